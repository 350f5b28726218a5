"""Image → pixels: decoding, validation and MNIST-style normalisation.

This is the only streamsim module that imports Pillow, and the one place where user input is
checked. Everything else works on *pixels*: ``uint8 [28, 28]`` arrays with the ink bright on
black, fitted to a 20-px box and centred by centre of mass (the MNIST convention).

An *image* is a path (``str`` or :class:`pathlib.Path`), ``bytes``/``bytearray``/``memoryview``,
a binary file object, a :class:`PIL.Image.Image`, or a numpy array ``[H, W]`` or ``[H, W, C]``
with ``C`` in 1, 3, 4.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import struct
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "PIXELS_SHAPE",
    "Frame",
    "ImageError",
    "Loaded",
    "contact_sheet",
    "iter_image_files",
    "load",
    "normalise",
    "to_pixels",
]

PIXELS_SHAPE = (28, 28)
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

_SIDE = PIXELS_SHAPE[0]  # canvas side
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
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
# Pillow logs what it skips in a damaged file (e.g. TIFF samples it cannot decode); with no handler
# configured Python would print each on stderr: it reaches the application's logging, if any, only.
logging.getLogger("PIL").addHandler(logging.NullHandler())

_SUPPORTED_TYPES_MSG = (
    "expected an image: a path (str or pathlib.Path), bytes, a binary file object, "
    "a PIL.Image.Image, or a numpy array [H, W] or [H, W, C] with C in (1, 3, 4)"
)


class ImageError(ValueError):
    """Input that is not a usable image.

    ``str(err)`` is one line, ``"<source>: <reason>"``, e.g.
    ``"scan.png: not an image (cannot identify image file)"``.

    Attributes:
        source: Human name of the input (a path, ``"<bytes>"``, ``"<array>"``...).
        reason: What is wrong with it.
    """

    def __init__(self, source: str, reason: str):
        self.source = _one_line(source)
        self.reason = _one_line(reason)
        super().__init__(f"{self.source}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.source, self.reason))


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


@dataclass(frozen=True, eq=False)
class Loaded:
    """A loaded image.

    Attributes:
        pixels: ``uint8 [28, 28]``, ink bright on black, fitted and centred.
        digest: sha256 hex of the input's own bytes (file/bytes), or of its content (array, PIL).
        path: Absolute resolved path for path inputs, else ``None``.
        source: Human name used in messages.
        frame: With ``load(..., frame=True)``: the :class:`Frame` a duplicate check compares with.
    """

    pixels: np.ndarray
    digest: str
    path: str | None
    source: str
    frame: Frame | None = None


def load(image, *, source: str | None = None, frame: bool = False) -> Loaded:
    """Load any supported image and normalise it to pixels.

    Args:
        image: A path, bytes-like, binary file object, ``PIL.Image.Image`` or numpy array.
        source: Name to use in error messages (defaults to the path, ``"<bytes>"``, ...).
        frame: Also keep the image's :class:`Frame` (what a duplicate check compares with).

    Returns:
        A :class:`Loaded` with the pixels, the digest, the resolved path and the source.

    Raises:
        ImageError: The input is not a usable image (unreadable, corrupt, blank, too large...).
        TypeError: The input is of an unsupported type.
    """
    def done(grey: np.ndarray, digest: str, path: str | None, src: str) -> Loaded:
        if frame:
            pixels, fr = _normalise_grey(grey, src, frame=True)
            return Loaded(pixels, digest, path, src, fr)
        return Loaded(_normalise_grey(grey, src), digest, path, src)

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        src = source if source is not None else str(image)
        data = _read_path(path, src)
        return _guarded(src, lambda: done(_decode(data, src), _sha256(data), os.path.realpath(path), src))
    if isinstance(image, (bytes, bytearray, memoryview)):
        src = source if source is not None else "<bytes>"
        data = bytes(image)
        return _guarded(src, lambda: done(_decode(data, src), _sha256(data), None, src))
    if isinstance(image, Image.Image):
        src = source if source is not None else "<PIL.Image>"
        return _guarded(src, lambda: done(*_from_pil_input(image, src), None, src))
    if isinstance(image, np.ndarray):
        src = source if source is not None else "<array>"
        _check_array(image, src)
        return _guarded(src, lambda: done(_array_to_grey(image, src), _array_digest(image), None, src))
    if callable(getattr(image, "read", None)):
        src = source if source is not None else "<file>"
        try:
            data = image.read()
        except OSError as err:
            raise ImageError(src, f"cannot read file ({_os_reason(err)})") from err
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"file object returned {type(data).__name__}, not bytes: open it in binary mode ('rb')"
            )
        data = bytes(data)
        return _guarded(src, lambda: done(_decode(data, src), _sha256(data), None, src))
    raise TypeError(f"{_SUPPORTED_TYPES_MSG}; got {type(image).__module__}.{type(image).__qualname__}")


def _guarded(source: str, work):
    """Run ``work`` (decode and normalise one input) so that whatever the bytes, the outcome is
    pixels or an :class:`ImageError`: decoder and numerical warnings are silenced (never printed
    per file), and any other exception a malformed input provokes in a codec or in the maths
    becomes an ``ImageError`` whose reason names it."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return work()
    except ImageError:
        raise
    except Image.DecompressionBombWarning as err:
        raise ImageError(source, f"decompression bomb ({_bomb_size(err)})") from err
    except MemoryError as err:
        raise ImageError(source, "too large to decode (out of memory)") from err
    except (Exception, RecursionError) as err:  # noqa: BLE001 - one bad input is that input's failure
        raise ImageError(source, f"cannot be read as an image ({type(err).__name__}: {_one_line(err) or 'no detail'})") from err


