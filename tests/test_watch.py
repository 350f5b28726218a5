"""`streamsim watch` as users run it: a real subprocess tailing a real folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import EXE, WatchProcess, png_bytes, status
from streamsim import Index

@pytest.mark.slow
def test_watch_ingests_everything_once_and_stops_cleanly(tmp_path, digits):
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    imgs = digits[0]
    # already there before the watcher starts: 3 images, a duplicate, two bad files
    for i in range(3):
        (inbox / f"early{i}.png").write_bytes(png_bytes(imgs[i]))
    (inbox / "early_copy.png").write_bytes(png_bytes(imgs[0]))
    (inbox / "empty.png").write_bytes(b"")
    (inbox / "truncated.png").write_bytes(png_bytes(imgs[3])[:80])
    (inbox / "notes.txt").write_text("not an image name: ignored")

    w = WatchProcess(inbox, store)
    try:
        w.wait_for(lambda ev: sum(e["event"] in ("stored", "duplicate", "failed") for e in ev) >= 6)
        assert w.count("stored") == 3 and w.count("duplicate") == 1 and w.count("failed") == 2
        reasons = {Path(e["path"]).name: e["reason"] for e in w.events if e["event"] == "failed"}
        assert set(reasons) == {"empty.png", "truncated.png"} and "empty" in reasons["empty.png"]

        # rename into place: the temporary name is ignored, the final one ingested
        tmp = inbox / ".incoming.png.part"
        tmp.write_bytes(png_bytes(imgs[10]))
        time.sleep(1.0)
        assert w.count("stored") == 3
        tmp.rename(inbox / "renamed.png")
        # moved in from another folder: complete at once, no close event ever comes
        outside = tmp_path / "outside.png"
        outside.write_bytes(png_bytes(imgs[13]))
        outside.rename(inbox / "moved_in.png")

        # a slow writer in chunks: never read half-written
        data = png_bytes(imgs[11])
        with open(inbox / "slow.png", "wb") as f:
            for i in range(0, len(data), max(1, len(data) // 8)):
                f.write(data[i : i + max(1, len(data) // 8)])
                f.flush()
                time.sleep(0.25)
        w.wait_for(lambda ev: sum(e["event"] == "stored" for e in ev) >= 6)
        stored = {Path(e["path"]).name for e in w.events if e["event"] == "stored"}
        assert {"renamed.png", "slow.png", "moved_in.png"} <= stored
        assert w.count("failed") == 2  # the slow file was never reported corrupt

        # another process searches while the watcher runs
        with Index.open(store, create=False) as index:
            hit = index.search(imgs[11], k=1)[0]
            assert Path(hit.path).name == "slow.png" and hit.distance < 1e-4
    finally:
        t = time.monotonic()
        rc = w.stop()
    assert rc == 0 and time.monotonic() - t < 10
    assert w.events[-1]["event"] == "stopped"
    st = status(store)
    assert st["images"] == 6 and st["failed"] == 2 and st["files"] == 7
    # user files untouched
    assert (inbox / "early_copy.png").exists() and (inbox / "empty.png").read_bytes() == b""

    # restart: nothing is processed twice; a changed file is a new image
    (inbox / "early1.png").write_bytes(png_bytes(imgs[12]))
    w2 = WatchProcess(inbox, store)
    try:
        w2.wait_for(lambda ev: any(e["event"] == "stored" for e in ev))
        time.sleep(1.0)
    finally:
        assert w2.stop(signal.SIGINT) == 0
    assert w2.count("stored") == 1 and w2.count("failed") == 0 and w2.count("duplicate") == 0
    assert status(store)["images"] == 7


@pytest.mark.slow
def test_sigkill_and_restart_lose_and_double_nothing(tmp_path, digits):
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    imgs = digits[0]
    w = WatchProcess(inbox, store)
    w.wait_for(lambda ev: any(e["event"] == "watching" for e in ev))
    for i in range(120):
        (inbox / f"f{i:03d}.png.tmp").write_bytes(png_bytes(imgs[i]))
        os.replace(inbox / f"f{i:03d}.png.tmp", inbox / f"f{i:03d}.png")
    w.wait_for(lambda ev: sum(e["event"] == "stored" for e in ev) >= 30)
    w.stop(signal.SIGKILL)
    acknowledged = {e["path"]: e["id"] for e in w.events if e["event"] == "stored"}
    for i in range(120, 150):  # arrive while it is down
        (inbox / f"f{i:03d}.png").write_bytes(png_bytes(imgs[i]))
    out = subprocess.run([EXE, "watch", str(inbox), "--store", str(store), "--once", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with Index.open(store, create=False) as index:
        assert len(index) == 150
        for path, image_id in acknowledged.items():
            assert index.get(image_id)["path"] == path
        for i in (0, 77, 149):
            assert Path(index.search(imgs[i], k=1)[0].path).name == f"f{i:03d}.png"
    st = status(store)
    assert st["images"] == 150 and st["files"] == 150 and st["failed"] == 0


@pytest.mark.slow
def test_once_takes_files_in_arrival_order_and_patterns(tmp_path, digits):
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    (inbox / "sub").mkdir(parents=True)
    names = ["c.png", "a.png", "b.png"]
    now = time.time()
    for k, name in enumerate(names):
        p = inbox / name
        p.write_bytes(png_bytes(digits[0][k]))
        os.utime(p, (now - 100 + k, now - 100 + k))
    (inbox / "sub" / "deep.png").write_bytes(png_bytes(digits[0][5]))
    (inbox / "skip.jpg").write_bytes(png_bytes(digits[0][6]))
    out = subprocess.run([EXE, "watch", str(inbox), "--store", str(store), "--once", "--json", "--pattern", "*.png"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(e["path"]).name for e in events if e["event"] == "stored"] == names
    out = subprocess.run([EXE, "watch", str(inbox), "--store", str(store), "--once", "--json", "--recursive"],
                         capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(Path(e["path"]).name for e in events if e["event"] == "stored") == ["deep.png", "skip.jpg"]


def test_second_watcher_on_the_same_store_is_refused(tmp_path):
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    w = WatchProcess(inbox, store)
    try:
        w.wait_for(lambda ev: any(e["event"] == "watching" for e in ev))
        out = subprocess.run([EXE, "watch", str(inbox), "--store", str(store), "--once"], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "already running" in out.stderr and "Traceback" not in out.stderr
    finally:
        assert w.stop() == 0


@pytest.fixture
def watcher(tmp_path):
    from streamsim.watch import Watcher, WatchConfig

    inbox = tmp_path / "inbox"
    (inbox / ".staging").mkdir(parents=True)
    (inbox / "sub").mkdir()
    index = Index.open(tmp_path / "store")
    yield Watcher(index, WatchConfig(folder=inbox, recursive=True, settle=0.3)), inbox
    index.close()


def test_readiness_follows_the_writer_not_its_readers(watcher, digits):
    w, inbox = watcher
    path = str(inbox / "a.png")
    Path(path).write_bytes(png_bytes(digits[0][0]))
    now = time.monotonic()
    for kind in ("created", "opened", "modified", "opened", "closed_no_write"):  # a reader peeks mid-write
        w.offer(path, kind, now)
    w._pending[path].stable_since -= 5  # quiet for a while: still being written, not ready
    assert w.ready() == []
    w.offer(path, "closed", time.monotonic())
    assert [f[0] for f in w.ready()] == [path]
    # moved in from elsewhere: only a created event, never opened here
    moved = str(inbox / "b.png")
    Path(moved).write_bytes(png_bytes(digits[0][1]))
    w.offer(moved, "created", time.monotonic() - 1)
    assert moved in [f[0] for f in w.ready()]


def test_hidden_folders_and_temporary_names_are_ignored(watcher, digits):
    w, inbox = watcher
    for rel in (".staging/x.png", "sub/.y.png", "sub/z.png.part", "sub/ok.png"):
        (inbox / rel).write_bytes(png_bytes(digits[0][2]))
        w.offer(str(inbox / rel), "closed", time.monotonic())
    assert list(w._pending) == [str(inbox / "sub" / "ok.png")]


def test_a_file_removed_before_it_is_read_is_not_a_failure(watcher, digits):
    w, inbox = watcher
    p = inbox / "brief.png"
    p.write_bytes(png_bytes(digits[0][3]))
    w.offer(str(p), "closed", time.monotonic())
    batch = w.ready()
    p.unlink()
    w.ingest(batch)
    assert w.stats.failed == 0 and not w._pending and w.index.catalog.count_failures() == 0


def test_the_journal_is_read_from_the_catalog_not_a_copy(watcher, digits):
    """A taken file is not taken again on a rescan; once its journal row is gone (`forget_journal`,
    by this or another process) the next rescan takes it again — the watcher holds no copy of the
    journal that could disagree with the catalog (and grow with every file)."""
    w, inbox = watcher
    for i in range(3):
        (inbox / f"f{i}.png").write_bytes(png_bytes(digits[0][10 + i]))
    w.run_once()
    assert w.stats.ingested == 3
    w.scan()
    assert not w._pending  # journalled with the same size and mtime: nothing to take
    w.index.catalog.forget_journal([str(inbox / "f1.png")])
    w.scan()
    assert list(w._pending) == [str(inbox / "f1.png")]
    (inbox / "f2.png").write_bytes(png_bytes(digits[0][20]))  # changed since it was journalled
    w.offer(str(inbox / "f2.png"), "closed", time.monotonic())
    assert sorted(w._pending) == [str(inbox / "f1.png"), str(inbox / "f2.png")]


def test_pipelined_batches_store_every_file_once_in_arrival_order(tmp_path, digits):
    """Batches taken while earlier ones are still decoding (in worker processes) or being stored:
    every file is stored, or failed, exactly once, in arrival order (mtime, then name — not the
    names' order), and the catalog's ids follow that order."""
    from streamsim.watch import POOL_MIN_BATCH, Watcher, WatchConfig

    class Recording(Watcher):
        most_in_flight = 0

        def take(self, files):
            super().take(files)
            self.most_in_flight = max(self.most_in_flight, len(self._inflight))

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(3)
    contents = [png_bytes(img) for img in digits[0]] + [b"", png_bytes(digits[0][5])[:80]]
    contents += [contents[17], contents[150]]  # the same bytes again, later: duplicates
    names = [f"{n:04d}.png" for n in rng.permutation(len(contents))]
    now = time.time()
    for k, (name, data) in enumerate(zip(names, contents)):  # arrival order: k
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (now - 1000 + k, now - 1000 + k))
    events = []
    with Index.open(tmp_path / "store") as index:
        w = Recording(index, WatchConfig(folder=inbox, settle=0.2, batch_files=POOL_MIN_BATCH, retrain=False), events.append)
        w.run_once()
        outcomes = [e for e in events if e["event"] in ("stored", "duplicate", "failed")]
        assert [Path(e["path"]).name for e in outcomes] == names  # each once, in arrival order
        assert [e["event"] for e in outcomes] == ["stored"] * 200 + ["failed"] * 2 + ["duplicate"] * 2
        ids = [e["id"] for e in outcomes if e["event"] == "stored"]
        assert ids == sorted(ids) and len(set(ids)) == 200
        assert [e["id"] for e in outcomes[-2:]] == [ids[17], ids[150]]
        assert w.most_in_flight >= 2  # the pipeline had batches decoding behind the one being stored
        assert len(index) == 200 and index.catalog.journal_stats([str(inbox / n) for n in names]).keys() == {
            str(inbox / n) for n in names}
