"""Grey image → pixels: MNIST-style normalisation.

*Pixels* are ``uint8 [28, 28]`` arrays with the ink bright on black, fitted to a 20-px box and
centred by centre of mass (the MNIST convention); everything in streamsim after loading works on
them. :func:`normalise_grey` takes a grey float32 array in 0..1, as :mod:`streamsim.decode` makes
it; :func:`normalise` takes any supported numpy array. With ``frame=True`` both also return the
image's :class:`Frame`: what it looked like before its pixels were floored and clipped, which a
duplicate check compares with (:mod:`streamsim.verify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from PIL import Image

from .decode import ImageError, array_to_grey, check_array
from .defaults import PIXELS_SHAPE, SIDE  # re-exported: the pixels' side and shape

__all__ = ["NO_INK_LEFT", "PIXELS_SHAPE", "SIDE", "Frame", "normalise", "normalise_grey"]

_BOX = 20  # the ink's longer side after fitting
_CENTRE = 14.0  # where the centre of mass lands (row, col), as in MNIST
_MIN_CONTRAST = 0.1  # ink contrast (0..1) below which an image is blank
_BBOX_LEVEL = 0.2  # fraction of the strongest ink that counts for the bounding box
_NOISE_K = 3.0  # background noise allowance, in robust standard deviations
_MAX_FRAME_SAMPLES = 200_000
_NOISY = 0.05  # paper noise (robust σ, 0..1) above which the ink's box is found on a smoothed copy
_DENOISE_SIGMA = 1.0  # Gaussian σ of that smoothing, in pixels of a 28-px-wide image
_MASK_BLOCKS = 8  # a big image is smoothed as block means, this many blocks per σ
_BIG_CROP = 2  # a noisy image whose ink box is scaled down more than this many times: see _big_noisy_ink
_SPECKLED = 0.005  # fraction of the image in isolated specks (salt-and-pepper) that also counts as noisy
_NOISE_FLOOR = 0.5 / 255  # paper noise (σ, 0..1 of the full range) below half a grey level is no noise

NO_INK_LEFT = "no ink left after normalising (the marks are no stronger than the paper's noise)"


@dataclass(frozen=True, eq=False)
class Frame:
    """What a query looked like before its pixels were floored and clipped, for checking a
    candidate duplicate against it (:mod:`streamsim.verify`).

    Attributes:
        ink: float32 ``[28, 28]`` in the pixels' own frame (same crop, scale and placement): the
            image's ink, 0 at the background level and 1 at the ink's contrast, paper noise kept.
        sigma: The paper noise (Gaussian σ) in those units, measured around the ink's box.
        lo, hi: Where the image's own value range clips ``ink`` (e.g. 0 and 1 for dark paper
            noise clipped at black).
        impulses: The rate of stray pixels (salt and pepper) of each kind, set to ``lo`` or ``hi``.
        ink_mask: bool ``[28, 28]``, where the ink of the image's pixels lies (smoothed by σ 1 px,
            above 0.1): the rest is background, on which a check may re-measure the noise.
    """

    ink: np.ndarray
    sigma: float
    lo: float
    hi: float
    impulses: float = 0.0
    ink_mask: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.ink_mask is None:
            object.__setattr__(self, "ink_mask", _near_ink(np.clip(self.ink, 0, 1)))

    @classmethod
    def of_pixels(cls, pixels: np.ndarray) -> Frame:
        """The frame of an image known only by its pixels ``uint8 [28, 28]`` (no noise measured)."""
        return cls(np.asarray(pixels, np.float32) * np.float32(1 / 255), 0.0, 0.0, 1.0)


def normalise(array: np.ndarray, *, source: str = "<array>", frame: bool = False):
    """Normalise an image array to pixels (MNIST convention).

    Detects polarity from the border (ink ends up bright on black), removes the background,
    crops to the ink, fits the longer side to 20 px and places the result in a 28×28 canvas
    with its centre of mass at (14, 14).

    Args:
        array: ``[H, W]`` or ``[H, W, C]`` (C in 1, 3, 4; alpha composited on white);
            ``uint8``, ``bool``, float (max ≤ 1 means 0..1, else 0..255) or another integer
            type (scaled by its maximum).
        source: Name used in error messages.
        frame: Return ``(pixels, Frame)``: also the image's :class:`Frame`.

    Returns:
        ``uint8 [28, 28]`` pixels.

    Raises:
        ImageError: The array is blank, empty, too large, has a bad shape or non-finite values.
        TypeError: The array has an unsupported dtype.

    Example:
        >>> page = np.full((60, 40), 255, np.uint8)   # white paper
        >>> page[10:50, 15:25] = 0                      # a dark bar
        >>> px = normalise(page)
        >>> px.shape, px.dtype, int(px.max())
        ((28, 28), dtype('uint8'), 255)
        >>> rows, cols = np.nonzero(px)                 # now a bright 20×5 bar, centred
        >>> [int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())]
        [5, 24, 12, 16]
    """
    check_array(array, source)
    grey = array_to_grey(array, source)
    return normalise_grey(grey, source, frame=frame)


def normalise_grey(grey: np.ndarray, source: str, *, frame: bool = False):
    """Normalise a grey image to pixels: what :func:`normalise` does once the array is checked and grey.

    Args:
        grey: float32 ``[H, W]`` in 0..1, as :mod:`streamsim.decode` makes it.
        source: Name used in error messages.
        frame: Return ``(pixels, Frame)``: also the image's :class:`Frame` (:func:`_linear_frame`).

    Returns:
        ``uint8 [28, 28]`` pixels.

    Raises:
        ImageError: The image is blank, or no ink is left after normalising.
    """
    frame_ = _frame(grey)
    background = _median(frame_)
    noise = _border_noise(frame_, background)
    hi = float(grey.max()) - background
    lo = background - float(grey.min())
    # Ink lies on the side of the background with the stronger contrast; a tie goes by the
    # usual convention (bright background → dark ink). Either way ink ends up bright on black.
    invert = lo > hi or (lo == hi and background > 0.5)
    contrast = lo if invert else hi
    if contrast < _MIN_CONTRAST:
        raise ImageError(source, "blank image (no ink)")
    # Paper noise (robust sigma of the border) is ignored: values within the floor count as
    # background, and the bounding box only counts ink well clear of the noise, so isolated
    # faint specks and noisy paper do not stretch it.
    floor = min(_NOISE_K * noise, 0.5 * contrast)
    level = min(max(_BBOX_LEVEL * contrast, floor + _NOISE_K * noise), 0.6 * contrast)
    speckled = noise <= _NOISY and _speckled(grey, background, contrast)
    noisy = noise > _NOISY or speckled
    if noisy:
        strong = _smoothed_mask(grey, invert, speckled=speckled)
    elif invert:
        strong = grey < np.float32(background - level)
    else:
        strong = grey > np.float32(background + level)
    strong = _supported(strong)
    rows = strong.any(axis=1).nonzero()[0]
    cols = strong.any(axis=0).nonzero()[0]
    if not len(rows):
        raise ImageError(source, NO_INK_LEFT)
    crop = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if noisy and max(crop.shape) > _BIG_CROP * _BOX:
        contrast, floor = _big_noisy_ink(crop, background, invert, contrast, noise)
    # ink = (distance from the background - floor) / (contrast - floor), clipped to 0..1.
    sign = -1.0 if invert else 1.0
    ink = crop - np.float32(background + sign * floor)
    ink *= np.float32(sign / (contrast - floor))
    np.maximum(ink, 0.0, out=ink)
    np.minimum(ink, 1.0, out=ink)
    if not (ink > 0).any():  # NaN-free by construction; marks no stronger than the floor vanish here
        raise ImageError(source, NO_INK_LEFT)
    box = _fit(ink)
    top, left = _offset(box)
    pixels = _place(box, top, left)
    if not pixels.any():
        raise ImageError(source, NO_INK_LEFT)
    if not frame:
        return pixels
    lin, inside = _linear_frame(grey, background, sign / contrast, (int(rows[0]), int(cols[0])), crop.shape,
                                box.shape, (top, left))
    around = inside.copy()
    h, w = box.shape
    around[max(0, top - 1) : top + h + 1, max(0, left - 1) : left + w + 1] = False
    clip = ((0.0 - background) * sign / contrast, (1.0 - background) * sign / contrast)
    lo, hi = min(clip), max(clip)
    if around.sum() >= 16:
        sigma, impulses = _frame_noise(lin[around], lo, hi)
    else:
        sigma, impulses = noise / contrast, 0.0
    if sigma * contrast < _NOISE_FLOOR:  # e.g. float residue of the resampling around clean ink: no paper noise
        sigma = 0.0
    return pixels, Frame(lin, float(sigma), float(lo), float(hi), float(impulses), _near_ink(pixels * np.float32(1 / 255)))


# --------------------------------------------------------------------------------- internals


def _frame(grey: np.ndarray) -> np.ndarray:
    """The border pixels: a 1-px frame, or ~5% of the shorter side for big images."""
    h, w = grey.shape
    short = min(h, w)
    k = 1 if short < 100 else short // 20
    if 2 * k >= short:
        return grey.reshape(-1)
    if k == 1:
        return np.concatenate((grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]))
    frame = np.concatenate(
        (grey[:k].reshape(-1), grey[-k:].reshape(-1), grey[k:-k, :k].reshape(-1), grey[k:-k, -k:].reshape(-1))
    )
    if frame.size > _MAX_FRAME_SAMPLES:
        frame = frame[:: frame.size // _MAX_FRAME_SAMPLES + 1]
    return frame


def _border_noise(border: np.ndarray, background: float) -> float:
    """The paper's noise level (a Gaussian σ) from the border's 90th percentile of |deviation| from
    the background: unlike the MAD it does not collapse to 0 when noise is clipped at black (half
    the border exactly 0)."""
    dev = np.abs(border - np.float32(background))
    at = int(0.9 * (dev.size - 1))
    return float(np.partition(dev, at)[at]) / 1.2816


def _median(x: np.ndarray) -> float:
    """Median of a 1-D array (np.median's overhead dominates on small frames)."""
    n = x.size
    k = n // 2
    if n % 2:
        return float(np.partition(x, k)[k])
    part = np.partition(x, (k - 1, k))
    return 0.5 * (float(part[k - 1]) + float(part[k]))


def _near_ink(ink: np.ndarray) -> np.ndarray:
    """Where ink lies, bool [28, 28]: the ink (0..1) smoothed by σ 1 px, above 0.1 (a lone
    stray pixel stays below)."""
    return _NEAR_INK_BLUR @ np.asarray(ink, np.float32) @ _NEAR_INK_BLUR.T > 0.1


def _gaussian(sigma: float) -> np.ndarray:
    """A normalised Gaussian kernel of σ ``sigma``, radius ``int(4σ + 0.5)`` (SciPy's ``gaussian_filter``'s)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _resampling(pos: np.ndarray, n: int, sigma: float = 0.0, *, edge: str = "nearest") -> np.ndarray:
    """Weights ``float32 [len(pos), n]``: row i is the linear interpolation, at position
    ``pos[i]``, of a signal of length ``n`` first smoothed by a Gaussian of σ ``sigma`` (none at
    0). Outside the signal the smoothing repeats the edge value (``edge="nearest"``) or reads 0
    (``"constant"``); a tap of the interpolation outside ``0 … n − 1`` weighs 0. Applied to both
    axes (``R @ image @ C.T``) it is SciPy's ``gaussian_filter`` then ``map_coordinates(order=1)``
    on a regular grid, in two small matrix products."""
    pos = np.asarray(pos, np.float64)
    left = np.floor(pos).astype(np.int64)
    frac = pos - left
    taps = np.stack([left, left + 1], axis=1)  # [m, 2]
    weight = np.stack([1.0 - frac, frac], axis=1) * ((taps >= 0) & (taps < n))
    kernel = _gaussian(sigma) if sigma > 0 else np.ones(1)
    r = len(kernel) // 2
    src = taps[:, :, None] + np.arange(-r, r + 1)  # [m, 2, taps of the kernel]
    weight = weight[:, :, None] * kernel
    if edge != "nearest":
        weight = np.where((src >= 0) & (src < n), weight, 0.0)
    src = np.clip(src, 0, n - 1)
    out = np.zeros((len(pos), n), np.float64)
    np.add.at(out, (np.broadcast_to(np.arange(len(pos))[:, None, None], src.shape), src), weight)
    return out.astype(np.float32)


_NEAR_INK_BLUR = _resampling(np.arange(SIDE, dtype=np.float64), SIDE, 1.0, edge="constant")


def _linear_frame(grey: np.ndarray, background: float, gain: float, origin: tuple[int, int],
                  crop_shape: tuple[int, int], box_shape: tuple[int, int], offset: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The image as ink in the pixels' own frame, float32 [28, 28]: ``(grey − background) × gain``
    (ink bright, 0 = background, 1 = the ink's contrast; paper noise kept, not floored or clipped)
    resampled by the same crop, scale and placement as the pixels, so that the canvas also shows
    what lies around the ink's box. Where it falls outside the image it is 0 (the second array
    says where it falls inside). Downscaling is anti-aliased (a Gaussian of the scale's width
    first), so the noise is averaged as in the pixels. Only the window the canvas covers is read."""
    sy, sx = box_shape[0] / crop_shape[0], box_shape[1] / crop_shape[1]
    blur = (max(0.0, 0.5 / sy - 0.5), max(0.0, 0.5 / sx - 0.5)) if min(sy, sx) < 1 else (0.0, 0.0)
    rr = (np.arange(SIDE, dtype=np.float32) - offset[0] + 0.5) / sy - 0.5 + origin[0]
    cc = (np.arange(SIDE, dtype=np.float32) - offset[1] + 0.5) / sx - 0.5 + origin[1]
    h, w = grey.shape
    r0 = min(max(0, int(np.floor(rr[0])) - int(4 * blur[0]) - 2), h - 1)
    r1 = max(min(h, int(np.ceil(rr[-1])) + int(4 * blur[0]) + 3), r0 + 1)
    c0 = min(max(0, int(np.floor(cc[0])) - int(4 * blur[1]) - 2), w - 1)
    c1 = max(min(w, int(np.ceil(cc[-1])) + int(4 * blur[1]) + 3), c0 + 1)
    window = (grey[r0:r1, c0:c1] - np.float32(background)) * np.float32(gain)
    rows = _resampling(rr - r0, r1 - r0, blur[0])
    cols = _resampling(cc - c0, c1 - c0, blur[1])
    inside = ((rr >= 0) & (rr <= h - 1))[:, None] & ((cc >= 0) & (cc <= w - 1))[None, :]
    ink = (rows @ window @ cols.T).astype(np.float32)
    return np.where(inside, ink, np.float32(0)), inside


def _frame_noise(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Paper noise from background pixels (0 = the background level), ink units: ``(σ, rate)`` —
    the σ of Gaussian noise, clipped to ``[lo, hi]``, whose 90th percentile of ``|value|`` is the
    observed one (robust to a few stray pixels), and the rate of stray pixels of each kind (set to
    ``lo`` or ``hi``): the share beyond half the ink's contrast that the Gaussian does not explain,
    the same rate assumed for the kind that cannot show against this background."""
    normal = NormalDist()
    t = float(np.quantile(np.abs(values), 0.9))
    tails = int(hi > t) + int(-lo > t)  # P(|clip(n)| > t) = tails × P(n > t): solve it for 0.1
    sigma = t / normal.inv_cdf(1.0 - 0.1 / tails) if t > 0 and tails else 0.0
    far = float(np.mean(np.abs(values) > 0.5))
    gauss = 0.0
    if sigma > 0:
        gauss = (1.0 - normal.cdf(0.5 / sigma) if hi > 0.5 else 0.0) + (normal.cdf(-0.5 / sigma) if -lo > 0.5 else 0.0)
    return sigma, max(0.0, far - gauss)


def _speckled(grey: np.ndarray, background: float, contrast: float) -> bool:
    """Salt-and-pepper on clean paper: more than 0.5 % of the image in isolated specks (pixels at
    half the ink's contrast or more with no such 8-neighbour)."""
    mask = np.abs(grey - np.float32(background)) > np.float32(0.5 * contrast)
    isolated = mask & (_neighbourhood_count(mask) < 2)
    return int(isolated.sum()) > _SPECKLED * mask.size


def _smoothed_mask(grey: np.ndarray, invert: bool, *, speckled: bool) -> np.ndarray:
    """Where the ink is on grainy or speckled paper: thresholds a smoothed copy (a median filter
    first for specks), where the grain has averaged out but strokes have not, so that specks
    neither stretch the box nor (on a big noisy scan, where thousands of them cluster) fill it.
    Only the box comes from here; the ink values are the image's own. A big image is smoothed as
    block means (:data:`_MASK_BLOCKS` of them per smoothing σ, so the copy keeps its shape) and the
    smoothed copy interpolated back, so the cost does not grow with the square of the scan's size."""
    from scipy.ndimage import gaussian_filter, median_filter

    h, w = grey.shape
    scale = max(h, w) / SIDE
    step = max(1, int(_DENOISE_SIGMA * scale / _MASK_BLOCKS))
    g = _block_means(grey, step) if step > 1 else grey
    scale /= step
    if speckled:
        g = median_filter(g, size=max(3, 2 * round(scale) + 1), mode="nearest")
    g = gaussian_filter(g, _DENOISE_SIGMA * scale, mode="reflect")
    if step > 1:
        rows = _resampling(np.clip((np.arange(h) - (step - 1) / 2) / step, 0, g.shape[0] - 1), g.shape[0])
        cols = _resampling(np.clip((np.arange(w) - (step - 1) / 2) / step, 0, g.shape[1] - 1), g.shape[1])
        g = rows @ g @ cols.T
    frame = _frame(g)
    background = _median(frame)
    noise = _border_noise(frame, background)
    contrast = (background - float(g.min())) if invert else (float(g.max()) - background)
    level = min(max(_BBOX_LEVEL * contrast, _NOISE_K * noise), 0.6 * contrast)
    return g < np.float32(background - level) if invert else g > np.float32(background + level)


def _big_noisy_ink(crop: np.ndarray, background: float, invert: bool, contrast: float, noise: float
                   ) -> tuple[float, float]:
    """``(contrast, floor)`` for a noisy image whose ink box, ``crop``, is scaled down more than
    :data:`_BIG_CROP` times. Its pixels each average many
    of the scan's, which averages the noise away; so the ink's contrast is measured on the box
    averaged down to the pixels' size (area means: the strokes keep their strength, the noise
    does not reach out), not as the darkest or brightest pixel, which the noise's tail pushes out
    (a σ 0.08 grain adds a third to a 0.7 contrast, and the ink came out that much fainter than
    the clean scan's); and the floor under which ink counts as paper is set for the noise left
    after scaling down, not the scan's own."""
    lin = (crop - np.float32(background)) * np.float32(-1.0 if invert else 1.0)
    s = _BOX / max(lin.shape)
    small = Image.fromarray(np.ascontiguousarray(lin, dtype=np.float32), mode="F").resize(
        (max(1, round(lin.shape[1] * s)), max(1, round(lin.shape[0] * s))), Image.Resampling.BOX)
    measured = float(np.asarray(small).max())
    if _MIN_CONTRAST <= measured < contrast:
        contrast = measured
    floor = min(_NOISE_K * noise * s, 0.5 * contrast)
    return contrast, floor


def _block_means(grey: np.ndarray, step: int) -> np.ndarray:
    """Means of ``step`` × ``step`` blocks, float32 (the last row and column of blocks padded
    with the edge's values)."""
    h, w = grey.shape
    ph, pw = -h % step, -w % step
    g = np.pad(grey, ((0, ph), (0, pw)), mode="edge") if ph or pw else grey
    return g.reshape((h + ph) // step, step, (w + pw) // step, step).mean(axis=(1, 3), dtype=np.float32)


def _supported(mask: np.ndarray) -> np.ndarray:
    """Drop isolated pixels (no strong 8-neighbour) so stray specks do not stretch the box;
    strokes, even 1 px wide, keep their pixels. Falls back to the mask if nothing is left."""
    kept = mask & (_neighbourhood_count(mask) >= 2)
    return kept if kept.any() else mask


def _neighbourhood_count(mask: np.ndarray) -> np.ndarray:
    """How many pixels of each 3×3 neighbourhood (the pixel included) are set: sums of shifted
    slices of a zero-bordered copy, rows then columns (a handful of array operations)."""
    h, w = mask.shape
    m = np.zeros((h + 2, w + 2), np.uint8)
    m[1:-1, 1:-1] = mask
    rows = m[:-2] + m[1:-1]
    rows += m[2:]
    out = rows[:, :-2] + rows[:, 1:-1]
    out += rows[:, 2:]
    return out


def _fit(ink: np.ndarray) -> np.ndarray:
    """Resize so the longer side is 20 px (aspect kept, anti-aliased, sides ≥ 1 px)."""
    h, w = ink.shape
    s = _BOX / max(h, w)
    nh, nw = max(1, min(_BOX, round(h * s))), max(1, min(_BOX, round(w * s)))
    if (nh, nw) == (h, w):
        return ink
    im = Image.fromarray(np.ascontiguousarray(ink, dtype=np.float32), mode="F")
    if s < 1:
        out = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0 if s < 1 / 3 else None)
    else:
        out = im.resize((nw, nh), Image.Resampling.BILINEAR)
    box = np.asarray(out, dtype=np.float32).copy()
    np.maximum(box, 0.0, out=box)  # Lanczos overshoots a little
    np.minimum(box, 1.0, out=box)
    if not box.any():  # a sub-pixel speck resampled away: keep it visible
        box[...] = float(ink.max())
    return box


_RAMP = np.arange(SIDE, dtype=np.float32)


def _offset(box: np.ndarray) -> tuple[int, int]:
    """Where the box's top-left corner goes so that its centre of mass lands at (14, 14), clamped inside."""
    h, w = box.shape
    row_mass = box.sum(axis=1)
    col_mass = box.sum(axis=0)
    total = float(row_mass.sum())
    if not total > 0:  # normalise_grey refuses inkless boxes before this; centre one if it comes
        return (SIDE - h) // 2, (SIDE - w) // 2
    cy = float(row_mass @ _RAMP[:h]) / total
    cx = float(col_mass @ _RAMP[:w]) / total
    top = min(max(math.floor(_CENTRE - cy + 0.5), 0), SIDE - h)
    left = min(max(math.floor(_CENTRE - cx + 0.5), 0), SIDE - w)
    return top, left


def _place(box: np.ndarray, top: int, left: int) -> np.ndarray:
    """Paste the box into the 28×28 canvas at (top, left), as uint8."""
    h, w = box.shape
    canvas = np.zeros(PIXELS_SHAPE, np.uint8)
    scaled = box * np.float32(255)
    scaled += np.float32(0.5)  # values are ≥ 0: truncation after +0.5 rounds half up
    canvas[top : top + h, left : left + w] = scaled
    return canvas
