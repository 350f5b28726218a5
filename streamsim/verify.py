"""Checking a candidate near-duplicate against the query, pixel by pixel.

Codes find candidates; this module decides between them. A copy of a stored image (re-scanned,
shifted, under paper noise or stray pixels) differs from its original by the noise and by how
normalisation placed its ink — a slightly different box, so a slightly different scale and
offset. Another writer's same character differs by its *shape*. So each candidate's stored
pixels are registered onto the query's :class:`~streamsim.images.Frame` (the query's ink with its
noise kept, in the pixels' frame) by a scale and a shift per axis, found by Gauss-Newton steps
on lightly smoothed images with a prior that keeps the fit near the identity — and, where that
fit points to one, a small rotation (a re-scan laid a little askew: up to :data:`MAX_TURN`, under
a prior of :data:`TURN_SD`; not for queries under heavy paper noise, :data:`TURN_NOISE`), and then:

- *residual* — the squared difference left after the fit, plus the prior's penalty: the
  lower, the better a candidate explains the query. Used to order candidates.
- *excess* — that difference minus what the query's own noise (Gaussian σ, re-measured on the
  pixels far from both inks, and a rate of stray pixels; clipped where the image's value range
  clips it) would leave for a true copy, per unit of the candidate's *edge energy* (its squared
  gradient, summed). About 0 for a copy; for anything else, roughly the mean squared distance
  (px²) its ink would have to move to become the query's — a measure of shape, not of how thick
  or blurred the strokes are, so one threshold holds for thin pen strokes and soft, thick scans
  alike. Used, with a threshold calibrated per encoder version (:mod:`streamsim.calibrate`), to
  call a candidate a duplicate.

Batched numpy on ``[N, 28, 28]`` pairs: the scale-and-shift warps are separable, so each is two
28×28 matrix products; a turn is tried by resampling the candidate once and fitting again.

Example:
    >>> from streamsim.images import Frame
    >>> c = np.zeros((2, 28, 28), np.float32); c[:, 6:22, 12:16] = 1.0; c[1, 6:10, 16:20] = 1.0
    >>> q = Frame(np.roll(c[0], 1, axis=1), 0.0, 0.0, 1.0)   # bar shifted by a pixel
    >>> residual, excess = scores([q, q], c)                  # against itself, and a bar with a flag
    >>> bool(excess[0] < 0.01 < 0.1 < excess[1])
    True
"""

from __future__ import annotations

import os

import numpy as np

from .defaults import SIDE
from .images import Frame

ITERATIONS = 4
TURN_SD = 0.06  # radians (3.4°): the prior's spread of a copy's rotation (a re-scan laid a little askew) ...
MAX_TURN = 0.15  # ... the largest tried (8.6°) ...
MIN_TURN = 0.01  # ... and the smallest worth trying
TURN_SMOOTH = 1.2  # Gaussian σ (px), on top of SMOOTH, of the images a turn is estimated on
ROTATE_ORDER = 3  # a turned candidate is resampled by cubic splines: linear interpolation blurs fine strokes
TURN_NOISE = 0.1  # queries with paper noise of this σ or more are not tried turned
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
_WIDE = _blur_matrix(1.0)
_COARSE = _blur_matrix(TURN_SMOOTH)
INK_LEVEL = 0.02  # where the registered candidate, smoothed by σ 1 px, exceeds this: near its ink
MIN_BACKGROUND = 50  # pixels, to re-measure the query's noise on
_LAMBDA = (PRIOR_NOISE / PRIOR_SD**2).astype(np.float32)
_PRIOR_H = np.diag(_LAMBDA)[None]  # the prior's term of the normal equations
_IDENTITY = np.array([1, 1, 0, 0], np.float32)
CHUNK = 4096  # pairs computed at once (about 40 MB of intermediates)


