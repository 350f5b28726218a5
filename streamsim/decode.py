"""Image input → grey: decoding and validation.

The one place where user input is checked. An *image* is a path (``str`` or
:class:`pathlib.Path`), ``bytes``/``bytearray``/``memoryview``, a binary file object, a
:class:`PIL.Image.Image`, or a numpy array ``[H, W]`` or ``[H, W, C]`` with ``C`` in 1, 3, 4. Each
is decoded to a grey float32 array in 0..1 (EXIF orientation applied, alpha composited on white)
and digested (sha256 of the input's own bytes, or of its content), or refused with an
:class:`ImageError` that says why in one line.

Also here: finding the image files in folders (:func:`iter_image_files`) and reading a dataset of
images (:func:`load_dataset`). :mod:`streamsim.normalise` turns the grey array into pixels, and
:func:`streamsim.images.load` does both.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import struct
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "ImageError", "iter_image_files", "load_dataset"]

MAX_ASPECT = 500  # longer side / shorter side beyond which an input is no glyph image
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
# Pillow logs what it skips in a damaged file (e.g. TIFF samples it cannot decode); with no handler
# configured Python would print each on stderr: it reaches the application's logging, if any, only.
logging.getLogger("PIL").addHandler(logging.NullHandler())

SUPPORTED_TYPES_MSG = (
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
        self.source = one_line(source)
        self.reason = one_line(reason)
        super().__init__(f"{self.source}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.source, self.reason))


def iter_image_files(paths, *, recursive: bool = True) -> Iterator[Path]:
    """Yield image files: files as given, folders walked.

    Folders are walked in sorted name order (deterministic). In walked folders, files whose
    lower-cased suffix is in :data:`IMAGE_SUFFIXES` are kept, and hidden names (starting with
    ``"."``) are skipped, files and folders alike. Symbolic links to folders are not followed.
    Paths given explicitly are yielded as given, whatever their suffix (a missing one too:
    :func:`streamsim.images.load` reports it).

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


def load_dataset(path: str | Path) -> np.ndarray:
    """Pixels ``uint8 [N, 28, 28]`` from a folder of images or an ``.npz`` with a uint8 ``images`` array.

    Every image goes through :func:`streamsim.normalise.normalise` (a folder's files through
    :func:`streamsim.images.load`). Files in a folder that cannot be read are skipped; a dataset
    with no usable image raises :class:`ImageError`.
    """
    from .images import load
    from .normalise import normalise

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
        raise ImageError(source, f"unreadable .npz ({one_line(str(e))})") from None
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


# --------------------------------------------------------------------------------- internals


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_digest(array: np.ndarray) -> str:
    contiguous = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{contiguous.dtype.str}{contiguous.shape}".encode())
    h.update(contiguous.view(np.uint8).reshape(-1) if contiguous.size else b"")
    return h.hexdigest()


def os_reason(err: OSError) -> str:
    return (err.strerror or str(err) or type(err).__name__).lower()


def read_path(path: Path, source: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageError(source, "file not found") from err
    except OSError as err:
        raise ImageError(source, f"cannot read file ({os_reason(err)})") from err


def _too_large(source: str, width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(source, f"{what} ({width}×{height} pixels; the limit is {MAX_IMAGE_PIXELS})")
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        # a few hundred bytes can claim a 28 × 2,000,000 strip; decoding it takes seconds and no
        # glyph is shaped so: refused before its pixels are decoded
        raise ImageError(source, f"not a glyph image: {width}×{height} pixels (more than {MAX_ASPECT}:1)")


# Pillow's plugins signal broken data with all of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, ZeroDivisionError)


def decode_bytes(data: bytes, source: str) -> np.ndarray:
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
        size = f"{im.size[0]}×{im.size[1]} pixels" if im is not None else bomb_size(err)
        raise ImageError(source, f"decompression bomb ({size})") from err
    except _DECODE_ERRORS as err:
        raise ImageError(source, f"truncated or corrupt image ({one_line(err) or type(err).__name__})") from err
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


def bomb_size(err: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))
    return f"{found.group(1)} pixels" if found else "too many pixels"


def from_pil_input(im: Image.Image, source: str) -> tuple[np.ndarray, str]:
    """A caller's PIL image → (grey float32 0..1, digest). The caller's image is not modified."""
    _too_large(source, *im.size, "image too large")
    try:
        raw = im.tobytes()  # loads a lazily opened image
        digest = hashlib.sha256(f"{im.mode}{im.size}".encode())
        digest.update(raw)
        upright = ImageOps.exif_transpose(im)
        return _pil_to_grey(upright), digest.hexdigest()
    except _DECODE_ERRORS as err:
        raise ImageError(source, f"truncated or corrupt image ({one_line(err) or type(err).__name__})") from err


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


def check_array(array: np.ndarray, source: str) -> None:
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


def array_to_grey(array: np.ndarray, source: str) -> np.ndarray:
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
