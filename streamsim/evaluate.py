"""Retrieval quality on a labelled set of images: streamsim against baselines, under perturbations.

:func:`evaluate` builds a temporary store from the images, then measures, in one run and on the
same queries, streamsim (through :class:`~streamsim.index.Index`) and the baselines — raw pixels,
centre-of-mass-centred pixels (both cosine, exact) and, when the optional ``imagehash`` package is
importable, a 64-bit perceptual hash (Hamming distance):

- ``retrieval[condition]`` — ``p_at_10``, ``map`` (mean average precision over the top 100) and
  ``recall_at_100`` for clean queries and for queries under each perturbation of
  :data:`PERTURBATIONS`. A query is a stored image (or a perturbed copy of one); the relevant
  images are the *other* stored images with its label, and the query's own original is left out
  of the ranking, so a perturbed query is scored on finding the rest of its class;
- ``neardup_top1`` — a copy with clipped noise σ 0.3 and a random shift of ±3 px: is its
  original the first hit?
- streamsim only: ``duplicate_mode`` — ``recall`` (the original is among the ``duplicate``-mode
  hits of its near-duplicate copy), ``false_duplicate_rate`` (unseen images, held out of the
  store, for which ``duplicate`` mode returns anything) and ``false_duplicate_rate_noisy`` (the
  same for near-duplicate copies of the unseen images) and ``rescan_recall`` (the original is among
  the ``duplicate``-mode hits of a re-scan of it: turned by up to ±5°, shifted by up to ±1 px,
  light paper noise); ``recall_mode`` — ``recall_at_100`` of
  ``recall``-mode search, on clean and on perturbed queries, next to ``similar``'s.

Unseen images are a random sample of the images (``unseen="images"``: another writer's same
character must not be called a copy), or every image of a random sample of the labels
(``unseen="labels"``: for printed type, where one character in two typefaces may be the same
drawing, ``docs/search-modes.md``).

Perturbations (:mod:`streamsim.perturb`) are applied to the images as given (any size, either
polarity), then every query goes through the same normalisation as any input.

Example:
    >>> perturb(np.zeros((2, 28, 28), np.uint8), "shift", seed=0).shape
    (2, 28, 28)
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .perturb import PERTURBATIONS, normalise_all, perturb
from .search import unit

CONDITIONS = ("clean", *PERTURBATIONS)
METRICS = ("p_at_10", "map", "recall_at_100")
TOP = 100  # ranks scored by map and recall_at_100
PARALLEL_MIN = 2000  # images to normalise (stored + every condition's queries) from which workers share them
UNSEEN = ("images", "labels")
BAD_DATA_MSG = "{path}: {reason}; expected an .npz with `images` (uint8 [N, H, W]) and `labels` ([N])"


class EvalDataError(ValueError):
    """The evaluation data cannot be used; the message names the file and what to fix."""


def load_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W], labels [N])`` from an ``.npz``, read without pickle."""
    p = Path(path)

    def bad(reason: str) -> EvalDataError:
        return EvalDataError(BAD_DATA_MSG.format(path=p, reason=reason))

    if not p.is_file():
        raise bad("no such file")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise bad(f"no {' or '.join(repr(k) for k in missing)} array (it has: {', '.join(z.files) or 'nothing'})")
            x, y = z["images"], z["labels"]
    except EvalDataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # one line, no traceback
        raise bad(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    if x.dtype != np.uint8 or x.ndim != 3 or min(x.shape) == 0:
        raise bad(f"`images` must be a non-empty uint8 array [N, H, W], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iuUSb":
        raise bad(f"`labels` must be [N] integers or strings matching the {len(x)} images, got {y.dtype} {list(y.shape)}")
    if len(x) < 3:
        raise bad(f"need at least 3 images, got {len(x)}")
    return x, y


# -- metrics ----------------------------------------------------------------------------------


def ranking_metrics(ranked_labels: np.ndarray, query_labels: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """P@10, mAP over the top :data:`TOP` and recall@100 from the labels of ranked results.

    ``ranked_labels`` ``[Q, ≥100]`` (the query's own original already left out), ``relevant``
    ``[Q]``: how many relevant images each query could find.

    Example:
        >>> r = ranking_metrics(np.array([[1] * 5 + [0] * 95]), np.array([1]), np.array([5]))
        >>> r["p_at_10"], r["map"], r["recall_at_100"]
        (0.5, 1.0, 1.0)
    """
    hit = ranked_labels[:, :TOP] == np.asarray(query_labels)[:, None]
    cum = np.cumsum(hit, axis=1)
    ranks = np.arange(1, hit.shape[1] + 1)
    denom = np.maximum(np.minimum(relevant, TOP), 1)
    ap = (hit * cum / ranks).sum(axis=1) / denom
    rec = cum[:, -1] / np.maximum(relevant, 1)
    return {"p_at_10": float(hit[:, :10].mean()), "map": float(ap.mean()), "recall_at_100": float(rec.mean())}


# -- methods ----------------------------------------------------------------------------------


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores per row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A baseline: how to turn (raw images, their normalised pixels) into vectors, and how to score."""

    name: str
    vectors: Callable[[np.ndarray, np.ndarray], np.ndarray]
    hamming: bool = False

    def rank(self, stored: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
        if self.hamming:  # boolean hashes: fewer differing bits is closer
            scores = (queries.astype(np.float32) * 2 - 1) @ (stored.astype(np.float32) * 2 - 1).T
        else:
            scores = _flat_unit(queries) @ _flat_unit(stored).T
        return _top(scores, k)


def _flat_unit(v: np.ndarray) -> np.ndarray:
    """Each item (an image or a code) flattened to a float32 row of unit length."""
    return unit(np.asarray(v, np.float32).reshape(len(v), -1))


def _phash(raw: np.ndarray, _px: np.ndarray) -> np.ndarray:
    import imagehash
    from PIL import Image

    return np.stack([imagehash.phash(Image.fromarray(img)).hash.reshape(-1) for img in raw])


def baselines() -> list[Baseline]:
    """Raw pixels and centred pixels (cosine), plus pHash-64 when ``imagehash`` is importable."""
    out = [Baseline("raw_pixels", lambda raw, px: raw.reshape(len(raw), -1)),
           Baseline("centred_pixels", lambda raw, px: px.reshape(len(px), -1))]
    try:
        import imagehash  # noqa: F401
    except ImportError:
        return out
    return [*out, Baseline("phash", _phash, hamming=True)]


# -- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """Which images are stored, which stored ones are queries, which are held out (unseen)."""

    stored: np.ndarray  # indices into the data
    queries: np.ndarray  # positions into ``stored``
    unseen: np.ndarray  # indices into the data, never stored

    @classmethod
    def make(cls, n: int, *, queries: int, seed: int, labels: np.ndarray | None = None) -> Split:
        """About a tenth of the images (at most ``queries``) unseen — whole labels' images when
        ``labels`` are given (labels in a random order, until that many) — the rest stored."""
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_unseen = min(queries, max(1, n // 10)) if n >= 10 else 1
        if labels is not None:
            classes = rng.permutation(np.unique(labels))
            sizes = np.cumsum([np.sum(labels == c) for c in classes])
            held = classes[: max(1, int(np.searchsorted(sizes, n_unseen)) + 1)]
            held = held if len(held) < len(classes) else held[:-1]
            chosen = np.isin(labels, held)
            unseen, stored = np.flatnonzero(chosen), np.flatnonzero(~chosen)
            q = np.sort(rng.choice(len(stored), min(queries, len(stored)), replace=False))
            return cls(stored, q, unseen)
        unseen, stored = np.sort(perm[:n_unseen]), np.sort(perm[n_unseen:])
        q = np.sort(rng.choice(len(stored), min(queries, len(stored)), replace=False))
        return cls(stored, q, unseen)


def _condition(raw: np.ndarray, kind: str | None, seed: int, fallback: np.ndarray | None):
    """``(images, pixels, frames)``: ``raw`` under perturbation ``kind`` (as given when None),
    normalised as any query is (``fallback``: the pixels of an image a perturbation erased)."""
    r = raw if kind is None else perturb(raw, kind, seed=seed)
    return (r, *normalise_all(r, fallback, frames=True))


class _done:
    """A finished call, shaped like a future (the one-process path of :func:`_workers`)."""

    def __init__(self, fn, *args):
        self.value = fn(*args)

    def result(self):
        return self.value


def _workers(images: int):
    """Worker processes for normalising and perturbing ``images`` images, where that is worth
    starting them (≥ :data:`PARALLEL_MIN` images) and :func:`~streamsim.workers.workers_allowed`;
    else a no-op context."""
    import contextlib

    from .workers import process_pool, workers_allowed

    if images < PARALLEL_MIN or not workers_allowed():
        return contextlib.nullcontext()
    return process_pool()


def _without_self(ranked: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Drop each row's own original from a ranking of positions, keep ``k`` columns (-1 pads)."""
    out = np.full((len(ranked), k), -1, np.int64)
    for i, row in enumerate(ranked):
        kept = row[(row != own[i]) & (row >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def _scores(ranked: np.ndarray, labels: np.ndarray, qlabels: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    lab = np.where(ranked >= 0, labels[np.maximum(ranked, 0)], -1)  # labels are ≥ 0; -1: no hit
    return ranking_metrics(lab, qlabels, relevant)


def evaluate(data_images: np.ndarray, labels: np.ndarray, *, queries: int = 1000, seed: int = 0,
             checkpoint: str | Path | None = None, progress: Callable[[str], None] | None = None,
             calibrate_store: bool = False, parallel: bool = False, policy=None, unseen: str = "images") -> dict[str, Any]:
    """Measure streamsim and the baselines on labelled images; returns the report (see module doc).

    ``checkpoint`` is an encoder folder to evaluate (default: the shipped encoder).
    ``calibrate_store``: calibrate the duplicate threshold on the temporary store's own images
    first (:meth:`Index.calibrate_duplicates`), as ``streamsim calibrate`` would.
    ``parallel``: perturb and normalise the queries of a large run (≥ :data:`PARALLEL_MIN` images)
    in worker processes, as ``streamsim eval`` does (where :func:`streamsim.workers.workers_allowed`:
    a script needs the ``if __name__ == "__main__":`` guard). The report is the same either way.
    ``policy``: how streamsim's search modes rank (:class:`~streamsim.search.SearchPolicy`;
    default the product's). ``unseen``: ``"images"`` or ``"labels"`` (see the module doc).

    A store of at least :data:`streamsim.calibrate.AUTO_CALIBRATION` images calibrates its
    duplicate rule on its own images by itself, as any store does (``encoder.store_calibration``).
    """
    from .index import Index

    if unseen not in UNSEEN:
        raise ValueError(f"unseen must be one of {', '.join(UNSEEN)}, got {unseen!r}")
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    x = np.asarray(data_images, np.uint8)
    y = np.asarray(labels)
    if y.dtype.kind in "US":
        y = np.unique(y, return_inverse=True)[1]
    y = y.astype(np.int64)
    split = Split.make(len(x), queries=queries, seed=seed, labels=y if unseen == "labels" else None)
    raw_s, lab_s = x[split.stored], y[split.stored]
    q_raw, q_lab, q_own = raw_s[split.queries], lab_s[split.queries], split.queries
    relevant = np.bincount(lab_s, minlength=y.max() + 1)[q_lab] - 1
    say(f"{len(x)} images: {len(raw_s)} stored, {len(q_raw)} queries, {len(split.unseen)} unseen")

    # each condition: (raw queries, their pixels, their frames: what the duplicate check sees);
    # normalising and perturbing are independent per image and per condition, so large runs
    # share them out
    unseen_raw = x[split.unseen]
    with _workers(len(raw_s) + len(q_raw) * (len(PERTURBATIONS) + 2) if parallel else 0) as pool:
        run = pool.submit if pool is not None else _done
        chunks = [run(normalise_all, raw_s[i : i + 1000]) for i in range(0, len(raw_s), 1000)]
        px_s = np.concatenate([c.result() for c in chunks])
        jobs = {kind: run(_condition, q_raw, kind, seed + n, px_s[q_own]) for n, kind in enumerate(PERTURBATIONS, 1)}
        jobs["neardup"] = run(_condition, q_raw, "neardup", seed + 99, px_s[q_own])
        jobs["rescan"] = run(_condition, q_raw, "rescan", seed + 97, px_s[q_own])
        clean = _condition(q_raw, None, 0, None)
        clean_unseen = normalise_all(unseen_raw, frames=True)
        noisy_unseen = _condition(unseen_raw, "neardup", seed + 98, clean_unseen[0])
        conditions: dict[str, tuple[np.ndarray, np.ndarray, list]] = {"clean": clean}
        conditions.update({kind: jobs[kind].result() for kind in PERTURBATIONS})
        nd_raw, nd_px, nd_fr = jobs["neardup"].result()
        rescans = jobs["rescan"].result()[1:]
    unseen_sets = (clean_unseen, noisy_unseen[1:])
    say("perturbed the queries")

    methods: dict[str, dict[str, Any]] = {}
    for b in baselines():
        vs = b.vectors(raw_s, px_s)
        res = {}
        for name, (r, p, _f) in conditions.items():
            ranked = _without_self(b.rank(vs, b.vectors(r, p), TOP + 1), q_own, TOP)
            res[name] = _scores(ranked, lab_s, q_lab, relevant)
        top1 = b.rank(vs, b.vectors(nd_raw, nd_px), 1)[:, 0]
        methods[b.name] = {"retrieval": res, "neardup_top1": float(np.mean(top1 == q_own))}
        say(f"baseline {b.name} done")

    with tempfile.TemporaryDirectory(prefix="streamsim-eval-") as d:
        if checkpoint is not None:
            from . import encoders

            src = Path(checkpoint)
            if not encoders.is_complete(src):
                raise EvalDataError(f"{src}: not a finished encoder checkpoint (needs meta.json and state/)")
            import shutil

            shutil.copytree(src, encoders.version_dir(Path(d) / "encoders", 1), ignore=shutil.ignore_patterns("*.md", "*.py"))
        with Index.open(d, **({"policy": policy} if policy is not None else {})) as index:
            ids = np.asarray(index.add_many(raw_s), np.int64)
            pos = np.full(int(ids.max()) + 1, -1, np.int64)
            pos[ids] = np.arange(len(ids))
            say("built the store")
            index.wait_for_calibration()  # a store of 1,000 or more calibrates itself
            if calibrate_store:
                index.calibrate_duplicates(seed=seed)
            methods["streamsim"] = _measure_index(index, pos, conditions, (nd_px, nd_fr), lab_s, q_lab, q_own, relevant,
                                                  unseen_sets, rescans, seed=seed)
            version = index.active_version
            store_calibration = index.store_calibration(version)
            meta = index.meta(version)
            threshold = index.duplicate_rule(version)
    say("streamsim done")
    order = ["streamsim", *[m for m in methods if m != "streamsim"]]
    return {
        "data": {"images": len(x), "stored": len(raw_s), "queries": len(q_raw),
                 "unseen": len(split.unseen), "unseen_by": unseen, "classes": len(np.unique(y)),
                 "image_shape": [int(s) for s in x.shape[1:]], "seed": int(seed)},
        "encoder": {"version": int(version), "arch": meta.get("arch"),
                    "duplicate_threshold": threshold, "store_calibration": store_calibration},
        "conditions": list(CONDITIONS),
        "methods": {m: methods[m] for m in order},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _measure_index(index, pos, conditions, neardup, lab_s, q_lab, q_own, relevant, unseen, rescans, *, seed) -> dict[str, Any]:
    def ranked(px, k, mode="similar", frames=None):
        rows = index.search_pixels(px, k, mode=mode, frames=frames)
        out = np.full((len(rows), k), -1, np.int64)
        for i, row in enumerate(rows):
            got = [pos[m.id] for m in row]
            out[i, : len(got)] = got
        return out

    rankings = {name: _without_self(ranked(p, TOP + 1, frames=f), q_own, TOP) for name, (_r, p, f) in conditions.items()}
    res = {name: _scores(r, lab_s, q_lab, relevant) for name, r in rankings.items()}
    nd_px, nd_fr = neardup
    top1 = ranked(nd_px, 1, frames=nd_fr)[:, 0]
    dup = index.search_pixels(nd_px, 10, mode="duplicate", frames=nd_fr)
    dup_recall = float(np.mean([any(pos[m.id] == q_own[i] for m in row) for i, row in enumerate(dup)]))
    turned = index.search_pixels(rescans[0], 10, mode="duplicate", frames=rescans[1])
    rescan_recall = float(np.mean([any(pos[m.id] == q_own[i] for m in row) for i, row in enumerate(turned)]))
    (unseen_px, unseen_fr), (noisy_px, noisy_fr) = unseen
    false_dup = index.search_pixels(unseen_px, 1, mode="duplicate", frames=unseen_fr) if len(unseen_px) else []
    false_noisy = index.search_pixels(noisy_px, 1, mode="duplicate", frames=noisy_fr) if len(noisy_px) else []
    # recall mode on clean queries, and on perturbed ones (each query under one perturbation, in turn)
    mix = [PERTURBATIONS[i % len(PERTURBATIONS)] for i in range(len(q_own))]
    mixed = np.stack([conditions[c][1][i] for i, c in enumerate(mix)])
    clean_px = conditions["clean"][1]
    recall_mode = {
        "recall_at_100": _scores(_without_self(ranked(clean_px, TOP + 1, "recall"), q_own, TOP), lab_s, q_lab, relevant)["recall_at_100"],
        "recall_at_100_perturbed": _scores(_without_self(ranked(mixed, TOP + 1, "recall"), q_own, TOP), lab_s, q_lab, relevant)["recall_at_100"],
        "similar_recall_at_100": res["clean"]["recall_at_100"],
        # (each query's similar-mode ranking under its perturbation, as searched above)
        "similar_recall_at_100_perturbed": _scores(np.stack([rankings[c][i] for i, c in enumerate(mix)]), lab_s, q_lab,
                                                   relevant)["recall_at_100"],
    }
    return {
        "retrieval": res,
        "neardup_top1": float(np.mean(top1 == q_own)),
        "duplicate_mode": {"recall": dup_recall, "rescan_recall": rescan_recall,
                           "false_duplicate_rate": float(np.mean([bool(r) for r in false_dup])) if len(unseen_px) else 0.0,
                           "false_duplicate_rate_noisy": float(np.mean([bool(r) for r in false_noisy])) if len(noisy_px) else 0.0},
        "recall_mode": recall_mode,
    }


# -- for people -------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    d = report["data"]
    head = (f"{d['images']} images ({d['classes']} classes): {d['stored']} stored, {d['queries']} queries, "
            f"{d['unseen']} unseen; encoder v{report['encoder']['version']} ({report['encoder']['arch']}); "
            f"{report['seconds']:.1f} s")
    lines = [head, ""]
    names = list(report["methods"])
    width = max(len(n) for n in names) + 2
    for metric, title in (("p_at_10", "precision@10"), ("map", "mAP@100"), ("recall_at_100", "recall@100")):
        lines.append(f"{title:<{width}}" + "".join(f"{c:>12}" for c in report["conditions"]))
        for n in names:
            r = report["methods"][n]["retrieval"]
            lines.append(f"{n:<{width}}" + "".join(f"{r[c][metric]:>12.3f}" for c in report["conditions"]))
        lines.append("")
    lines.append("near-duplicate top-1 (noise σ 0.3 + shift ±3 px): " + ", ".join(
        f"{n} {report['methods'][n]['neardup_top1']:.3f}" for n in names))
    s = report["methods"]["streamsim"]
    lines.append(f"duplicate mode: recall {s['duplicate_mode']['recall']:.3f}, "
                 f"false-duplicate rate {s['duplicate_mode']['false_duplicate_rate']:.3f} "
                 f"(noisy queries {s['duplicate_mode']['false_duplicate_rate_noisy']:.3f}; unseen by {d['unseen_by']}), "
                 f"re-scans turned up to ±5° found {s['duplicate_mode']['rescan_recall']:.3f}")
    rm = s["recall_mode"]
    lines.append(f"recall mode recall@100: clean {rm['recall_at_100']:.3f} (similar {rm['similar_recall_at_100']:.3f}), "
                 f"perturbed {rm['recall_at_100_perturbed']:.3f} (similar {rm['similar_recall_at_100_perturbed']:.3f})")
    return "\n".join(lines)
