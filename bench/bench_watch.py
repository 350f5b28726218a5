"""`streamsim watch` under load, with a real watcher process and a real producer process.

    python bench/bench_watch.py [--bulk 2000] [--drops 40] [--soak 100000] [--retrain] [--json]

The watcher runs with ``--no-retrain`` unless ``--retrain`` is given: the files are deformed
digits (several writers' styles), which the drift detectors rightly flag, and the fine-tune that
follows would share the two cores with the ingest being measured.

1. bulk: a producer process moves N ready-made 28×28 PNGs into the watched folder at once; we time
   from its first move until every image is stored (checked from this, a third, process). Then the
   same files only read and decoded (``images.load`` in worker processes, as the watcher's decoder
   does, nothing stored) in this process: the bulk rate as a fraction of decode-only.
2. latency: single files renamed into an idle watcher's folder, one at a time; the time until a
   search from this process finds each one (p50 / p95).
3. soak: N files dropped over time in bursts of 500; the watcher's RSS sampled throughout (and its
   growth per stored image over the second half, a least-squares slope); at the end every file must
   be stored exactly once.
4. stream: the bulk drop's images, already in memory as arrays, fed to a fresh store through
   ``Index.stream()`` (drift detection on, adaptation off, as the watcher above) in batches of 50;
   files/s against the watcher's bulk rate.
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
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

EXE = str(Path(sys.executable).parent / "streamsim")


def make_pngs(folder: Path, n: int, seed: int, prefix: str) -> list[Path]:
    from bench_speed import distinct_digits
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(distinct_digits(n, seed=seed)):
        p = folder / f"{prefix}{i:06d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


_catalogs: dict = {}


def count_images(store: Path) -> int:
    """Images the store's catalog has acknowledged, read through one read-only connection."""
    from streamsim.catalog import Catalog

    if store not in _catalogs:
        _catalogs[store] = Catalog.of_store(store)
    return _catalogs[store].count_images()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bulk", type=int, default=2000)
    ap.add_argument("--drops", type=int, default=40)
    ap.add_argument("--soak", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--retrain", action="store_true",
                    help="Leave the drift reaction on (the deformed digits used here set it off: a fine-tune then shares the CPU).")
    args = ap.parse_args(argv)

    from streamsim import Index, images
    from streamsim.workers import Decoder

    tmp = Path(tempfile.mkdtemp(prefix="streamsim-watch-bench-"))
    inbox, staging, store = tmp / "inbox", tmp / "staging", tmp / "store"
    inbox.mkdir()
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores"}
    extra = [] if args.retrain else ["--no-retrain"]
    watcher = subprocess.Popen([EXE, "watch", str(inbox), "--store", str(store), "--json", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events: list[dict] = []
    threading.Thread(target=lambda: [events.append(json.loads(x)) for x in watcher.stdout], daemon=True).start()
    try:
        while not any(e["event"] == "watching" for e in events):
            time.sleep(0.05)

        # 1. bulk drop
        bulk = make_pngs(staging / "bulk", args.bulk, seed=11, prefix="b")
        bulk_px = images.load(bulk[-1]).pixels
        mover = ("import os, sys, time; src, dst = sys.argv[1], sys.argv[2]; print(time.time(), flush=True)\n"
                 "for n in sorted(os.listdir(src)): os.rename(os.path.join(src, n), os.path.join(dst, n))")
        prod = subprocess.run([sys.executable, "-c", mover, str(staging / "bulk"), str(inbox)], capture_output=True, text=True, check=True)
        t0 = float(prod.stdout.split()[0])
        while count_images(store) < args.bulk:
            time.sleep(0.02)
        t_all = time.time()
        with Index.open(store, create=False) as reader:  # and searchable from this process
            assert reader.search(bulk_px, k=1)[0].path == str(inbox / bulk[-1].name)
        out["bulk_searchable_seconds"] = time.time() - t0
        out["bulk_files"] = args.bulk
        out["bulk_seconds"] = t_all - t0
        out["bulk_files_per_s"] = args.bulk / (t_all - t0)
        with Decoder(processes=True) as decoder:  # its workers started (and warmed) before the clock
            list(decoder.load([str(inbox / p.name) for p in bulk[:64]]))
            t = time.perf_counter()
            decoded = list(decoder.load([str(inbox / p.name) for p in bulk]))
            seconds = time.perf_counter() - t
        assert all(isinstance(r, images.Loaded) for _, r in decoded)
        out["decode_only_files_per_s"] = args.bulk / seconds
        out["bulk_vs_decode_only"] = out["bulk_files_per_s"] / out["decode_only_files_per_s"]

        # 2. single-file latency, searched from this process
        singles = make_pngs(staging / "single", args.drops, seed=12, prefix="s")
        lat = []
        with Index.open(store, create=False) as reader:
            for p in singles:
                px = images.load(p).pixels
                dest = inbox / p.name
                t = time.time()
                os.rename(p, dest)
                while True:
                    hit = reader.search_pixels(px[None], 1)[0]
                    if hit and hit[0].path == str(dest):
                        break
                    time.sleep(0.005)
                lat.append(time.time() - t)
                time.sleep(0.3)
        out["single_latency_p50_s"] = float(np.percentile(lat, 50))
        out["single_latency_p95_s"] = float(np.percentile(lat, 95))

        # 3. soak
        if args.soak:
            base = count_images(store)
            soak_dir = staging / "soak"
            made = make_pngs(soak_dir, args.soak, seed=13, prefix="k")
            samples = []
            t_start = time.time()
            for start in range(0, len(made), 500):
                for p in made[start : start + 500]:
                    os.rename(p, inbox / p.name)
                samples.append((time.time() - t_start, count_images(store) - base, rss_kb(watcher.pid)))
                time.sleep(0.5)
            deadline = time.time() + 600
            while count_images(store) - base < args.soak and time.time() < deadline:
                samples.append((time.time() - t_start, count_images(store) - base, rss_kb(watcher.pid)))
                time.sleep(1.0)
            out["soak_files"] = args.soak
            out["soak_stored"] = count_images(store) - base
            out["soak_seconds"] = time.time() - t_start
            rss = [s[2] for s in samples]
            q = len(rss) // 4
            out["soak_rss_mb_first_quarter_max"] = max(rss[: max(q, 1)]) / 1024
            out["soak_rss_mb_last_quarter_max"] = max(rss[-max(q, 1):]) / 1024
            half = [x for x in samples if x[1] >= args.soak // 2]  # after the start-up, per stored image
            if len(half) > 2:
                out["soak_rss_kb_per_image"] = float(np.polyfit([x[1] for x in half], [x[2] for x in half], 1)[0])
            out["soak_rss_mb_samples"] = [[round(t, 1), n, round(r / 1024, 1)] for t, n, r in samples[:: max(1, len(samples) // 12)]]
        watcher.terminate()
        out["sigterm_exit_code"] = watcher.wait(timeout=30)
        counts = {k: sum(e["event"] == k for e in events) for k in ("stored", "duplicate", "failed", "drift", "retraining", "activated", "rejected")}
        out["events"] = counts

        # 4. the same images, in memory, through Index.stream() in batches of 50
        arrays = [images.load(inbox / p.name).pixels for p in bulk]
        with Index.open(tmp / "stream-store") as index:
            index.search(arrays[0], k=1)  # the encoder loaded and compiled, as in the running watcher
            with index.stream(adapt=False) as stream:
                t = time.perf_counter()
                fed = [e for start in range(0, len(arrays), 50) for e in stream.feed(arrays[start : start + 50])]
                index.flush()
                seconds = time.perf_counter() - t
        out["stream_images"] = sum(e["event"] in ("stored", "duplicate") for e in fed)
        out["stream_seconds"] = seconds
        out["stream_images_per_s"] = len(arrays) / seconds
        out["stream_vs_watcher_bulk"] = out["stream_images_per_s"] / out["bulk_files_per_s"]
    finally:
        if watcher.poll() is None:
            watcher.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2) if args.json else "\n".join(f"{k:32s} {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
