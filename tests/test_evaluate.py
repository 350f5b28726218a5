"""`streamsim eval` and streamsim.evaluate on a tiny labelled set."""

import json

import numpy as np
import pytest
from streamsim.cli import app
from typer.testing import CliRunner

from streamsim import evaluate

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, digits):
    x, y = digits
    path = tmp_path_factory.mktemp("eval") / "tiny.npz"
    np.savez(path, images=x[:80], labels=y[:80])
    return path


def test_eval_json_keys(tiny):
    res = runner.invoke(app, ["eval", str(tiny), "--json", "--queries", "20", "--seed", "3"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep) == {"data", "encoder", "conditions", "methods", "seconds"}
    assert rep["data"]["images"] == 80 and rep["data"]["queries"] == 20 and rep["data"]["seed"] == 3
    assert rep["encoder"]["store_calibration"] is None and rep["encoder"]["duplicate_threshold"] > 0
    assert rep["conditions"] == ["clean", "noise", "salt_pepper", "shift", "rotation", "elastic", "stroke"]
    assert {"streamsim", "raw_pixels", "centred_pixels"} <= set(rep["methods"])
    for m in rep["methods"].values():
        assert set(m["retrieval"]) == set(rep["conditions"])
        for scores in m["retrieval"].values():
            assert set(scores) == {"p_at_10", "map", "recall_at_100"}
            assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert 0.0 <= m["neardup_top1"] <= 1.0
    s = rep["methods"]["streamsim"]
    assert set(s["duplicate_mode"]) == {"recall", "rescan_recall", "false_duplicate_rate", "false_duplicate_rate_noisy"}
    assert set(s["recall_mode"]) == {"recall_at_100", "recall_at_100_perturbed", "similar_recall_at_100",
                                     "similar_recall_at_100_perturbed"}
    assert s["retrieval"]["clean"]["p_at_10"] > rep["methods"]["raw_pixels"]["retrieval"]["shift"]["p_at_10"]


def test_eval_with_the_threshold_calibrated_on_the_store(tmp_path, tiny, digits):
    res = runner.invoke(app, ["eval", str(tiny), "--calibrate-store"])  # 72 stored: too few
    assert res.exit_code != 0 and "at least 100" in res.output and len(res.output.strip().splitlines()) == 1
    x, y = digits
    path = tmp_path / "more.npz"
    np.savez(path, images=x[:130], labels=y[:130])
    res = runner.invoke(app, ["eval", str(path), "--json", "--queries", "20", "--calibrate-store"])
    assert res.exit_code == 0, res.output
    enc = json.loads(res.stdout)["encoder"]
    cal = enc["store_calibration"]
    assert cal["images"] == 117 and enc["duplicate_threshold"] == cal["threshold"] <= cal["version_threshold"]


def test_parallel_eval_reports_the_same(monkeypatch, digits):
    """Worker processes (as `streamsim eval` uses for large runs) change the time, not the report."""
    x, y = digits
    monkeypatch.setattr(evaluate, "PARALLEL_MIN", 0)
    serial = evaluate.evaluate(x[:60], y[:60], queries=15, seed=1)
    shared = evaluate.evaluate(x[:60], y[:60], queries=15, seed=1, parallel=True)
    serial.pop("seconds"), shared.pop("seconds")
    assert json.dumps(serial, sort_keys=True) == json.dumps(shared, sort_keys=True)


def test_eval_table(tiny):
    res = runner.invoke(app, ["eval", str(tiny), "--queries", "10"])
    assert res.exit_code == 0, res.output
    assert "precision@10" in res.stdout and "centred_pixels" in res.stdout and "duplicate mode" in res.stdout


@pytest.mark.parametrize("content, message", [
    (b"not a zip file at all", "unreadable"),
    ({"images": np.zeros((4, 28, 28), np.uint8)}, "no 'labels'"),
    ({"images": np.zeros((4, 28, 28), np.float32), "labels": np.arange(4)}, "uint8"),
    ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.arange(3)}, "labels"),
    ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.array([{}, {}, {}, {}], dtype=object)}, "unreadable"),
])
def test_bad_data_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    res = runner.invoke(app, ["eval", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.npz" in lines[0] and message in lines[0]
    res = runner.invoke(app, ["eval", str(tmp_path / "missing.npz")])
    assert res.exit_code == 1 and "missing.npz" in res.stderr


def test_ranking_metrics_by_hand():
    ranked = np.array([[1, 0, 1] + [0] * 97, [0] * 100])
    r = evaluate.ranking_metrics(ranked, np.array([1, 1]), np.array([2, 4]))
    assert r["p_at_10"] == pytest.approx((2 / 10 + 0) / 2)
    assert r["map"] == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)
    assert r["recall_at_100"] == pytest.approx((1 + 0) / 2)


def test_eval_version_needs_a_store(tiny):
    result = runner.invoke(app, ["eval", str(tiny), "--version", "2"])
    assert result.exit_code == 1 and "--version needs --store" in result.output


@pytest.mark.slow
def test_eval_measures_a_stores_own_versions(tmp_path, tiny, digits):
    from streamsim import Index

    with Index.open(tmp_path / "s") as index:
        index.add_many(digits[0][80:200])
        index.train(epochs=1, activate=False)
    reports = {}
    for v in (1, 2):
        result = runner.invoke(app, ["eval", str(tiny), "--store", str(tmp_path / "s"), "--version", str(v),
                                     "--queries", "40", "--json"])
        assert result.exit_code == 0, result.output
        reports[v] = json.loads(result.output)
        assert reports[v]["encoder"]["store"]["version"] == v
    active = json.loads(runner.invoke(app, ["eval", str(tiny), "--store", str(tmp_path / "s"), "--queries", "40",
                                            "--json"]).output)
    assert active["encoder"]["store"]["version"] == 1  # version 2 was not activated
    codes = {v: reports[v]["methods"]["streamsim"]["retrieval"] for v in reports}
    assert codes[1] == active["methods"]["streamsim"]["retrieval"] and codes[1] != codes[2]
