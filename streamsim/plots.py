"""Pictures, as PNG files: a query beside its hits (:func:`contact_sheet`), and the normalised drift
score over the stream with its alarms and version switches (:func:`plot_stream`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .normalise import PIXELS_SHAPE, SIDE

__all__ = ["contact_sheet", "plot_stream"]


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
    side = SIDE * scale
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


def plot_stream(stream: dict[str, np.ndarray], events: Sequence[dict[str, Any]], out, *,
                size: tuple[int, int] = (1200, 480), smooth: int = 50) -> None:
    """Draw the normalised score over the stream (one dot per image, a running mean of ``smooth``
    images), with drift alarms (red), the drift episode's fine-tune attempts (orange), rejections
    and an unresolved episode (grey) and version switches (green, labelled) marked, as a PNG.

    ``stream`` is :meth:`~streamsim.catalog.Catalog.score_stream`'s result, ``events`` the
    catalog's event log.
    """
    w, h = size
    left, right, top, bottom = 56, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ids, scores = np.asarray(stream["id"]), np.asarray(stream["score"], np.float64)
    n = len(scores)
    draw.text((left, 6), f"normalised reconstruction score over {n} images (0 = like the reference)", fill="black", font=font)
    if n == 0:
        draw.text((left, h // 2), "no scores recorded yet", fill="gray", font=font)
        img.save(out)
        return
    lo = min(-3.0, float(np.quantile(scores, 0.001)))
    hi = max(3.0, float(np.quantile(scores, 0.999)))
    pw, ph = w - left - right, h - top - bottom

    def x_of(i: float) -> float:
        return left + pw * (i / max(n - 1, 1))

    def y_of(v: float) -> float:
        return top + ph * (1 - (min(max(v, lo), hi) - lo) / (hi - lo))

    for tick in range(math.ceil(lo), math.floor(hi) + 1):
        y = y_of(tick)
        draw.line([(left, y), (w - right, y)], fill=(225, 225, 225) if tick else (150, 150, 150))
        draw.text((8, y - 6), f"{tick:+d}", fill="black", font=font)
    for i, v in enumerate(scores):
        x, y = x_of(i), y_of(v)
        draw.rectangle([x, y, x + 1, y + 1], fill=(170, 180, 200))
    if n >= 2:
        k = max(1, min(smooth, n))
        mean = np.convolve(scores, np.ones(k) / k, mode="valid")
        draw.line([(x_of(i + k - 1), y_of(v)) for i, v in enumerate(mean)], fill=(20, 60, 200), width=2)
    for e in events:
        if e.get("image_id") is None or e["kind"] not in ("drift", "activated", "rollback", "retraining", "rejected",
                                                          "unresolved"):
            continue
        pos = int(np.searchsorted(ids, int(e["image_id"])))
        if pos >= n:
            pos = n - 1
        x = x_of(pos)
        if e["kind"] == "drift":
            draw.line([(x, top), (x, top + ph)], fill=(220, 30, 30), width=1)
        elif e["kind"] == "retraining":  # an attempt of the drift episode starts
            draw.line([(x, top + ph // 2), (x, top + ph)], fill=(240, 140, 0), width=2)
            draw.text((x + 3, top + ph - 14), f"try {e['detail'].get('attempt', '')}", fill=(200, 110, 0), font=font)
        elif e["kind"] == "rejected":
            draw.text((x + 3, top + 16), "rejected", fill=(90, 90, 90), font=font)
        elif e["kind"] == "unresolved":
            draw.text((x + 3, top + 30), "UNRESOLVED", fill=(40, 40, 40), font=font)
        else:
            draw.line([(x, top), (x, top + ph)], fill=(20, 150, 40), width=2)
            draw.text((x + 3, top + 2), f"v{e['version']}", fill=(20, 120, 30), font=font)
    draw.text((left, h - bottom + 8), f"image 1 … {n} in arrival order   "
              "red: drift alarm   orange: fine-tune attempt   green: version switched in   blue: running mean",
              fill="black", font=font)
    img.save(out)


# --------------------------------------------------------------------------------- internals


def _sheet_tile(px, what: str) -> np.ndarray:
    a = np.asarray(px)
    if a.shape != PIXELS_SHAPE:
        raise ValueError(f"contact_sheet: {what} must be pixels of shape {PIXELS_SHAPE}, got {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "fb":
        return np.rint(np.clip(a.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    raise ValueError(f"contact_sheet: {what} must be uint8 or float pixels, got dtype {a.dtype}")
