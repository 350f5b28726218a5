"""Perturbations of whole images, in numpy: what scans, copies and other writers do to a character.

The same functions make the evaluation's perturbed queries (:func:`perturb`, fixed strengths), the
encoder's training views and the duplicate calibration's copies (:func:`random_copies`, random
mixtures). They work on uint8 images ``[N, H, W]`` of any size and either polarity (the ink is
detected from the border, strengths scale with the image), and return the same; a copy that is
meant to be seen the way a query is seen goes through :func:`normalise_all` afterwards.

Example:
    >>> x = np.zeros((2, 28, 28), np.uint8); x[:, 8:20, 12:16] = 255
    >>> perturb(x, "shift", seed=0).shape, random_copies(x, seed=0).dtype
    ((2, 28, 28), dtype('uint8'))
"""

from __future__ import annotations

import numpy as np

from . import images
from .defaults import PIXELS_SHAPE, SIDE

PERTURBATIONS = ("noise", "salt_pepper", "shift", "rotation", "elastic", "stroke")
NOISE_SIGMA = 0.3  # Gaussian, on a 0..1 scale, clipped
SALT_PEPPER = 0.05  # fraction of pixels set to black or white
SHIFT_PX = 3  # uniform integer shift on each axis, on a 28-px image
ROTATE_DEG = 10.0
ELASTIC_ALPHA, ELASTIC_SIGMA = 16.0, 3.0  # a Simard-style field: about 1 px rms displacement on 28 px
RESCAN_DEG, RESCAN_SIGMA = 5.0, 0.05  # a re-scan: turned by up to ±5°, shifted by up to ±1 px, light paper noise
STROKE_PX = 2  # grey dilation / erosion window on a 28-px image (about ±1 px of stroke width)


