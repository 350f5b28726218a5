"""The validation gate of a new encoder version: does it serve the store's users better?

A candidate (a fine-tune after drift, or a fresh model) is judged against its parent on two
held-out samples of the store's own images: *recent* images (since the change) and a *reference*
of older ones (plus the sample kept with the parent's checkpoint). What users get is retrieval, so
that is what is measured first:

- **self-retrieval top-1**: each sample image is perturbed the way a re-scan, another pen or a
  copy perturbs it (:func:`streamsim.perturb.random_copies`: shift, rotation, elastic deformation,
  stroke width, noise), normalised as any query, and searched by code among the clean images of
  both samples; a hit is its own original first.
- **neighbourhood agreement** on the reference sample: the share of each image's 10 nearest
  neighbours (by code, within the sample) that the candidate and the parent have in common —
  how much of what users found before they still find.
- **reconstruction error** on both samples, as the drift score measures it.

The rule (:func:`judge`): promote when recent retrieval improves (or, while the error on recent
images falls, drops by no more than the noise of the sample: the queries only the parent finds
exceed those only the candidate finds by at most one standard error of that difference), reference retrieval drops by at most ``retrieval_margin`` (absolute) and the
reference error rises by at most ``margin`` (relative). The numbers and the rule are recorded with
the version (``versions --json``, ``validation``) and in its ``rejected`` / ``activated`` events.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .defaults import RETRIEVAL_MARGIN
from .search import unit

SAMPLE = 400  # images of each sample whose perturbed copies are searched
COPIES = 4  # perturbed copies of each (different perturbations): a small held-out sample still measures
NEIGHBOURS = 10  # neighbourhood agreement: the k nearest within the reference sample
RULE = ("promote when recent self-retrieval improves (more queries found only by the candidate than only by the "
        "parent; or, while the recent reconstruction error falls, no more lost than one standard error of that "
        "difference), reference self-retrieval top-1 drops by at most retrieval_margin (absolute) and the reference "
        "reconstruction error rises by at most margin (relative); self-retrieval: perturbed copies of held-out "
        "images (shift, rotation, elastic, stroke width, noise) searched by code among the clean images of both samples")


def queries(recent: np.ndarray, reference: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """The gate's fixed test: up to :data:`SAMPLE` images of each sample, :data:`COPIES` perturbed
    copies of each (normalised as queries), and the gallery they are searched in (both samples, clean)."""
    from .perturb import normalise_all, random_copies

    rng = np.random.default_rng(seed)
    gallery = np.concatenate([recent, reference]).astype(np.uint8)
    picks = {"recent": np.sort(rng.permutation(len(recent))[:SAMPLE]),
             "reference": len(recent) + np.sort(rng.permutation(len(reference))[:SAMPLE])}
    out: dict[str, Any] = {"gallery": gallery}
    for name, own in picks.items():
        own = np.tile(own, COPIES)
        out[name] = (own, normalise_all(random_copies(gallery[own], seed=seed + 1), gallery[own]))
    return out


def self_retrieval(encoder, test: dict[str, Any]) -> dict[str, np.ndarray]:
    """Whether each of each sample's perturbed copies finds its original first under ``encoder``."""
    g = unit(np.asarray(encoder(test["gallery"]), np.float32))
    out = {}
    for name in ("recent", "reference"):
        own, px = test[name]
        if len(own) == 0:
            out[name] = np.zeros(0, bool)
            continue
        q = unit(np.asarray(encoder(px), np.float32))
        out[name] = np.argmax(q @ g.T, axis=1) == own
    return out


def neighbour_agreement(a: np.ndarray, b: np.ndarray, k: int = NEIGHBOURS) -> float | None:
    """Mean share of the ``k`` nearest neighbours (cosine, within the set, self excluded) that
    codes ``a`` and ``b`` of the same images have in common.

    >>> x = np.random.default_rng(0).standard_normal((30, 8))
    >>> neighbour_agreement(x, 2 * x)
    1.0
    """
    n = len(a)
    if n < 2:
        return None
    k = min(k, n - 1)

    def nearest(c):
        s = unit(np.asarray(c, np.float64))
        s = s @ s.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1, kind="stable")[:, :k]

    na, nb = nearest(a), nearest(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na.tolist(), nb.tolist())]))


def judge(parent, candidate, recent: np.ndarray, reference: np.ndarray, *, margin: float,
          retrieval_margin: float = RETRIEVAL_MARGIN, seed: int = 0) -> dict[str, Any]:
    """The gate's numbers and verdict for ``candidate`` against ``parent`` (encoders) on held-out
    ``recent`` and ``reference`` pixels: a dict with ``passed`` and, when it fails, ``why``."""
    from .versions import mean_error

    test = queries(recent, reference, seed=seed)
    hits_b, hits_a = self_retrieval(parent, test), self_retrieval(candidate, test)
    mean = lambda h: float(h.mean()) if len(h) else None  # noqa: E731
    before = {k: mean(v) for k, v in hits_b.items()}
    after = {k: mean(v) for k, v in hits_a.items()}
    # queries only the candidate finds, and only the parent: a drop within the noise of a small
    # sample (one standard error of the paired difference) is no measurable loss
    gained = int(np.sum(hits_a["recent"] & ~hits_b["recent"]))
    lost = int(np.sum(hits_b["recent"] & ~hits_a["recent"]))
    err_b = {"recent": mean_error(parent, recent), "reference": mean_error(parent, reference)}
    err_a = {"recent": mean_error(candidate, recent), "reference": mean_error(candidate, reference)}
    ref_n = min(len(reference), SAMPLE)
    agreement = neighbour_agreement(parent(reference[:ref_n]), candidate(reference[:ref_n])) if ref_n else None
    error_falls = err_a["recent"] < err_b["recent"]
    checks = {
        "recent_retrieval_improves": bool(gained > lost or (error_falls and lost - gained <= math.sqrt(gained + lost))),
        "reference_retrieval_within_margin": bool(before["reference"] is None
                                                   or after["reference"] >= before["reference"] - retrieval_margin),
        "reference_error_within_margin": bool(len(reference) == 0
                                              or err_a["reference"] <= err_b["reference"] * (1 + margin)),
    }
    out = {
        "recent_retrieval_before": before["recent"], "recent_retrieval_after": after["recent"],
        "reference_retrieval_before": before["reference"], "reference_retrieval_after": after["reference"],
        "recent_queries_gained": gained, "recent_queries_lost": lost, "neighbour_agreement": agreement,
        "recent_error_before": err_b["recent"], "recent_error_after": err_a["recent"],
        "reference_error_before": err_b["reference"], "reference_error_after": err_a["reference"],
        "recent_error_falls": bool(error_falls),
        "margin": margin, "retrieval_margin": retrieval_margin, "retrieval_queries": int(len(test["recent"][0])
                                                                                          + len(test["reference"][0])),
        **checks, "passed": all(checks.values()), "rule": RULE,
    }
    if not out["passed"]:
        if not checks["recent_retrieval_improves"]:
            out["why"] = (f"retrieval of recent images did not improve (top-1 {before['recent']:.3f} → "
                          f"{after['recent']:.3f})")
        elif not checks["reference_retrieval_within_margin"]:
            out["why"] = (f"retrieval of older images dropped more than {retrieval_margin:g} (top-1 "
                          f"{before['reference']:.3f} → {after['reference']:.3f})")
        else:
            out["why"] = f"error on the reference rose more than {margin:.0%}"
    return out
