"""Image → pixels: the public entry point.

:func:`load` decodes and validates any supported image (:mod:`streamsim.decode`, the one place
where user input is checked) and normalises it to *pixels* (:mod:`streamsim.normalise`):
``uint8 [28, 28]`` arrays with the ink bright on black, fitted to a 20-px box and centred by
centre of mass (the MNIST convention). Everything else works on pixels.

An *image* is a path (``str`` or :class:`pathlib.Path`), ``bytes``/``bytearray``/``memoryview``,
a binary file object, a :class:`PIL.Image.Image`, or a numpy array ``[H, W]`` or ``[H, W, C]``
with ``C`` in 1, 3, 4.

The names a caller needs around loading are here too: :class:`ImageError`, :class:`Frame`,
:func:`normalise`, :func:`iter_image_files`, :func:`load_dataset`, :func:`contact_sheet` and the
constants :data:`IMAGE_SUFFIXES`, :data:`MAX_IMAGE_PIXELS`, :data:`PIXELS_SHAPE` and
:data:`NO_INK_LEFT`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import normalise as _normaliser
from .decode import (
    SUPPORTED_TYPES_MSG,
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    ImageError,
    array_digest,
    array_to_grey,
    bomb_size,
    check_array,
    decode_bytes,
    from_pil_input,
    one_line,
    os_reason,
    read_path,
    sha256,
    iter_image_files,
    load_dataset,
)
from .normalise import NO_INK_LEFT, PIXELS_SHAPE, Frame, normalise
from .plots import contact_sheet

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "NO_INK_LEFT",
    "PIXELS_SHAPE",
    "Frame",
    "ImageError",
    "Loaded",
    "contact_sheet",
    "iter_image_files",
    "load",
    "load_dataset",
    "normalise",
    "to_pixels",
]


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

    Example:
        >>> page = np.full((60, 40), 255, np.uint8)   # white paper
        >>> page[10:50, 15:25] = 0                      # a dark bar
        >>> loaded = load(page)
        >>> loaded.pixels.shape, loaded.path, loaded.source
        ((28, 28), None, '<array>')
    """
    def done(grey: np.ndarray, digest: str, path: str | None, src: str) -> Loaded:
        if frame:
            pixels, fr = _normaliser.normalise_grey(grey, src, frame=True)
            return Loaded(pixels, digest, path, src, fr)
        return Loaded(_normaliser.normalise_grey(grey, src), digest, path, src)

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        src = source if source is not None else str(image)
        data = read_path(path, src)
        return _guarded(src, lambda: done(decode_bytes(data, src), sha256(data), os.path.realpath(path), src))
    if isinstance(image, (bytes, bytearray, memoryview)):
        src = source if source is not None else "<bytes>"
        data = bytes(image)
        return _guarded(src, lambda: done(decode_bytes(data, src), sha256(data), None, src))
    if isinstance(image, Image.Image):
        src = source if source is not None else "<PIL.Image>"
        return _guarded(src, lambda: done(*from_pil_input(image, src), None, src))
    if isinstance(image, np.ndarray):
        src = source if source is not None else "<array>"
        check_array(image, src)
        return _guarded(src, lambda: done(array_to_grey(image, src), array_digest(image), None, src))
    if callable(getattr(image, "read", None)):
        src = source if source is not None else "<file>"
        try:
            data = image.read()
        except OSError as err:
            raise ImageError(src, f"cannot read file ({os_reason(err)})") from err
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"file object returned {type(data).__name__}, not bytes: open it in binary mode ('rb')"
            )
        data = bytes(data)
        return _guarded(src, lambda: done(decode_bytes(data, src), sha256(data), None, src))
    raise TypeError(f"{SUPPORTED_TYPES_MSG}; got {type(image).__module__}.{type(image).__qualname__}")


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
        raise ImageError(source, f"decompression bomb ({bomb_size(err)})") from err
    except MemoryError as err:
        raise ImageError(source, "too large to decode (out of memory)") from err
    except (Exception, RecursionError) as err:  # noqa: BLE001 - one bad input is that input's failure
        raise ImageError(source, f"cannot be read as an image ({type(err).__name__}: {one_line(err) or 'no detail'})") from err


def to_pixels(image) -> np.ndarray:
    """Return ``load(image).pixels``: the image as ``uint8 [28, 28]`` pixels."""
    return load(image).pixels
