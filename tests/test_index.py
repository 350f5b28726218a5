import threading
from pathlib import Path

import numpy as np
import pytest

from streamsim import ImageError, Index, Match, StoreError
from streamsim.index import MODES


def test_open_creates_store_with_shipped_encoder(tmp_path):
    with Index.open(tmp_path / "s") as index:
        assert index.active_version == 1
        v = index.versions()
        assert v[0]["version"] == 1 and v[0]["state"] == "active" and v[0]["reason"] == "shipped"
        assert len(index) == 0
    with pytest.raises(StoreError):
        Index.open(tmp_path / "missing", create=False)


def test_add_search_get_remove(tmp_path, digit_files, digits):
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many(digit_files)
        assert len(set(ids)) == len(ids) == 40 and len(index) == 40
        hits = index.search(digit_files[3], k=5)
        assert len(hits) == 5 and isinstance(hits[0], Match)
        assert hits[0].id == ids[3] and hits[0].distance < 1e-4
        assert hits[0].path == str(digit_files[3].resolve()) and hits[0].encoder_version == 1
        assert all(0 <= h.distance <= 2 for h in hits) and hits[0].distance == min(h.distance for h in hits)
        # the same pixels given as an array find the same image
        assert index.search(digits[0][3], k=1)[0].id == ids[3]
        assert index.remove(ids[3]) and not index.remove(ids[3])
        assert index.get(ids[3]) is None
        assert all(h.id != ids[3] for h in index.search(digit_files[3], k=40))


def test_identity_is_by_bytes(tmp_path, digit_files):
    copy = tmp_path / "elsewhere" / "copy.png"
    copy.parent.mkdir()
    copy.write_bytes(digit_files[0].read_bytes())
    with Index.open(tmp_path / "s") as index:
        a = index.add(digit_files[0])
        b = index.add(copy)
        assert a == b and len(index) == 1
        assert set(index.get(a)["paths"]) == {str(digit_files[0].resolve()), str(copy.resolve())}
        # same picture, different bytes (re-encoded as JPEG): a separate image
        from PIL import Image

        jpg = tmp_path / "copy.jpg"
        Image.open(digit_files[0]).save(jpg, quality=95)
        assert index.add(jpg) != a and len(index) == 2
        # an array whose own bytes are stored already
        arr = np.zeros((28, 28), np.uint8)
        arr[5:20, 10:14] = 255
        assert index.add(arr) == index.add(arr.copy())


def test_inputs_of_every_kind(tmp_path, digit_files, digits):
    from PIL import Image

    raw = digit_files[1].read_bytes()
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many([str(digit_files[1]), raw, open(digit_files[2], "rb"), Image.open(digit_files[3]), digits[0][4]])
        assert len(ids) == 5 and ids[0] == ids[1]  # path and bytes share the file's bytes
        batch = index.add_many(digits[0][10:15])
        assert len(batch) == 5 and len(index) == 4 + 5
        assert index.get(ids[1])["path"] is not None
        assert index.get(batch[0])["path"] is None


def test_bad_input_stores_nothing_of_the_batch(tmp_path, digit_files):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with Index.open(tmp_path / "s") as index:
        with pytest.raises(ImageError, match="bad.png"):
            index.add_many([digit_files[0], bad])
        assert len(index) == 0
        report = index.add_files([digit_files[0], bad])
        assert len(report.added) == 1 and report.failed[0][0].endswith("bad.png")
        assert index.catalog.count_failures() == 1


def test_search_modes(tmp_path, digit_files, digits):
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many(digit_files)
        for mode in MODES:
            hits = index.search(digit_files[5], k=3, mode=mode)
            assert hits and hits[0].id == ids[5]
        # duplicate mode: a lightly perturbed copy is found, distances within the threshold
        noisy = digits[0][5].astype(np.float32) + np.random.default_rng(0).normal(0, 10, (28, 28))
        dup = index.search(np.clip(noisy, 0, 255).astype(np.uint8), k=5, mode="duplicate")
        assert dup and dup[0].id == ids[5]
        assert 0 < index.duplicate_rule(1) < 0.2  # an excess: a share of the ink that may differ
        with pytest.raises(ValueError, match="unknown search mode"):
            index.search(digit_files[0], mode="fuzzy")
        many = index.search_many(digit_files[:3], k=2)
        assert [m[0].id for m in many] == ids[:3]


