"""Per-version numbers computed when an encoder version is made, stored in its metadata.

- ``reference`` — reconstruction-error statistics on a reference sample;
- ``drift_reference`` — the fit that turns an image's reconstruction error and ink into its
  normalised drift score (:class:`streamsim.drift.Normaliser`), on the same sample;
- ``duplicate_threshold`` and ``duplicate_calibration`` — the rule by which ``duplicate`` search
  and dedup call a stored image a copy of the query: cosine distance at most ``threshold`` times
  the query's distance to its 5th nearest stored image (capped at ``scale_typical``), calibrated
  on near-duplicates (shifts, noise, stray pixels, re-normalised like a re-scan) versus distinct
  images (``docs/search-modes.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .model import Encoder

DISTINCT_RATE = 0.01  # at most this fraction of distinct images may have a neighbour within the threshold
COPY_QUANTILE = 0.99
POOL = 4000  # distinct neighbours are looked for among at most this many images
DUPLICATE_RANK = 5  # the duplicate rule measures distances against the query's 5th nearest stored image
SCALE_QUANTILE = 0.5  # ... capped at this quantile of that distance among the calibration images


def perturbed_copies(pixels: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Near-duplicates of uint8 pixels (:func:`streamsim.perturb.copies`: shifts, noise, stray
    pixels), passed through the same normalisation as any input."""
    from .perturb import copies, normalise_all

    return normalise_all(copies(pixels, seed=seed), pixels)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)


def error_stats(errors: np.ndarray) -> dict[str, float]:
    e = np.asarray(errors, np.float64)
    q = np.quantile(e, [0.01, 0.05, 0.5, 0.95, 0.99])
    return {
        "count": len(e), "mean": float(e.mean()), "std": float(e.std()),
        "q01": float(q[0]), "q05": float(q[1]), "median": float(q[2]), "q95": float(q[3]), "q99": float(q[4]),
    }


def separating_threshold(copy_dist: np.ndarray, distinct_dist: np.ndarray) -> float:
    """The duplicate threshold from copies' distances to their originals and distinct images'
    distances to their nearest other image.

    Copies and distinct images apart (the copies' 99th percentile below the distinct images' 1st):
    the geometric middle of that gap. Overlapping: the distinct images' 1st percentile, so that at
    most :data:`DISTINCT_RATE` of distinct images are called copies.

    Example:
        >>> round(separating_threshold(np.full(100, 0.01), np.full(100, 0.04)), 3)
        0.02
    """
    copy_q = float(np.quantile(np.asarray(copy_dist, np.float64), COPY_QUANTILE))
    if len(distinct_dist) == 0:
        return copy_q
    distinct_q = float(np.quantile(np.asarray(distinct_dist, np.float64), DISTINCT_RATE))
    if copy_q < distinct_q:
        return float(np.sqrt(max(copy_q, 1e-9) * distinct_q))
    return distinct_q


def duplicate_scale(sorted_dist: np.ndarray, typical: float) -> np.ndarray:
    """The yardstick of the duplicate rule for each row of ascending distances from a query to the
    stored images: its distance to the :data:`DUPLICATE_RANK`-th nearest, but at most ``typical``
    (the calibrated median of that distance; also used where the store holds fewer images), so
    that a sparsely filled store is no more lenient than a full one. A candidate is a duplicate
    when ``distance <= threshold * scale``.

    Example:
        >>> duplicate_scale(np.array([[0.01, 0.1, 0.2, 0.2, 0.2, 0.5], [0.01, 0.1, np.inf, np.inf, np.inf, np.inf]]), 0.3)
        array([0.2, 0.3])
    """
    d = np.asarray(sorted_dist, np.float64)
    if d.shape[1] < DUPLICATE_RANK:
        return np.full(len(d), typical)
    scale = d[:, DUPLICATE_RANK - 1]
    return np.where(np.isfinite(scale) & (scale > 0), np.minimum(scale, typical), typical)


def calibrate(encoder: Encoder, pixels: np.ndarray, *, seed: int = 0, sample: int = 2000) -> dict[str, Any]:
    """Reference error statistics and the duplicate threshold for ``encoder`` on ``pixels``.

    ``pixels`` should be real, distinct images; ``sample`` of them are measured. The duplicate rule
    is relative: a stored image is a copy of the query when their distance is at most
    ``duplicate_threshold`` times the query's distance to its :data:`DUPLICATE_RANK`-th nearest
    stored image (:func:`duplicate_scale`). The threshold separates near-duplicates of sample
    images (searched among up to :data:`POOL` of ``pixels``, their originals included) from the
    sample images themselves (searched among the others).
    """
    rng = np.random.default_rng(seed)
    pool = pixels if len(pixels) <= POOL else pixels[np.sort(rng.choice(len(pixels), POOL, replace=False))]
    pick = np.sort(rng.choice(len(pool), min(sample, len(pool)), replace=False))
    pixels = pool[pick]
    codes, errors = encoder.encode_with_error(pixels)
    ink = pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0
    pool_u = _unit(encoder(pool))
    # copies: distance to their own original, relative to their DUPLICATE_RANK-th nearest stored image
    copy_d = 1.0 - _unit(encoder(perturbed_copies(pixels, seed=seed))) @ pool_u.T
    copy_own = copy_d[np.arange(len(pick)), pick]
    copy_sorted = np.sort(copy_d, axis=1)
    # distinct images: the nearest other stored image (exact pixel twins are identical, not near)
    d = 1.0 - _unit(codes) @ pool_u.T
    twins = (pixels.reshape(len(pixels), 1, -1) == pool.reshape(1, len(pool), -1)).all(axis=2)
    d[twins] = np.inf
    d = np.sort(d, axis=1)
    typical = float(np.quantile(d[:, DUPLICATE_RANK - 1], SCALE_QUANTILE))
    nn_dist = d[:, 0]
    copy_rel = copy_own / duplicate_scale(copy_sorted, typical)
    nn_rel = nn_dist / duplicate_scale(d, typical)
    threshold = separating_threshold(copy_rel, nn_rel)
    from .drift import Normaliser

    return {
        "drift_reference": Normaliser.fit(errors, ink).to_dict(),
        "reference": {
            "error": error_stats(errors),
            "error_per_ink": error_stats(errors / np.maximum(ink, 1e-3)),
            "ink": error_stats(ink),
        },
        "duplicate_threshold": threshold,
        "duplicate_calibration": {
            "rule": (f"distance <= threshold x min(distance to the query's {_ordinal(DUPLICATE_RANK)} nearest stored image, "
                     "scale_typical); "
                     f"threshold: geometric middle between the copies' q{COPY_QUANTILE * 100:.0f} and the distinct "
                     f"images' q{DISTINCT_RATE * 100:.0f} relative distance when apart, else the latter"),
            "rank": DUPLICATE_RANK,
            "scale_typical": typical,
            "copy_recall": float(np.mean(copy_rel <= threshold)),
            "distinct_within": float(np.mean(nn_rel <= threshold)),
            "copy_relative_q99": float(np.quantile(copy_rel, COPY_QUANTILE)),
            "copy_relative_median": float(np.median(copy_rel)),
            "distinct_relative_q01": float(np.quantile(nn_rel, DISTINCT_RATE)),
            "distinct_relative_median": float(np.median(nn_rel)),
            "copy_distance_median": float(np.median(copy_own)),
            "distinct_nn_distance_median": float(np.median(nn_dist)),
            "sample": len(pixels), "pool": len(pool), "seed": seed,
        },
    }


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
