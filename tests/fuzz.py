"""A small seeded fuzzer for :func:`streamsim.images.load` (imported by ``test_fuzz.py``; not a test file).

* :func:`seed_images` encodes small synthetic glyphs (bars, rings, strokes) in every supported
  format and in several modes;
* :func:`mutate` applies 1-3 random mutations (bit flips, interesting bytes, truncation, insertion,
  deletion, duplication, header-field edits) to one file's bytes;
* :func:`mutated_inputs` yields ``n`` mutated ``(name, bytes)`` pairs, the same for the same seed.

Everything is driven by a :class:`random.Random`, so a run is reproducible from its seed (with the
same Pillow and codec libraries: the encoders' output is part of the corpus).

Usage::

    for name, data in mutated_inputs(5000, seed=1):
        try:
            images.load(data)
        except images.ImageError:
            pass
"""

from __future__ import annotations

import io
import traceback
import random
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["MUTATIONS", "glyph", "mutate", "mutate_ops", "mutated_inputs", "seed_images"]

# ------------------------------------------------------------------------------------ glyphs


def glyph(rng: random.Random, size: int | None = None) -> np.ndarray:
    """A synthetic character-like glyph, ``uint8 [size, size]``, dark ink (0) on white paper (255).

    One of: a bar (vertical, horizontal or slanted), a ring, a polyline stroke, or a "+" cross;
    anti-aliased or not, with a random stroke width and, sometimes, a grey paper or faint ink.
    """
    side = size or rng.choice([28, 28, 32, 40, 48, 64])
    scale = 4  # draw big, then downsample for anti-aliasing
    big = side * scale
    im = Image.new("L", (big, big), 255)
    d = ImageDraw.Draw(im)
    width = max(1, round(rng.uniform(0.06, 0.16) * big))
    ink = rng.choice([0, 0, 0, 40, 90])
    m = lambda v: round(v * big)  # noqa: E731 - fraction of the side -> pixels
    kind = rng.choice(["vbar", "hbar", "slash", "ring", "stroke", "cross"])
    if kind == "vbar":
        x = rng.uniform(0.3, 0.7)
        d.line([(m(x), m(rng.uniform(0.1, 0.3))), (m(x), m(rng.uniform(0.7, 0.9)))], fill=ink, width=width)
    elif kind == "hbar":
        y = rng.uniform(0.3, 0.7)
        d.line([(m(rng.uniform(0.1, 0.3)), m(y)), (m(rng.uniform(0.7, 0.9)), m(y))], fill=ink, width=width)
    elif kind == "slash":
        d.line([(m(0.25), m(0.85)), (m(0.75), m(0.15))], fill=ink, width=width)
    elif kind == "ring":
        r0, r1 = rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.35)
        d.ellipse([m(0.5 - r0), m(0.5 - r1), m(0.5 + r0), m(0.5 + r1)], outline=ink, width=width)
    elif kind == "stroke":
        pts = [(m(rng.uniform(0.15, 0.85)), m(rng.uniform(0.15, 0.85))) for _ in range(rng.randint(3, 5))]
        d.line(pts, fill=ink, width=width, joint="curve")
    else:
        d.line([(m(0.5), m(0.15)), (m(0.5), m(0.85))], fill=ink, width=width)
        d.line([(m(0.15), m(0.5)), (m(0.85), m(0.5))], fill=ink, width=width)
    resample = Image.Resampling.BOX if rng.random() < 0.7 else Image.Resampling.NEAREST
    a = np.asarray(im.resize((side, side), resample), dtype=np.uint8)
    if rng.random() < 0.2:  # grey paper
        a = (a.astype(np.int16) * 200 // 255 + 30).astype(np.uint8)
    if rng.random() < 0.5:  # white ink on black, MNIST style
        a = 255 - a
    return a


# ------------------------------------------------------------------------------------ seeds

# (format, mode, save options) for every supported container; names are "<fmt>-<mode>[-<codec>]".
_SPECS: list[tuple[str, str, str, dict]] = [
    ("png-L", "PNG", "L", {}),
    ("png-LA", "PNG", "LA", {}),
    ("png-RGB", "PNG", "RGB", {}),
    ("png-RGBA", "PNG", "RGBA", {}),
    ("png-P", "PNG", "P", {}),
    ("png-P-trns", "PNG", "P", {"transparency": 0}),
    ("png-1", "PNG", "1", {}),
    ("png-I;16", "PNG", "I;16", {}),
    ("jpeg-L", "JPEG", "L", {"quality": 90}),
    ("jpeg-RGB", "JPEG", "RGB", {"quality": 85}),
    ("jpeg-RGB-progressive", "JPEG", "RGB", {"quality": 80, "progressive": True}),
    ("jpeg-CMYK", "JPEG", "CMYK", {"quality": 90}),
    ("bmp-L", "BMP", "L", {}),
    ("bmp-RGB", "BMP", "RGB", {}),
    ("bmp-RGBA", "BMP", "RGBA", {}),
    ("bmp-P", "BMP", "P", {}),
    ("bmp-1", "BMP", "1", {}),
    ("gif-L", "GIF", "L", {}),
    ("gif-P", "GIF", "P", {}),
    ("gif-P-trns", "GIF", "P", {"transparency": 0}),
    ("tiff-L", "TIFF", "L", {}),
    ("tiff-RGB", "TIFF", "RGB", {}),
    ("tiff-RGBA", "TIFF", "RGBA", {}),
    ("tiff-P", "TIFF", "P", {}),
    ("tiff-1", "TIFF", "1", {}),
    ("tiff-I;16", "TIFF", "I;16", {}),
    ("tiff-F", "TIFF", "F", {}),
    ("tiff-L-lzw", "TIFF", "L", {"compression": "tiff_lzw"}),
    ("tiff-RGB-deflate", "TIFF", "RGB", {"compression": "tiff_adobe_deflate"}),
    ("tiff-L-packbits", "TIFF", "L", {"compression": "packbits"}),
    ("tiff-1-g4", "TIFF", "1", {"compression": "group4"}),
    ("tiff-RGB-jpeg", "TIFF", "RGB", {"compression": "jpeg"}),
    ("webp-RGB", "WEBP", "RGB", {"quality": 80}),
    ("webp-RGBA", "WEBP", "RGBA", {"quality": 80}),
    ("webp-RGB-lossless", "WEBP", "RGB", {"lossless": True}),
]


def _convert(a: np.ndarray, mode: str) -> Image.Image:
    im = Image.fromarray(np.ascontiguousarray(a, np.uint8))  # L
    if mode == "L":
        return im
    if mode == "LA":
        return Image.merge("LA", [im, Image.new("L", im.size, 255)])
    if mode == "RGBA":
        # ink as opaque dark pixels, paper partly transparent
        alpha = Image.fromarray(np.where(a < 128, 255, 160).astype(np.uint8))
        return Image.merge("RGBA", [*im.convert("RGB").split(), alpha])
    if mode == "P":
        return im.convert("RGB").quantize(16)
    if mode == "1":
        return im.point(lambda v: 255 if v >= 128 else 0).convert("1", dither=Image.Dither.NONE)
    if mode == "I;16":
        return Image.fromarray(a.astype("<u2") * 257)  # I;16
    if mode == "F":
        return Image.fromarray(a.astype(np.float32) / 255)  # F
    return im.convert(mode)


def encode(a: np.ndarray, fmt: str, mode: str, options: dict | None = None) -> bytes:
    """``uint8 [H, W]`` grey → the bytes of a ``fmt`` file in ``mode``."""
    buf = io.BytesIO()
    _convert(a, mode).save(buf, format=fmt, **(options or {}))
    return buf.getvalue()


def seed_images(rng: random.Random, extra: Sequence[np.ndarray] = ()) -> list[tuple[str, bytes]]:
    """Valid small images, one per (format, mode, codec) in :data:`_SPECS`, each from a fresh
    random glyph; plus every ``extra`` grey array (e.g. real MNIST digits) as ``png-L`` files named
    ``"png-L-extra<i>"``. Every seed loads without error."""
    out = [(name, encode(glyph(rng), fmt, mode, opts)) for name, fmt, mode, opts in _SPECS]
    out += [(f"png-L-extra{i}", encode(np.asarray(a, np.uint8), "PNG", "L")) for i, a in enumerate(extra)]
    return out


# ------------------------------------------------------------------------------------ mutations

_INTERESTING8 = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE]
_INTERESTING_FIELDS = [
    b"\xff\xff", b"\x00\x00", b"\x7f\xff", b"\x80\x00", b"\x00\x01", b"\xff\xfe",
    b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x01",
    b"\x00\x00\xff\xff", b"\xff\xff\x00\x00", b"\x00\x01\x00\x00",
]


