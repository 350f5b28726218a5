"""The Ray engine against the local one, on one machine: same answers, and what the cluster costs.

    python bench/bench_scale.py [--images 100000] [--files 10000] [--queries 1000] [--workers 2] [--json]

Needs ``pip install '.[ray]'`` (or ``'.[test]'``). Reports, on a store of ``--images`` distinct
deformed MNIST digits:

- what a reindex is made of: the catalog's pixel reads, encoding, and the HNSW build (images/s);
- ``reindex`` of the active version, local and on a local Ray cluster of ``--workers`` workers:
  seconds and images/s each, the Ray overhead (seconds over local), and the cluster's start-up
  apart (``ray.init`` and the actors loading their encoder are paid once per command);
- the largest difference between the Ray-built and the local vectors, and the top-10 agreement of
  ``Index.search`` between the two indexes (``--queries`` held-out digits; must be >= 0.99);
- ``add`` of ``--files`` PNG files, local and on Ray (files/s), and that both stores hold the same
  images (by digest) with the same vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray  # noqa: F401  -- Ray loads before usearch (streamsim.engines)

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import distinct_digits  # noqa: E402

AGREEMENT_FLOOR = 0.99


def top10(index, queries) -> list[list[int]]:
    return [[m.id for m in ms] for ms in index.search_many(queries, k=10)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean share of one list's top 10 found in the other's."""
    return float(np.mean([len(set(x) & set(y)) / max(1, len(x)) for x, y in zip(a, b)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import jax
    from PIL import Image

    from streamsim import engines
    from streamsim.index import Index
    from streamsim.vectors import Vectors

    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on "
                            f"{jax.devices()[0].platform}, ray {ray.__version__}",
                 "images": args.images, "files": args.files, "workers": args.workers}
    tmp = Path(tempfile.mkdtemp(prefix="streamsim-bench-scale-"))
    try:
        raw = distinct_digits(args.images)
        queries = distinct_digits(args.queries, seed=99)
        with Index.open(tmp / "store") as index:
            t = time.perf_counter()
            for s in range(0, len(raw), 10_000):
                index.add_many(raw[s : s + 10_000])
            index.flush()
            out["fill_seconds"] = round(time.perf_counter() - t, 1)
            ids = index.catalog.ids()

            local = index.reindex()
            local_vectors = index.vectors().get(ids).copy()
            # the parts of a reindex that stay with the driver, apart: reading the catalog's
            # pixels, and building the HNSW index from codes
            t = time.perf_counter()
            for _ in index.catalog.iter_pixels():
                pass
            out["catalog_read_per_s"] = round(len(ids) / (time.perf_counter() - t))
            t = time.perf_counter()
            Vectors(tmp / "build-only.usearch", local_vectors.shape[1]).add(ids, local_vectors)
            out["index_build_per_s"] = round(len(ids) / (time.perf_counter() - t))
            sample = index.catalog.pixels(ids[:20_000])
            index.encoder()(sample[:4096])  # compiled
            t = time.perf_counter()
            index.encoder()(sample)
            out["encode_per_s"] = round(len(sample) / (time.perf_counter() - t))
            local_top = top10(index, queries)

            t = time.perf_counter()
            engine = engines.RayEngine(workers=args.workers)
            engine.worker_pids()  # the actors are up
            out["ray_start_seconds"] = round(time.perf_counter() - t, 2)
            try:
                remote = index.reindex(engine=engine)
                out["ray_second_reindex_seconds"] = index.reindex(engine=engine)["seconds"]  # encoders loaded
            finally:
                engine.close()
            ray_vectors = index.vectors().get(ids)
            ray_top = top10(index, queries)

        out["reindex_local_seconds"] = local["seconds"]
        out["reindex_ray_seconds"] = remote["seconds"]
        out["reindex_local_per_s"] = round(len(ids) / local["seconds"])
        out["reindex_ray_per_s"] = round(len(ids) / remote["seconds"])
        out["ray_overhead_seconds"] = round(remote["seconds"] - local["seconds"], 2)
        out["max_vector_difference"] = float(np.abs(ray_vectors - local_vectors).max())
        out["top10_agreement"] = round(agreement(local_top, ray_top), 4)

        folder = tmp / "files"
        folder.mkdir()
        for i, a in enumerate(distinct_digits(args.files, seed=5)):
            Image.fromarray(a).save(folder / f"f{i:05d}.png")
        stores = {}
        for name in ("local", "ray"):
            started = engines.RayEngine(workers=args.workers) if name == "ray" else engines.LocalEngine()
            with started as engine, Index.open(tmp / f"add-{name}") as index:
                if name == "ray":
                    engine.worker_pids()  # start-up apart, as for reindex
                t = time.perf_counter()
                report = index.add_files([folder], engine=engine)
                seconds = time.perf_counter() - t
                out[f"add_{name}_files_per_s"] = round(args.files / seconds)
                out[f"add_{name}_added"] = len(report.added)
                got = index.catalog.ids()
                stores[name] = ([index.get(i)["digest"] for i in got], index.vectors().get(got).copy())
        out["add_same_images"] = stores["local"][0] == stores["ray"][0]
        out["add_max_vector_difference"] = float(np.abs(stores["local"][1] - stores["ray"][1]).max())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ok = (out["top10_agreement"] >= AGREEMENT_FLOOR and out["max_vector_difference"] <= 1e-5
          and out["add_same_images"] and out["add_max_vector_difference"] <= 1e-5)
    out["ok"] = bool(ok)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:>28}: {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
