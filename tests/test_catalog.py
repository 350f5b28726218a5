import numpy as np
import pytest

from streamsim.catalog import Catalog


def px(v):
    a = np.zeros((28, 28), np.uint8)
    a[10:18, 10:18] = v
    return a


@pytest.fixture
def cat(tmp_path):
    c = Catalog(tmp_path / "catalog.sqlite")
    yield c
    c.close()


def test_same_digest_is_stored_once_with_both_paths(cat):
    a, b = cat.add_images([("d1", px(200), "/x/a.png"), ("d1", px(200), "/x/b.png")])
    assert a.id == b.id and a.new and not b.new
    assert cat.count_images() == 1 and cat.count_paths() == 2
    info = cat.get(a.id)
    assert info["path"] == "/x/a.png" and info["paths"] == ["/x/a.png", "/x/b.png"]


def test_pixels_round_trip_and_order(cat):
    s = cat.add_images([("d1", px(100), None), ("d2", px(200), None)])
    got = cat.pixels([s[1].id, s[0].id])
    assert got[0, 12, 12] == 200 and got[1, 12, 12] == 100
    with pytest.raises(KeyError):
        cat.pixels([999])
    batches = list(cat.iter_pixels(batch=1))
    assert [int(b[0][0]) for b in batches] == [s[0].id, s[1].id]


def test_ids_are_never_reused(cat):
    first = cat.add_images([("d1", px(1), None)])[0].id
    assert cat.remove(first)
    second = cat.add_images([("d2", px(2), None)])[0].id
    assert second > first


def test_identical_pixels_and_failures(cat):
    cat.add_images([("d1", px(50), "/a"), ("d2", px(50), "/b"), ("d3", px(60), "/c")])
    assert cat.identical_groups() == [[1, 2]]
    assert cat.find_pixels(px(50)) == [1, 2]
    groups = cat.identical_file_groups()
    assert groups == [{"ids": [1, 2], "paths": ["/a", "/b"]}]
    cat.record_failure("/bad.png", "not an image")
    cat.record_failure("/bad.png", "truncated")
    assert cat.count_failures() == 1 and cat.failures()[0]["reason"] == "truncated"
    cat.add_images([("d4", px(70), "/bad.png")])  # fixed later: no longer failed
    assert cat.count_failures() == 0


def test_versions_and_activation(cat):
    cat.add_version(1, state="ready", parent=None, reason="shipped", meta={"arch": "mlp"})
    cat.add_version(2, state="ready", parent=1, reason="manual", meta={})
    cat.activate(1)
    cat.activate(2)
    states = {v["version"]: v["state"] for v in cat.versions()}
    assert states == {1: "ready", 2: "active"} and cat.active_version() == 2
    assert cat.next_version() == 3
    rows = cat.version_rows()
    assert rows[0]["arch"] == "mlp" and {"version", "state", "parent", "reason", "created"} <= rows[0].keys()
    kinds = [e["kind"] for e in cat.events()]
    assert kinds.count("version_created") == 2 and kinds.count("activated") == 2
    with pytest.raises(ValueError, match="no encoder version 9"):
        cat.activate(9)


def test_failed_transaction_leaves_nothing(cat):
    with pytest.raises(ValueError):
        cat.add_images([("ok", px(1), None), ("bad", np.zeros((3, 3), np.uint8), None)])
    assert cat.count_images() == 0


def test_readonly_reader_sees_writer(tmp_path, cat):
    cat.add_images([("d1", px(1), None)])
    reader = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    assert reader.count_images() == 1
    reader.close()
