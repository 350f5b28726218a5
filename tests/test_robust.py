"""Nothing a user drops in stops streamsim: decoder workers that die or hang, a full disk, kills
in the middle of re-encoding, and `streamsim check` finding and repairing a damaged store."""

from __future__ import annotations

import errno
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import EXE, cli_json, misbehaving_loader, png_bytes, write_pngs
from streamsim import Index, images, normalise, watch, workers
from streamsim.catalog import Catalog


@pytest.mark.slow
def test_a_worker_that_dies_or_hangs_costs_only_its_file(tmp_path, digits):
    good = write_pngs(tmp_path / "in", digits[0][:30])
    bad = {}
    for n, name in enumerate(("a_crash.png", "b_slow.png", "c_stuck.png")):
        bad[name] = tmp_path / "in" / name
        bad[name].write_bytes(png_bytes(digits[0][100 + n]))
    files = sorted(good + list(bad.values()))
    t0 = time.monotonic()
    with workers.Decoder(processes=True, timeout=0.5, grace=2.0, loader=misbehaving_loader, workers=2) as decoder:
        out = dict(decoder.load(files))
        assert decoder.crashes >= 2  # the crash, and the stuck worker killed
    assert list(out) == files  # every file answered, in order
    assert out[bad["a_crash.png"]].reason == workers.CRASHED
    assert "took longer than 0.5 s" in out[bad["b_slow.png"]].reason  # the time limit inside the worker
    assert "took longer than 0.5 s" in out[bad["c_stuck.png"]].reason  # the wait on the batch
    for f in good:
        assert isinstance(out[f], images.Loaded), out[f]
    assert time.monotonic() - t0 < 60


def test_a_file_that_decodes_too_long_is_failed_here_too(tmp_path, digits, monkeypatch):
    files = write_pngs(tmp_path / "in", digits[0][:3])
    real = normalise.normalise_grey

    def slow_on_the_second(grey, source, **kw):
        if source.endswith("img0001.png"):
            time.sleep(30)
        return real(grey, source, **kw)

    monkeypatch.setattr(normalise, "normalise_grey", slow_on_the_second)
    t0 = time.monotonic()
    with workers.Decoder(processes=False, timeout=0.3) as decoder:
        out = [r for _, r in decoder.load(files)]
    assert time.monotonic() - t0 < 5
    assert isinstance(out[0], images.Loaded) and isinstance(out[2], images.Loaded)
    assert isinstance(out[1], images.ImageError) and "took longer than 0.3 s" in out[1].reason


def test_a_full_disk_keeps_files_unacknowledged_and_the_watcher_retries(tmp_path, digits, monkeypatch):
    monkeypatch.setattr(watch, "ERROR_BACKOFF", 0.05)
    inbox = tmp_path / "inbox"
    write_pngs(inbox, digits[0][:10])
    with Index.open(tmp_path / "store") as index:
        real, calls = index.catalog.add_images, []

        def full(*a, **k):
            calls.append(1)
            if len(calls) <= 2:
                raise sqlite3.OperationalError("database or disk is full")
            return real(*a, **k)

        monkeypatch.setattr(index.catalog, "add_images", full)
        events = []
        config = watch.WatchConfig(inbox, settle=0.0, use_events=False, retrain=False)
        watch.Watcher(index, config, events.append).run_once()
        kinds = [e["event"] for e in events]
        assert kinds.count("error") == 2 and kinds.count("stored") == 10, kinds
        assert "disk is full" in next(e for e in events if e["event"] == "error")["reason"]
        assert len(index) == 10 and len(index.catalog.journal()) == 10
    with Index.open(tmp_path / "store") as index:
        assert index.check()["ok"]


@pytest.mark.slow
def test_a_full_disk_during_a_build_discards_it_and_the_old_version_serves(tmp_path, digits, monkeypatch):
    from streamsim.vectors import Vectors

    real_save = Vectors.save

    def full(self):
        if self.path.name == "v0002.usearch":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_save(self)

    with Index.open(tmp_path / "store") as index:
        ids = index.add_many(digits[0][:60])
        monkeypatch.setattr(Vectors, "save", full)
        with pytest.raises(OSError, match="No space left"):
            index.train(epochs=1)
        assert index.active_version == 1
        assert [v["state"] for v in index.versions()] == ["active", "failed"]
        assert not (tmp_path / "store" / "vectors" / "v0002.usearch").exists()
        assert index.search(digits[0][5], k=1)[0].id == ids[5]
        monkeypatch.setattr(Vectors, "save", real_save)
        assert index.train(epochs=1) == 3 and index.active_version == 3
        assert index.check()["ok"]


