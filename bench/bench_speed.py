"""Speed of the shipped pipeline on this machine (CPU unless JAX sees an accelerator).

    python bench/bench_speed.py [--stored 100000] [--files 10000] [--json] [--skip-cli]

Reports: batched and one-at-a-time encode (images/s); ``Index.search`` of one in-memory image with
N stored (p50/p95 ms, wall clock and the process's CPU time), for clean queries and for lightly noisy ones (Gaussian σ 0.1 on the ink
scale, ``noisy_*`` keys), and recall@10 of the vector index against exact search over the same
vectors for both; ``Index.search_many`` of all the queries at once (queries/s); ``streamsim
search``, ``status``, ``versions`` and ``events`` from a cold start (s, median of 3); ``streamsim
add`` of a folder of PNGs (files/s). Only public names are used, so the same script measures an
earlier release installed in another environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from data import mnist_raw  # noqa: E402


def distinct_digits(n: int, seed: int = 0) -> np.ndarray:
    """n distinct uint8 digit images: the 5,000 real digits, each copy deformed differently
    (shift, rotation, scale, elastic, stroke width; no noise), like more writers' handwriting."""
    import jax

    from streamsim.train import Corruptions, corrupt

    tr, _, te, _ = mnist_raw()
    base = np.concatenate([tr, te])
    rng = np.random.default_rng(seed)
    pick = base[rng.integers(0, len(base), n)].astype(np.float32) / 255.0
    c = Corruptions(p_noise=0.0, p_salt_pepper=0.0, p_affine=1.0, p_elastic=0.7, p_stroke=0.5)
    out = [np.asarray(corrupt(jax.random.key(seed * 1000 + i), pick[s : s + 8192], c))
           for i, s in enumerate(range(0, n, 8192))]
    return np.round(np.concatenate(out) * 255).astype(np.uint8)


def noisy_copies(raw: np.ndarray, sigma: float = 0.1, seed: int = 1) -> np.ndarray:
    """The images under light Gaussian noise (σ on the 0..1 ink scale), clipped: paper grain."""
    rng = np.random.default_rng(seed)
    return np.round(np.clip(raw / 255.0 + sigma * rng.standard_normal(raw.shape), 0, 1) * 255).astype(np.uint8)


def recall(vectors, allkeys, allvecs, codes) -> tuple[float, float]:
    """recall@10 of the vector index against exact search over the same vectors, and the same
    counting a hit as close as the exact 10th neighbour as correct (ties)."""
    got, _ = vectors.search(codes, 10)
    u = allvecs / np.linalg.norm(allvecs, axis=1, keepdims=True)
    qu = codes / np.linalg.norm(codes, axis=1, keepdims=True)
    sims = qu @ u.T
    order = np.argsort(-sims, axis=1)[:, :10]
    exact = allkeys[order]
    plain = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]))
    kth = 1.0 - sims[np.arange(len(sims)), order[:, -1]]
    pos = {int(key): i for i, key in enumerate(allkeys)}
    got_d = np.array([[1.0 - sims[r, pos[int(key)]] if key >= 0 else np.inf for key in row] for r, row in enumerate(got)])
    return plain, float(np.mean(got_d <= kth[:, None] + 1e-6))


def bench_encode(enc, pixels):
    enc(pixels[:4096])
    t = time.perf_counter()
    enc(pixels)
    batched = len(pixels) / (time.perf_counter() - t)
    enc(pixels[0])
    n = 5000
    t = time.perf_counter()
    for i in range(n):
        enc(pixels[i])
    single = n / (time.perf_counter() - t)
    return batched, single


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stored", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args(argv)

    import jax

    from streamsim import Index, images

    out = {"machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"}
    raw = distinct_digits(args.stored)
    pixels = np.stack([images.normalise(x) for x in raw[: min(len(raw), 100_000)]])
    tmp = Path(tempfile.mkdtemp(prefix="streamsim-bench-"))
    try:
        with Index.open(tmp / "store") as index:
            enc = index.encoder()
            out["encoder"] = type(enc).__name__
            big = np.tile(pixels, (max(1, 200_000 // len(pixels)), 1, 1))
            out["encode_batched_per_s"], out["encode_single_per_s"] = bench_encode(enc, big)

            t = time.perf_counter()
            for s in range(0, len(raw), 10_000):
                index.add_many(raw[s : s + 10_000])
            index.flush()
            out["add_many_per_s"] = len(raw) / (time.perf_counter() - t)
            out["stored"] = len(index)

            queries = distinct_digits(500, seed=99)
            noisy = noisy_copies(queries)
            vectors = index.vectors(index.active_version)
            allkeys = vectors.keys().astype(np.int64)
            allvecs = vectors.get(allkeys)
            for prefix, qs in (("", queries), ("noisy_", noisy)):
                index.search(qs[0])
                lat, cpu = [], []
                for q in qs:
                    t, c = time.perf_counter(), time.process_time()
                    index.search(q, k=10)
                    lat.append((time.perf_counter() - t) * 1000)
                    cpu.append((time.process_time() - c) * 1000)
                out[f"{prefix}search_p50_ms"] = float(np.percentile(lat, 50))
                out[f"{prefix}search_p95_ms"] = float(np.percentile(lat, 95))
                # the process's own CPU time per search: what other work on the machine disturbs far less
                out[f"{prefix}search_cpu_p50_ms"] = float(np.percentile(cpu, 50))
                out[f"{prefix}search_cpu_p95_ms"] = float(np.percentile(cpu, 95))
                t = time.perf_counter()
                index.search_many(qs, k=10)
                out[f"{prefix}search_many_per_s"] = len(qs) / (time.perf_counter() - t)
                codes = enc(np.stack([images.normalise(q) for q in qs]))
                out[f"{prefix}recall_at_10"], out[f"{prefix}recall_at_10_ties"] = recall(vectors, allkeys, allvecs, codes)

        if not args.skip_cli:
            exe = str(Path(sys.executable).parent / "streamsim")
            folder = tmp / "files"
            folder.mkdir()
            from PIL import Image

            for i, a in enumerate(distinct_digits(args.files, seed=5)):
                Image.fromarray(a).save(folder / f"f{i:05d}.png")
            env = {**os.environ}
            t = time.perf_counter()
            subprocess.run([exe, "add", str(folder), "--store", str(tmp / "cli"), "--json"], check=True, env=env, capture_output=True)
            out["cli_add_files_per_s"] = args.files / (time.perf_counter() - t)
            q = folder / "f00042.png"
            for key, command in (("cli_search_cold_s", ["search", str(q)]), ("cli_status_s", ["status"]),
                                 ("cli_versions_s", ["versions"]), ("cli_events_s", ["events"])):
                cold = []
                for _ in range(3):
                    t = time.perf_counter()
                    subprocess.run([exe, *command, "--store", str(tmp / "cli"), "--json"], check=True, env=env, capture_output=True)
                    cold.append(time.perf_counter() - t)
                out[key] = float(np.median(cold))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:24s} {v:,.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
