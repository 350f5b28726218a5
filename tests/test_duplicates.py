"""Duplicates on every kind of glyph: a small seeded fixture of each source (handwriting from three
collections, printed type, Chinese characters), re-scans turned by up to ±5°, and a store that
calibrates its duplicate rule on its own images once it is big enough.

Counts are exact for the seeded data: a change to the check that moves one of them should be
looked at, and the figure in ``docs/benchmarks.md`` re-measured (``bench/bench_dups.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamsim import Index, calibrate, verify
from streamsim.perturb import normalise_all, perturb

DATA = Path(__file__).parent / "data"
QUERIES = 30
DEJAVU = "/usr/share/fonts/truetype/dejavu"
LIBERATION = "/usr/share/fonts/truetype/liberation"
PRINTED_FACES = [f"{DEJAVU}/DejaVuSans.ttf", f"{DEJAVU}/DejaVuSerif.ttf", f"{LIBERATION}/LiberationMono-Regular.ttf",
                 f"{LIBERATION}/LiberationSerif-Regular.ttf"]
CJK_FACES = ["/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/truetype/arphic/ukai.ttc",
             "/usr/share/fonts/truetype/arphic/uming.ttc", "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf"]
CJK_CHARS = "永和九年岁在癸丑暮春之初会于山阴兰亭修禊事也群贤毕至少长咸集此地有崇岭茂林修竹"


def _need(paths: list[str], package: str) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        pytest.skip(f"needs {missing[0]} (apt-get install {package})")


def _render(faces: list[str], chars: str, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFont

    out, labels = [], []
    for path in faces:
        font = ImageFont.truetype(path, size)
        for ch in chars:
            img = Image.new("L", (64, 64), 255)
            ImageDraw.Draw(img).text((32, 32), ch, fill=0, font=font, anchor="mm")
            out.append(np.asarray(img))
            labels.append(ch)
    return np.stack(out), np.asarray(labels)


def _source(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "mfeat":  # UCI Multiple Features handwritten digits (tests/data/make_mfeat_small.py)
        with np.load(DATA / "mfeat_small.npz", allow_pickle=False) as z:
            return z["images"], z["labels"]
    if name == "uci":  # scikit-learn's UCI 8×8 digits, upscaled
        from sklearn.datasets import load_digits
        from PIL import Image

        d = load_digits()
        pick = np.random.default_rng(0).choice(len(d.images), 250, replace=False)
        box = [np.asarray(Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((20, 20), Image.BILINEAR))
               for i in pick]
        return np.stack([np.pad(b, 4) for b in box]), d.target[pick]
    if name == "printed":
        _need(PRINTED_FACES, "fonts-dejavu-core fonts-liberation")
        return _render(PRINTED_FACES, "ABDEFGHJKLMNPQRTabdefghkmnpqrt2345")
    _need(CJK_FACES, "fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming fonts-ipafont-gothic")
    return _render(CJK_FACES, CJK_CHARS)


def _counts(x: np.ndarray, y: np.ndarray, tmp_path: Path, by_label: bool) -> dict[str, int]:
    """Store all but 20 or so images — random ones, or (``by_label``: printed type, where one
    character in two faces may be one drawing) every image of a few characters; query noisy
    near-duplicates (σ 0.3, ±3 px) and re-scans (±5°) of 30 stored ones, and the unseen ones: how
    many are found, and how many unseen get a duplicate."""
    rng = np.random.default_rng(1)
    order = rng.permutation(len(x))
    stored, unseen = order[:-20], order[-20:]
    if by_label:
        held = np.isin(y, rng.permutation(np.unique(y))[:5])
        stored, unseen = np.flatnonzero(~held), np.flatnonzero(held)
    asked = np.sort(rng.choice(len(stored), QUERIES, replace=False))
    with Index.open(tmp_path / "s") as index:
        ids = np.asarray(index.add_many(x[stored]))
        out = {}
        for kind in ("neardup", "rescan"):
            px, fr = normalise_all(perturb(x[stored][asked], kind, seed=5), frames=True)
            dup = index.search_pixels(px, 5, mode="duplicate", frames=fr)
            out[kind] = sum(any(m.id == ids[j] for m in row) for row, j in zip(dup, asked))
            if kind == "neardup":
                top = index.search_pixels(px, 1, mode="similar", frames=fr)
                out["neardup_top1"] = sum(bool(row) and int(row[0].id) == int(ids[j]) for row, j in zip(top, asked))
        px, fr = normalise_all(x[unseen], frames=True)
        out["false"] = sum(bool(r) for r in index.search_pixels(px, 1, mode="duplicate", frames=fr))
    return out


# exact counts (of 30 queries; of the unseen images: 20, or 5 characters' in 4 faces), for the seeded fixtures above
EXPECTED = {
    "mfeat": {"neardup": 26, "neardup_top1": 30, "rescan": 30, "false": 0},
    "uci": {"neardup": 12, "neardup_top1": 28, "rescan": 30, "false": 0},
    "printed": {"neardup": 29, "neardup_top1": 29, "rescan": 30, "false": 0},
    "cjk": {"neardup": 29, "neardup_top1": 29, "rescan": 29, "false": 0},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_source_finds_its_copies(name, tmp_path):
    x, y = _source(name)
    got = _counts(x, y, tmp_path, by_label=name in ("printed", "cjk"))
    assert got == EXPECTED[name]


def test_a_rescan_turned_by_5_degrees_is_a_duplicate_and_would_not_be_without_the_turn(digits, tmp_path, monkeypatch):
    x, _ = digits
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many(x[:60])
        from scipy.ndimage import rotate

        five = np.stack([rotate(x[i], 5.0 if i % 2 else -5.0, reshape=False, order=1) for i in range(20)])
        px, fr = normalise_all(five, frames=True)
        found = sum(any(m.id == ids[i] for m in row) for i, row in enumerate(index.search_pixels(px, 3, mode="duplicate", frames=fr)))
        monkeypatch.setattr(verify, "MIN_TURN", np.inf)  # the fit without a turn
        index._searcher._checks.clear()
        unturned = sum(any(m.id == ids[i] for m in row)
                       for i, row in enumerate(index.search_pixels(px, 3, mode="duplicate", frames=fr)))
    assert found == 20 and unturned < 10, (found, unturned)


def test_a_store_calibrates_itself_once_big_enough_and_again_when_it_doubles(digits, tmp_path, monkeypatch):
    x, _ = digits
    monkeypatch.setattr(calibrate, "AUTO_CALIBRATION", 100)
    with Index.open(tmp_path / "s") as index:
        index.add_many(x[:99])
        assert index.store_calibration() is None  # too small: the version's own threshold
        index.add(x[99])
        first = index.wait_for_calibration()
        assert first is not None and first["images"] == 100
        assert index.duplicate_rule() == first["threshold"]
        index.add_many(x[100:199])
        assert index.wait_for_calibration()["created"] == first["created"]  # not grown twice yet
        index.ingest(x[199:200])
        again = index.wait_for_calibration()
        assert again["images"] == 200 and again["created"] > first["created"]
        assert [e["kind"] for e in index.catalog.events()].count("calibrated") == 2


def test_a_failed_calibration_is_recorded_and_ingest_goes_on(digits, tmp_path, monkeypatch):
    x, _ = digits
    monkeypatch.setattr(calibrate, "AUTO_CALIBRATION", 50)

    def broken(store, *, version=None, seed=0):
        raise OSError("disk full")

    monkeypatch.setattr(calibrate, "calibrate_store", broken)
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many(x[:60])
        assert index.wait_for_calibration() is None  # the version's own rule stays in force
        failed = [e for e in index.catalog.events() if e["kind"] == "calibration_failed"]
        assert len(failed) == 1 and "OSError: disk full" in failed[0]["detail"]["reason"]
        assert len(index.add_many(x[60:70])) == 10 and len(index) == len(ids) + 10
        index.wait_for_calibration()  # 70 images: not grown by a quarter since the failure, not tried again
        assert [e["kind"] for e in index.catalog.events()].count("calibration_failed") == 1
        assert index.duplicate_rule() == index.meta(1)["duplicate_threshold"]
        index.add_many(x[70:80])  # 80: tried again (and fails again)
        index.wait_for_calibration()
        assert [e["kind"] for e in index.catalog.events()].count("calibration_failed") == 2
