"""Per-version numbers computed when an encoder version is made, stored in its metadata.

- ``reference`` — reconstruction-error statistics on a reference sample;
- ``drift_reference`` — the fit that turns an image's reconstruction error and ink into its
  normalised drift score (:class:`streamsim.drift.Normaliser`), on the same sample;
- ``duplicate_threshold`` — the largest cosine distance at which ``duplicate`` search still calls a
  stored image a copy of the query, from perturbed copies (noise, stray pixels, shifts, small
  rotations, stroke changes, re-normalised like a re-scan) versus distinct images.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import images
from .model import Encoder

# A copy perturbed this much must still count as a duplicate.
COPY_CORRUPTIONS = dict(
    noise_sigma=0.3, p_noise=1.0, salt_pepper=0.03, p_salt_pepper=0.5, shift=2.0, rotate_deg=5.0,
    scale=0.05, p_affine=1.0, elastic=0.0, p_elastic=0.0, p_stroke=0.0,
)
COPY_QUANTILE = 0.99
DISTINCT_QUANTILE = 0.02


def perturbed_copies(pixels: np.ndarray, *, seed: int = 0, **overrides: Any) -> np.ndarray:
    """Perturbed copies of uint8 pixels, passed through the same normalisation as any input."""
    import jax

    from .train import Corruptions, corrupt

    c = Corruptions(**{**COPY_CORRUPTIONS, **overrides})
    x = np.asarray(_jitted(corrupt)(jax.random.key(seed), pixels.astype(np.float32) / 255.0, c))
    out = np.empty_like(pixels)
    for i, img in enumerate(x):
        try:
            out[i] = images.normalise(img)
        except images.ImageError:
            out[i] = pixels[i]
    return out


@functools.lru_cache(maxsize=None)
def _jitted(fn):
    """``fn`` compiled once as a whole (its last argument, the corruptions, static), instead of
    op by op."""
    import jax

    return jax.jit(fn, static_argnums=2)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)


def error_stats(errors: np.ndarray) -> dict[str, float]:
    e = np.asarray(errors, np.float64)
    q = np.quantile(e, [0.01, 0.05, 0.5, 0.95, 0.99])
    return {
        "count": int(len(e)), "mean": float(e.mean()), "std": float(e.std()),
        "q01": float(q[0]), "q05": float(q[1]), "median": float(q[2]), "q95": float(q[3]), "q99": float(q[4]),
    }


def balanced_threshold(copy_dist: np.ndarray, distinct_dist: np.ndarray) -> float:
    """The distance that minimises (copies beyond it) + (distinct images within it), as fractions."""
    copy_dist = np.sort(np.asarray(copy_dist, np.float64))
    if len(distinct_dist) == 0:
        return float(np.quantile(copy_dist, COPY_QUANTILE))
    distinct_dist = np.sort(np.asarray(distinct_dist, np.float64))
    candidates = np.concatenate([copy_dist, distinct_dist])
    missed = 1.0 - np.searchsorted(copy_dist, candidates, side="right") / len(copy_dist)
    within = np.searchsorted(distinct_dist, candidates, side="right") / len(distinct_dist)
    return float(candidates[np.argmin(missed + within)])


def calibrate(encoder: Encoder, pixels: np.ndarray, *, seed: int = 0, sample: int = 2000) -> dict[str, Any]:
    """Reference error statistics and the duplicate threshold for ``encoder`` on ``pixels``."""
    rng = np.random.default_rng(seed)
    if len(pixels) > sample:
        pixels = pixels[np.sort(rng.choice(len(pixels), sample, replace=False))]
    codes, errors = encoder.encode_with_error(pixels)
    ink = pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0
    copies = perturbed_copies(pixels, seed=seed)
    copy_codes = encoder(copies)
    copy_dist = 1.0 - np.sum(_unit(codes) * _unit(copy_codes), axis=1)
    # Nearest *distinct* stored image (excluding exact pixel twins).
    u = _unit(codes)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    flat = pixels.reshape(len(pixels), -1)
    nn_dist = []
    for i in range(len(pixels)):
        order = np.argsort(-sims[i])[:5]
        for j in order:
            if not np.array_equal(flat[i], flat[j]):
                nn_dist.append(1.0 - sims[i, j])
                break
    nn_dist = np.asarray(nn_dist)
    copy_q = float(np.quantile(copy_dist, COPY_QUANTILE))
    distinct_q = float(np.quantile(nn_dist, DISTINCT_QUANTILE)) if len(nn_dist) else copy_q
    threshold = balanced_threshold(copy_dist, nn_dist)
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
            "rule": "minimise missed copies + distinct images within the threshold (equal weight)",
            "copy_recall": float(np.mean(copy_dist <= threshold)),
            "distinct_within": float(np.mean(nn_dist <= threshold)) if len(nn_dist) else 0.0,
            "copy_distance_q99": copy_q, "distinct_nn_distance_q02": distinct_q,
            "copy_distance_median": float(np.median(copy_dist)),
            "distinct_nn_distance_median": float(np.median(nn_dist)) if len(nn_dist) else None,
            "sample": int(len(pixels)), "seed": seed,
        },
    }
