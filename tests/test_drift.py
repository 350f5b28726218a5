"""Drift detectors on seeded synthetic score streams: where alarms fire, and that stationary
streams raise none. Every detector goes through the same suite."""

from __future__ import annotations

import numpy as np
import pytest

from streamsim import drift, plots

DETECTORS = sorted(drift.DETECTORS)


def _stream(seed: int, before: int, after: int = 0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.0, 1.0, before), rng.normal(shift, 1.0, after)])


def _alarms(det, stream) -> list[int]:
    return [i for i, x in enumerate(stream) if det.update(x).drift_detected]


@pytest.mark.parametrize("name", DETECTORS)
def test_stationary_stream_raises_no_alarm(name):
    # 30,000 scores like the reference: the budget is one false alarm per 10,000 at most
    assert _alarms(drift.DETECTORS[name](), _stream(7, 30_000)) == []


@pytest.mark.parametrize("name", DETECTORS)
def test_heavy_tailed_stationary_stream_stays_within_budget(name):
    rng = np.random.default_rng(3)
    stream = rng.standard_t(5, 30_000) / np.sqrt(5 / 3)  # unit variance, heavier tails than the normal
    assert len(_alarms(drift.DETECTORS[name](), stream)) <= 3


@pytest.mark.parametrize("name", DETECTORS)
def test_a_shift_of_one_sigma_is_found_quickly_and_once(name):
    stream = _stream(11, 3_000, 3_000, shift=-1.0 if name == "cusum_low" else 1.0)
    det = drift.DETECTORS[name]()
    alarms = _alarms(det, stream)
    assert len(alarms) == 1, alarms  # one change, one alarm (cooldown, then a new baseline)
    assert 3_000 <= alarms[0] <= 3_000 + 200
    start = alarms[0] - det.change_point + 1  # the estimated first changed update
    assert abs(start - 3_000) <= 210


@pytest.mark.parametrize("name", [d for d in DETECTORS if d != "cusum_low"])
def test_a_decrease_is_not_drift(name):
    # lower reconstruction error than the reference is not a reason to retrain ...
    assert _alarms(drift.DETECTORS[name](), _stream(5, 3_000, 3_000, shift=-2.0)) == []


def test_a_version_adapted_to_a_change_also_watches_for_a_drop():
    # ... except for a version whose reference is the stream it adapted to: a second switch to
    # something simpler (back to digits, say) is a change of data too
    plain = drift.Normaliser(0.0, 1.0, 1.0)
    adapted = drift.Normaliser(0.0, 1.0, 1.0, two_sided=True)
    assert "cusum_low" not in drift.DriftMonitor(version=1, normaliser=plain).detectors
    mon = drift.DriftMonitor(version=2, normaliser=adapted)
    assert drift.Normaliser.from_meta({"drift_reference": adapted.to_dict()}).two_sided
    stream = _stream(5, 3_000, 3_000, shift=-2.0)
    alarms = [(i, a.detector) for i, x in enumerate(stream) if (a := mon.update(float(x), image_id=i))]
    assert len(alarms) == 1 and alarms[0][1] == "cusum_low" and 3_000 <= alarms[0][0] <= 3_050
    # a reference of few images: its mean is uncertain, so both CUSUMs allow more slack
    few = drift.DriftMonitor(version=2, normaliser=drift.Normaliser(0.0, 1.0, 1.0, two_sided=True, images=36))
    assert few.detectors["cusum"].slack == few.detectors["cusum_low"].slack == 0.75
    level = _stream(6, 20_000, 0, shift=0.0) - 0.4  # the level of a 36-image reference missed by 0.4
    assert not [x for x in level if few.update(float(x))]


@pytest.mark.parametrize("name", DETECTORS)
def test_non_finite_scores_are_ignored(name):
    det = drift.DETECTORS[name]()
    for x in [np.nan, np.inf, -np.inf] * 100:
        assert not det.update(x).drift_detected
    assert det.n == 300


def test_exact_alarm_positions():
    stream = _stream(0, 2_000, 500, shift=1.5)
    assert _alarms(drift.CUSUM(), stream) == [2020]
    assert _alarms(drift.PageHinkley(), stream) == [2022]
    assert _alarms(drift.KSWindow(), stream) == [2059]


