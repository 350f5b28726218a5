"""Tests for streamsim.vectors: one USearch file per encoder version."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import streamsim.vectors as vectors_mod
from streamsim.vectors import Vectors

DIM = 64


def clustered(n: int, dim: int, rng: np.random.Generator, n_clusters: int = 50, spread: float = 1.0) -> np.ndarray:
    """Non-negative clustered vectors shaped like ReLU encoder codes: gaussian mixture, then ReLU."""
    centers = rng.normal(0.0, 1.0, (n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    x = centers[labels] + spread * rng.normal(0.0, 1.0, (n, dim))
    return np.maximum(x, 0.0).astype(np.float32)


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k nearest stored vectors by cosine, computed with numpy alone."""
    dn = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    sims = qn @ dn.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def filled(tmp_path, rng):
    x = clustered(2000, DIM, rng)
    keys = np.arange(10, 10 + len(x), dtype=np.int64)
    v = Vectors.open(tmp_path / "v1.usearch", DIM)
    v.add(keys, x)
    return v, keys, x


def test_add_search_round_trip(filled):
    v, keys, x = filled
    assert len(v) == len(keys)
    found, dist = v.search(x[:200], 5)
    assert found.dtype == np.int64 and dist.dtype == np.float32
    assert found.shape == dist.shape == (200, 5)
    np.testing.assert_array_equal(found[:, 0], keys[:200])
    assert np.all(np.abs(dist[:, 0]) < 1e-5)
    assert np.all(np.diff(dist, axis=1) >= -1e-6), "results must be best first"


def test_single_query_vector_is_one_row(filled):
    v, keys, x = filled
    found, dist = v.search(x[3], 4)
    assert found.shape == dist.shape == (1, 4)
    assert found[0, 0] == keys[3]


def test_hnsw_path_round_trip(filled, monkeypatch):
    monkeypatch.setattr(vectors_mod, "EXACT_SEARCH_MAX", 0)
    v, keys, x = filled
    found, dist = v.search(x, 1)
    assert np.mean(found[:, 0] == keys) > 0.99
    assert np.all(dist[found[:, 0] == keys, 0] < 1e-5)


def test_upsert_does_not_duplicate(filled, rng):
    v, keys, x = filled
    new = clustered(5, DIM, rng) + 3.0
    v.add(keys[:5], new)
    assert len(v) == len(keys)
    assert len(np.unique(v.keys())) == len(keys)
    found, dist = v.search(new, 3)
    np.testing.assert_array_equal(found[:, 0], keys[:5])
    assert np.all(dist[:, 0] < 1e-5)
    np.testing.assert_allclose(v.get(keys[:5]), new, rtol=1e-6)
    # the same key twice in one call: the last one wins, once
    v.add([7, 7], np.stack([x[0], new[0]]))
    assert len(v) == len(keys) + 1
    np.testing.assert_allclose(v.get([7])[0], new[0], rtol=1e-6)


def test_remove_then_search_never_returns_removed(filled, monkeypatch):
    v, keys, x = filled
    gone = keys[::3]
    assert v.remove(gone) == len(gone)
    assert v.remove(gone) == 0
    assert v.remove([-1, 2**64 - 1, 10**12]) == 0
    assert len(v) == len(keys) - len(gone)
    assert not v.contains(gone).any()
    assert v.contains(keys[1::3]).all()
    for exact_max in (10**9, 0):  # exact and HNSW paths
        monkeypatch.setattr(vectors_mod, "EXACT_SEARCH_MAX", exact_max)
        found, _ = v.search(x[::3], 10)
        assert not np.isin(found, gone).any()
    assert not np.isin(v.keys(), gone).any()


def test_remove_then_readd_same_key(filled, rng, monkeypatch):
    v, keys, x = filled
    gone = keys[:500]
    v.remove(gone)
    new = clustered(500, DIM, np.random.default_rng(99))
    v.add(gone, new)
    assert len(v) == len(keys)
    for exact_max in (10**9, 0):
        monkeypatch.setattr(vectors_mod, "EXACT_SEARCH_MAX", exact_max)
        found, dist = v.search(new, 1)
        assert np.mean(found[:, 0] == gone) > 0.99
    # many cycles on one key
    for i in range(30):
        v.remove([keys[600]])
        v.add([keys[600]], x[i] + 1.0)
        found, dist = v.search(x[i] + 1.0, 1)
        assert found[0, 0] == keys[600] and dist[0, 0] < 1e-5
    assert len(v) == len(keys)