def _bitflip(b: bytearray, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return "bitflip"


def _bytes(b: bytearray, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.choice(_INTERESTING8) if rng.random() < 0.7 else rng.randrange(256)
    return "bytes"


def _truncate(b: bytearray, rng: random.Random) -> str:
    del b[rng.randrange(1, len(b)) if len(b) > 1 else 1:]
    return "truncate"


def _insert(b: bytearray, rng: random.Random) -> str:
    i = rng.randrange(len(b) + 1)
    b[i:i] = rng.randbytes(rng.randint(1, 32))
    return "insert"


def _delete(b: bytearray, rng: random.Random) -> str:
    i = rng.randrange(len(b))
    del b[i : i + rng.randint(1, min(64, len(b) - i))]
    return "delete"


def _duplicate(b: bytearray, rng: random.Random) -> str:
    i = rng.randrange(len(b))
    span = b[i : i + rng.randint(1, 64)]
    j = rng.randrange(len(b) + 1)
    b[j:j] = span
    return "duplicate"


def _header(b: bytearray, rng: random.Random) -> str:
    """2-4 bytes within the first 64 overwritten with an extreme value (big or zero sizes, counts...)."""
    value = rng.choice([v for v in _INTERESTING_FIELDS if len(v) <= len(b)] or [b"\x00"])
    n = min(len(value), rng.randint(2, 4), len(b))
    value = value[:n] if rng.random() < 0.5 else value[-n:]
    if rng.random() < 0.5:
        value = value[::-1]  # little-endian fields (BMP, TIFF II)
    i = rng.randrange(0, max(1, min(64, len(b)) - n + 1))
    b[i : i + n] = value
    return "header"


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_chunks(b: bytes) -> list[tuple[bytes, bytes]] | None:
    """``[(type, data)]`` of a well-formed PNG's chunks, or None."""
    if b[:8] != _PNG_MAGIC:
        return None
    out, pos = [], 8
    while pos + 12 <= len(b):
        (n,) = struct.unpack(">I", b[pos : pos + 4])
        if pos + 12 + n > len(b):
            return None
        out.append((bytes(b[pos + 4 : pos + 8]), bytes(b[pos + 8 : pos + 8 + n])))
        pos += 12 + n
    return out


def _pngdata(b: bytearray, rng: random.Random) -> str:
    """A PNG's decompressed scanlines (filter-type bytes included) mutated, then recompressed with
    valid zlib checksums and chunk CRCs: reaches the normaliser with garbage pixels, which plain
    byte flips of the deflate stream seldom do. Other files get a bit flip instead."""
    chunks = _png_chunks(b)
    try:
        raw = bytearray(zlib.decompress(b"".join(d for t, d in chunks if t == b"IDAT"))) if chunks else None
    except zlib.error:
        raw = None
    if not raw:
        return _bitflip(b, rng)
    for _ in range(rng.randint(1, 6)):
        j = rng.randrange(len(raw))
        r = rng.random()
        if r < 0.4:
            raw[j] ^= 1 << rng.randrange(8)
        elif r < 0.8:
            raw[j] = rng.choice(_INTERESTING8) if rng.random() < 0.5 else rng.randrange(256)
        else:
            raw[j] = rng.randrange(5)  # small: a valid filter type where it lands on a row's first byte
    first = next(i for i, (t, _) in enumerate(chunks) if t == b"IDAT")
    chunks = [(t, d) for t, d in chunks if t != b"IDAT"]
    chunks.insert(first, (b"IDAT", zlib.compress(bytes(raw))))
    out = bytearray(_PNG_MAGIC)
    for t, d in chunks:
        out += struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    b[:] = out
    return "pngdata"


MUTATIONS = {
    "bitflip": _bitflip,
    "bytes": _bytes,
    "truncate": _truncate,
    "insert": _insert,
    "delete": _delete,
    "duplicate": _duplicate,
    "header": _header,
    "pngdata": _pngdata,
}
_WEIGHTS = {"bitflip": 4, "bytes": 3, "truncate": 1, "insert": 1, "delete": 1, "duplicate": 1, "header": 3, "pngdata": 1}


def _fix_png_crcs(b: bytearray) -> bytearray:
    """Recompute every chunk CRC of a PNG-looking file (so that the decoder gets past the header
    checks to the mutated fields); stops at the first chunk that does not fit."""
    if bytes(b[:8]) != _PNG_MAGIC:
        return b
    pos = 8
    while pos + 12 <= len(b):
        length = struct.unpack(">I", b[pos : pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(b):
            break
        b[end : end + 4] = struct.pack(">I", zlib.crc32(b[pos + 4 : end]) & 0xFFFFFFFF)
        pos = end + 4
    return b


def mutate_ops(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """:func:`mutate`, also returning the names of the mutations applied (in order)."""
    b = bytearray(data)
    ops = []
    names, weights = list(_WEIGHTS), list(_WEIGHTS.values())
    for _ in range(rng.randint(1, 3)):
        if not b:
            break
        op = rng.choices(names, weights)[0]
        ops.append(MUTATIONS[op](b, rng))
    if b[:8] == _PNG_MAGIC and ops[-1:] != ["pngdata"] and rng.random() < 0.5:
        _fix_png_crcs(b)
        ops.append("pngcrc")
    return bytes(b), ops


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-3 random mutations of ``data`` (see :data:`MUTATIONS`); a mutated PNG gets its chunk CRCs
    recomputed half the time, so that mutations of the header fields reach the decoder (Pillow
    checks them), and ``pngdata`` mutates a PNG's pixels under valid checksums."""
    return mutate_ops(data, rng)[0]


def mutated_inputs(n: int, seed: int, extra: Sequence[np.ndarray] = ()) -> Iterator[tuple[str, bytes]]:
    """``n`` mutated files ``(name, bytes)``, deterministic for ``seed``: a seed image chosen at
    random, mutated by :func:`mutate`. ``name`` is ``"<seed name>#<i>:<ops>"``, e.g.
    ``"png-L#17:bitflip+header+pngcrc"``."""
    rng = random.Random(seed)
    seeds = seed_images(rng, extra)
    for i in range(n):
        name, data = seeds[rng.randrange(len(seeds))]
        out, ops = mutate_ops(data, rng)
        yield f"{name}#{i}:{'+'.join(ops)}", out


def error_site(err: BaseException) -> str:
    """``"file:line function"`` of the innermost streamsim frame of ``err`` (and of the innermost
    frame overall, when that is elsewhere, e.g. in Pillow)."""
    tb = traceback.extract_tb(err.__traceback__)
    ours = [f for f in tb if "streamsim" in Path(f.filename).parts]
    where = lambda f: f"{Path(f.filename).name}:{f.lineno} {f.name}"  # noqa: E731
    site = where(ours[-1]) if ours else "?"
    if tb and (not ours or tb[-1] is not ours[-1]):
        site += f" -> {where(tb[-1])}"
    return site