def test_cusum_fires_on_a_stream_unfamiliar_from_the_start_and_page_hinkley_does_not():
    stream = _stream(2, 0, 2_000, shift=1.0)
    assert _alarms(drift.CUSUM(), stream) == [25]
    assert _alarms(drift.PageHinkley(), stream) == []


def test_cooldown_then_new_baseline():
    det = drift.CUSUM(cooldown=100)
    stream = _stream(4, 500, 2_000, shift=2.0)
    alarms = _alarms(det, stream)
    assert len(alarms) == 1
    assert det.reference == pytest.approx(2.0, abs=0.3)  # the cooldown's scores are the new reference
    # a second change on top of the new level is found again
    more = _alarms(det, np.random.default_rng(9).normal(4.0, 1.0, 300))
    assert len(more) == 1


def test_calibrate_threshold_meets_the_budget():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, 5_000)
    th = drift.calibrate_threshold(lambda t: drift.CUSUM(threshold=t), reference, budget=2_000,
                                   length=40_000, lo=1.0, hi=60.0, iterations=10)
    stream = rng.choice(reference, 40_000)
    assert drift.false_alarms(lambda: drift.CUSUM(threshold=th), stream) <= 40_000 // 2_000 + 5
    assert drift.false_alarms(lambda: drift.CUSUM(threshold=th / 4), stream) > 40_000 // 2_000


def test_bad_options_say_what_is_wrong():
    with pytest.raises(ValueError, match="cooldown"):
        drift.CUSUM(cooldown=-1)
    with pytest.raises(ValueError, match="window"):
        drift.KSWindow(window=5)
    with pytest.raises(ValueError, match="unknown drift detector 'nope'"):
        drift.DriftMonitor(version=1, normaliser=None, detectors=("nope",))


def test_normaliser_removes_the_ink_dependence():
    rng = np.random.default_rng(0)
    ink = rng.uniform(0.05, 0.4, 4_000)
    errors = 0.4 * ink**0.6 * np.exp(rng.normal(0, 0.2, 4_000))  # error grows with ink
    norm = drift.Normaliser.fit(errors, ink)
    z = norm.score(errors, ink)
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0, rel=1e-6)
    assert norm.slope == pytest.approx(0.6, abs=0.05)
    # thin and thick glyphs reconstructed equally well (relative to their ink) score alike
    thin, thick = norm.score(0.4 * np.array([0.05, 0.4]) ** 0.6, np.array([0.05, 0.4]))
    assert thin == pytest.approx(thick, abs=0.1)  # raw error differs 3.5-fold
    # twice the expected error is an unfamiliar image
    assert norm.score(np.array([0.8 * 0.2**0.6]), np.array([0.2]))[0] > 2.5
    again = drift.Normaliser.from_meta({"drift_reference": norm.to_dict()})
    assert np.allclose(again.score(errors, ink), z, atol=1e-4)
    with pytest.raises(ValueError, match="at least 10"):
        drift.Normaliser.fit(errors[:3], ink[:3])


def test_monitor_reports_the_image_where_the_change_began():
    mon = drift.DriftMonitor(version=3, normaliser=None)
    stream = _stream(1, 1_000, 300, shift=2.0)
    alarms = [a for i, x in enumerate(stream) if (a := mon.update(x, image_id=1000 + i, path=f"f{i}.png"))]
    assert len(alarms) == 1
    a = alarms[0]
    assert a.detector == "cusum" and a.path == f"f{a.image_id - 1000}.png"
    assert 1990 <= a.change_image_id <= a.image_id and a.image_id - 2000 <= 50
    assert a.statistic > drift.CUSUM().threshold


def test_plot_writes_a_png(tmp_path):
    from PIL import Image

    s = _stream(0, 300, 300, shift=2.0)
    stream = {"id": np.arange(1, 601), "version": np.ones(600, int), "error": np.ones(600), "score": s}
    events = [{"kind": "drift", "image_id": 320, "version": 1}, {"kind": "activated", "image_id": 600, "version": 2}]
    plots.plot_stream(stream, events, tmp_path / "d.png")
    im = np.asarray(Image.open(tmp_path / "d.png").convert("RGB"))
    assert im.shape == (480, 1200, 3)
    assert ((im[..., 0] > 200) & (im[..., 1] < 60)).any()  # the red alarm line
    empty = {k: np.zeros(0) for k in ("id", "version", "error", "score")}
    plots.plot_stream(empty, [], tmp_path / "e.png")
    assert Image.open(tmp_path / "e.png").size == (1200, 480)
