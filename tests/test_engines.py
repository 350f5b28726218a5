"""The engines (streamsim.engines): a reindex or an ``add`` through Ray workers gives the store
the local engine gives it, a worker killed mid-job costs a retry or fails the job cleanly with the
store untouched, and a missing Ray says how to install it. Against a real local Ray cluster, one
for the whole run (``ray.init(num_cpus=2)``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import EXE, cli_json, write_pngs
from streamsim import engines
from streamsim.index import Index
from streamsim.store import vectors_path

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]' or '.[test]')")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the test run (start-up costs a few seconds)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_engine(ray_cluster):
    """Two actors (the cluster's two CPUs), each loading its encoder once; stopped after the test."""
    with engines.RayEngine(workers=2, batch=64) as engine:
        yield engine


@pytest.fixture
def store(tmp_path, digits):
    with Index.open(tmp_path / "store") as index:
        index.add_many(digits[0])
    return tmp_path / "store"


def _snapshot(root):
    """What a reindex may not change before it completes: the active vectors' bytes, the
    catalog's images and versions."""
    with Index.open(root, reconcile=False) as index:
        v = index.active_version
        return (hashlib.sha256(vectors_path(root, v).read_bytes()).hexdigest(), len(index),
                [(r["version"], r["state"]) for r in index.versions()])


def _top10(index, queries):
    return [[m.id for m in ms] for ms in index.search_many(queries, k=10)]


def test_reindex_on_ray_equals_local(store, digits, ray_engine):
    queries = digits[0][::10]
    with Index.open(store) as index:
        ids = index.catalog.ids()
        before = index.vectors().get(ids).copy()
        local = index.reindex()
        after_local, top_local = index.vectors().get(ids).copy(), _top10(index, queries)
        seen, untouched, before_ray = [], [], _snapshot(store)
        inode = vectors_path(store, 1).stat().st_ino

        def progress(n):  # the old index stays on disk until the new one is complete
            seen.append(n)
            untouched.append(_snapshot(store) == before_ray)

        result = index.reindex(engine=ray_engine, progress=progress)
        after_ray, top_ray = index.vectors().get(ids), _top10(index, queries)
        replaced = vectors_path(store, 1).stat().st_ino != inode
    assert set(result) == {"version", "images", "engine", "workers", "seconds"}
    assert (result["engine"], result["workers"], result["images"], result["version"]) == ("ray", 2, len(ids), 1)
    assert (local["engine"], local["workers"], local["images"]) == ("local", 1, len(ids))
    assert sum(seen) == len(ids) and len(seen) == -(-len(ids) // 64)  # batches of 64 went out
    assert all(untouched) and replaced  # then the file was replaced (os.replace: a new inode)
    np.testing.assert_allclose(after_local, before, atol=1e-5)
    np.testing.assert_allclose(after_ray, after_local, atol=1e-5)
    assert top_ray == top_local
    events = [e for e in Index.open(store).catalog.events() if e["kind"] == "reindexed"]
    assert [e["detail"]["engine"] for e in events] == ["local", "ray"]


def test_add_on_ray_stores_each_file_once_and_reports_failures_as_local_does(tmp_path, digits, ray_engine):
    drop = tmp_path / "drop"
    files = write_pngs(drop, digits[0][:60])
    shutil.copy(files[3], drop / "copy_of_3.png")  # the same bytes under another name
    (drop / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a truncated PNG
    reports = {}
    for name, engine in (("local", None), ("ray", ray_engine)):
        with Index.open(tmp_path / name) as index:
            reports[name] = index.add_files([drop], engine=engine)
            again = index.add_files([drop], engine=engine)  # re-running adds nothing new
            assert (len(again.added), len(again.duplicates), len(again.failed)) == (0, 61, 1)
            assert len(index) == 60
    local, remote = reports["local"], reports["ray"]
    assert (len(remote.added), len(remote.duplicates)) == (60, 1)
    assert remote.failed == local.failed and len(remote.failed) == 1
    assert remote.failed[0][0].endswith("broken.png") and "\n" not in remote.failed[0][1]
    with Index.open(tmp_path / "local") as a, Index.open(tmp_path / "ray") as b:
        ids = a.catalog.ids()
        assert np.array_equal(ids, b.catalog.ids())
        assert [a.get(i)["digest"] for i in ids] == [b.get(i)["digest"] for i in ids]
        np.testing.assert_allclose(b.vectors().get(ids), a.vectors().get(ids), atol=1e-5)
        sa, sb = a.catalog.score_stream(), b.catalog.score_stream()
        np.testing.assert_allclose(sb["score"], sa["score"], atol=1e-4)
        assert _top10(a, digits[0][60:80]) == _top10(b, digits[0][60:80])
        assert len(b.catalog.failures()) == 1


def test_add_on_ray_of_fuzzed_files_gives_the_outcomes_local_gives(tmp_path, ray_engine):
    """The door that takes bytes: seeded mutated files of every format, through Ray's workers and
    through the local decoder, stored or failed alike (the same reasons, one line each)."""
    from fuzz import mutated_inputs

    drop = tmp_path / "fuzz"
    drop.mkdir()
    for i, (_, data) in enumerate(mutated_inputs(80, seed=19)):
        (drop / f"m{i:03d}.png").write_bytes(data)
    reports, digests = {}, {}
    for name, engine in (("local", None), ("ray", ray_engine)):
        with Index.open(tmp_path / name) as index:
            reports[name] = index.add_files([drop], engine=engine)
            digests[name] = sorted(index.get(i)["digest"] for i in index.catalog.ids())
    assert ray_engine.encoded == 80
    assert sorted(reports["ray"].failed) == sorted(reports["local"].failed)
    assert all("\n" not in reason for _, reason in reports["ray"].failed)
    assert digests["ray"] == digests["local"]
    assert reports["ray"].files == 80 and 0 < len(reports["ray"].failed) < 80


@pytest.mark.slow
def test_train_builds_the_new_versions_index_on_ray(store, digits, ray_cluster):
    with Index.open(store) as index:
        ids = index.catalog.ids()
        with engines.RayEngine(workers=2, batch=64, min_images=1) as engine:
            version = index.train(digits[0][:64], epochs=1, engine=engine)
            assert engine.encoded >= len(ids)  # the new version's index went through the workers
        assert index.active_version == version == 2
        built = index.vectors(version).get(ids).copy()
        index.reindex(version)  # locally
        np.testing.assert_allclose(index.vectors(version).get(ids), built, atol=1e-5)


def _kill_one_worker(engine):
    """A progress callback that SIGKILLs one of the engine's actors after the first batch."""
    pids = engine.worker_pids()
    killed = []

    def progress(_):
        if not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    return progress, killed


@pytest.mark.slow
def test_a_worker_killed_mid_reindex_costs_a_retry(store, digits, ray_cluster):
    with Index.open(store) as index:
        ids = index.catalog.ids()
        expected = index.vectors().get(ids).copy()
        with engines.RayEngine(workers=2, batch=16, retries=2) as engine:
            progress, killed = _kill_one_worker(engine)
            result = index.reindex(engine=engine, progress=progress)
        assert killed and result["images"] == len(ids)
        np.testing.assert_allclose(index.vectors().get(ids), expected, atol=1e-5)


def test_a_worker_killed_without_retries_fails_the_job_and_the_store_is_untouched(store, digits, ray_cluster):
    before = _snapshot(store)
    with Index.open(store) as index:
        top = _top10(index, digits[0][:20])
        checks = []
        with engines.RayEngine(workers=2, batch=16, retries=0) as engine:
            progress, killed = _kill_one_worker(engine)

            def watch(n):  # while the job runs, the old index is the one on disk and serving
                checks.append((_snapshot(store) == before, _top10(index, digits[0][:20]) == top))
                progress(n)

            with pytest.raises(engines.EngineError, match="worker failed") as err:
                index.reindex(engine=engine, progress=watch)
        assert "\n" not in str(err.value) and killed
        assert checks and all(all(c) for c in checks)
        assert _top10(index, digits[0][:20]) == top
    assert _snapshot(store) == before
    with Index.open(store) as index:
        assert not [e for e in index.catalog.events() if e["kind"] == "reindexed"]
        assert index.check()["ok"]


@pytest.mark.parametrize("command", [["reindex"], ["add", "."]])
def test_engine_ray_without_ray_says_how_to_install_it(tmp_path, command):
    code = ("import sys; sys.modules['ray'] = None; from streamsim.cli import main; "
            f"sys.argv = ['streamsim', *{command!r}, '--engine', 'ray', '--store', {str(tmp_path / 's')!r}]; main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip() == f"streamsim: {engines.RAY_MISSING_MSG}"
    assert "pip install 'streamsim[ray]'" in run.stderr


def test_address_without_ray_engine_is_refused(tmp_path):
    run = subprocess.run([EXE, "reindex", "--address", "127.0.0.1:6379", "--store", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.strip() == f"streamsim: {engines.ADDRESS_MSG}"


def test_an_address_where_no_cluster_answers_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([EXE, "reindex", "--engine", "ray", "--address", f"127.0.0.1:{port}", "--store",
                          str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip() == f"streamsim: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"


def test_ray_after_usearch_is_refused_not_aborted(store):
    code = ("import sys; from streamsim.index import Index; from streamsim.engines import EngineError\n"
            f"index = Index.open({str(store)!r})\n"
            "try:\n    index.reindex(engine='ray')\nexcept EngineError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == engines.RAY_ORDER_MSG


@pytest.mark.slow
def test_cli_joins_a_running_cluster_with_address_and_leaves_it_running(store, ray_cluster):
    address = ray_cluster.get_runtime_context().gcs_address
    code, result = cli_json("reindex", "--engine", "ray", "--address", address, "--store", str(store))
    assert code == 0 and (result["engine"], result["images"]) == ("ray", 200)
    assert 1 <= result["workers"] <= 2  # the CPUs free then (the previous test's actors may still be going)
    assert ray_cluster.is_initialized() and ray_cluster.cluster_resources().get("CPU") == 2


@pytest.mark.slow
def test_cli_reindex_and_add_on_a_cluster_of_their_own(tmp_path, digits):
    """Through the command: each starts a local Ray cluster for itself and stops it after."""
    files = write_pngs(tmp_path / "drop", digits[0][:30])
    (tmp_path / "drop" / "broken.png").write_bytes(b"GIF89a" + b"\x01" * 10)
    store = str(tmp_path / "store")
    code, added = cli_json("add", str(tmp_path / "drop"), "--engine", "ray", "--store", store)
    assert code == 1 and (added["added"], added["failed"], added["images"]) == (30, 1, 30)
    code, result = cli_json("reindex", "--engine", "ray", "--store", store)
    assert code == 0 and set(result) == {"version", "images", "engine", "workers", "seconds"}
    assert (result["version"], result["images"], result["engine"], result["workers"]) == (1, 30, "ray", os.cpu_count())
    code, hits = cli_json("search", str(files[4]), "-k", "1", "--store", store)
    assert hits[0]["path"] == str(files[4].resolve())


def test_reindex_of_a_version_without_an_index_is_one_line(store):
    run = subprocess.run([EXE, "reindex", "--version", "7", "--store", str(store)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.strip() == "streamsim: no encoder version 7; see `streamsim versions`"
    code, result = cli_json("reindex", "--store", str(store))
    assert code == 0 and (result["version"], result["images"], result["engine"], result["workers"]) == (1, 200, "local", 1)
