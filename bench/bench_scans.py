"""How long ``streamsim.images.normalise`` takes on big scans, clean and noisy, how close the
noisy scans come out to the clean one, and whether `duplicate` mode finds a noisy re-scan of a
stored page.

    python bench/bench_scans.py [--sizes 400,1500,3000] [--repeats 3] [--json]

Each scan is a printed glyph ("R", DejaVu Sans) on a page ``size`` px tall and two thirds as wide:
dark ink on grey paper, clean; with Gaussian paper noise (σ 0.08 and 0.2 of the full range); and
with 4 % salt-and-pepper specks. Reported per scan: the median wall time of ``repeats`` calls
(after one warm-up) and the mean absolute difference (grey levels) between its 28×28 pixels and
the clean scan's. A noisy scan is never 0 away — paper noise raises the measured contrast and the
noise floor, so its ink comes out fainter — but the difference should not change with the size.

Duplicates: for each size, a store of the clean pages of ten characters (``STORED``) — queried
with each page under each noise (is its page among the `duplicate` hits? is it `similar`'s top
hit?) — and six characters not stored (``UNSEEN``) under each noise: does `duplicate` mode return
anything for them (a false duplicate)?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
KINDS = ("clean", "noise 0.08", "noise 0.2", "specks 4 %")
STORED, UNSEEN = "ABDEGHKMPR", "CFNSUW"


def page(size: int, char: str = "R") -> np.ndarray:
    """Ink (float32 0..1, 1 = ink) of a character on a ``size`` × ``2 size / 3`` page."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = size, 2 * size // 3
    im = Image.new("L", (w, h), 0)
    font = ImageFont.truetype(FONT, h // 2) if os.path.exists(FONT) else ImageFont.load_default(h // 2)
    ImageDraw.Draw(im).text((w // 4, h // 6), char, fill=255, font=font)
    return np.asarray(im, np.float32) / 255


def scan(ink: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    paper = 0.86 - 0.7 * ink
    if kind.startswith("noise"):
        paper = paper + rng.normal(0, float(kind.split()[1]), ink.shape)
    elif kind.startswith("specks"):
        u = rng.random(ink.shape)
        paper = np.where(u < 0.02, 0.0, np.where(u > 0.98, 1.0, paper))
    return np.round(np.clip(paper, 0, 1) * 255).astype(np.uint8)


def run(sizes: list[int], repeats: int) -> list[dict]:
    from streamsim import images

    rows = []
    for size in sizes:
        ink = page(size)
        clean = images.normalise(scan(ink, "clean"))
        for kind in KINDS:
            img = scan(ink, kind)
            px = images.normalise(img)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                images.normalise(img)
                times.append(time.perf_counter() - t0)
            rows.append({"size": [int(img.shape[0]), int(img.shape[1])], "kind": kind,
                         "seconds": round(statistics.median(times), 4),
                         "mad_to_clean": round(float(np.abs(px.astype(np.int16) - clean).mean()), 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def duplicates(sizes: list[int]) -> list[dict]:
    import tempfile

    from streamsim import Index

    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
            ids = {ch: index.add(scan(page(size, ch), "clean")) for ch in STORED}
            for kind in KINDS[1:]:
                found = top = false = 0
                for n, ch in enumerate(STORED + UNSEEN):
                    q = scan(page(size, ch), kind, seed=n + 1)
                    dup = [m.id for m in index.search(q, k=3, mode="duplicate")]
                    if ch in ids:
                        found += ids[ch] in dup
                        top += index.search(q, k=1)[0].id == ids[ch]
                    else:
                        false += bool(dup)
                rows.append({"size": size, "kind": kind, "duplicate_recall": found / len(STORED),
                             "similar_top1": top / len(STORED), "false_duplicates": false / len(UNSEEN)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="400,1500,3000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = run(sizes, args.repeats)
    dups = duplicates(sizes)
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows, "duplicates": dups}, indent=2))
        return 0
    print(f"machine: {machine}\n\n| scan (px) | " + " | ".join(KINDS) + " |")
    print("| --- |" + " ---: |" * len(KINDS))
    for size in dict.fromkeys(tuple(r["size"]) for r in rows):
        cells = [next(r for r in rows if tuple(r["size"]) == size and r["kind"] == k) for k in KINDS]
        print(f"| {size[0]} × {size[1]} | " + " | ".join(f"{c['seconds']:.3f} s ({c['mad_to_clean']:.1f})" for c in cells) + " |")
    print(f"\n| page (px) | noise | `duplicate` finds the page ({len(STORED)}) | `similar` top hit | "
          f"false duplicates ({len(UNSEEN)} unseen) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in dups:
        print(f"| {r['size']} | {r['kind']} | {r['duplicate_recall']:.1f} | {r['similar_top1']:.1f} | {r['false_duplicates']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
