"""Checking a candidate near-duplicate against the query, pixel by pixel.

Codes find candidates; this module decides between them. A copy of a stored image (re-scanned,
shifted, under paper noise or stray pixels) differs from its original by the noise and by how
normalisation placed its ink — a slightly different box, so a slightly different scale and
offset. Another writer's same character differs by its *shape*. So each candidate's stored
pixels are registered onto the query's :class:`~streamsim.images.Frame` (the query's ink with its
noise kept, in the pixels' frame) by a scale and a shift per axis, found by Gauss-Newton steps
on lightly smoothed images with a prior that keeps the fit near the identity, and then:

- *residual* — the squared difference left after the fit, plus the prior's penalty: the
  lower, the better a candidate explains the query. Used to order candidates.
- *excess* — that difference minus what the query's own noise (Gaussian σ and a rate of stray
  pixels, measured around its ink, clipped where the image's value range clips it) would leave
  for a true copy, per unit of the candidate's ink energy. About 0 for a copy; for anything
  else, the share of the ink that differs. Used, with a threshold calibrated per encoder version
  (:mod:`streamsim.calibrate`), to call a candidate a duplicate.

Batched numpy on ``[N, 28, 28]`` pairs (separable warps are 28×28 matrix products), about
0.3 ms a pair on one CPU core.

Example:
    >>> from streamsim.images import Frame
    >>> c = np.zeros((2, 28, 28), np.float32); c[:, 6:22, 12:16] = 1.0; c[1, 6:10, 16:20] = 1.0
    >>> q = Frame(np.roll(c[0], 1, axis=1), 0.0, 0.0, 1.0)   # bar shifted by a pixel
    >>> residual, excess = scores([q, q], c)                  # against itself, and a bar with a flag
    >>> bool(excess[0] < 0.01 < 0.1 < excess[1])
    True
"""

from __future__ import annotations

import numpy as np

from .images import Frame

SIDE = 28
ITERATIONS = 6
SMOOTH = 0.7  # Gaussian σ (px) of the images the fit is made on
# prior standard deviations of (scale_y, scale_x, shift_y, shift_x) around (1, 1, 0, 0), and the
# noise variance they are weighed against (per pixel, 0..1 ink)
PRIOR_SD = np.array([0.06, 0.06, 2.0, 2.0], np.float32)
PRIOR_NOISE = 0.045
_CENTRE = (SIDE - 1) / 2
_U = np.arange(SIDE, dtype=np.float32) - _CENTRE


def _blur_matrix(sigma: float) -> np.ndarray:
    r = np.arange(SIDE, dtype=np.float32)
    b = np.exp(-0.5 * ((r[:, None] - r[None]) / sigma) ** 2)
    return (b / b.sum(axis=1, keepdims=True)).astype(np.float32)


_BLUR = _blur_matrix(SMOOTH)
_LAMBDA = (PRIOR_NOISE / PRIOR_SD**2).astype(np.float32)
_IDENTITY = np.array([1, 1, 0, 0], np.float32)
CHUNK = 4096  # pairs computed at once (about 40 MB of intermediates)


