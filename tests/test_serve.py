"""``streamsim serve``: the HTTP API through real HTTP on a real uvicorn server, the command as users
start it, a seeded upload fuzzer, and the page in Debian's Chromium driven by Playwright.

Every answer is compared with what the library (``Index``) or the command gives on the same store.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fuzz import mutated_inputs
from helpers import EXE, WatchProcess, cli_json, png_bytes, status as cli_status, write_pngs
from streamsim import Index
from streamsim.cli import app
from streamsim.server import ServeError, Server, thumbnail_url
from streamsim.store import drift_summary, events as store_events

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")  # Debian's; never `playwright install`
FUZZ_SEED = 20261129
FUZZ_INPUTS = 240
FUZZ_FIXTURES = Path(__file__).parent / "data" / "fuzz"


# ------------------------------------------------------------------------------------ HTTP


class Reply:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def call(method: str, url: str, *, files: list[tuple[str, bytes]] | None = None, body=None, token: str | None = None,
         headers: dict | None = None, data: bytes | None = None) -> Reply:
    """One request over real HTTP; ``files`` as multipart field ``file``, ``body`` as JSON."""
    headers = dict(headers or {})
    if files is not None:
        boundary = uuid.uuid4().hex
        parts = [b"--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%s\"\r\n"
                 b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (boundary.encode(), n.encode(), d) for n, d in files]
        data = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


def ok(reply: Reply):
    assert reply.status == 200, (reply.status, reply.body[:300])
    return reply.json()


def bad(reply: Reply, status: int | tuple[int, ...]) -> str:
    """The one-line error of a 4xx reply."""
    assert reply.status in ((status,) if isinstance(status, int) else status), (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error
    return error


def bmp_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="BMP")
    return buf.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------ stores


@pytest.fixture(scope="module")
def template(tmp_path_factory, digits):
    """A store of 40 digits, 4 of them stored again as BMP (same pixels, other bytes: 4 groups of
    duplicates) and one file stored under two names."""
    root = tmp_path_factory.mktemp("serve")
    x = digits[0]
    files = write_pngs(root / "scans", x[:40])
    for i in range(4):
        (root / "scans" / f"copy{i}.bmp").write_bytes(bmp_bytes(x[i * 7]))
    shutil.copy(files[30], root / "scans" / "again.png")
    with Index.open(root / "store") as index:
        index.add_files([root / "scans"])
    return root / "store"


@pytest.fixture(scope="module")
def versioned(tmp_path_factory, template):
    """The template store with a second encoder version (trained, not active)."""
    store = tmp_path_factory.mktemp("versioned") / "store"
    shutil.copytree(template, store)
    with Index.open(store) as index:
        assert index.train(epochs=1, activate=False) == 2
    return store


@pytest.fixture(scope="module")
def served(tmp_path_factory, template):
    """A copy of the template store served on a free port: ``(url, store)``."""
    store = tmp_path_factory.mktemp("served") / "store"
    shutil.copytree(template, store)
    with Index.open(store) as index, Server(index, port=0) as server:
        yield server.url, store


# ------------------------------------------------------------------------------------ the API


def test_status_is_what_the_command_prints(served):
    url, store = served
    assert ok(call("GET", url + "/api/status")) == cli_status(store)


def test_page_is_served(served):
    url, _ = served
    r = call("GET", url + "/")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    assert b'data-testid="image-count"' in r.body


def test_upload_answers_each_file_in_order(served, digits):
    url, store = served
    new, known = digits[0][150], digits[0][3]
    before = ok(call("GET", url + "/api/status"))["images"]
    out = ok(call("POST", url + "/api/images", files=[("new.png", png_bytes(new)), ("known.png", png_bytes(known)),
                                                      ("notes.txt", b"not an image"), ("new-again.png", png_bytes(new))]))
    assert [o["name"] for o in out] == ["new.png", "known.png", "notes.txt", "new-again.png"]
    assert [o["outcome"] for o in out] == ["stored", "duplicate", "failed", "duplicate"]
    assert out[2]["id"] is None and "not an image" in out[2]["reason"]
    assert out[0]["id"] == out[3]["id"] and out[0]["reason"] is None
    assert ok(call("GET", url + "/api/status"))["images"] == before + 1
    with Index.open(store) as index:
        assert index.search(png_bytes(known), 1)[0].id == out[1]["id"]
        got = ok(call("GET", url + f"/api/images/{out[0]['id']}"))
        assert got == json.loads(json.dumps(index.get(out[0]["id"])))
        r = call("GET", url + thumbnail_url(out[0]["id"]))
        assert r.status == 200 and r.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.body))), index.pixels(out[0]["id"]))


@pytest.mark.parametrize("mode", ["similar", "duplicate", "recall"])
def test_search_is_index_search(served, digits, mode):
    url, store = served
    query = png_bytes(digits[0][7])
    got = ok(call("POST", url + f"/api/search?k=5&mode={mode}", files=[("q.png", query)]))
    with Index.open(store) as index:
        want = [m.to_dict() for m in index.search(query, 5, mode=mode)]
    assert got == [w | {"thumbnail": f"/api/images/{w['id']}/pixels.png"} for w in want]
    assert got, "the query is a stored digit: it has matches in every mode"


def test_bad_requests_are_4xx_with_one_line_errors(served, digits):
    url, _ = served
    glyph = png_bytes(digits[0][0])
    assert "mode" in bad(call("POST", url + "/api/search?mode=fuzzy", files=[("q.png", glyph)]), 400)
    assert "k must" in bad(call("POST", url + "/api/search?k=0", files=[("q.png", glyph)]), 400)
    assert "k must" in bad(call("POST", url + "/api/search?k=ten", files=[("q.png", glyph)]), 400)
    assert "q.txt" in bad(call("POST", url + "/api/search", files=[("q.txt", b"hello")]), 400)
    assert "one query" in bad(call("POST", url + "/api/search", files=[("a.png", glyph), ("b.png", glyph)]), 400)
    assert "multipart" in bad(call("POST", url + "/api/search", data=b"raw bytes"), 415)
    bad(call("POST", url + "/api/images", files=[]), 400)
    bad(call("POST", url + "/api/images", data=b"--x\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=x"}), 400)
    assert "bomb" in bad(call("POST", url + "/api/search", files=[("big.png", huge_png(20000, 20000))]), 413)
    assert "big.png" in bad(call("POST", url + "/api/images", files=[("ok.png", png_bytes(digits[0][190])),
                                                                     ("big.png", huge_png(20000, 20000))]), 413)
    assert ok(call("POST", url + "/api/search?k=1&mode=duplicate", files=[("q.png", png_bytes(digits[0][190]))])) == [], \
        "nothing of an upload refused with 413 is stored"
    bad(call("GET", url + "/api/images/0"), 404)
    bad(call("GET", url + "/api/images/99999999999999999999999"), 404)
    bad(call("GET", url + "/api/images/12345/pixels.png"), 404)
    bad(call("GET", url + "/api/images/abc"), 422)
    bad(call("GET", url + "/api/nothing"), 404)
    bad(call("GET", url + "/api/duplicates?size=0"), 400)
    bad(call("GET", url + "/api/events?last=-1"), 400)
    assert "version 99" in bad(call("POST", url + "/api/versions/99/activate"), 404)
    for body in ({}, {"ids": [1, 2]}, {"ids": "1,2", "decision": "keep_all"}, {"ids": [], "decision": "keep_all"},
                 {"ids": [1, True], "decision": "keep_all"}, {"ids": [1, 2], "decision": "delete"}, [1, 2]):
        bad(call("POST", url + "/api/duplicates/decisions", body=body), 400)
    assert "123456" in bad(call("POST", url + "/api/duplicates/decisions", body={"ids": [1, 123456], "decision": "keep_all"}), 404)
    bad(call("POST", url + "/api/duplicates/decisions", data=b"{not json", headers={"Content-Type": "application/json"}), 400)
    ok(call("GET", url + "/api/status"))


def test_uploads_over_the_cap_are_refused(tmp_path, digits):
    with Index.open(tmp_path / "store") as index, Server(index, port=0, max_upload=4096) as server:
        big = os.urandom(8192)
        assert "4,096" in bad(call("POST", server.url + "/api/images", files=[("big.png", big)]), 413)
        # without a Content-Length (chunked), counted as it arrives: the server may answer and close
        # before the last chunk is sent, so a refused send is expected and the answer still read
        import http.client

        u = urllib.parse.urlsplit(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.putrequest("POST", "/api/images")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        body = b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n' + big  # well formed as far as it goes
        try:
            for chunk in (body[:3000], body[3000:]):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert conn.getresponse().status == 413
        conn.close()
        assert ok(call("POST", server.url + "/api/images", files=[("ok.png", png_bytes(digits[0][0]))]))[0]["outcome"] == "stored"


def test_duplicates_paginate_and_decisions_stick(served):
    url, store = served
    with Index.open(store) as index:
        want = index.dedup()
    assert len(want) >= 5
    first = ok(call("GET", url + "/api/duplicates?page=1&size=2"))
    assert (first["page"], first["size"], first["total"], first["pages"]) == (1, 2, len(want), -(-len(want) // 2))
    pages = [ok(call("GET", url + f"/api/duplicates?page={p}&size=2"))["groups"] for p in range(1, first["pages"] + 2)]
    assert [g for page in pages for g in page] == want and pages[-1] == []
    keep, apart = want[0], want[1]
    got = ok(call("POST", url + "/api/duplicates/decisions", body={"ids": keep["ids"], "decision": "keep_all"}))
    assert got["ids"] == keep["ids"] and got["decision"] == "keep_all"
    ok(call("POST", url + "/api/duplicates/decisions", body={"ids": apart["ids"], "decision": "not_duplicates"}))
    after = ok(call("GET", url + "/api/duplicates?size=500"))["groups"]
    assert after == want[2:]
    # the decisions are the store's: the library and the command (a new process) respect them
    with Index.open(store) as index:
        assert index.dedup() == want[2:]
        decided = {tuple(g["ids"]): g["decision"] for g in index.dedup(decided=True)}
    assert decided[tuple(keep["ids"])] == "keep_all"  # still duplicates, kept: listed with --decided
    assert not any(set(ids) & set(apart["ids"]) for ids in decided), "images decided distinct are no group at all"
    assert cli_json("dedup", "--store", str(store)) == (0, want[2:])
    res = CliRunner().invoke(app, ["dedup", "--decided", "--json", "--store", str(store)])
    assert res.exit_code == 0 and {tuple(g["ids"]): g["decision"] for g in json.loads(res.stdout)} == decided
    kinds = [(e["decision"], e["ids"]) for e in ok(call("GET", url + "/api/events?kind=duplicates_decided"))]
    assert kinds == [("keep_all", keep["ids"]), ("not_duplicates", apart["ids"])]


def test_events_and_drift_are_what_the_command_prints(served):
    url, store = served
    assert ok(call("GET", url + "/api/events")) == store_events(store)
    assert ok(call("GET", url + "/api/events?kind=activated&kind=version_created&last=1")) == \
        store_events(store, kinds=["activated", "version_created"], last=1)
    with Index.open(store) as index:
        assert ok(call("GET", url + "/api/drift")) == json.loads(json.dumps(drift_summary(index.catalog)))
    assert ok(call("GET", url + "/api/drift?window=5"))["window"] == 5
    r = call("GET", url + "/api/drift.png")
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.body)).size == (1200, 480)


@pytest.mark.slow
def test_server_sees_what_a_watcher_stores(template, tmp_path, digits):
    store = tmp_path / "store"
    shutil.copytree(template, store)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Index.open(store) as index, Server(index, port=0) as server:
        url = server.url
        before = ok(call("GET", url + "/api/status"))["images"]
        watcher = WatchProcess(inbox, store, "--no-retrain")
        try:
            watcher.wait_for(lambda ev: any(e["event"] == "watching" for e in ev))
            files = write_pngs(inbox, digits[0][120:128])
            watcher.wait_for(lambda ev: sum(e["event"] == "stored" for e in ev) == 8)
            stored = {e["path"]: e["id"] for e in watcher.events if e["event"] == "stored"}
            t0 = time.monotonic()
            while ok(call("GET", url + "/api/status"))["images"] != before + 8:
                assert time.monotonic() - t0 < 1.0, "the server sees the watcher's images within a second"
                time.sleep(0.05)
            for f in files[:3]:
                hits = ok(call("POST", url + "/api/search?k=1&mode=duplicate", files=[(f.name, f.read_bytes())]))
                assert [h["id"] for h in hits] == [stored[str(f.resolve())]]
        finally:
            assert watcher.stop() == 0


@pytest.mark.slow
def test_versions_and_activate_roll_back_and_forward(versioned, tmp_path, digits):
    store = tmp_path / "store"
    shutil.copytree(versioned, store)
    query = png_bytes(digits[0][11])
    with Index.open(store) as index, Server(index, port=0) as server:
        url = server.url
        assert ok(call("GET", url + "/api/versions")) == json.loads(json.dumps(index.versions()))
        assert [v["state"] for v in ok(call("GET", url + "/api/versions"))] == ["active", "ready"]
        assert ok(call("POST", url + "/api/versions/2/activate"))["active_version"] == 2
        assert cli_status(store)["active_version"] == 2
        hits = ok(call("POST", url + "/api/search?k=3", files=[("q.png", query)]))
        assert {h["encoder_version"] for h in hits} == {2}
        back = ok(call("POST", url + "/api/versions/1/activate"))
        assert (back["active_version"], back["previous"]) == (1, 2)
        assert ok(call("GET", url + "/api/status"))["active_version"] == 1
        assert [e["kind"] for e in ok(call("GET", url + "/api/events?kind=rollback"))] == ["rollback", "rollback"]


def test_token_is_required_for_the_api(tmp_path):
    with Index.open(tmp_path / "store") as index, Server(index, port=0, token="s3cret") as server:
        url = server.url
        assert "Bearer" in bad(call("GET", url + "/api/status"), 401)
        bad(call("GET", url + "/api/status", token="wrong"), 401)
        bad(call("GET", url + "/api/status", headers={"Authorization": "Basic s3cret"}), 401)
        bad(call("POST", url + "/api/images", files=[("a.png", b"x")]), 401)
        assert ok(call("GET", url + "/api/status", token="s3cret"))["images"] == 0
        assert call("GET", url + "/").status == 200  # the page itself holds no data; it asks for the token


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    with Index.open(tmp_path / "store") as index, Server(index, port=0) as first:
        port = int(first.url.rsplit(":", 1)[1])
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            Server(index, port=port)
        for host in ("0.0.0.0", "192.168.1.20", "example.org"):
            with pytest.raises(ServeError, match="token"):
                Server(index, host=host, port=0)
        with pytest.raises(ServeError, match="ASCII"):
            Server(index, port=0, token="pass word")


def test_command_refuses_a_public_host_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STREAMSIM_TOKEN"}
    for host in ("0.0.0.0", "::"):
        run = subprocess.run([EXE, "serve", "--host", host, "--port", "0", "--store", str(tmp_path / "s")],
                             capture_output=True, text=True, timeout=60, env=env)
        assert run.returncode != 0 and run.stdout == ""
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "token" in lines[0] and host in lines[0], run.stderr
    assert not (tmp_path / "s").exists(), "refused before the store is touched"


@pytest.mark.slow
def test_command_serves_with_a_token_from_the_environment(tmp_path, digits):
    write_pngs(tmp_path / "scans", digits[0][:5])
    assert subprocess.run([EXE, "add", str(tmp_path / "scans"), "--store", str(tmp_path / "s")], capture_output=True).returncode == 0
    proc = subprocess.Popen([EXE, "serve", "--host", "0.0.0.0", "--port", "0", "--store", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"STREAMSIM_TOKEN": "from-env"})
    try:
        line = proc.stdout.readline()
        assert "serving" in line and "token required" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("http://0.0.0.0:")[1].split("/")[0])
        local = f"http://127.0.0.1:{port}"
        bad(call("GET", local + "/api/status"), 401)
        assert ok(call("GET", local + "/api/status", token="from-env"))["images"] == 5
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_upload_fuzzer_never_breaks_the_server(tmp_path, digits):
    """Seeded mutated image files (tests/fuzz.py), uploaded in batches and as search queries: each
    batch answers one outcome per file or a 4xx, never a 500, and the server stays up."""
    rng = random.Random(FUZZ_SEED)
    inputs = list(mutated_inputs(FUZZ_INPUTS, FUZZ_SEED, extra=digits[0][:4]))
    with Index.open(tmp_path / "store") as index, Server(index, port=0) as server:
        url = server.url
        for start in range(0, len(inputs), 24):
            batch = inputs[start : start + 24]
            r = call("POST", url + "/api/images", files=batch)
            if r.status == 200:
                out = r.json()
                assert [o["name"] for o in out] == [n for n, _ in batch]
                assert all(o["outcome"] in ("stored", "duplicate", "failed") for o in out)
                assert all((o["id"] is None) == (o["outcome"] == "failed") for o in out)
            else:
                bad(r, (400, 413))
        # the inputs that once broke the loader (tests/data/fuzz), one upload each
        for f in sorted(p for p in FUZZ_FIXTURES.glob("*") if p.is_file() and p.suffix != ".md"):
            r = call("POST", url + "/api/images", files=[(f.name, f.read_bytes())])
            if r.status == 200:
                assert [o["name"] for o in r.json()] == [f.name]
            else:
                bad(r, (400, 413))
        for name, data in rng.sample(inputs, 24):
            r = call("POST", url + f"/api/search?k=3&mode={rng.choice(['similar', 'duplicate', 'recall'])}", files=[(name, data)])
            assert r.status == 200 or 400 <= r.status < 500, (name, r.status, r.body[:200])
        # malformed requests: cut and flipped multipart bodies
        good = png_bytes(digits[0][0])
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"g.png\"\r\n\r\n".encode()
                + good + f"\r\n--{boundary}--\r\n".encode())
        for i in range(40):
            cut = bytearray(body[: rng.randrange(1, len(body))] if i % 2 else body)
            for _ in range(rng.randint(1, 6)):
                cut[rng.randrange(len(cut))] = rng.randrange(256)
            r = call("POST", url + "/api/images", data=bytes(cut),
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            assert r.status == 200 or 400 <= r.status < 500, (i, r.status, r.body[:200])
        assert ok(call("GET", url + "/api/status"))["images"] == len(index)


# ------------------------------------------------------------------------------------ the page


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install '.[test]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def _thumbs_loaded(page, selector: str) -> int:
    return page.eval_on_selector_all(selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length")


@pytest.mark.slow
def test_page_searches_reviews_activates_and_follows_a_writer(browser, versioned, tmp_path, digits):
    store = tmp_path / "store"
    shutil.copytree(versioned, store)
    query = tmp_path / "query.png"
    query.write_bytes(png_bytes(digits[0][14]))
    with Index.open(store) as index, Server(index, port=0) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        count = page.get_by_test_id("image-count")
        expect_text(count, str(len(index)))
        # search by upload: the matches appear as thumbnails, with distance and version
        page.get_by_test_id("search-file").set_input_files(str(query))
        page.wait_for_function("document.querySelectorAll('[data-testid=result] img').length == 10")
        page.wait_for_function("[...document.querySelectorAll('[data-testid=result] img')].every(i => i.complete && i.naturalWidth == 28)")
        ids = [int(x) for x in page.eval_on_selector_all("[data-testid=result]", "els => els.map(e => e.dataset.id)")]
        assert ids == [m.id for m in index.search(query, 10)]
        assert page.get_by_test_id("result-version").first.inner_text() == "v1"
        # drag-and-drop onto the drop zone, and paste, search too
        for how, digit in (("drop", digits[0][15]), ("paste", digits[0][16])):
            data = png_bytes(digit)
            page.evaluate(_DROP_OR_PASTE, [how, base64.b64encode(data).decode()])
            want = [m.id for m in index.search(data, 10)]
            page.wait_for_function("ids => JSON.stringify([...document.querySelectorAll('[data-testid=result]')]"
                                   ".map(e => +e.dataset.id)) == JSON.stringify(ids)", arg=want)
        # decide on the first duplicate group; after a reload it stays decided
        groups = page.get_by_test_id("dup-group")
        groups.first.wait_for()
        first = groups.first.get_attribute("data-ids")
        n = groups.count()
        groups.first.get_by_test_id("decide-keep-all").click()
        page.wait_for_function(f"!document.querySelector('[data-testid=dup-group][data-ids=\"{first}\"]')")
        page.reload()
        page.get_by_test_id("dup-group").first.wait_for()
        assert page.get_by_test_id("dup-group").count() == n - 1
        assert first not in page.eval_on_selector_all("[data-testid=dup-group]", "els => els.map(e => e.dataset.ids)")
        # activate version 2, then search again under it
        page.locator("[data-testid=version-row][data-version='2'] [data-testid=activate]").click()
        expect_text(page.get_by_test_id("active-version"), "2")
        assert index.active_version == 2
        page.get_by_test_id("search-file").set_input_files(str(query))
        page.wait_for_function("(document.querySelector('[data-testid=result-version]') || {}).textContent == 'v2'")
        # a watcher in another process fills the store: the counter follows within about a second
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        watcher = WatchProcess(inbox, store, "--no-retrain")
        try:
            watcher.wait_for(lambda ev: any(e["event"] == "watching" for e in ev))
            write_pngs(inbox, digits[0][100:112])
            watcher.wait_for(lambda ev: sum(e["event"] == "stored" for e in ev) == 12)
            t0 = time.monotonic()
            expect_text(count, str(len(index)), timeout=10)
            assert time.monotonic() - t0 < 2.5, "the page's counter follows the store within about a second"
        finally:
            assert watcher.stop() == 0
        assert _thumbs_loaded(page, "[data-testid=result] img") == 10
        page.close()


@pytest.mark.slow
def test_page_asks_for_the_token_once(browser, template, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(template, store)
    with Index.open(store) as index, Server(index, port=0, token="tab-token") as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.get_by_test_id("token-form").wait_for()
        page.get_by_test_id("token-input").fill("tab-token")
        page.get_by_test_id("token-input").press("Enter")
        expect_text(page.get_by_test_id("image-count"), str(len(index)))
        page.get_by_test_id("dup-group").first.wait_for()
        page.wait_for_function("[...document.querySelectorAll('[data-testid=dup-group] img')].every(i => i.complete && i.naturalWidth == 28)")
        page.reload()  # kept for the tab: not asked again
        expect_text(page.get_by_test_id("image-count"), str(len(index)))
        assert page.get_by_test_id("token-form").is_hidden()
        page.close()


_DROP_OR_PASTE = """([how, b64]) => {
  const file = new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], "q.png", {type: "image/png"});
  const dt = new DataTransfer();
  dt.items.add(file);
  if (how === "drop") document.querySelector("[data-testid=drop-zone]").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
  else document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true}));
}"""


def expect_text(locator, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if locator.inner_text().strip() == text:
            return
        time.sleep(0.05)
    raise AssertionError(f"expected {text!r}, the page shows {locator.inner_text()!r}")