def test_save_and_open_give_identical_results(filled, monkeypatch, tmp_path):
    v, keys, x = filled
    v.remove(keys[:10])  # below the compaction threshold: tombstones travel in the file
    v.save()
    assert not v.dirty
    w = Vectors.open(v.path, DIM)
    assert len(w) == len(v) and not w.dirty
    assert set(w.keys().tolist()) == set(v.keys().tolist())
    for exact_max in (10**9, 0):
        monkeypatch.setattr(vectors_mod, "EXACT_SEARCH_MAX", exact_max)
        a = v.search(x[:300], 10)
        b = w.search(x[:300], 10)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, rng):
    path = tmp_path / "deep" / "er" / "v2.usearch"
    v = Vectors.open(path, DIM)
    v.add([1, 2], clustered(2, DIM, rng))
    v.save()
    assert path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["v2.usearch"]
    before = path.stat()
    v.save()  # not dirty: no-op
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_ino == before.st_ino


def test_crash_between_temp_and_replace_keeps_old_file(filled, monkeypatch, rng):
    v, keys, x = filled
    v.save()
    old = v.path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    v.add([999_999], clustered(1, DIM, rng))
    monkeypatch.setattr(vectors_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        v.save()
    monkeypatch.undo()
    assert v.dirty
    assert v.path.read_bytes() == old
    assert [p.name for p in v.path.parent.iterdir()] == [v.path.name]
    w = Vectors.open(v.path, DIM)
    assert len(w) == len(keys) and not w.contains([999_999])[0]
    v.save()  # the retry succeeds
    assert Vectors.open(v.path, DIM).contains([999_999])[0]


def test_stale_temp_of_dead_writer_is_cleaned(filled):
    v, _, _ = filled
    stale = v.path.parent / f"{v.path.name}.tmp-{2**31 - 2}"
    stale.write_bytes(b"half written")
    v.save()
    assert not stale.exists()


def test_dim_mismatch_on_open(filled):
    v, _, _ = filled
    v.save()
    with pytest.raises(ValueError) as e:
        Vectors.open(v.path, 32)
    msg = str(e.value)
    assert str(v.path) in msg and "64" in msg and "32" in msg


def test_metric_mismatch_on_open(tmp_path):
    from usearch.index import Index

    p = tmp_path / "l2.usearch"
    other = Index(ndim=DIM, metric="l2sq", dtype="f32")
    other.add(np.arange(3, dtype=np.uint64), np.ones((3, DIM), np.float32))
    other.save(str(p))
    with pytest.raises(ValueError, match="L2sq"):
        Vectors.open(p, DIM)


def test_not_an_index_file(tmp_path):
    p = tmp_path / "junk.usearch"
    p.write_bytes(b"not an index at all" * 10)
    with pytest.raises(ValueError, match="junk.usearch"):
        Vectors.open(p, DIM)


@pytest.mark.parametrize(
    "keys, vecs, match",
    [
        ([1, 2], np.full((2, DIM), np.nan, np.float32), "NaN"),
        ([1], np.full((1, DIM), np.inf), "NaN"),
        ([1], np.full((1, DIM), 1e300), "float32"),
        ([1, 2], np.ones((2, DIM + 1)), "shape"),
        ([1, 2], np.ones((2, 2, DIM)), "shape"),
        ([1, 2, 3], np.ones((2, DIM)), "one key per row"),
        (np.array([2**64 - 1], dtype=np.uint64), np.ones((1, DIM)), "2\\*\\*64-1"),
        (np.array([2**63], dtype=np.uint64), np.ones((1, DIM)), "2\\*\\*63-1"),
        ([-1], np.ones((1, DIM)), "negative"),
        ([1.5], np.ones((1, DIM)), "integers"),
        ([[1, 2]], np.ones((2, DIM)), "1-d"),
        ([1], np.array([["a"] * DIM]), "real numbers"),
    ],
)
def test_invalid_inputs(tmp_path, keys, vecs, match):
    v = Vectors.open(tmp_path / "v.usearch", DIM)
    v.add([5], np.ones((1, DIM)))
    with pytest.raises(ValueError, match=match):
        v.add(keys, vecs)
    assert len(v) == 1  # nothing changed


def test_invalid_search_inputs(filled):
    v, _, _ = filled
    with pytest.raises(ValueError, match="shape"):
        v.search(np.ones((1, DIM - 1)), 3)
    with pytest.raises(ValueError, match="NaN"):
        v.search(np.full((1, DIM), np.nan), 3)
    with pytest.raises(ValueError, match="k must"):
        v.search(np.ones((1, DIM)), 0)
    with pytest.raises(ValueError, match="ndim"):
        Vectors.open(v.path, 0)


def test_empty_index_search_is_all_padding(tmp_path):
    v = Vectors.open(tmp_path / "empty.usearch", DIM)
    assert len(v) == 0 and v.keys().shape == (0,)
    found, dist = v.search(np.ones((3, DIM)), 4)
    assert found.shape == (3, 4) and np.all(found == -1) and np.all(np.isinf(dist))
    found, dist = v.search(np.ones((0, DIM)), 4)
    assert found.shape == (0, 4)
    v.save()  # a new empty index is written once, and loads back
    assert len(Vectors.open(v.path, DIM)) == 0


def test_k_larger_than_len_is_padded(tmp_path, rng, monkeypatch):
    x = clustered(6, DIM, rng)
    v = Vectors.open(tmp_path / "small.usearch", DIM)
    v.add(np.arange(6), x)
    v.remove([5])
    for exact_max in (10**9, 0):
        monkeypatch.setattr(vectors_mod, "EXACT_SEARCH_MAX", exact_max)
        found, dist = v.search(x[:2], 8)
        assert found.shape == (2, 8)
        assert sorted(found[0, :5].tolist()) == [0, 1, 2, 3, 4]
        assert np.all(found[:, 5:] == -1) and np.all(np.isinf(dist[:, 5:]))
        assert np.all(np.isfinite(dist[:, :5]))


def test_reload_if_changed_sees_another_writer(tmp_path, rng):
    path = tmp_path / "shared.usearch"
    early_reader = Vectors.open(path, DIM)  # opened before the file exists
    writer = Vectors.open(path, DIM)
    x = clustered(300, DIM, rng)
    writer.add(np.arange(300), x)
    writer.save()
    reader = Vectors.open(path, DIM)
    assert early_reader.reload_if_changed() is True and len(early_reader) == 300
    assert reader.reload_if_changed() is False

    early_reader.save()  # untouched: must not clobber the writer's file
    assert len(Vectors.open(path, DIM)) == 300

    writer.add(np.arange(300, 350), clustered(50, DIM, rng))
    writer.remove([0, 1])
    writer.save()
    assert reader.reload_if_changed() is True
    assert reader.reload_if_changed() is False
    assert len(reader) == 348 and not reader.contains([0])[0]
    np.testing.assert_array_equal(reader.search(x[2:50], 5)[0], writer.search(x[2:50], 5)[0])

    reader.add([10_000], x[:1])  # unsaved local changes are never discarded by a reload
    writer.add([20_000], x[:1])
    writer.save()
    assert reader.reload_if_changed() is False and reader.contains([10_000])[0]


def test_compaction_on_save(filled):
    v, keys, x = filled
    v.remove(keys[: len(keys) // 2])
    assert v.tombstones == len(keys) // 2
    v.save()
    assert v.tombstones == 0
    w = Vectors.open(v.path, DIM)
    assert w.tombstones == 0 and len(w) == len(keys) - len(keys) // 2
    found, _ = w.search(x[len(keys) // 2 :], 1)
    np.testing.assert_array_equal(found[:, 0], keys[len(keys) // 2 :])


def test_searches_while_a_writer_adds(tmp_path, rng):
    v = Vectors.open(tmp_path / "busy.usearch", DIM)
    x = clustered(3000, DIM, rng)
    v.add(np.arange(500), x[:500])
    errors: list[BaseException] = []

    def writer():
        try:
            for start in range(500, 3000, 250):
                v.add(np.arange(start, start + 250), x[start : start + 250])
                v.remove(np.arange(start - 100, start - 50))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():
        found, dist = v.search(x[:20], 5)
        assert found.shape == (20, 5) and np.all(found < 3000)
    t.join()
    assert not errors
    assert len(v) == 3000 - 50 * 10


def test_recall_at_10_on_clustered_codes(tmp_path, monkeypatch):
    """HNSW recall@10 >= 0.99 against numpy brute force on 30k clustered non-negative 64-d codes."""
    monkeypatch.setattr(vectors_mod, "EXACT_SEARCH_MAX", 0)  # force the graph, whatever the threshold
    rng = np.random.default_rng(7)
    data = clustered(30_200, DIM, rng)
    stored, queries = data[:30_000], data[30_000:]
    keys = np.arange(len(stored), dtype=np.int64) * 3 + 1  # keys unrelated to row numbers
    v = Vectors.open(tmp_path / "recall.usearch", DIM)
    v.add(keys, stored)
    found, _ = v.search(queries, 10)
    truth = keys[exact_topk(stored, queries, 10)]
    recall = np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(len(queries))])
    assert recall >= 0.99, f"recall@10 = {recall:.4f}"
    assert v.measure_recall(k=10, sample=100) >= 0.99


def test_compact_redoes_build_when_a_writer_raced(filled, monkeypatch):
    v, keys, x = filled
    v.remove(keys[:1000])
    real_build = Vectors._build
    calls: list[int] = []

    def racing_build(self, k, vecs):
        index = real_build(self, k, vecs)
        if not calls:  # the first, unlocked build: a writer adds meanwhile
            calls.append(1)
            self.add([123_456_789], x[:1])
        return index

    monkeypatch.setattr(Vectors, "_build", racing_build)
    v.compact()
    assert v.contains([123_456_789])[0]
    assert v.tombstones == 0 and len(v) == len(keys) - 1000 + 1
