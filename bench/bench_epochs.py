"""How long to train: the shipped recipe (``checkpoints/build_default.py``) at several lengths,
batch sizes and widths, each scored by ``streamsim.evaluate`` on the 1,000 held-out MNIST digits.

    python bench/bench_epochs.py train --out DIR [--variants deform40,deform200,...]   # on an accelerator
    python bench/bench_epochs.py score DIR [--json]                                    # anywhere

``train`` saves each variant as a checkpoint folder ``DIR/NAME`` (calibrated like a shipped
version); ``score`` evaluates every checkpoint folder in DIR and prints a table. Training is the
slow half (200 epochs: about 70 s on one H200, about ten minutes on the 2-core CPU), so the two
halves can run on different machines. Results go to ``docs/ablation.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "checkpoints"))
sys.path.insert(0, str(ROOT / "bench"))

# name: (hidden width, epochs, batch size, corruption overrides[, other training overrides]);
# everything else is the shipped recipe
VARIANTS = {
    "deform40": (256, 40, 256, {}),
    "deform200": (256, 200, 256, {}),
    "deform400": (256, 400, 256, {}),
    "deform600": (256, 600, 256, {}),
    "wide200": (512, 200, 256, {}),
    "b1024e400": (256, 400, 1024, {}),
    # 200 epochs with more deformation: elastic 4 px in 80 % of batches; or a more local field (7 × 7 grid)
    "more200": (256, 200, 256, {"elastic": 4.0, "p_elastic": 0.8}),
    "local200": (256, 200, 256, {"elastic_grid": 7, "elastic": 2.5}),
    # 200 epochs, the weights averaged over the steps (decay 0.999 per step: about the last 20 epochs)
    "ema200": (256, 200, 256, {}, {"ema": 0.999}),
}


def train(out: Path, names: list[str]) -> None:
    from build_default import recipe_config, training_data

    from streamsim import encoders
    from streamsim import train as T
    from streamsim.versions import build_meta, reference_sample
    from streamsim.model import DEFAULT_CONFIGS, Encoder, build

    pixels, digits, views = training_data(views=4)
    for name in names:
        hidden, epochs, batch, corruptions, *extra = VARIANTS[name]
        config = {**DEFAULT_CONFIGS["mlp"], "hidden": hidden}
        cfg = dataclasses.replace(recipe_config(epochs=epochs, batch_size=batch, corruptions=corruptions), **(extra or [{}])[0])
        t0 = time.perf_counter()
        model, hist = T.fit(build("mlp", config, seed=0), pixels, cfg, views=views)
        secs = time.perf_counter() - t0
        meta = build_meta(Encoder(model), "mlp", config, pixels, hist, cfg, parent=None, version=1, reason="shipped",
                          seed=0, calibration=digits)
        meta["training"]["seconds"] = round(secs, 1)
        encoders.save(model, out / name, meta, reference=reference_sample(pixels, seed=0))
        print(name, f"trained in {secs:.1f} s", flush=True)


def score(folder: Path) -> dict:
    from data import mnist_raw

    from streamsim import encoders, evaluate

    _, _, held, labels = mnist_raw()
    rows = {}
    for ck in sorted(p for p in folder.iterdir() if (p / "meta.json").exists()):
        meta = encoders.read_meta(ck)
        rep = evaluate.evaluate(held, labels, queries=1000, checkpoint=ck, parallel=True)
        s = rep["methods"]["streamsim"]
        r = s["retrieval"]
        p10 = {c: r[c]["p_at_10"] for c in r}
        rows[ck.name] = {
            "hidden": meta["config"]["hidden"], "epochs": meta["training"]["epochs"], "batch": meta["train"]["batch_size"],
            "train_seconds": meta["training"].get("seconds"), "p_at_10": p10, "map": r["clean"]["map"],
            "gap": p10["clean"] - min(p10[c] for c in evaluate.PERTURBATIONS),
            "neardup_top1": s["neardup_top1"], "duplicate_recall": s["duplicate_mode"]["recall"],
            "false_duplicate_rate": s["duplicate_mode"]["false_duplicate_rate"],
            "recall_mode_recall_at_100": s["recall_mode"]["recall_at_100"],
        }
        print(ck.name, json.dumps(rows[ck.name]), file=sys.stderr, flush=True)
    return rows


def markdown(rows: dict) -> str:
    from streamsim.evaluate import PERTURBATIONS

    head = ("| variant | hidden | epochs | batch | P@10 clean | " + " | ".join(PERTURBATIONS)
            + " | gap | mAP@100 | near-dup top-1 | dup recall | false dup | recall mode R@100 |")
    lines = [head, "| --- " + "| ---: " * (len(PERTURBATIONS) + 10) + "|"]
    order = [n for n in VARIANTS if n in rows] + sorted(n for n in rows if n not in VARIANTS)
    for name, r in ((n, rows[n]) for n in order):
        p = r["p_at_10"]
        lines.append(f"| {name} | {r['hidden']} | {r['epochs']} | {r['batch']} | {p['clean']:.3f} | "
                     + " | ".join(f"{p[c]:.3f}" for c in PERTURBATIONS)
                     + f" | {r['gap']:.4f} | {r['map']:.3f} | {r['neardup_top1']:.3f} | {r['duplicate_recall']:.3f} "
                     f"| {r['false_duplicate_rate']:.3f} | {r['recall_mode_recall_at_100']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--variants", default=",".join(VARIANTS))
    s = sub.add_parser("score")
    s.add_argument("folder", type=Path)
    s.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "train":
        train(args.out, args.variants.split(","))
        return 0
    rows = score(args.folder)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
