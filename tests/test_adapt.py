"""The drift episode converges or says why not: retries with a stronger recipe, a CPU budget, a
killed fine-tune counted as a failed attempt, and a gate that judges retrieval."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import EXE, cli_json, dot_glyphs
from streamsim import Index
from streamsim.versions import RetrainResult


def _switching(digits, n_digits=200, n_new=200):
    return digits[0][:n_digits], dot_glyphs(n_new, seed=2)


def _fake_retrain(results, *, burn: float = 0.0):
    """An Index.retrain that trains nothing: each call takes the next outcome of ``results``
    (recorded as the real one records it: a ``rejected`` or ``activated`` event) after ``burn``
    seconds of CPU; the active version stays as it is."""
    calls = []

    def retrain(self, *, since=None, reason="manual", keep=None, stop=None, steps=None, replay=1.0, fresh=None, **kw):
        calls.append({"since": since, "steps": steps, "replay": replay, "fresh": fresh})
        t = time.process_time()
        while time.process_time() - t < burn:
            pass
        state = results[len(calls) - 1]
        version = self.catalog.new_version(state="rejected" if state == "rejected" else "ready",
                                           parent=self.active_version, reason=reason)
        self.catalog.add_event("rejected" if state == "rejected" else "activated", version=version,
                               detail={"why": "forced"})
        return RetrainResult(version, state, {"forced": True}, "forced" if state == "rejected" else None, 0.0)

    return retrain, calls


def _drift(stream, old, new):
    for batch in [*np.array_split(old, 4), *np.array_split(new, 4)]:
        stream.feed(batch)


def test_a_rejection_then_an_accepted_retry_ends_the_episode(tmp_path, digits, monkeypatch):
    old, new = _switching(digits)
    retrain, calls = _fake_retrain(["rejected", "active"])
    monkeypatch.setattr(Index, "retrain", retrain)
    with Index.open(tmp_path / "s") as index:
        with index.stream(min_new=80, retry_after=0.0, fine_tune="thread") as stream:
            _drift(stream, old, new)
            assert stream.wait(30, now=True)  # the retry is due at once: no more images needed
            done = [e["event"] for e in stream.events(timeout=5)]
            assert done == ["retraining", "rejected", "retraining", "activated"], done
            assert stream.state == "stable"
            # a stronger recipe the second time: twice the steps, more replay, still a fine-tune
            assert calls[1]["steps"] == 2 * calls[0]["steps"] and calls[1]["replay"] > calls[0]["replay"]
            assert calls[0]["fresh"] is None and calls[1]["fresh"] is None
        assert index.status()["drift"]["state"] == "stable"


def test_a_rejected_attempt_is_retried_after_a_while_without_more_images(tmp_path, digits, monkeypatch):
    old, new = _switching(digits)
    retrain, calls = _fake_retrain(["rejected", "rejected", "rejected"])
    monkeypatch.setattr(Index, "retrain", retrain)
    with Index.open(tmp_path / "s") as index:
        with index.stream(min_new=80, retry_after=0.5, fine_tune="thread") as stream:
            _drift(stream, old, new)
            stream.wait(30)
            assert [e["event"] for e in stream.events(timeout=5)] == ["retraining", "rejected"]
            stream.step()
            assert stream.events() == [] and len(calls) == 1  # not yet
            time.sleep(0.6)
            stream.wait(30)
            assert [e["event"] for e in stream.events(timeout=5)][:2] == ["retraining", "rejected"]
            time.sleep(0.6)
            stream.wait(30)
            last = stream.events(timeout=5)
            assert [e["event"] for e in last] == ["retraining", "rejected", "unresolved"]
            assert calls[2]["fresh"] == "conv"  # the last attempt: a fresh model on the whole store
            assert "--fresh conv" in last[-1]["advice"]
        assert index.status()["drift"]["state"] == "unresolved"
    said = subprocess.run([EXE, "status", "--store", str(tmp_path / "s")], capture_output=True, text=True).stdout
    assert "unresolved" in said and "no new version served the new images better" in said and "--fresh" in said


def test_the_cpu_budget_holds_the_next_attempt_back(tmp_path, digits, monkeypatch):
    old, new = _switching(digits)
    retrain, calls = _fake_retrain(["rejected", "rejected"], burn=0.3)
    monkeypatch.setattr(Index, "retrain", retrain)
    with Index.open(tmp_path / "s") as index:
        with index.stream(min_new=80, retry_after=0.0, cpu_budget=0.2, fine_tune="thread") as stream:
            _drift(stream, old, new)
            stream.wait(30, now=True)
            events = stream.events(timeout=5)
            assert [e["event"] for e in events] == ["retraining", "rejected", "budget_wait"], events
            assert events[1]["cpu_seconds"] >= 0.3 and events[2]["cpu_budget"] == 0.2
            assert 3000 < events[2]["resume_in"] <= 3600
            stream.wait(1, now=True)
            assert stream.events() == [] and len(calls) == 1 and stream.state == "drifting"


@pytest.mark.slow
def test_a_killed_fine_tune_is_a_failed_attempt_and_is_retried(tmp_path, digits):
    old, new = _switching(digits)
    with Index.open(tmp_path / "s") as index:
        with index.stream(min_new=80, retry_after=0.0) as stream:  # the fine-tune in a worker process
            _drift(stream, old, new)
            assert stream.state == "adapting"
            deadline = time.monotonic() + 60
            while not multiprocessing.active_children() and time.monotonic() < deadline:
                time.sleep(0.1)
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            seen = []
            while "retraining" not in seen[1:] and time.monotonic() < deadline:
                seen += [e["event"] for e in stream.events(timeout=1)]
            assert seen[:3] == ["retraining", "build_failed", "retraining"], seen
            assert stream.state == "adapting"
        # leaving the block cancelled the retry; nothing half-built is left and version 1 serves
        assert index.active_version == 1
        assert "building" not in [v["state"] for v in index.versions()]
        assert index.status()["drift"]["episode"]["attempts"] == 2
        assert index.search(old[3], k=1)[0].id == 4


def test_the_gate_judges_retrieval(digits):
    from streamsim import gate
    from streamsim.model import Encoder, build

    from streamsim.encoders import load, shipped_dir

    shipped = Encoder(load(shipped_dir())[0])
    recent, reference = _normalised(dot_glyphs(60, seed=3)), _normalised(digits[0][:120])
    same = gate.judge(shipped, shipped, recent, reference, margin=0.25)
    assert not same["passed"] and not same["recent_retrieval_improves"]  # no gain, no promotion
    assert same["neighbour_agreement"] == 1.0 and "retrieval of recent images" in same["why"]
    untrained = Encoder(build("mlp", None, seed=0))  # forgets everything
    worse = gate.judge(shipped, untrained, recent, reference, margin=10.0)
    assert worse["reference_retrieval_after"] < worse["reference_retrieval_before"]
    assert not worse["passed"] and worse["neighbour_agreement"] < 0.5
    assert worse["retrieval_queries"] == 180 * 4 and "promote when" in worse["rule"]


def _normalised(raw):
    from streamsim.perturb import normalise_all

    return normalise_all(raw)


def test_watch_refuses_a_budget_that_is_no_budget(tmp_path):
    (tmp_path / "in").mkdir()
    rc, _ = cli_json("watch", str(tmp_path / "in"), "--once", "--attempts", "0", "--store", str(tmp_path / "s"),
                     check=False)
    assert rc == 2
    rc, out = cli_json("watch", str(tmp_path / "in"), "--once", "--attempts", "2", "--cpu-budget", "600",
                       "--store", str(tmp_path / "s"))
    assert rc == 0 and out["event"] == "stopped"


def test_a_promoted_version_is_refined_as_the_new_data_doubles_until_the_gate_says_enough(tmp_path, digits,
                                                                                       monkeypatch):
    from streamsim.adapt import episode

    old, new = digits[0][:200], dot_glyphs(900, seed=2)
    retrain, calls = _fake_retrain(["active", "active", "rejected"])
    monkeypatch.setattr(Index, "retrain", retrain)
    with Index.open(tmp_path / "s") as index:
        with index.stream(min_new=80, fine_tune="thread") as stream:
            _drift(stream, old, new[:100])
            stream.wait(30)
            assert [e["event"] for e in stream.events(timeout=5)] == ["retraining", "activated"]
            first = calls[0]["since"]
            ep = index.status()["drift"]["episode"]
            assert ep["state"] == "stable" and ep["refine"]["since"] == first and ep["refine"]["count"] == 0
            short = 2 * ep["refine"]["images"] - index.catalog.count_images_from(first)  # until doubled
            assert short > 1
            stream.feed(new[100 : 100 + short - 1])
            assert stream.events() == [] and len(calls) == 1
            stream.feed(new[100 + short - 1 : 100 + short + 1])
            stream.wait(30)
            done = stream.events(timeout=5)
            assert [e["event"] for e in done] == ["retraining", "activated"]
            assert done[0]["refinement"] == 1 and calls[1]["since"] == first  # every image since the change
            stream.feed(new[100 + short + 1 :])  # doubled again: the second refinement is rejected
            stream.wait(30)
            done = stream.events(timeout=5)
            assert [e["event"] for e in done] == ["retraining", "rejected"] and done[1]["refinement"] == 2
            assert stream.state == "stable"
            stream.feed(dot_glyphs(600, seed=9))
            assert stream.events() == [] and len(calls) == 3  # refined enough: no more
        ep = episode(index.catalog.events())
        assert ep["state"] == "stable" and "refine" not in ep