@pytest.mark.slow
def test_check_finds_and_repairs_vectors_a_dead_build_a_tampered_checkpoint_and_the_journal(tmp_path, digits):
    store = tmp_path / "store"
    inbox = tmp_path / "inbox"
    write_pngs(inbox, digits[0][:30])
    assert subprocess.run([EXE, "watch", str(inbox), "--once", "--store", str(store), "--json"],
                          capture_output=True, timeout=300).returncode == 0
    rc, report = cli_json("check", "--store", str(store))
    assert rc == 0 and report["ok"] and report["images"] == 30 and report["problems"] == []

    (store / "vectors" / "v0001.usearch").unlink()  # the active index lost
    weights = store / "encoders" / "v0001" / "weights.npz"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # the shipped encoder's copy altered
    with Catalog(store / "catalog.sqlite") as cat:
        dead = cat.new_version(state="building", parent=1, reason="manual")  # a build whose process died
    (store / "encoders" / f"v{dead:04d}").mkdir()
    db = sqlite3.connect(store / "catalog.sqlite")  # a journal that names an image never stored
    with db:
        db.execute("INSERT INTO journal(path, size, mtime_ns, digest, outcome, image_id, reason, time) "
                   "VALUES('/elsewhere/x.png', 1, 1, NULL, 'stored', 999, NULL, 0)")
    db.close()

    rc, report = cli_json("check", "--store", str(store))
    assert rc == 1 and not report["ok"]
    kinds = sorted(p["kind"] for p in report["problems"])
    assert kinds == ["checkpoint", "half_built", "journal"], report  # vectors are checked once v1 is sound
    assert all(p["repairable"] for p in report["problems"])

    rc, report = cli_json("check", "--store", str(store), "--repair")
    assert rc == 0 and report["ok"], report
    assert sorted(p["kind"] for p in report["repaired"]) == ["checkpoint", "half_built", "journal", "vectors"]
    assert len(list((store / "encoders").glob(".v0001.damaged-*"))) == 1  # set aside, not deleted
    with Index.open(store) as index:
        assert len(index) == 30 and index.versions()[dead - 1]["state"] == "failed"
        assert index.search(digits[0][7], k=1)[0].path.endswith("img0007.png")
    rc, report = cli_json("check", "--store", str(store))
    assert rc == 0 and report["ok"]


@pytest.mark.slow
def test_check_reports_a_tampered_trained_version_it_cannot_repair(tmp_path, digits):
    with Index.open(tmp_path / "store") as index:
        index.add_many(digits[0][:40])
        index.train(epochs=1, activate=False)
    state = tmp_path / "store" / "encoders" / "v0002" / "meta.json"
    meta = json.loads(state.read_text())
    meta["final_loss"] = 0.0
    state.write_text(json.dumps(meta))
    with Index.open(tmp_path / "store", reconcile=False) as index:
        report = index.check(repair=True)
    assert not report["ok"] and report["repaired"] == []
    assert [(p["kind"], p["version"], p["repairable"]) for p in report["problems"]] == [("checkpoint", 2, False)]