def to_pixels(image) -> np.ndarray:
    """Return ``load(image).pixels``: the image as ``uint8 [28, 28]`` pixels."""
    return load(image).pixels


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
    _check_array(array, source)
    grey = _array_to_grey(array, source)
    return _normalise_grey(grey, source, frame=frame)


def iter_image_files(paths, *, recursive: bool = True) -> Iterator[Path]:
    """Yield image files: files as given, folders walked.

    Folders are walked in sorted name order (deterministic). In walked folders, files whose
    lower-cased suffix is in :data:`IMAGE_SUFFIXES` are kept, and hidden names (starting with
    ``"."``) are skipped, files and folders alike. Symbolic links to folders are not followed.
    Paths given explicitly are yielded as given, whatever their suffix (a missing one too:
    :func:`load` reports it).

    Args:
        paths: One path or an iterable of paths (``str`` or ``Path``).
        recursive: Walk sub-folders too.

    Yields:
        ``Path`` objects.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for given in paths:
        path = Path(given)
        if path.is_dir():
            yield from _walk(path, recursive, top=True)
        else:
            yield path


def contact_sheet(
    query: np.ndarray,
    hits: list[tuple[np.ndarray, str]],
    out: str | Path,
    *,
    scale: int = 4,
) -> None:
    """Save a PNG showing the query and its hits side by side, each labelled.

    Cells are ``28 * scale`` px wide (wider if a label needs it), separated and framed by
    8-px gaps; the query comes first, labelled ``"query"``.

    Args:
        query: The query's pixels, ``[28, 28]`` (uint8, or float in 0..1).
        hits: ``(pixels, label)`` pairs, e.g. ``(px, "#12 d=0.031")``.
        out: Where to write the PNG.
        scale: Integer magnification (nearest neighbour).

    Raises:
        ValueError: Bad ``scale`` or pixels that are not 2-D ``[28, 28]``.
    """
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    cells = [(_sheet_tile(query, "query"), "query")]
    cells += [(_sheet_tile(px, f"hit {i}"), str(label)) for i, (px, label) in enumerate(hits)]
    font = ImageFont.load_default()
    pad = 8
    side = _SIDE * scale
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), label, font=font) for _, label in cells]
    text_h = max(b[3] for b in boxes)
    cell_w = max([side] + [b[2] - b[0] for b in boxes])
    width = pad + len(cells) * (cell_w + pad)
    height = pad + side + 4 + text_h + pad
    sheet = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(sheet)
    for k, ((tile, label), box) in enumerate(zip(cells, boxes)):
        x = pad + k * (cell_w + pad)
        img = Image.fromarray(tile, mode="L").resize((side, side), Image.Resampling.NEAREST)
        sheet.paste(img, (x + (cell_w - side) // 2, pad))
        draw.text((x + (cell_w - (box[2] - box[0])) // 2 - box[0], pad + side + 4), label, fill=0, font=font)
    sheet.save(out, format="PNG")


# --------------------------------------------------------------------------------- internals


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _array_digest(array: np.ndarray) -> str:
    contiguous = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{contiguous.dtype.str}{contiguous.shape}".encode())
    h.update(contiguous.view(np.uint8).reshape(-1) if contiguous.size else b"")
    return h.hexdigest()


def _os_reason(err: OSError) -> str:
    return (err.strerror or str(err) or type(err).__name__).lower()


def _read_path(path: Path, source: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageError(source, "file not found") from err
    except OSError as err:
        raise ImageError(source, f"cannot read file ({_os_reason(err)})") from err


def _too_large(source: str, width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(source, f"{what} ({width}×{height} pixels; the limit is {MAX_IMAGE_PIXELS})")


# Pillow's plugins signal broken data with all of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, ZeroDivisionError)


def _decode(data: bytes, source: str) -> np.ndarray:
    """Decode image file bytes to a grey float32 array in 0..1."""
    if not data:
        raise ImageError(source, "empty file")
    im = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data), formats=None)
            except UnidentifiedImageError as err:
                raise ImageError(source, "not an image (cannot identify image file)") from err
            _too_large(source, *im.size, "decompression bomb")
            if im.tell() != 0:
                im.seek(0)  # the first frame of a GIF / multi-page TIFF
            with _quiet_stderr() if data[:4] in _TIFF_MAGIC else contextlib.nullcontext():
                im.load()  # libtiff writes what it finds wrong straight to file descriptor 2
            ImageOps.exif_transpose(im, in_place=True)
            return _pil_to_grey(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        size = f"{im.size[0]}×{im.size[1]} pixels" if im is not None else _bomb_size(err)
        raise ImageError(source, f"decompression bomb ({size})") from err
    except _DECODE_ERRORS as err:
        raise ImageError(source, f"truncated or corrupt image ({_one_line(err) or type(err).__name__})") from err
    finally:
        if im is not None:
            im.close()


@contextlib.contextmanager
def _quiet_stderr():
    """Point file descriptor 2 at /dev/null for the block (libtiff prints its warnings there, past
    Python), where that is safe: in the main thread of a process with a real stderr. Output other
    threads write meanwhile is lost too, so the block is kept short (one image's decode)."""
    try:
        fd = sys.stderr.fileno() if sys.stderr is not None else -1
    except (AttributeError, ValueError, OSError):
        fd = -1
    if fd != 2 or threading.current_thread() is not threading.main_thread():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _bomb_size(err: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))
    return f"{found.group(1)} pixels" if found else "too many pixels"