def _ink_bright(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float images in [0, 1] with the ink bright (dark-ink images inverted), and which were."""
    f = raw.astype(np.float32) / 255.0
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)
    inverted = np.median(border, axis=1) > 0.5
    f[inverted] = 1.0 - f[inverted]
    return f, inverted


def _back(f: np.ndarray, inverted: np.ndarray) -> np.ndarray:
    f = np.clip(f, 0.0, 1.0)
    f[inverted] = 1.0 - f[inverted]
    return np.round(f * 255).astype(np.uint8)


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = img.shape
    out = np.zeros_like(img)
    src = img[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    from scipy import ndimage

    h, w = img.shape
    rr, cc = _grid(h, w)
    t = np.deg2rad(degrees)
    r0, c0 = rr - (h - 1) / 2, cc - (w - 1) / 2
    r = np.cos(t) * r0 - np.sin(t) * c0 + (h - 1) / 2
    c = np.sin(t) * r0 + np.cos(t) * c0 + (w - 1) / 2
    return ndimage.map_coordinates(img, [r, c], order=1, mode="constant", cval=0.0)


def _elastic(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    h, w = img.shape
    scale = max(h, w) / SIDE
    field = [ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)).astype(np.float32), ELASTIC_SIGMA * scale)
             * ELASTIC_ALPHA * scale for _ in range(2)]
    rr, cc = _grid(h, w)
    return ndimage.map_coordinates(img, [rr + field[0], cc + field[1]], order=1, mode="constant", cval=0.0)


def _stroke(img: np.ndarray, thicken: bool, size: int) -> np.ndarray:
    from scipy import ndimage

    out = (ndimage.grey_dilation if thicken else ndimage.grey_erosion)(img, size=(size, size))
    if not thicken and out.max() < 0.25 * img.max():  # thinned away: thicken instead
        out = ndimage.grey_dilation(img, size=(size, size))
    return out


def _salt_pepper(img: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    u = rng.random(img.shape)
    return np.where(u < rate / 2, 0.0, np.where(u > 1 - rate / 2, 1.0, img)).astype(np.float32)


def perturb(raw: np.ndarray, kind: str, *, seed: int = 0) -> np.ndarray:
    """Perturbed copies of uint8 images ``[N, H, W]``: one of :data:`PERTURBATIONS` at its fixed
    strength, ``"neardup"`` (a ±3 px shift, then noise σ 0.3) or ``"rescan"`` (turned by up to
    ±5°, shifted by up to ±1 px, noise σ 0.05). Seeded."""
    if kind not in (*PERTURBATIONS, "neardup", "rescan"):
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {', '.join(PERTURBATIONS)}, neardup or rescan")
    rng = np.random.default_rng(seed)
    f, inverted = _ink_bright(np.asarray(raw, np.uint8))
    scale = max(f.shape[1:]) / SIDE
    shift = round(SHIFT_PX * scale)
    out = np.empty_like(f)
    for i, img in enumerate(f):
        if kind in ("shift", "neardup"):
            img = _shift(img, *rng.integers(-shift, shift + 1, 2))
        if kind == "rescan":
            one = max(1, round(scale))
            img = _shift(_rotate(img, rng.uniform(-RESCAN_DEG, RESCAN_DEG)), *rng.integers(-one, one + 1, 2))
            img = img + RESCAN_SIGMA * rng.standard_normal(img.shape).astype(np.float32)
        if kind in ("noise", "neardup"):
            img = img + NOISE_SIGMA * rng.standard_normal(img.shape).astype(np.float32)
        elif kind == "salt_pepper":
            img = _salt_pepper(img, rng, SALT_PEPPER)
        elif kind == "rotation":
            img = _rotate(img, rng.uniform(-ROTATE_DEG, ROTATE_DEG))
        elif kind == "elastic":
            img = _elastic(img, rng)
        elif kind == "stroke":
            img = _stroke(img, rng.random() < 0.5, max(2, round(STROKE_PX * scale)))
        out[i] = img
    return _back(out, inverted)


def random_copies(raw: np.ndarray, *, seed: int = 0, deform: bool = True, noise: float = 0.35,
                  p_noise: float = 0.6, p_shift: float = 0.5) -> np.ndarray:
    """One randomly perturbed copy of each uint8 image ``[N, H, W]``: a shift of up to ±3 px (with
    probability ``p_shift``); with ``deform``, maybe a rotation, an elastic deformation and a
    stroke-width change; then clipped noise (σ up to ``noise``, probability ``p_noise``) or else,
    one time in five, salt-and-pepper. Seeded."""
    rng = np.random.default_rng(seed)
    f, inverted = _ink_bright(np.asarray(raw, np.uint8))
    scale = max(f.shape[1:]) / SIDE
    out = np.empty_like(f)
    for i, img in enumerate(f):
        if rng.random() < p_shift:
            s = round(SHIFT_PX * scale)
            img = _shift(img, *rng.integers(-s, s + 1, 2))
        if deform:
            if rng.random() < 0.4:
                img = _rotate(img, rng.uniform(-ROTATE_DEG, ROTATE_DEG))
            if rng.random() < 0.3:
                img = _elastic(img, rng)
            if rng.random() < 0.3:
                img = _stroke(img, rng.random() < 0.5, max(2, round(STROKE_PX * scale)))
        u = rng.random()
        if u < p_noise:
            img = img + rng.uniform(0, noise) * rng.standard_normal(img.shape).astype(np.float32)
        elif u < p_noise + 0.2:
            img = _salt_pepper(img, rng, rng.uniform(0, SALT_PEPPER * 1.2))
        out[i] = img
    return _back(out, inverted)


def copies(raw: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Near-duplicates as a re-scan or a plagiarist makes them: a shift of up to ±3 px, then clipped
    noise (σ up to 0.4) or salt-and-pepper — no change of shape. Seeded."""
    return random_copies(raw, seed=seed, deform=False, noise=0.4, p_noise=0.8, p_shift=0.8)


def normalise_all(raw: np.ndarray, fallback: np.ndarray | None = None, *, frames: bool = False):
    """:func:`streamsim.images.normalise` over a batch; an image that normalises to nothing (a
    perturbation erased it) takes ``fallback``'s pixels (or stays black). With ``frames``,
    ``(pixels, [Frame, ...])``: each image's :class:`~streamsim.images.Frame` too (a fallback's
    is that of its pixels)."""
    out = np.zeros((len(raw), *PIXELS_SHAPE), np.uint8)
    kept: list[images.Frame] = []
    for i, img in enumerate(raw):
        try:
            if frames:
                out[i], f = images.normalise(img, frame=True)
                kept.append(f)
            else:
                out[i] = images.normalise(img)
        except images.ImageError:
            if fallback is not None:
                out[i] = fallback[i]
            if frames:
                kept.append(images.Frame.of_pixels(out[i]))
    return (out, kept) if frames else out


def training_views(pixels: np.ndarray, *, count: int = 4, seed: int = 0) -> np.ndarray:
    """``count`` re-normalised perturbed copies of each normalised image, uint8 ``[N, count, 28, 28]``:
    the second views of contrastive training. Even views are :func:`copies` (the same image,
    re-scanned: the encoder must tell it from other writers' characters), odd ones
    :func:`random_copies` (deformed too: the encoder must still see the same character)."""
    out = []
    for v in range(count):
        make = copies if v % 2 == 0 else random_copies
        out.append(normalise_all(make(pixels, seed=seed * 1000 + v), pixels))
    return np.stack(out, axis=1)
