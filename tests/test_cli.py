import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from streamsim.cli import app

runner = CliRunner()


def run(*args, store):
    return runner.invoke(app, [*args, "--store", str(store)])


def test_add_search_status_versions(tmp_path, digit_files):
    store = tmp_path / "store"
    (digit_files[0].parent / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    res = run("add", str(digit_files[0].parent), "--json", store=store)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["added"] == 40 and out["failed"] == 0

    res = run("search", str(digit_files[2]), "-k", "3", "--json", store=store)
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert len(hits) == 3 and set(hits[0]) == {"id", "path", "distance", "encoder_version"}
    assert hits[0]["path"] == str(digit_files[2].resolve())

    res = run("search", str(digit_files[2]), "--show", str(tmp_path / "hits.png"), store=store)
    assert res.exit_code == 0 and "matches" in res.stdout
    assert Image.open(tmp_path / "hits.png").size[0] > 28 * 4

    status = json.loads(run("status", "--json", store=store).stdout)
    assert status["images"] == 40 and status["files"] == 40 and status["failed"] == 0
    assert status["active_version"] == 1
    versions = json.loads(run("versions", "--json", store=store).stdout)
    assert status["versions"] == versions
    assert {"version", "state", "parent", "reason", "created"} <= versions[0].keys()


def test_bad_files_are_reported_and_counted(tmp_path, digit_files):
    store = tmp_path / "store"
    bad = tmp_path / "broken.png"
    bad.write_bytes(digit_files[0].read_bytes()[:60])
    res = run("add", str(bad), str(digit_files[0]), str(tmp_path / "nope.png"), store=store)
    assert res.exit_code == 1
    errors = [line for line in res.stderr.splitlines() if line]
    assert any("broken.png" in line for line in errors) and any("nope.png" in line for line in errors)
    assert "Traceback" not in res.output
    status = json.loads(run("status", "--json", store=store).stdout)
    assert status["images"] == 1 and status["failed"] == 1
    failed = json.loads(run("failed", "--json", store=store).stdout)
    assert failed[0]["path"].endswith("broken.png") and failed[0]["reason"]


def test_errors_are_one_line(tmp_path, digit_files):
    res = run("search", str(digit_files[0]), store=tmp_path / "none")
    assert res.exit_code != 0 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    run("add", str(digit_files[0]), store=tmp_path / "s")
    res = run("search", str(tmp_path / "missing.png"), store=tmp_path / "s")
    assert res.exit_code != 0 and "missing.png" in res.stderr
    res = run("search", str(digit_files[0]), "--mode", "fuzzy", store=tmp_path / "s")
    assert res.exit_code != 0 and "unknown search mode" in res.stderr
    res = run("status", store=tmp_path / "none")
    assert res.exit_code != 0 and "no streamsim store" in res.stderr


def test_dedup_groups_identical_files(tmp_path, digit_files):
    store = tmp_path / "store"
    twin = tmp_path / "twin.png"
    twin.write_bytes(digit_files[0].read_bytes())
    run("add", str(digit_files[0]), str(digit_files[1]), str(twin), store=store)
    groups = json.loads(run("dedup", "--json", store=store).stdout)
    assert len(groups) == 1 and len(groups[0]["paths"]) == 2


@pytest.mark.slow
def test_train_npz_and_no_activate(tmp_path, digits):
    store = tmp_path / "store"
    data = tmp_path / "data.npz"
    np.savez(data, images=digits[0][:64])
    run("add", str(data.parent), store=store)  # nothing to add: no images there
    res = run("train", str(data), "--epochs", "1", "--no-activate", "--json", store=store)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 2 and out["active_version"] == 1 and out["trained_on"] == 64
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=digits[0][:4])
    res = run("train", str(bad), store=store)
    assert res.exit_code != 0 and "bad.npz" in res.stderr


def test_help_is_instant_and_imports_no_jax(tmp_path):
    code = "import sys; from streamsim.cli import app; import streamsim.catalog; print('jax' in sys.modules)"
    # run outside the source tree so the installed package is what gets imported
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"
    exe = Path(sys.executable).parent / "streamsim"  # the installed console script
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "search" in res.stdout


def test_a_damaged_catalog_is_a_one_line_error(tmp_path):
    store = tmp_path / "we#ird?store"
    store.mkdir()
    (store / "catalog.sqlite").write_bytes(b"this is not a database" * 100)
    res = run("status", "--json", store=store)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_calibrate_the_duplicate_threshold_on_the_store(tmp_path, digits, digit_files):
    from helpers import write_pngs

    store = tmp_path / "store"
    run("add", str(digit_files[0].parent), store=store)
    res = run("calibrate", store=store)  # 40 images: too few, one clear line
    assert res.exit_code != 0 and "at least 100" in res.output and len(res.output.strip().splitlines()) == 1
    run("add", str(write_pngs(tmp_path / "more", digits[0][40:140])[0].parent), store=store)
    res = run("calibrate", "--json", store=store)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"threshold", "measured", "version_threshold", "images", "copy_recall", "distinct_within", "version"} <= set(out)
    assert out["images"] == 140 and out["threshold"] <= out["version_threshold"]
    versions = json.loads(run("versions", "--json", store=store).stdout)
    assert versions[0]["duplicate_threshold"] == out["threshold"]
