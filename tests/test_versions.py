"""Drift → fine-tune → new version → background re-encode → atomic swap; rollback and retention.

A small store of real digits is followed by images of an unfamiliar "script" (dot patterns) that
the shipped encoder reconstructs badly; everything runs the real encoder on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import bar_glyphs, dot_glyphs
from streamsim import Index
from streamsim.store import StoreError

pytestmark = pytest.mark.slow  # every test here trains or fine-tunes an encoder

EXE = str(Path(sys.executable).parent / "streamsim")
N_DIGITS, N_NEW = 200, 200


@pytest.fixture(scope="module")
def drifted(tmp_path_factory, digits):
    """A store of 200 digits (ids 1–200) followed by 200 dot glyphs (ids 201–400)."""
    root = tmp_path_factory.mktemp("drifted") / "store"
    with Index.open(root) as index:
        index.add_many(digits[0])
        index.add_many(dot_glyphs(N_NEW))
    return root


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, drifted):
    """The drifted store fine-tuned while one thread searches and another adds images."""
    root = tmp_path_factory.mktemp("retrained") / "store"
    shutil.copytree(drifted, root)
    seen, errors, added = [], [], []
    done = threading.Event()
    query = dot_glyphs(1, seed=99)[0]
    with Index.open(root) as index:
        def searcher():
            while not done.is_set():
                try:
                    hits = index.search(query, k=5)
                    seen.append((hits[0].encoder_version, len(hits)))
                except Exception as e:  # noqa: BLE001 - any error here is a failure of the test
                    errors.append(repr(e))

        def adder():
            for i, img in enumerate(dot_glyphs(30, seed=5)):
                added.append(index.add(img))
                time.sleep(0.02 if i < 29 else 0)

        threads = [threading.Thread(target=searcher), threading.Thread(target=adder)]
        for t in threads:
            t.start()
        result = index.retrain(since=N_DIGITS + 1, epochs=3, reason="drift")
        threads[1].join()
        done.set()
        threads[0].join()
        ids_in_index = index.vectors(index.active_version).keys()
        catalog_ids = index.catalog.ids()
    return {"root": root, "result": result, "seen": seen, "errors": errors, "added": added,
            "ids_in_index": set(ids_in_index.tolist()), "catalog_ids": set(catalog_ids.tolist())}


def test_new_images_score_high_under_the_shipped_encoder(drifted):
    with Index.open(drifted) as index:
        s = index.catalog.score_stream()
    assert len(s["id"]) == N_DIGITS + N_NEW and set(s["version"].tolist()) == {1}
    old, new = s["score"][:N_DIGITS], s["score"][N_DIGITS:]
    assert abs(old.mean()) < 0.5  # real digits look like the reference
    assert new.mean() > old.mean() + 1.5


def test_fine_tune_is_promoted_while_searches_go_on(retrained):
    r = retrained["result"]
    assert r.state == "active" and r.version == 2 and r.promoted
    v = r.validation
    assert v["passed"] and v["recent_error_after"] < v["recent_error_before"]
    assert v["reference_error_after"] <= v["reference_error_before"] * 1.10
    assert v["since_image_id"] == N_DIGITS + 1 and v["replayed"] > 0 and v["reference_images"] > 0
    # searches were answered throughout, first by version 1, then by version 2, never failing
    assert retrained["errors"] == []
    versions = [s[0] for s in retrained["seen"]]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
    assert all(n == 5 for _, n in retrained["seen"])
    # images that arrived during the build are in the new index
    assert set(retrained["added"]) <= retrained["ids_in_index"]
    assert retrained["ids_in_index"] == retrained["catalog_ids"]


def test_versions_and_events_record_the_swap(retrained):
    with Index.open(retrained["root"]) as index:
        rows = {v["version"]: v for v in index.versions()}
        kinds = [e["kind"] for e in index.catalog.events()]
        # images stored after the swap are scored by the new version
        new_id = index.add(dot_glyphs(1, seed=1234)[0])
        scored = index.catalog.scores_of([new_id])
    assert rows[1]["state"] == "ready" and rows[2]["state"] == "active"
    assert rows[2]["parent"] == 1 and rows[2]["reason"] == "drift" and rows[2]["validation"]["passed"]
    # the new version is calibrated on the store's own images before it is switched to
    assert kinds[-3:] == ["version_created", "calibrated", "activated"]
    assert rows[2]["store_calibration"]["version"] == 2 and rows[2]["duplicate_threshold"] > 0
    assert scored[new_id][0] == 2


def test_rollback_and_roll_forward(retrained, tmp_path, digits):
    root = tmp_path / "store"
    shutil.copytree(retrained["root"], root)
    with Index.open(root) as index:
        index.rollback(1)
        assert index.active_version == 1
        extra = index.add(digits[0][0][::-1].copy())  # arrives while version 1 is active
        assert index.search(dot_glyphs(1, seed=99)[0], k=1)[0].encoder_version == 1
        index.rollback(2)  # forward again: its index catches up with the image added meanwhile
        assert index.active_version == 2
        assert index.search(index.pixels(extra), k=1)[0].id == extra
        events = [e for e in index.catalog.events() if e["kind"] == "rollback"]
        assert [(e["version"], e["detail"]["from"]) for e in events] == [(1, 2), (2, 1)]
        with pytest.raises(StoreError, match="no encoder version 9"):
            index.rollback(9)


def test_gate_rejects_a_fine_tune_that_forgets(drifted, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(drifted, root)
    with Index.open(root) as index:
        # no replay, no margin, and long enough on the dots alone to forget the digits (the shipped
        # encoder, trained long, loses nothing in 3 epochs: its reference error even falls)
        r = index.retrain(since=N_DIGITS + 1, epochs=20, replay=0.0, margin=0.0)
        assert r.state == "rejected" and not r.promoted and r.rejected_because
        v = r.validation
        assert not v["passed"] and v["reference_error_after"] > v["reference_error_before"]
        assert not (v["reference_error_within_margin"] and v["reference_retrieval_within_margin"])
        assert index.active_version == 1
        rows = {v["version"]: v for v in index.versions()}
        assert rows[r.version]["state"] == "rejected"
        rejected = [e for e in index.catalog.events() if e["kind"] == "rejected"]
        assert rejected and rejected[-1]["detail"]["passed"] is False
        with pytest.raises(StoreError, match="cannot be activated"):
            index.rollback(r.version)


def test_retention_keeps_checkpoints_and_rebuilds_a_pruned_index(retrained, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(retrained["root"], root)
    with Index.open(root) as index:
        v3 = index.train(epochs=1, keep=1)  # v3 active, parent v2 kept, v1's index pruned
        states = {v["version"]: v["state"] for v in index.versions()}
        assert states == {1: "retired", 2: "ready", v3: "active"}
        assert not (root / "vectors" / "v0001.usearch").exists()
        assert (root / "encoders" / "v0001" / "meta.json").exists()  # checkpoints stay
        index.rollback(1)  # rebuilt from the catalog's pixels
        assert index.active_version == 1
        assert (root / "vectors" / "v0001.usearch").exists()
        assert len(index.vectors(1)) == len(index)


def test_too_few_new_images_is_a_clear_error(drifted, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(drifted, root)
    with Index.open(root) as index, pytest.raises(StoreError, match="only 5 images since image 396"):
        index.retrain(since=396)


def _env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"  # compiled programs, shared by these tests
    return {**os.environ, "XDG_CACHE_HOME": str(cache)}


def test_a_crash_during_a_build_leaves_the_old_version_serving(drifted, tmp_path, tmp_path_factory):
    root = tmp_path / "store"
    shutil.copytree(drifted, root)
    proc = subprocess.Popen([EXE, "retrain", "--since", str(N_DIGITS + 1), "--store", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(tmp_path_factory))
    deadline = time.monotonic() + 120
    building = False
    while time.monotonic() < deadline and proc.poll() is None:
        with Index.open(root) as index:  # another process reading while the build runs
            building = any(v["state"] == "building" for v in index.versions())
            assert index.active_version == 1
        if building:
            break
        time.sleep(0.2)
    assert building, proc.stderr.read() if proc.poll() is not None else "no build seen"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with Index.open(root) as index:  # the dead build is found and discarded
        rows = {v["version"]: v for v in index.versions()}
        assert rows[2]["state"] == "failed" and index.active_version == 1
        assert [e["kind"] for e in index.catalog.events()][-1] == "build_failed"
        assert not (root / "encoders" / "v0002").exists() and not (root / "vectors" / "v0002.usearch").exists()
        assert index.search(dot_glyphs(1, seed=3)[0], k=3)[0].encoder_version == 1
        r = index.retrain(since=N_DIGITS + 1, epochs=10)
        assert r.version == 3 and r.state == "active"  # numbers never repeat


def test_watch_finds_the_drift_and_swaps_in_a_fine_tuned_version(tmp_path, tmp_path_factory, digits):
    from helpers import write_pngs

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    write_pngs(inbox, digits[0], prefix="a")
    env = _env(tmp_path_factory)
    run = lambda *a: subprocess.run([EXE, *a, "--store", str(store)], capture_output=True, text=True, env=env, timeout=300)  # noqa: E731
    assert run("watch", str(inbox), "--once", "--json").returncode == 0
    for i, img in enumerate(dot_glyphs(N_NEW)):
        Image.fromarray(img).save(inbox / f"b{i:04d}.png")
    out = run("watch", str(inbox), "--once", "--json")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [e["event"] for e in events if e["event"] not in ("stored", "watching")]
    assert kinds == ["drift", "retraining", "activated", "stopped"], kinds
    alarm = events[[e["event"] for e in events].index("drift")]
    assert Path(alarm["path"]).name.startswith("b") and N_DIGITS - 50 <= alarm["change_image_id"] <= alarm["id"]
    assert alarm["id"] - N_DIGITS <= 100  # found within 100 images of the switch

    logged = json.loads(run("events", "--json").stdout)
    drift_events = [e for e in logged if e["kind"] == "drift"]
    assert len(drift_events) == 1 and drift_events[0]["image_id"] == alarm["id"] and drift_events[0]["path"] == alarm["path"]
    assert {"kind", "time", "version", "image_id", "path"} <= set(drift_events[0])
    versions = json.loads(run("versions", "--json").stdout)
    assert [(v["version"], v["state"], v["reason"]) for v in versions] == [(1, "ready", "shipped"), (2, "active", "drift")]
    status = json.loads(run("status", "--json").stdout)
    assert status["active_version"] == 2 and status["drift"]["alarms"] == 1
    plot = tmp_path / "drift.png"
    assert run("drift", "--plot", str(plot)).returncode == 0
    assert Image.open(plot).size == (1200, 480)

    # a restarted watcher does not alarm again over the same images
    out = run("watch", str(inbox), "--once", "--json")
    assert [json.loads(line)["event"] for line in out.stdout.splitlines()] == ["stopped"]


def test_watch_no_retrain_records_the_alarm_only(tmp_path, tmp_path_factory, digits):
    from helpers import write_pngs

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    write_pngs(inbox, digits[0][:100], prefix="a")
    for i, img in enumerate(dot_glyphs(100)):
        Image.fromarray(img).save(inbox / f"b{i:04d}.png")
    out = subprocess.run([EXE, "watch", str(inbox), "--once", "--json", "--no-retrain", "--store", str(store)],
                         capture_output=True, text=True, env=_env(tmp_path_factory), timeout=300)
    assert out.returncode == 0, out.stderr
    kinds = [json.loads(line)["event"] for line in out.stdout.splitlines()]
    assert kinds.count("drift") == 1 and "retraining" not in kinds
    status = json.loads(subprocess.run([EXE, "status", "--json", "--store", str(store)], capture_output=True, text=True).stdout)
    assert status["active_version"] == 1 and len(status["versions"]) == 1


def test_cli_rollback_events_drift_and_errors(retrained, tmp_path):
    from typer.testing import CliRunner

    from streamsim.cli import app

    root = tmp_path / "store"
    shutil.copytree(retrained["root"], root)
    runner = CliRunner()
    invoke = lambda *a: runner.invoke(app, [*a, "--store", str(root)])  # noqa: E731
    out = invoke("rollback", "1", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["active_version"] == 1 and json.loads(out.output)["previous"] == 2
    events = json.loads(invoke("events", "--json", "--kind", "rollback").output)
    assert [(e["kind"], e["version"], e["from"]) for e in events] == [("rollback", 1, 2)]
    d = json.loads(invoke("drift", "--json").output)
    assert d["window"] > 0 and d["score"] is not None and d["alarms"] == 0
    table = invoke("versions")
    assert table.exit_code == 0 and "drift" in table.output and "active" in table.output
    out = invoke("retrain", "--since", "100000")
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "only 0 images since image 100000" in out.output
    out = invoke("rollback", "7")
    assert out.exit_code == 1 and "no encoder version 7" in out.output


def test_live_watcher_swaps_in_the_background_while_other_processes_search(tmp_path, tmp_path_factory, digits):
    from helpers import write_pngs
    from helpers import WatchProcess

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    env = _env(tmp_path_factory)
    w = WatchProcess(inbox, store, "--keep", "1", env=env)
    try:
        w.wait_for(lambda ev: any(e["event"] == "watching" for e in ev))
        write_pngs(inbox, digits[0], prefix="a")
        w.wait_for(lambda ev: sum(e["event"] == "stored" for e in ev) == N_DIGITS)
        for i, img in enumerate(dot_glyphs(300)):
            Image.fromarray(img).save(inbox / f"b{i:04d}.png")
        w.wait_for(lambda ev: any(e["event"] == "retraining" for e in ev), timeout=120)
        answered = []
        while not any(e["event"] in ("activated", "rejected", "build_failed") for e in w.events):
            out = subprocess.run([EXE, "search", str(inbox / "b0000.png"), "--json", "--store", str(store)],
                                 capture_output=True, text=True, env=env, timeout=120)
            assert out.returncode == 0, out.stderr
            answered.append(json.loads(out.stdout)[0]["encoder_version"])
        w.wait_for(lambda ev: any(e["event"] == "activated" for e in ev), timeout=5)
        assert answered and answered[0] == 1  # the old version answered while the new one was built
        write_pngs(inbox, dot_glyphs(3, seed=77), prefix="c")  # after the swap: stored under version 2
        w.wait_for(lambda ev: sum(e["event"] == "stored" for e in ev) == N_DIGITS + 303)
        out = subprocess.run([EXE, "search", str(inbox / "c0001.png"), "--json", "-k", "1", "--store", str(store)],
                             capture_output=True, text=True, env=env, timeout=120)
        hit = json.loads(out.stdout)[0]
        assert hit["encoder_version"] == 2 and hit["path"].endswith("c0001.png")
    finally:
        assert w.stop() == 0
    assert [e["event"] for e in w.events].count("drift") == 1
    with Index.open(store) as index:
        assert index.active_version == 2
        assert {v["version"]: v["state"] for v in index.versions()} == {1: "ready", 2: "active"}  # parent kept


def test_a_second_switch_adapts_too_and_every_version_can_be_made_active(retrained, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(retrained["root"], root)
    bars = bar_glyphs(300, seed=4)
    with Index.open(root) as index:
        assert index.active_version == 2  # digits, then dots: adapted once
        with index.stream(min_new=100, steps=150, retry_after=0.0, fine_tune="thread") as stream:
            fed = [e for batch in np.array_split(bars, 6) for e in stream.feed(batch)]
            assert [e["event"] for e in fed].count("drift") >= 1
            stream.step(now=True)
            assert stream.wait(600, now=True)
            done = stream.events(timeout=5)
            assert done[-1]["event"] == "activated", done
            assert stream.state == "stable"
        v3 = index.active_version
        assert v3 > 2 and {v["version"]: v for v in index.versions()}[v3]["validation"]["passed"]
        bar_id = index.search(bars[7], k=1)[0].id
        for v in (1, 2, v3):  # back and forward: each version's encoder and index together
            index.rollback(v)
            hit = index.search(bars[7], k=1)[0]
            assert hit.encoder_version == v and hit.id == bar_id
        assert index.status()["drift"]["state"] == "stable"
