"""`Index.stream()`: any producer feeds the same adaptive loop — detection, the drift episode,
adaptation in the background — as the folder watcher does."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from helpers import EXE, cli_json, dot_glyphs, write_pngs
from streamsim import Index
from streamsim.stream import StreamLockError
from streamsim.versions import RetrainResult


def _switching(digits, n_digits=200, n_new=200):
    return digits[0][:n_digits], dot_glyphs(n_new, seed=2)


def test_feed_returns_one_event_per_item_and_bad_items_are_failed_events(tmp_path, digits):
    good = write_pngs(tmp_path / "in", digits[0][:2])
    with Index.open(tmp_path / "s") as index, index.stream() as stream:
        events = stream.feed([digits[0][5], good[0], good[0].read_bytes(), b"garbage", str(tmp_path / "missing.png")])
        assert [e["event"] for e in events] == ["stored", "stored", "duplicate", "failed", "failed"]
        assert events[1]["path"] == str(good[0].resolve()) and "path" not in events[0]
        assert "not an image" in events[3]["reason"] and "file not found" in events[4]["reason"]
        with pytest.raises(TypeError):
            stream.feed([object()])
        assert stream.state == "stable" and stream.events() == []
        assert index.catalog.count_failures() == 1  # the missing path is recorded, as `add` records it


def test_a_second_stream_on_a_store_is_refused(tmp_path):
    with Index.open(tmp_path / "s") as index, index.stream():
        with pytest.raises(StreamLockError, match="already running"):
            index.stream()
        run = subprocess.run([EXE, "watch", str(tmp_path), "--once", "--store", str(tmp_path / "s")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "already running" in run.stderr
    with Index.open(tmp_path / "s") as index, index.stream():  # released on leaving the block
        pass


def _fake_retrain(results):
    """An Index.retrain that trains nothing: it records the outcomes in ``results`` in turn, as the
    real one does (a rejected version and its event)."""
    calls = []

    def retrain(self, *, since=None, reason="manual", keep=None, stop=None, steps=None, replay=1.0, fresh=None, **kw):
        calls.append({"since": since, "steps": steps, "replay": replay, "fresh": fresh})
        version = self.catalog.new_version(state="rejected", parent=self.active_version, reason=reason)
        self.catalog.add_event("rejected", version=version, detail={"why": "forced"})
        return RetrainResult(version, results[len(calls) - 1], {"forced": True}, "forced", 0.0)

    return retrain, calls


def test_the_drift_episode_from_alarm_to_unresolved(tmp_path, digits, monkeypatch):
    old, new = _switching(digits)
    retrain, calls = _fake_retrain(["rejected", "rejected"])
    monkeypatch.setattr(Index, "retrain", retrain)
    with Index.open(tmp_path / "s") as index:
        with index.stream(budget=2, min_new=80, fine_tune="thread") as stream:  # the stub runs in this process
            events = [e for batch in np.array_split(old, 4) for e in stream.feed(batch)]
            assert "drift" not in [e["event"] for e in events] and stream.state == "stable"
            events = [e for batch in np.array_split(new[:100], 4) for e in stream.feed(batch)]
            drifts = [e for e in events if e["event"] == "drift"]
            assert len(drifts) == 1 and drifts[0]["id"] > len(old)  # after the switch, not before
            assert drifts[0]["change_image_id"] > len(old) - 50  # the estimated start of the change
            stream.wait(30)
            first = stream.events(timeout=5)
            assert [e["event"] for e in first] == ["retraining", "rejected"]
            assert stream.state == "drifting" and first[0]["attempt"] == 1
            assert index.status()["drift"]["state"] == "drifting"
            # the retry waits until the images since the change have doubled (or a minute has passed),
            # and is stronger: the last attempt of the budget is a fresh model on the whole store
            stream.feed(new[100:130])
            assert stream.events() == [] and len(calls) == 1
            stream.feed(new[130:])
            stream.wait(30)
            second = stream.events(timeout=5)
            assert [e["event"] for e in second] == ["retraining", "rejected", "unresolved"]
            assert calls[0]["fresh"] is None and calls[1]["fresh"] == "conv"
            assert "retrain" in second[-1]["advice"]
            assert stream.state == "unresolved"
        status = index.status()["drift"]
        assert status["state"] == "unresolved" and status["episode"]["attempts"] == 2
        kinds = [e["kind"] for e in index.catalog.events()]
        assert kinds.count("retraining") == 2 and kinds.count("unresolved") == 1


@pytest.mark.slow
def test_the_episode_as_the_event_log_tells_it():
    from streamsim.adapt import episode

    def ev(kind, image_id=None, **detail):
        return {"kind": kind, "image_id": image_id, "detail": detail}

    log = [ev("rejected"), ev("drift", 40, change_image_id=31)]
    assert episode(log[:1])["state"] == "stable"  # a manual retrain's outcome opens nothing
    assert episode(log) | {} == {"state": "drifting", "since_image_id": 31, "alarm_image_id": 40, "attempts": 0}
    log += [ev("retraining", images=300), ev("drift", 90, change_image_id=80)]
    assert episode(log)["state"] == "adapting" and episode(log)["since_image_id"] == 31  # not while an attempt runs
    log += [ev("rejected"), ev("retraining", images=700), ev("build_failed"), ev("unresolved")]
    assert episode(log)["state"] == "unresolved" and episode(log)["attempts"] == 2
    log += [ev("drift", 2000, change_image_id=1990)]  # the data changed again: a new episode
    assert episode(log)["state"] == "drifting" and episode(log)["since_image_id"] == 1990
    assert episode(log)["attempts"] == 0
    assert episode(log + [ev("activated", 2100)])["state"] == "stable"


def test_add_opens_an_episode_that_a_later_stream_continues(tmp_path, digits, monkeypatch):
    old, new = _switching(digits)
    write_pngs(tmp_path / "old", old)
    write_pngs(tmp_path / "new", new)
    store = tmp_path / "s"
    assert cli_json("add", str(tmp_path / "old"), "--store", str(store))[1]["drift"] == []
    rc, out = cli_json("add", str(tmp_path / "new"), "--store", str(store))
    assert rc == 0 and len(out["drift"]) == 1 and out["drift_state"] == "drifting"
    assert json.loads(subprocess.run([EXE, "status", "--json", "--store", str(store)], capture_output=True,
                                     text=True).stdout)["drift"]["state"] == "drifting"
    retrain, calls = _fake_retrain(["rejected"])
    monkeypatch.setattr(Index, "retrain", retrain)
    with Index.open(store) as index, index.stream(min_new=50, fine_tune="thread") as stream:
        assert stream.state == "drifting"
        stream.step()
        stream.wait(30)
        assert [e["event"] for e in stream.events(timeout=5)] == ["retraining", "rejected"]
        assert calls[0]["since"] == out["drift"][0]["change_image_id"]


@pytest.mark.slow
def test_an_in_memory_stream_adapts_in_the_background(tmp_path, digits):
    old, new = _switching(digits)
    with Index.open(tmp_path / "s") as index, index.stream(min_new=100) as stream:
        for batch in [*np.array_split(old, 4), *np.array_split(new, 4)]:
            stream.feed(batch)
        assert stream.state == "adapting"
        assert stream.wait(600)
        done = stream.events(timeout=5)
        assert [e["event"] for e in done] == ["retraining", "activated"], done
        assert stream.state == "stable" and index.active_version == done[-1]["version"] == 2
        assert index.status()["drift"]["state"] == "stable"


@pytest.mark.slow
def test_leaving_the_block_cancels_a_build_and_the_old_version_serves(tmp_path, digits):
    old, new = _switching(digits)
    with Index.open(tmp_path / "s") as index:
        with index.stream(min_new=100) as stream:
            for batch in [*np.array_split(old, 4), *np.array_split(new, 4)]:
                stream.feed(batch)
            assert stream.state == "adapting"
        assert index.active_version == 1
        assert "building" not in [v["state"] for v in index.versions()]
        assert [e["kind"] for e in index.catalog.events()][-1] == "build_cancelled"
        assert index.status()["drift"]["episode"] | {"state": "drifting", "attempts": 1} == index.status()["drift"]["episode"]
        assert index.search(old[3], k=1)[0].id == 4


def test_add_while_a_watcher_holds_the_stream_stores_and_says_so(tmp_path, digits):
    write_pngs(tmp_path / "in", digits[0][:5])
    with Index.open(tmp_path / "s") as index, index.stream():
        run = subprocess.run([EXE, "add", str(tmp_path / "in"), "--store", str(tmp_path / "s"), "--json"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "storing without drift detection" in run.stderr
        assert json.loads(run.stdout)["added"] == 5 and len(index) == 5