def _from_pil_input(im: Image.Image, source: str) -> tuple[np.ndarray, str]:
    """A caller's PIL image → (grey float32 0..1, digest). The caller's image is not modified."""
    _too_large(source, *im.size, "image too large")
    try:
        raw = im.tobytes()  # loads a lazily opened image
        digest = hashlib.sha256(f"{im.mode}{im.size}".encode())
        digest.update(raw)
        upright = ImageOps.exif_transpose(im)
        return _pil_to_grey(upright), digest.hexdigest()
    except _DECODE_ERRORS as err:
        raise ImageError(source, f"truncated or corrupt image ({_one_line(err) or type(err).__name__})") from err


def _pil_to_grey(im: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode → grey float32 in 0..1; alpha composited on white."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.float32) * np.float32(1 / 255)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.float32) * np.float32(1 / 255)
    if mode.startswith("I") or mode.startswith("F"):
        # I;16*, I, F: scale by the actual range (Pillow's convert("L") would clip at 255).
        return _scale_by_range(np.asarray(im))
    has_alpha = mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        la = im if mode == "LA" else im.convert("RGBA").convert("LA")
        return _composite_on_white(np.asarray(la))
    if mode in ("RGB", "P"):
        return np.asarray(im.convert("L"), dtype=np.float32) * np.float32(1 / 255)
    # CMYK, YCbCr, LAB, HSV...: through RGB.
    return np.asarray(im.convert("RGB").convert("L"), dtype=np.float32) * np.float32(1 / 255)


def _composite_on_white(la: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 2] (grey, alpha) → grey float32 0..1 composited on white."""
    g = la[..., 0].astype(np.float32)
    a = la[..., 1].astype(np.float32) * np.float32(1 / 255)
    return (g * a + np.float32(255) * (1 - a)) * np.float32(1 / 255)


def _scale_by_range(a: np.ndarray) -> np.ndarray:
    """Numbers → 0..1 by their range: (a - min(0, lo)) / (hi - min(0, lo))."""
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("non-finite values")
    lo = min(0.0, float(a.min()))
    hi = float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.float32)
    return (a - np.float32(lo)) * np.float32(1 / (hi - lo))


def _check_array(array: np.ndarray, source: str) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    kind = array.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"unsupported array dtype {array.dtype}: use uint8 (0..255), bool, float (0..1 or 0..255) "
            "or another integer type"
        )
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        h, w = array.shape[:2]
    elif array.ndim == 2:
        h, w = array.shape
    else:
        raise ImageError(source, f"unsupported array shape {array.shape} (expected [H, W] or [H, W, C], C in 1, 3, 4)")
    if h == 0 or w == 0:
        raise ImageError(source, f"empty array (shape {array.shape})")
    _too_large(source, w, h, "image too large")


def _array_to_grey(array: np.ndarray, source: str) -> np.ndarray:
    """A checked array → grey float32 in 0..1 (same luma and compositing as the PIL path)."""
    kind = array.dtype.kind
    if kind == "f" and not np.isfinite(array).all():
        raise ImageError(source, "array contains NaN or infinite values")
    if array.ndim == 3:
        c = array.shape[2]
        if c == 1:
            array = array[..., 0]
        else:
            u8 = _to_uint8(array, source)
            # Pillow's RGB → L: ITU-R 601-2 luma in 16-bit fixed point, so arrays and PIL agree.
            r, g, b = (u8[..., i].astype(np.uint32) for i in range(3))
            luma = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
            if c == 3:
                return luma.astype(np.float32) * np.float32(1 / 255)
            return _composite_on_white(np.stack([luma, u8[..., 3]], axis=-1))
    if array.dtype == np.uint8:
        return array.astype(np.float32) * np.float32(1 / 255)
    if kind == "b":
        return array.astype(np.float32)
    if kind == "f":
        a = array.astype(np.float32)
        if a.size and float(a.max()) > 1.0:
            a *= np.float32(1 / 255)
        return np.clip(a, 0, 1, out=a)
    return _scale_by_range(array)


def _to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """Colour array of any supported dtype → uint8 0..255 (per the dtype rules)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype.kind == "f":
        a = array.astype(np.float32)
        scale = 255.0 if a.size and float(a.max()) <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    return np.rint(_scale_by_range(array) * 255).astype(np.uint8)


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


def _median(x: np.ndarray) -> float:
    """Median of a 1-D array (np.median's overhead dominates on small frames)."""
    n = x.size
    k = n // 2
    if n % 2:
        return float(np.partition(x, k)[k])
    part = np.partition(x, (k - 1, k))
    return 0.5 * (float(part[k - 1]) + float(part[k]))


def _normalise_grey(grey: np.ndarray, source: str, *, frame: bool = False):
    """Grey float32 0..1 [H, W] → pixels; with ``frame``, ``(pixels, frame)`` (:func:`_linear_frame`)."""
    frame_ = _frame(grey)
    background = _median(frame_)
    # Noise level of the paper from the border's 90th percentile of |deviation|: unlike the MAD it
    # does not collapse to 0 when noise is clipped at black (half the border exactly 0).
    dev = np.abs(frame_ - np.float32(background))
    noise = float(np.partition(dev, int(0.9 * (dev.size - 1)))[int(0.9 * (dev.size - 1))]) / 1.2816
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


_NEAR_INK_BLUR = _resampling(np.arange(_SIDE, dtype=np.float64), _SIDE, 1.0, edge="constant")


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
    rr = (np.arange(_SIDE, dtype=np.float32) - offset[0] + 0.5) / sy - 0.5 + origin[0]
    cc = (np.arange(_SIDE, dtype=np.float32) - offset[1] + 0.5) / sx - 0.5 + origin[1]
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
    scale = max(h, w) / _SIDE
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
    dev = np.abs(frame - np.float32(background))
    noise = float(np.partition(dev, int(0.9 * (dev.size - 1)))[int(0.9 * (dev.size - 1))]) / 1.2816
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


_RAMP = np.arange(_SIDE, dtype=np.float32)


def _offset(box: np.ndarray) -> tuple[int, int]:
    """Where the box's top-left corner goes so that its centre of mass lands at (14, 14), clamped inside."""
    h, w = box.shape
    row_mass = box.sum(axis=1)
    col_mass = box.sum(axis=0)
    total = float(row_mass.sum())
    if not total > 0:  # _normalise_grey refuses inkless boxes before this; centre one if it comes
        return (_SIDE - h) // 2, (_SIDE - w) // 2
    cy = float(row_mass @ _RAMP[:h]) / total
    cx = float(col_mass @ _RAMP[:w]) / total
    top = min(max(math.floor(_CENTRE - cy + 0.5), 0), _SIDE - h)
    left = min(max(math.floor(_CENTRE - cx + 0.5), 0), _SIDE - w)
    return top, left


def _place(box: np.ndarray, top: int, left: int) -> np.ndarray:
    """Paste the box into the 28×28 canvas at (top, left), as uint8."""
    h, w = box.shape
    canvas = np.zeros(PIXELS_SHAPE, np.uint8)
    scaled = box * np.float32(255)
    scaled += np.float32(0.5)  # values are ≥ 0: truncation after +0.5 rounds half up
    canvas[top : top + h, left : left + w] = scaled
    return canvas


def _walk(folder: Path, recursive: bool, top: bool = False) -> Iterator[Path]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        if top:
            raise
        return  # an unreadable sub-folder is skipped, like os.walk does
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    yield from _walk(folder / entry.name, recursive)
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                yield folder / entry.name
        except OSError:
            continue


def _sheet_tile(px, what: str) -> np.ndarray:
    a = np.asarray(px)
    if a.shape != PIXELS_SHAPE:
        raise ValueError(f"contact_sheet: {what} must be pixels of shape {PIXELS_SHAPE}, got {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "fb":
        return np.rint(np.clip(a.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    raise ValueError(f"contact_sheet: {what} must be uint8 or float pixels, got dtype {a.dtype}")


def load_dataset(path: str | Path) -> np.ndarray:
    """Pixels ``uint8 [N, 28, 28]`` from a folder of images or an ``.npz`` with a uint8 ``images`` array.

    Every image goes through :func:`normalise`. Files in a folder that cannot be read are skipped;
    a dataset with no usable image raises :class:`ImageError`.
    """
    p = Path(path)
    source = str(p)
    if p.is_dir():
        out = []
        for f in iter_image_files([p]):
            try:
                out.append(load(f).pixels)
            except ImageError:
                continue
        if not out:
            raise ImageError(source, "no readable images in this folder")
        return np.stack(out)
    if not p.exists():
        raise ImageError(source, "file not found")
    if p.suffix.lower() != ".npz":
        raise ImageError(source, "training data must be a folder of images or an .npz file")
    try:
        with np.load(p, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ImageError(source, f"no 'images' array in the .npz (it has: {', '.join(data.files) or 'nothing'})")
            arr = data["images"]
    except ImageError:
        raise
    except (OSError, ValueError) as e:
        raise ImageError(source, f"unreadable .npz ({_one_line(str(e))})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or len(arr) == 0:
        raise ImageError(source, f"'images' must be a non-empty uint8 array [N, H, W], got {arr.dtype} {arr.shape}")
    out = []
    for i, img in enumerate(arr):
        try:
            out.append(normalise(img, source=f"{source}[{i}]"))
        except ImageError:
            continue
    if not out:
        raise ImageError(source, "no usable image in 'images'")
    return np.stack(out)
