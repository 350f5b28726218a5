"""Retrieval quality of the shipped pipeline on 1,000 held-out real MNIST digits, with baselines.

    python bench/bench_quality.py [--store-version N] [--json]

Every number is computed in this run, for streamsim (through ``Index.search``: load → normalise →
encode → USearch) and for two baselines over the same held-out digits: raw pixels and
centre-of-mass-centred pixels (cosine, exact). Metrics:

- P@10: same-digit precision among the 10 nearest other held-out digits;
- near-dup top-1: a copy with clipped Gaussian noise and a random shift, searched against the
  1,000 originals — is its original the top hit? (σ 0.15 / ±2 px, and σ 0.3 / ±3 px)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from data import mnist_raw, perturb  # noqa: E402


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)


def baseline_scores(vecs, q15, q30, labels):
    z = _unit(vecs)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    p10 = float((labels[np.argsort(-s, axis=1)[:, :10]] == labels[:, None]).mean())
    nd = [float((np.argmax(_unit(q) @ z.T, axis=1) == np.arange(len(z))).mean()) for q in (q15, q30)]
    return {"p_at_10": p10, "neardup_top1_s015": nd[0], "neardup_top1_s030": nd[1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from streamsim import Index, images

    _, _, raw, labels = mnist_raw()
    p15 = perturb(raw, sigma=0.15, shift=2, seed=1)
    p30 = perturb(raw, sigma=0.3, shift=3, seed=2)
    results = {}
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    results["raw pixels"] = baseline_scores(flat(raw), flat(p15), flat(p30), labels)
    norm = lambda x: np.stack([images.normalise(i) for i in x])  # noqa: E731
    results["centred pixels"] = baseline_scores(flat(norm(raw)), flat(norm(p15)), flat(norm(p30)), labels)

    with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
        t0 = time.perf_counter()
        ids = np.asarray(index.add_many(raw))
        add_s = time.perf_counter() - t0
        pos = {int(i): n for n, i in enumerate(ids)}
        hits = index.search_many(raw, k=11)
        p10 = np.mean([
            np.mean([labels[pos[m.id]] == labels[n] for m in [h for h in row if h.id != ids[n]][:10]])
            for n, row in enumerate(hits)
        ])
        nd = []
        for q in (p15, p30):
            top = index.search_many(q, k=1)
            nd.append(float(np.mean([row[0].id == ids[n] for n, row in enumerate(top)])))
        dup = index.search_many(p15, k=1, mode="duplicate")
        dup_recall = float(np.mean([bool(row) and row[0].id == ids[n] for n, row in enumerate(dup)]))
        version = index.active_version
        results[f"streamsim v{version} ({index.meta(version)['arch']})"] = {
            "p_at_10": float(p10), "neardup_top1_s015": nd[0], "neardup_top1_s030": nd[1],
            "duplicate_mode_recall_s015": dup_recall,
        }
    out = {"machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores".strip(),
           "heldout": int(len(raw)), "results": results, "add_seconds": round(add_s, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"held-out real MNIST digits: {len(raw)}   machine: {out['machine']}")
    print("| method | P@10 clean | near-dup top-1 (σ 0.15, ±2 px) | near-dup top-1 (σ 0.3, ±3 px) |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['p_at_10']:.3f} | {r['neardup_top1_s015']:.3f} | {r['neardup_top1_s030']:.3f} |")
    for name, r in results.items():
        if "duplicate_mode_recall_s015" in r:
            print(f"duplicate mode recall on σ 0.15 / ±2 px copies ({name}): {r['duplicate_mode_recall_s015']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
