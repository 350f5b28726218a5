"""Searches through ``streamsim serve``'s HTTP API, with N images stored.

    python bench/bench_serve.py [--stored 100000] [--searches 200] [--threads 8] [--json]

Builds a store of N distinct digits (``bench_speed.distinct_digits``), starts ``streamsim serve
--port 0`` on it in its own process, and uploads PNG queries to ``POST /api/search?k=10``: first one
at a time (latency of one client), then ``--searches`` from ``--threads`` threads at once (every
one must be answered with 10 matches; the latency each client sees includes the wait for the
others, since searches on one store run one at a time). Also times ``GET /api/status`` and the
first and the cached ``GET /api/duplicates`` (``dedup`` over the whole store, then a page of it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import distinct_digits  # noqa: E402


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def search(url: str, data: bytes) -> tuple[float, int]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n\r\n".encode()
            + data + f"\r\n--{boundary}--\r\n".encode())
    req = urllib.request.Request(url + "/api/search?k=10", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        n = len(json.load(r))
    return (time.perf_counter() - t) * 1000, n


def timed_get(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=3600) as r:
        r.read()
    return (time.perf_counter() - t) * 1000


def pct(lat) -> dict:
    return {"p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stored", type=int, default=100_000)
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--no-dedup", action="store_true", help="Skip timing /api/duplicates (dedup of the whole store).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from streamsim import Index

    out = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "stored": args.stored}
    tmp = Path(tempfile.mkdtemp(prefix="streamsim-bench-serve-"))
    proc = None
    try:
        raw = distinct_digits(args.stored)
        with Index.open(tmp / "store") as index:
            for s in range(0, len(raw), 10_000):
                index.add_many(raw[s : s + 10_000])
        exe = str(Path(sys.executable).parent / "streamsim")
        proc = subprocess.Popen([exe, "serve", "--store", str(tmp / "store"), "--port", "0"], stdout=subprocess.PIPE, text=True)
        url = proc.stdout.readline().split(" on ")[1].strip().rstrip("/")
        queries = [png(q) for q in distinct_digits(args.searches, seed=99)]
        search(url, queries[0])  # warm: the encoder compiled, the vectors loaded
        one = [search(url, q) for q in queries]
        out["one_client"] = pct([t for t, _ in one])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            many = list(pool.map(lambda q: search(url, q), queries))
        wall = time.perf_counter() - t0
        out[f"{args.threads}_threads"] = pct([t for t, _ in many]) | {
            "answered": sum(n == 10 for _, n in many), "of": len(queries), "searches_per_s": round(len(queries) / wall, 1)}
        out["status_ms"] = round(float(np.median([timed_get(url + "/api/status") for _ in range(20)])), 2)
        if not args.no_dedup:
            out["duplicates_first_s"] = round(timed_get(url + "/api/duplicates?page=1&size=20") / 1000, 1)
            out["duplicates_cached_ms"] = round(float(np.median([timed_get(url + f"/api/duplicates?page={p}&size=20")
                                                                 for p in range(2, 12)])), 2)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
