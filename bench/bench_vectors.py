"""Benchmark streamsim.vectors: build time, single-query latency and recall@10 vs exact search.

    python bench/bench_vectors.py [--n 100000] [--dim 64] [--spread 1.0] [--queries 1000]

Data: a mixture of ~50 gaussian clusters passed through ReLU (non-negative, clustered — the shape of
our encoder's codes).  The index is grown by streaming adds; at each size (10k, 50k, 100k, capped
by --n) it reports the cumulative build time, the atomic save time, single-query search latency
(one query per call, as the CLI and the facade search) for the path the library picks at that
size and for forced exact search, and recall@10 against numpy brute-force cosine.  Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamsim.vectors as vectors_mod  # noqa: E402
from streamsim.vectors import Vectors  # noqa: E402


def clustered(n: int, dim: int, rng: np.random.Generator, n_clusters: int, spread: float) -> np.ndarray:
    centers = rng.normal(0.0, 1.0, (n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    x = centers[labels] + spread * rng.normal(0.0, 1.0, (n, dim))
    return np.maximum(x, 0.0).astype(np.float32)


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    dn = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        sims = qn[s : s + chunk] @ dn.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[s : s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def latencies(v: Vectors, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search one query per call; returns (per-call seconds, keys [Q, k])."""
    times = np.empty(len(queries))
    found = np.empty((len(queries), k), dtype=np.int64)
    for i, q in enumerate(queries):
        t = time.perf_counter()
        keys, _ = v.search(q, k)
        times[i] = time.perf_counter() - t
        found[i] = keys[0]
    return times, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="largest index size (default 100000)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--spread", type=float, default=1.0, help="within-cluster std (centres are N(0,1))")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1000, help="vectors per add() call while building")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sizes = sorted({s for s in (10_000, 50_000, 100_000) if s < args.n} | {args.n})
    rng = np.random.default_rng(args.seed)
    data = clustered(args.n + args.queries, args.dim, rng, args.clusters, args.spread)
    stored, queries = data[: args.n], data[args.n :]
    keys = rng.permutation(10 * args.n)[: args.n].astype(np.int64)  # ids unrelated to rows

    print(
        f"# streamsim.vectors — dim {args.dim}, {args.clusters} ReLU gaussian clusters (spread {args.spread}), "
        f"{args.queries} single queries, k={args.k}, {os.cpu_count()} CPUs\n"
        f"# EXACT_SEARCH_MAX={vectors_mod.EXACT_SEARCH_MAX} CONNECTIVITY={vectors_mod.CONNECTIVITY} "
        f"EXPANSION_ADD={vectors_mod.EXPANSION_ADD} EXPANSION_SEARCH={vectors_mod.EXPANSION_SEARCH}\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        v = Vectors.open(Path(tmp) / "bench.usearch", args.dim)
        built, build_s = 0, 0.0
        for n in sizes:
            t = time.perf_counter()
            for s in range(built, n, args.batch):
                e = min(n, s + args.batch)
                v.add(keys[s:e], stored[s:e])
            build_s += time.perf_counter() - t
            built = n
            t = time.perf_counter()
            v.save()
            save_s = time.perf_counter() - t

            truth = keys[:n][exact_topk(stored[:n], queries, args.k)]
            lat, found = latencies(v, queries, args.k)
            recall = np.mean([len(set(found[i]) & set(truth[i])) / args.k for i in range(len(queries))])
            path = "exact" if n <= vectors_mod.EXACT_SEARCH_MAX else "hnsw"
            saved = vectors_mod.EXACT_SEARCH_MAX
            vectors_mod.EXACT_SEARCH_MAX = 10**12
            try:
                lat_exact, _ = latencies(v, queries[:200], args.k)
            finally:
                vectors_mod.EXACT_SEARCH_MAX = saved
            rows.append(
                (n, path, build_s, save_s, np.percentile(lat, 50) * 1e3, np.percentile(lat, 95) * 1e3,
                 recall, np.percentile(lat_exact, 50) * 1e3)
            )
            print(f"  done N={n}", file=sys.stderr, flush=True)

    print("| N | path | build s | save s | search p50 ms | search p95 ms | recall@10 | exact p50 ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, path, b, s, p50, p95, r, ex in rows:
        print(f"| {n:,} | {path} | {b:.1f} | {s:.2f} | {p50:.3f} | {p95:.3f} | {r:.4f} | {ex:.3f} |")


if __name__ == "__main__":
    main()
