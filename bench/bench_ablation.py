"""Encoder ablation: architectures and training terms, each trained on the shipped recipe's data
and scored by ``streamsim.evaluate`` on the 1,000 held-out MNIST digits.

    python bench/bench_ablation.py [--epochs 20] [--variants mlp-recon,mlp-contrastive,...] [--json]

Every variant is trained from scratch with the same seed, data and epochs; only the named
difference changes. Results go to ``docs/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "checkpoints"))
sys.path.insert(0, str(ROOT / "bench"))

# name: (arch, config overrides, train config overrides, views per image)
VARIANTS = {
    "dense-recon": ("dense", {}, {"invariance": 0.0}, 0),
    "mlp-recon": ("mlp", {}, {"invariance": 0.0}, 0),
    "mlp-invariance": ("mlp", {}, {"invariance": 0.3}, 0),
    "mlp-contrastive": ("mlp", {}, {"contrastive": 1.0}, 0),
    "mlp-contrastive-views": ("mlp", {}, {"contrastive": 1.0}, 4),
    "dense-contrastive-views": ("dense", {}, {"contrastive": 1.0}, 4),
    "conv-contrastive-views": ("conv", {}, {"contrastive": 1.0}, 4),
    # the shipped recipe with twice the elastic deformation, twice as often, and more stroke changes
    "mlp-contrastive-views-deform": ("mlp", {}, {"contrastive": 1.0,
                                                 "corruptions": {"elastic": 3.0, "p_elastic": 0.6, "p_stroke": 0.5}}, 4),
    "mlp-contrastive-views-deform-more": ("mlp", {}, {"contrastive": 1.0,
                                                      "corruptions": {"elastic": 4.0, "p_elastic": 0.8, "p_stroke": 0.5}}, 4),
    # *deform* with a more local displacement field (drawn on a 7 × 7 or 10 × 10 grid instead of 4 × 4)
    "mlp-contrastive-views-local": ("mlp", {}, {"contrastive": 1.0, "corruptions": {
        "elastic": 1.5, "elastic_grid": 7, "p_elastic": 0.6, "p_stroke": 0.5}}, 4),
    "mlp-contrastive-views-local-strong": ("mlp", {}, {"contrastive": 1.0, "corruptions": {
        "elastic": 2.5, "elastic_grid": 7, "p_elastic": 0.6, "p_stroke": 0.5}}, 4),
    "mlp-contrastive-views-local-fine": ("mlp", {}, {"contrastive": 1.0, "corruptions": {
        "elastic": 1.5, "elastic_grid": 10, "p_elastic": 0.6, "p_stroke": 0.5}}, 4),
    # *deform* with a softer NT-Xent (other images of the batch, many of them the same character,
    # pushed away less hard)
    "mlp-contrastive-views-deform-t0.2": ("mlp", {}, {"contrastive": 1.0, "temperature": 0.2, "corruptions": {
        "elastic": 3.0, "p_elastic": 0.6, "p_stroke": 0.5}}, 4),
    "mlp-contrastive-views-deform-t0.3": ("mlp", {}, {"contrastive": 1.0, "temperature": 0.3, "corruptions": {
        "elastic": 3.0, "p_elastic": 0.6, "p_stroke": 0.5}}, 4),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from build_default import training_data
    from data import mnist_raw

    from streamsim import encoders, evaluate
    from streamsim import train as T
    from streamsim.versions import build_meta
    from streamsim.model import DEFAULT_CONFIGS, Encoder, build

    pixels, digits, views_all = training_data(views=4)
    _, _, held, held_labels = mnist_raw()
    rows = {}
    for name in args.variants.split(","):
        arch, conf, tconf, n_views = VARIANTS[name]
        config = {**DEFAULT_CONFIGS[arch], **conf}
        tconf = dict(tconf)
        corruptions = T.Corruptions(shift=3.0, **tconf.pop("corruptions", {}))
        cfg = T.TrainConfig(epochs=args.epochs, batch_size=256, seed=0, corruptions=corruptions, **tconf)
        t0 = time.perf_counter()
        model, hist = T.fit(build(arch, config, seed=0), pixels, cfg, views=views_all[:, :n_views] if n_views else None)
        secs = time.perf_counter() - t0
        enc = Encoder(model)
        probe = pixels[:8192]
        enc(probe)
        t1 = time.perf_counter()
        enc(probe)
        speed = len(probe) / (time.perf_counter() - t1)
        meta = build_meta(enc, arch, config, pixels, hist, cfg, parent=None, version=1, reason="ablation",
                          seed=0, calibration=digits)
        with tempfile.TemporaryDirectory() as d:
            encoders.save(model, Path(d) / "v", meta)
            rep = evaluate.evaluate(held, held_labels, queries=args.queries, checkpoint=Path(d) / "v")
        s = rep["methods"]["streamsim"]
        r = s["retrieval"]
        rows[name] = {
            "train_seconds": round(secs, 1), "encode_per_s": round(speed), "p_at_10": r["clean"]["p_at_10"], "map": r["clean"]["map"],
            "worst_perturbed_p_at_10": min(r[c]["p_at_10"] for c in evaluate.PERTURBATIONS),
            "p_at_10_by_condition": {c: r[c]["p_at_10"] for c in r},
            "neardup_top1": s["neardup_top1"], **{f"duplicate_{k}": v for k, v in s["duplicate_mode"].items()},
            "centred_p_at_10": rep["methods"]["centred_pixels"]["retrieval"]["clean"]["p_at_10"],
        }
        print(name, json.dumps(rows[name]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| variant | train s | encode img/s | P@10 clean | mAP@100 | worst perturbed P@10 | near-dup top-1 | dup recall | false dup "
          "| false dup, noisy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['train_seconds']} | {r['encode_per_s']:,} | {r['p_at_10']:.3f} | {r['map']:.3f} | {r['worst_perturbed_p_at_10']:.3f} "
              f"| {r['neardup_top1']:.3f} | {r['duplicate_recall']:.3f} | {r['duplicate_false_duplicate_rate']:.3f} "
              f"| {r['duplicate_false_duplicate_rate_noisy']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
