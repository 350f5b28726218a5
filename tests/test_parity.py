"""The command and the library give the same answers: `streamsim search --json` and `Index.search`
on the same noisy files in all three modes; `status`, `versions`, `events`, `failed` and `dedup`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import cli_json, png_bytes, write_pngs
from streamsim import Index, store as store_mod


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory, digits):
    base = tmp_path_factory.mktemp("parity")
    write_pngs(base / "stored", digits[0][:120])
    rng = np.random.default_rng(3)
    queries = []
    for i in range(6):  # noisy (σ 0.3), shifted copies of stored digits, and unseen digits
        x = digits[0][i].astype(np.float32) / 255
        x = np.clip(x + rng.normal(0, 0.3, x.shape), 0, 1) if i < 4 else digits[0][150 + i].astype(np.float32) / 255
        x = np.roll(x, int(rng.integers(-2, 3)), axis=1)
        q = base / "queries" / f"q{i:02d}.png"
        q.parent.mkdir(exist_ok=True)
        q.write_bytes(png_bytes((x * 255).round().astype(np.uint8)))
        queries.append(q)
    (base / "stored" / "copy.png").write_bytes((base / "stored" / "img0003.png").read_bytes())
    (base / "stored" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc, _ = cli_json("add", str(base / "stored"), "--store", str(base / "store"))
    assert rc == 1  # one file failed, the rest stored
    return base / "store", queries


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["similar", "duplicate", "recall"])
def test_search_from_the_command_equals_the_library(noisy_store, mode):
    store, queries = noisy_store
    found = 0
    with Index.open(store, create=False) as index:
        for q in queries:
            rc, printed = cli_json("search", str(q), "--mode", mode, "-k", "5", "--store", str(store))
            assert rc == 0
            expected = [m.to_dict() for m in index.search(str(q), k=5, mode=mode)]
            assert [m["id"] for m in printed] == [m["id"] for m in expected], q.name
            assert [m["path"] for m in printed] == [m["path"] for m in expected]
            np.testing.assert_allclose([m["distance"] for m in printed], [m["distance"] for m in expected], atol=1e-6)
            found += bool(printed)
    if mode == "duplicate":
        assert found >= 3  # the noisy copies are found through the command too


@pytest.mark.slow
def test_status_versions_events_failed_and_dedup_from_the_command_equal_the_library(noisy_store):
    store, _ = noisy_store
    status = store_mod.status(store)
    assert cli_json("status", "--store", str(store))[1] == json.loads(json.dumps(status))
    assert status["images"] == 120 and status["failed"] == 1
    assert cli_json("versions", "--store", str(store))[1] == json.loads(json.dumps(status["versions"]))
    assert cli_json("events", "--store", str(store))[1] == json.loads(json.dumps(store_mod.events(store)))
    assert cli_json("failed", "--store", str(store))[1] == json.loads(json.dumps(store_mod.failures(store)))
    with Index.open(store, create=False) as index:
        groups = index.dedup()
    assert cli_json("dedup", "--store", str(store))[1] == json.loads(json.dumps(groups))
    assert any(len(g["paths"]) >= 2 for g in groups)  # the copied file