def _interp(scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Linear-interpolation matrices ``[N, 28, 28]``: output row i samples the source at
    ``scale × (i − centre) + shift + centre`` (0 outside) — each row's weights are the tent
    ``max(0, 1 − |position − column|)``."""
    pos = scale[..., None] * _U + shift[..., None] + _CENTRE  # [N, 28] (or [N, axes, 28])
    return np.maximum(np.float32(1) - np.abs(pos[..., None] - _COLUMNS), np.float32(0))


def _difference_matrix() -> np.ndarray:
    """``D @ image``: the image's central differences down the rows (one-sided at the edges)."""
    d = np.zeros((SIDE, SIDE), np.float32)
    d[0, :2] = -1, 1
    d[-1, -2:] = -1, 1
    i = np.arange(1, SIDE - 1)
    d[i, i - 1], d[i, i + 1] = -0.5, 0.5
    return d


_COLUMNS = np.arange(SIDE, dtype=np.float32)
_DIFF = _difference_matrix()
_UY, _UX = _U[None, :, None], _U[None, None, :]  # the lever arms down the rows and along the columns


def _warps(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(R_y, R_x.T)`` of :func:`_interp` for parameters ``p [N, 4]`` (both axes in one pass)."""
    r = _interp(p[:, :2], p[:, 2:])  # [N, 2, 28, 28]
    return r[:, 0], r[:, 1].transpose(0, 2, 1)


def _register(q: np.ndarray, c: np.ndarray, start: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``(scale_y, scale_x, shift_y, shift_x)`` mapping each candidate ``c`` onto its query
    ``q`` (``[N, 28, 28]`` floats, ink 0..1): Gauss-Newton on the smoothed images, with the prior,
    from the identity or ``start``. Returns ``(params [N, 4], warped candidates, turn step [N])``:
    the last step is the Gauss-Newton step a rotation about the centre would take from there (in
    radians, under its prior :data:`TURN_SD`) — how far the candidate looks turned."""
    n = q.shape[0]
    qs = _BLUR @ q @ _BLUR.T
    cs = _BLUR @ c @ _BLUR.T
    # image, d/dy, d/dx side by side, [N, 28, 3 × 28]: one product per pair warps the rows of all three
    both = np.concatenate([cs, _DIFF @ cs, cs @ _DIFF.T], axis=2)
    p = np.zeros((n, 4), np.float32) + _IDENTITY if start is None else start.astype(np.float32)
    jac = np.empty((n, 4, SIDE, SIDE), np.float32)
    for _ in range(ITERATIONS):
        ry, rxt = _warps(p)
        rows = (ry @ both).reshape(n, SIDE, 3, SIDE).transpose(0, 2, 1, 3).reshape(n, 3 * SIDE, SIDE)
        w, ty, tx = (rows @ rxt).reshape(n, 3, SIDE, SIDE).transpose(1, 0, 2, 3)
        # the Jacobian's columns by (scale_y, scale_x, shift_y, shift_x), and its normal equations
        np.multiply(ty, _UY, out=jac[:, 0])
        np.multiply(tx, _UX, out=jac[:, 1])
        jac[:, 2], jac[:, 3] = ty, tx
        flat = jac.reshape(n, 4, -1)
        r = (qs - w).reshape(n, -1, 1)
        h = flat @ flat.transpose(0, 2, 1) + _PRIOR_H
        g = (flat @ r)[..., 0] - (p - _IDENTITY) * _LAMBDA
        p = p + np.linalg.solve(h, g[..., None])[..., 0]
        np.clip(p[:, :2], 0.7, 1.4, out=p[:, :2])
        np.clip(p[:, 2:], -6.0, 6.0, out=p[:, 2:])
    # the turn, by its Jacobian column at the last iteration's warp (image gradients times the
    # lever arm about the centre), against the residual left
    # (on images smoothed further, where a turn of a few degrees is still a small change)
    jt = _COARSE @ (ty * _UX - tx * _UY) @ _COARSE.T
    rc = _COARSE @ r.reshape(n, SIDE, SIDE) @ _COARSE.T
    turn = (jt * rc).sum(axis=(1, 2)) / ((jt * jt).sum(axis=(1, 2)) + PRIOR_NOISE / TURN_SD**2)
    ry, rxt = _warps(p)
    return p, ry @ c @ rxt, turn


def _clipped(w: np.ndarray, sigma: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(bias², variance)`` of ``clip(w + n, lo, hi)`` about ``w`` for Gaussian noise ``n`` of σ
    ``sigma``, per pixel."""
    from scipy.special import ndtr

    s = np.maximum(sigma, 1e-6)
    a, b = (lo - w) / s, (hi - w) / s
    pa, pb = ndtr(a), ndtr(b)
    phi_a, phi_b = np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi), np.exp(-0.5 * b * b) / np.sqrt(2 * np.pi)
    mid = pb - pa
    bias = (lo - w) * pa + (hi - w) * (1 - pb) + s * (phi_a - phi_b)  # E[clip] − w
    second = (lo - w) ** 2 * pa + (hi - w) ** 2 * (1 - pb) + s * s * (mid - (b * phi_b - a * phi_a))
    return bias * bias, np.maximum(second - bias * bias, 0)


def _copy_residual(w, sigma, lo, hi) -> np.ndarray:
    """Expected squared difference per pixel between a copy of ``w`` under the query's noise and
    ``w``: the clipped noise's bias² plus its variance."""
    bias2, var = _clipped(w, sigma, lo, hi)
    return bias2 + var


def _summed_copy_residual(w, sigma, lo, hi) -> np.ndarray:
    """:func:`_copy_residual` summed over each image of ``w`` ``[N, H, W]`` (σ, lo, hi: ``[N]``),
    computed pixel by pixel only where ``w`` is not 0 (the rest share one value per image)."""
    base = _copy_residual(np.zeros(len(w), w.dtype), sigma, lo, hi)
    img, *_ = nz = np.nonzero(w)
    extra = _copy_residual(w[nz], sigma[img], lo[img], hi[img]) - base[img]
    return base * w[0].size + np.bincount(img, weights=extra, minlength=len(w))


def _background_sigma(q, background, sigma, lo, hi) -> np.ndarray:
    """σ of the query's noise re-measured on ``background`` (pixels far from both the query's and
    the registered candidate's ink): the σ whose clipped Gaussian gives the mean square seen
    there (a mean square uses every pixel; the frame's σ, from a percentile, is rougher). Where
    fewer than :data:`MIN_BACKGROUND` pixels qualify, ``sigma``."""
    count = background.sum(axis=(1, 2))
    seen = (q * q * background).sum(axis=(1, 2)) / np.maximum(count, 1)
    a, b = np.full(len(q), 1e-6, np.float32), np.full(len(q), 3.0, np.float32)
    # the mean square rises with σ: search the bracket, `split` ways a round — many ways for a few
    # pairs (fewer, larger numpy calls), halving for many (less arithmetic); as fine either way
    split, rounds = (_SPLIT, _ROUNDS) if len(q) < _FEW_PAIRS else (2, 30)
    zero = np.zeros((len(q), split - 1), np.float32)
    step = np.arange(1, split, dtype=np.float32) / np.float32(split)
    lo_, hi_ = lo[:, 0], hi[:, 0]
    rows = np.arange(len(q))
    for _ in range(rounds):
        at = a[:, None] + (b - a)[:, None] * step  # [N, split − 1]
        below = (_copy_residual(zero, at, lo_, hi_) <= seen[:, None]).sum(axis=1)  # points still at or below
        a, b = (np.where(below > 0, at[rows, np.maximum(below - 1, 0)], a),
                np.where(below < split - 1, at[rows, np.minimum(below, split - 2)], b))
    return np.where(count >= MIN_BACKGROUND, 0.5 * (a + b), sigma[:, 0, 0])[:, None, None]


_SPLIT, _ROUNDS = 32, 6  # 32⁶ ≈ 2³⁰: as fine as 30 halvings of (0, 3], in 6 evaluations ...
_FEW_PAIRS = 64  # ... for fewer pairs than this


def edge_energy(w: np.ndarray) -> np.ndarray:
    """Sum of squared differences between neighbouring pixels (rows and columns) of each image
    ``[N, H, W]``: how much a small displacement of its ink changes it."""
    return (np.diff(w, axis=1) ** 2).sum(axis=(1, 2)) + (np.diff(w, axis=2) ** 2).sum(axis=(1, 2))


def _turned(q: np.ndarray, c: np.ndarray, allow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Register each candidate onto its query allowing a small rotation: the scale-and-shift fit
    (:func:`_register`), then, where it points to a turn, the candidate turned by it (up to
    :data:`MAX_TURN`) and fitted again from there; the better of the two by residual plus the
    turn's prior penalty — for the pairs in ``allow``. Returns ``(penalty [N], warped candidates)``."""
    p, w, turn = _register(q, c)
    penalty = ((p - _IDENTITY) ** 2 * _LAMBDA).sum(axis=1)
    redo = np.flatnonzero((np.abs(turn) >= MIN_TURN) & allow)
    if len(redo):
        t = np.clip(turn[redo], -MAX_TURN, MAX_TURN)
        p2, w2, _ = _register(q[redo], _rotate(c[redo], t), p[redo])
        pen2 = ((p2 - _IDENTITY) ** 2 * _LAMBDA).sum(axis=1) + PRIOR_NOISE * (t / TURN_SD) ** 2
        old = ((q[redo] - w[redo]) ** 2).sum(axis=(1, 2)) + penalty[redo]
        better = ((q[redo] - w2) ** 2).sum(axis=(1, 2)) + pen2 < old
        w[redo[better]], penalty[redo[better]] = w2[better], pen2[better]
    return penalty, w


def _rotate(c: np.ndarray, turn: np.ndarray) -> np.ndarray:
    """Images ``[N, 28, 28]`` turned by ``turn`` radians about the centre (cubic splines, 0 outside)."""
    from scipy.ndimage import affine_transform

    out = np.empty(c.shape, np.float32)
    centre = np.full(2, _CENTRE)
    for i, t in enumerate(np.asarray(turn, np.float64)):
        m = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # output (y, x) -> source (y, x)
        out[i] = affine_transform(c[i], m, offset=centre - m @ centre, order=ROTATE_ORDER, mode="constant", cval=0.0)
    return out


def _scores(q, sigma, lo, hi, rate, ink, c, turns: bool = True) -> tuple[np.ndarray, np.ndarray]:
    # a heavily noisy query is not tried turned: under its noise a turn fits another writer's
    # character about as often as it straightens a copy
    penalty, w = _turned(q, c, (sigma[:, 0, 0] < TURN_NOISE) & turns)
    resid = ((q - w) ** 2).sum(axis=(1, 2))
    stray = rate * ((hi - w) ** 2 + (lo - w) ** 2)  # a stray pixel replaces the value with lo or hi
    expected = stray.sum(axis=(1, 2))
    noisy = sigma[:, 0, 0] > 0
    if noisy.any():
        far = ~(ink[noisy] | ((_WIDE @ w[noisy] @ _WIDE.T) > INK_LEVEL))
        s = _background_sigma(q[noisy], far, sigma[noisy], lo[noisy], hi[noisy])
        gauss = _summed_copy_residual(w[noisy], s[:, 0, 0], lo[noisy, 0, 0], hi[noisy, 0, 0])
        expected[noisy] += (1 - 2 * rate[noisy, 0, 0]) * gauss
    energy = np.maximum(edge_energy(w), 1e-3)
    return resid + penalty, (resid - expected) / energy


def scores(frames: list[Frame], candidates: np.ndarray, turns: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(residual, excess)`` for each query frame and its candidate (uint8 pixels or 0..1 floats
    ``[N, 28, 28]``), pairwise. See the module docstring. ``turns``: try a small rotation too (for
    queries without heavy paper noise)."""
    n = len(frames)
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    c = np.asarray(candidates)
    c = c.astype(np.float32) / np.float32(255) if c.dtype == np.uint8 else c.astype(np.float32)
    q = np.stack([f.ink for f in frames]).astype(np.float32)
    col = lambda name: np.asarray([getattr(f, name) for f in frames], np.float32)[:, None, None]  # noqa: E731
    ink = np.stack([f.ink_mask for f in frames])
    args = (q, col("sigma"), col("lo"), col("hi"), col("impulses"), ink, c)
    workers = _workers()
    step = min(CHUNK, max(MIN_SPLIT, -(-n // workers)))
    run = lambda start: _scores(*(a[start : start + step] for a in args), turns=turns)  # noqa: E731
    starts = range(0, n, step)
    done = [run(starts[0])] if len(starts) == 1 else list(_pool().map(run, starts))
    return np.concatenate([r for r, _ in done]), np.concatenate([e for _, e in done])


MIN_SPLIT = 512  # pairs: smaller batches are scored on the calling thread
_POOL: tuple[int, object] | None = None  # (pid, executor): a forked child makes its own


def _workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _pool():
    """Threads that score chunks of pairs side by side (numpy releases the GIL in the matrix
    products that dominate)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="streamsim-verify"))
    return _POOL[1]


# -- candidates from a code search ------------------------------------------------------------

CANDIDATES = 16  # a query's nearest stored images (by code) that are checked
GATE = 3.0  # ... of those, only the ones within GATE × the nearest one's code distance
# A query with paper noise has a less exact code: its original can rank lower, further out.
NOISY_CANDIDATES = 32
NOISY_GATE = 4.0
GATE_FLOOR = 0.01  # (a cosine distance; so that an identical nearest one does not shut the gate)
METHOD = "verify-edges"  # recorded with a calibration; thresholds recorded under another method are not comparable
DEFAULT_THRESHOLD = 0.07  # excess for versions calibrated otherwise (about the shipped encoder's)
# A noisy query's excess is uncertain by about the noise energy's own fluctuation; differences
# between its candidates are not (the same noise is in every one): see accepted(). GAP is in
# squared ink over the 28×28 frame.
NOISY_MARGIN = 2.5
GAP = 4.0


def search_width(frames: list[Frame], width: int = CANDIDATES) -> int:
    """How many nearest stored images a code search must return for :func:`check` to see every
    candidate of these queries (``width`` for clean ones, at least :data:`NOISY_CANDIDATES` when
    any is noisy)."""
    return max(width, NOISY_CANDIDATES) if any(f.sigma > 0 for f in frames) else width


def checked(keys: np.ndarray, dist: np.ndarray, width: int = CANDIDATES, noisy=None) -> list[list[int]]:
    """Per row of a code search (ascending distances), the columns worth checking: the first
    ``width`` stored images within ``GATE`` × the nearest one's distance — for rows marked
    ``noisy``, the first ``max(width, NOISY_CANDIDATES)`` within ``NOISY_GATE`` ×."""
    out = []
    for i, (row_k, row_d) in enumerate(zip(keys, dist)):
        wide = noisy is not None and bool(noisy[i])
        n, gate = (max(width, NOISY_CANDIDATES), NOISY_GATE) if wide else (width, GATE)
        limit = gate * max(float(row_d[0]) if len(row_d) else 0.0, GATE_FLOOR)
        out.append([j for j in range(min(n, len(row_k))) if row_k[j] >= 0 and row_d[j] <= limit])
    return out


def check(frames: list[Frame], keys: np.ndarray, dist: np.ndarray, pixels_of, width: int = CANDIDATES,
          memo=None, turns: bool = True) -> list[list[tuple[int, float, float, float]]]:
    """Check each query's candidates: per row, ``(key, code distance, residual, excess)`` for the
    columns :func:`checked` picks (a noisy frame's wider). ``pixels_of(ids)`` returns stored
    pixels in the order asked; ``keys`` should have :func:`search_width` columns.

    ``memo`` (a :class:`weakref.WeakKeyDictionary`, optional): ``{frame: {key: (residual,
    excess)}}`` of pairs already scored — a frame checked again (the same query in another mode)
    is only scored against candidates it has not met; new scores are added. Valid because a
    stored image's pixels never change. ``turns``: passed to :func:`scores` (a memo holds scores
    of one kind)."""
    cols = checked(keys, dist, width, [f.sigma > 0 for f in frames])
    known = [memo.setdefault(f, {}) if memo is not None else {} for f in frames]
    keyed = np.asarray(keys).tolist()  # Python ints
    pairs = [(i, j) for i, row in enumerate(cols) for j in row if keyed[i][j] not in known[i]]
    if pairs:
        wanted = sorted({keyed[i][j] for i, j in pairs})
        where = {key: n for n, key in enumerate(wanted)}
        stored = pixels_of(wanted)
        r, e = scores([frames[i] for i, _ in pairs], stored[[where[keyed[i][j]] for i, j in pairs]], turns)
        for (i, j), ri, ei in zip(pairs, r.tolist(), e.tolist()):
            known[i][keyed[i][j]] = (ri, ei)
    return [[(keyed[i][j], float(dist[i, j]), *known[i][keyed[i][j]]) for j in row] for i, row in enumerate(cols)]


def accepted(row: list[tuple[int, float, float, float]], frame: Frame, threshold: float
             ) -> list[tuple[int, float, float, float]]:
    """The candidates of one query (rows of :func:`check`) that are near-duplicates of it, best
    explained first. A clean query: every one with excess at most ``threshold``. A noisy query
    (whose excess is only as exact as its noise energy): among the candidates that explain it
    about as well as the best one (residual within ``GAP`` of it) those with excess at most
    ``threshold`` — and when the best one leads all others by ``GAP``, it alone, up to
    ``NOISY_MARGIN × threshold``."""
    ranked = sorted(row, key=lambda c: c[2])
    if frame.sigma <= 0 or not ranked:
        return [c for c in ranked if c[3] <= threshold]
    best = ranked[0]
    close = [c for c in ranked if c[2] < best[2] + GAP]
    if len(close) == 1:
        return [best] if best[3] <= NOISY_MARGIN * threshold else []
    return [c for c in close if c[3] <= threshold]