def _interp(scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Linear-interpolation matrices ``[N, 28, 28]``: output row i samples the source at
    ``scale × (i − centre) + shift + centre`` (0 outside)."""
    pos = scale[:, None] * _U[None] + shift[:, None] + _CENTRE  # [N, 28]
    return np.maximum(1 - np.abs(pos[:, :, None] - np.arange(SIDE, dtype=np.float32)[None, None]), 0)


def _register(q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``(scale_y, scale_x, shift_y, shift_x)`` mapping each candidate ``c`` onto its query
    ``q`` (``[N, 28, 28]`` floats, ink 0..1): Gauss-Newton on the smoothed images, with the prior.
    Returns ``(params [N, 4], warped candidates)``."""
    n = q.shape[0]
    qs = _BLUR @ q @ _BLUR.T
    cs = _BLUR @ c @ _BLUR.T
    gy = np.concatenate([cs[:, 1:2] - cs[:, 0:1], (cs[:, 2:] - cs[:, :-2]) / 2, cs[:, -1:] - cs[:, -2:-1]], axis=1)
    gx = np.concatenate([cs[:, :, 1:2] - cs[:, :, 0:1], (cs[:, :, 2:] - cs[:, :, :-2]) / 2,
                         cs[:, :, -1:] - cs[:, :, -2:-1]], axis=2)
    both = np.concatenate([cs, gy, gx], axis=2)  # [N, 28, 84]: rows are resampled once for all three
    p = np.zeros((n, 4), np.float32) + _IDENTITY
    for _ in range(ITERATIONS):
        rows = _interp(p[:, 0], p[:, 2]) @ both
        rxt = _interp(p[:, 1], p[:, 3]).transpose(0, 2, 1)
        w, ty, tx = rows[:, :, :SIDE] @ rxt, rows[:, :, SIDE : 2 * SIDE] @ rxt, rows[:, :, 2 * SIDE :] @ rxt
        # the Jacobian's columns by (scale_y, scale_x, shift_y, shift_x), and its normal equations
        jac = (ty * _U[None, :, None], tx * _U[None, None, :], ty, tx)
        r = qs - w
        h = np.stack([np.stack([(a * b).sum(axis=(1, 2)) for b in jac], axis=-1) for a in jac], axis=-2)
        g = np.stack([(a * r).sum(axis=(1, 2)) for a in jac], axis=-1) - (p - _IDENTITY) * _LAMBDA
        p = p + np.linalg.solve(h + np.diag(_LAMBDA)[None], g[..., None])[..., 0]
        p = np.concatenate([np.clip(p[:, :2], 0.7, 1.4), np.clip(p[:, 2:], -6.0, 6.0)], axis=1)
    ry, rxt = _interp(p[:, 0], p[:, 2]), _interp(p[:, 1], p[:, 3]).transpose(0, 2, 1)
    return p, ry @ c @ rxt


def _copy_residual(w: np.ndarray, sigma: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Expected ``(clip(w + n, lo, hi) − w)²`` per pixel for Gaussian noise ``n`` of σ ``sigma``:
    what a true copy of ``w`` under the query's noise leaves."""
    from scipy.special import ndtr

    s = np.maximum(sigma, 1e-6)
    a, b = (lo - w) / s, (hi - w) / s
    pa, pb = ndtr(a), ndtr(b)
    phi_a, phi_b = np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi), np.exp(-0.5 * b * b) / np.sqrt(2 * np.pi)
    inner = (pb - pa) - (b * phi_b - a * phi_a)
    return s * s * (a * a * pa + b * b * (1 - pb) + inner)


def _scores(q, sigma, lo, hi, rate, c) -> tuple[np.ndarray, np.ndarray]:
    p, w = _register(q, c)
    resid = ((q - w) ** 2).sum(axis=(1, 2))
    stray = rate * ((hi - w) ** 2 + (lo - w) ** 2)  # a stray pixel replaces the value with lo or hi
    expected = ((1 - 2 * rate) * _copy_residual(w, sigma, lo, hi) + stray).sum(axis=(1, 2))
    energy = np.maximum((w**2).sum(axis=(1, 2)), 1e-3)
    penalty = ((p - _IDENTITY) ** 2 * _LAMBDA).sum(axis=1)
    return resid + penalty, (resid - expected) / energy


def scores(frames: list[Frame], candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(residual, excess)`` for each query frame and its candidate (uint8 pixels or 0..1 floats
    ``[N, 28, 28]``), pairwise. See the module docstring."""
    n = len(frames)
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    c = np.asarray(candidates)
    c = c.astype(np.float32) / np.float32(255) if c.dtype == np.uint8 else c.astype(np.float32)
    q = np.stack([f.ink for f in frames]).astype(np.float32)
    col = lambda name: np.asarray([getattr(f, name) for f in frames], np.float32)[:, None, None]  # noqa: E731
    args = (q, col("sigma"), col("lo"), col("hi"), col("impulses"), c)
    out_r, out_e = [], []
    for start in range(0, n, CHUNK):
        r, e = _scores(*(a[start : start + CHUNK] for a in args))
        out_r.append(r)
        out_e.append(e)
    return np.concatenate(out_r), np.concatenate(out_e)


# -- candidates from a code search ------------------------------------------------------------

CANDIDATES = 10  # a query's nearest stored images (by code) that are checked
GATE = 2.0  # ... of those, only the ones within GATE × the nearest one's code distance
GATE_FLOOR = 0.01  # (a cosine distance; so that an identical nearest one does not shut the gate)
DEFAULT_THRESHOLD = 0.04  # excess for versions calibrated before this check (about the shipped encoder's)


def checked(keys: np.ndarray, dist: np.ndarray, width: int = CANDIDATES) -> list[list[int]]:
    """Per row of a code search (ascending distances), the columns worth checking: the first
    ``width`` stored images within ``GATE`` × the nearest one's distance."""
    out = []
    for row_k, row_d in zip(keys, dist):
        limit = GATE * max(float(row_d[0]) if len(row_d) else 0.0, GATE_FLOOR)
        out.append([j for j in range(min(width, len(row_k))) if row_k[j] >= 0 and row_d[j] <= limit])
    return out


def check(frames: list[Frame], keys: np.ndarray, dist: np.ndarray, pixels_of, width: int = CANDIDATES
          ) -> list[list[tuple[int, float, float, float]]]:
    """Check each query's candidates: per row, ``(key, code distance, residual, excess)`` for the
    columns :func:`checked` picks. ``pixels_of(ids)`` returns stored pixels in the order asked."""
    cols = checked(keys, dist, width)
    pairs = [(i, j) for i, row in enumerate(cols) for j in row]
    if not pairs:
        return [[] for _ in cols]
    wanted = sorted({int(keys[i, j]) for i, j in pairs})
    where = {key: n for n, key in enumerate(wanted)}
    stored = pixels_of(wanted)
    r, e = scores([frames[i] for i, _ in pairs], stored[[where[int(keys[i, j])] for i, j in pairs]])
    out: list[list[tuple[int, float, float, float]]] = [[] for _ in cols]
    for (i, j), ri, ei in zip(pairs, r, e):
        out[i].append((int(keys[i, j]), float(dist[i, j]), float(ri), float(ei)))
    return out