def _kill_at_random(args, seed, low, high, *, ready=None):
    """Start ``streamsim ARGS``, SIGKILL it after a seeded random delay (or let it finish)."""
    delay = float(np.random.default_rng(seed).uniform(low, high))
    proc = subprocess.Popen([EXE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return delay, proc.returncode


def _after_kill(store, expected_images):
    """What must hold after any kill: the store opens, a whole version serves, nothing building,
    nothing lost or doubled, `check` says whole."""
    with Index.open(store) as index:
        states = [v["state"] for v in index.versions()]
        assert "building" not in states, states
        assert len(index) == expected_images
        pixels = index.pixels(1)
        assert index.search(pixels, k=1, mode="duplicate")[0].id == 1
    rc, report = cli_json("check", "--store", str(store))
    assert rc == 0 and report["ok"], report


@pytest.mark.slow
def test_kills_during_train_rollback_and_add_lose_nothing(tmp_path, digits):
    store = tmp_path / "store"
    write_pngs(tmp_path / "a", digits[0][:80])
    assert subprocess.run([EXE, "add", str(tmp_path / "a"), "--store", str(store)], capture_output=True).returncode == 0

    _kill_at_random(["train", "--epochs", "3", "--store", str(store), "--json"], seed=1, low=3.0, high=9.0)
    _after_kill(store, 80)

    # a pruned version made active again is rebuilt from the stored pixels: kill that rebuild
    with Index.open(store) as index:
        index.train(epochs=1)
        index.train(epochs=1, keep=1)
        assert index.versions()[0]["state"] == "retired"
    _kill_at_random(["rollback", "1", "--store", str(store)], seed=2, low=1.0, high=3.0)
    _after_kill(store, 80)

    # an add killed half-way: the next add takes the rest, nothing doubled
    write_pngs(tmp_path / "b", digits[0][80:200])
    _kill_at_random(["add", str(tmp_path / "b"), "--store", str(store)], seed=3, low=1.0, high=2.5)
    _after_kill(store, _count(store))
    assert subprocess.run([EXE, "add", str(tmp_path / "b"), "--store", str(store)], capture_output=True).returncode == 0
    _after_kill(store, 200)
    with Index.open(store) as index:  # and the next build completes
        version = index.train(epochs=1)
        assert index.active_version == version and index.check()["ok"]


def _count(store) -> int:
    with Catalog(store / "catalog.sqlite", readonly=True) as cat:
        return cat.count_images()


@pytest.mark.slow
def test_a_watcher_takes_500_mutated_files_and_every_good_one(tmp_path, digits):
    from fuzz import mutated_inputs

    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    ext = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "gif": ".gif", "tiff": ".tif", "webp": ".webp"}
    for i, (name, data) in enumerate(mutated_inputs(500, 11)):
        (inbox / f"m{i:03d}{ext[name.split('-')[0]]}").write_bytes(data)
    fixtures = [p for p in (Path(__file__).parent / "data" / "fuzz").iterdir() if p.suffix != ".md"]
    for p in fixtures:  # every file that once broke the loader
        (inbox / f"fixture_{p.name}").write_bytes(p.read_bytes())
    good = write_pngs(inbox, digits[0][:20], prefix="good")

    def watch_once():
        run = subprocess.run([EXE, "watch", str(inbox), "--once", "--json", "--no-retrain", "--store", str(store)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stderr.strip() == ""  # no traceback, no decoder warning printed per file
        return [json.loads(line) for line in run.stdout.splitlines()]

    events = watch_once()
    outcomes = {e["path"]: e["event"] for e in events if e["event"] in ("stored", "duplicate", "failed")}
    assert len(outcomes) == 500 + len(fixtures) + len(good)
    assert all(outcomes[str(g.resolve())] == "stored" for g in good)
    assert all(e["reason"] for e in events if e["event"] == "failed")
    assert events[-1]["event"] == "stopped" and "error" not in {e["event"] for e in events}
    again = watch_once()  # a restart takes none of them again, good or bad
    assert [e["event"] for e in again] == ["stopped"]
    with Index.open(store) as index:
        stored = sum(v == "stored" for v in outcomes.values())
        assert len(index) == stored and index.check()["ok"]


def test_a_strip_no_glyph_is_shaped_like_is_refused_before_it_is_decoded():
    from streamsim.decode import MAX_ASPECT

    fixture = Path(__file__).parent / "data" / "fuzz" / "tall_58mpx.png"  # 261 bytes claiming 28 × 2,097,180
    t0 = time.monotonic()
    with pytest.raises(images.ImageError, match=f"not a glyph image: 28×2097180 pixels \\(more than {MAX_ASPECT}:1\\)"):
        images.load(fixture)
    assert time.monotonic() - t0 < 0.5
    line = np.zeros((8, 8 * MAX_ASPECT), np.uint8)  # a long line of text is still taken
    line[2:6, 10:-10] = 255
    assert images.load(line).pixels.any()