def test_reopen_reconciles_missing_vectors(tmp_path, digit_files):
    store = tmp_path / "s"
    with Index.open(store) as index:
        ids = index.add_many(digit_files[:10])
    (store / "vectors" / "v0001.usearch").unlink()  # as if the process died before saving
    with Index.open(store) as index:
        assert index.search(digit_files[4], k=1)[0].id == ids[4]


@pytest.mark.slow
def test_train_new_version_and_rollback(tmp_path, digit_files, digits):
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many(digit_files)
        seen = []
        stop = threading.Event()

        def searcher():
            while not stop.is_set():
                seen.append(index.search(digit_files[0], k=1)[0].id)

        t = threading.Thread(target=searcher)
        t.start()
        v2 = index.train(epochs=1)
        stop.set()
        t.join()
        assert seen and set(seen) == {ids[0]}
        assert v2 == 2 and index.active_version == 2
        states = {v["version"]: v["state"] for v in index.versions()}
        assert states == {1: "ready", 2: "active"}
        assert index.search(digit_files[7], k=1)[0] == Match(ids[7], str(digit_files[7].resolve()), pytest.approx(0, abs=1e-4), 2)
        v3 = index.train(digits[0][100:150], epochs=1, activate=False)
        assert v3 == 3 and index.active_version == 2
        new_id = index.add(digits[0][160])
        index.rollback(1)
        assert index.active_version == 1
        assert index.search(digits[0][160], k=1)[0].id == new_id  # caught up with images added since
        index.rollback(3)
        assert index.search(digits[0][160], k=1)[0].encoder_version == 3
        kinds = [e["kind"] for e in index.catalog.events()]
        assert kinds.count("rollback") == 2
        with pytest.raises(StoreError, match="no encoder version 9"):
            index.rollback(9)


def test_bulk_add_in_worker_processes(tmp_path, digits, monkeypatch):
    from helpers import write_pngs

    import streamsim.workers as workers

    monkeypatch.setattr(workers, "PARALLEL_LOAD_MIN", 8)
    files = write_pngs(tmp_path / "bulk", digits[0][:30])
    (tmp_path / "bulk" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "bulk" / "img0000_copy.png").write_bytes(files[0].read_bytes())
    seen = []
    with Index.open(tmp_path / "s") as index:
        report = index.add_files([tmp_path / "bulk"], on_file=lambda p, outcome, i: seen.append((p, outcome)))
        assert len(report.added) == 30 and len(report.duplicates) == 1
        assert [p for p, _ in report.failed] == [str(tmp_path / "bulk" / "zz_bad.png")]
        assert len(seen) == 32
        assert index.search(files[9], k=1)[0].path == str(files[9].resolve())


def test_a_fixed_file_clears_its_failure_whatever_path_spelling(tmp_path, digit_files, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    bad = tmp_path / "later.png"
    bad.write_bytes(b"garbage")
    monkeypatch.chdir(work)
    with Index.open(tmp_path / "s") as index:
        index.add_files([Path("..") / "later.png"])
        assert index.catalog.count_failures() == 1
        bad.write_bytes(digit_files[0].read_bytes())
        index.add_files([Path("..") / "later.png"])
        assert index.catalog.count_failures() == 0 and len(index) == 1


def test_version_numbers_are_taken_atomically(tmp_path):
    from streamsim.catalog import Catalog

    a = Catalog(tmp_path / "c.sqlite")
    b = Catalog(tmp_path / "c.sqlite")
    got = [a.new_version(state="building", parent=None, reason="manual"),
           b.new_version(state="building", parent=None, reason="manual")]
    assert got == [1, 2]
    a.add_version(1, state="ready", parent=None, reason="shipped", meta={}, if_missing=True)  # no error
    a.close()
    b.close()


def test_an_unguarded_script_adds_many_files_in_one_process(tmp_path, digits):
    """A script without an ``if __name__ == "__main__":`` guard must not be re-run by worker
    processes (spawned workers import the main module): its files are decoded here instead."""
    import subprocess
    import sys

    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(digits[0][:24]):
        Image.fromarray(img).save(folder / f"{i}.png")
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import streamsim.workers as W\n"
        "from streamsim import Index\n"
        "print('TOP-LEVEL', flush=True)\n"
        "W.PARALLEL_LOAD_MIN = 4\n"
        f"with Index.open({str(tmp_path / 'store')!r}) as ix:\n"
        f"    print('STORED', ix.add_files([{str(folder)!r}]).files, len(ix), flush=True)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("TOP-LEVEL") == 1 and "STORED 24 24" in run.stdout
