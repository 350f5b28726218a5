"""``streamsim serve``: an HTTP API over an open :class:`~streamsim.index.Index`, and one web page.

Every route answers through the ``Index`` (and the store functions the command prints), so the
server, the command and the library give the same answers. JSON unless said; a bad request is a
4xx with ``{"error": "..."}``.

==========================================  ====================================================
``GET /``                                   the page (``static/index.html``: plain HTML/JS/CSS)
``GET /api/status``                         what ``status --json`` prints
``POST /api/images`` (multipart ``file``…)  ``[{"name", "outcome", "id", "reason"}]`` in order
``POST /api/search?k=&mode=`` (``file``)    ``Index.search`` as ``search --json``, plus ``thumbnail``
``GET /api/images/{id}``                    ``Index.get``; ``…/pixels.png`` the stored pixels
``GET /api/duplicates?page=&size=``         ``{"groups", "page", "size", "total", "pages"}``
``POST /api/duplicates/decisions``          ``{"ids", "decision"}`` → ``Index.decide``
``GET /api/versions``                       what ``versions --json`` prints
``POST /api/versions/{n}/activate``         ``Index.rollback`` (back or forward)
``GET /api/events?kind=&last=``             what ``events --json`` prints
``GET /api/drift``, ``GET /api/drift.png``  what ``drift --json`` prints; the drift plot
==========================================  ====================================================

Safety: loopback by default; another host needs a token (:func:`check_host`); with a token every
``/api`` request needs ``Authorization: Bearer <token>`` (401 otherwise); request bodies are capped
(:data:`MAX_UPLOAD_BYTES`) and images over the decoder's pixel limit refused, both with 413;
clients name images by id only. No CORS headers.

Example:
    >>> import tempfile, json, urllib.request
    >>> with tempfile.TemporaryDirectory() as d, Index.open(d) as index, Server(index, port=0) as server:
    ...     json.load(urllib.request.urlopen(server.url + "/api/status"))["images"]
    0
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import math
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import decode, images
from .index import Index
from .search import MODES

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "MAX_UPLOAD_BYTES", "MAX_K", "ServeError", "Server", "check_host",
           "create_app", "thumbnail_url"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a request's body
MAX_FILES = 1000  # files in one upload
MAX_K = 1000  # matches one search may ask for
MAX_PAGE_SIZE = 500  # duplicate groups per page
MAX_ID = 2**63 - 1  # SQLite's largest integer: image ids, versions
PAGE = Path(__file__).parent / "static" / "index.html"
NO_TOKEN_MSG = ("refusing to serve on {host} without a token: anyone who can reach it could read and change the "
                "store; pass --token (or set STREAMSIM_TOKEN), or serve on 127.0.0.1")


class ServeError(ValueError):
    """The server cannot start as asked."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, token: str | None) -> None:
    """Refuse (:class:`ServeError`) to serve on a host other than loopback without a token, and a
    token that cannot travel in an HTTP header (printable ASCII, no spaces)."""
    if not is_loopback(host) and not token:
        raise ServeError(NO_TOKEN_MSG.format(host=host))
    if token and not all(33 <= ord(c) <= 126 for c in token):
        raise ServeError("the token must be printable ASCII without spaces (it travels in an HTTP header)")


def thumbnail_url(image_id: int) -> str:
    """The URL path of a stored image's pixels as PNG on this server."""
    return f"/api/images/{int(image_id)}/pixels.png"


class _TooLarge(Exception):
    """A request body over the cap (raised while it is read)."""


class _Guard:
    """ASGI middleware in front of ``/api``: the bearer token and the cap on a request's body."""

    def __init__(self, app, *, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                response = JSONResponse({"error": "missing or wrong token: send the header `Authorization: Bearer <token>`"},
                                        401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await _too_large(self.max_body)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request too large: the limit is {limit:,} bytes"}, 413)


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status, message.strip().splitlines()[0] if message.strip() else "error")


def _image_error(err: images.ImageError, name: str) -> HTTPException:
    """400 for an upload that is no usable image; 413 over the decoder's pixel limit."""
    status = 413 if err.reason.startswith("decompression bomb") else 400
    return _error(status, f"{name}: {err.reason}")


def _over_pixel_limit(data: bytes) -> str | None:
    """Why ``data`` is over the decoder's pixel limit (read from its header only), or ``None``
    (it is within the limit, or not an image the header reader knows: decoding will say)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # a damaged header's complaints: the decoder reports the file
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        return "decompression bomb (over the decoder's pixel limit)"
    except Exception:  # noqa: BLE001 - a file the header reader rejects is reported by the decoder
        return None
    if w * h > decode.MAX_IMAGE_PIXELS:
        return f"decompression bomb ({w}×{h} pixels; the limit is {decode.MAX_IMAGE_PIXELS})"
    return None


async def _files(request: Request) -> list[tuple[str, bytes]]:
    """The ``file`` parts of a multipart request, ``(name, bytes)`` in order."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise _error(415, "send the image(s) as multipart/form-data, in field `file`")
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except _TooLarge:
        raise
    except HTTPException:
        raise
    except Exception as err:  # noqa: BLE001 - the multipart parser's many ways of saying "malformed"
        raise _error(400, f"malformed multipart body ({decode.one_line(str(err)) or type(err).__name__})") from err
    out = []
    try:
        for value in form.getlist("file"):
            if not isinstance(value, UploadFile):
                raise _error(400, "field `file` must be a file, not text")
            name = decode.one_line(value.filename or f"upload {len(out) + 1}")
            out.append((name, await value.read()))
    finally:
        await form.close()
    if not out:
        raise _error(400, "no image in the request: send one or more files in field `file`")
    return out


def _int(request: Request, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _error(400, f"{name} must be a whole number, got {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise _error(400, f"{name} must be between {lo} and {hi}, got {value}" if hi else f"{name} must be at least {lo}, got {value}")
    return value


def create_app(index: Index, *, token: str | None = None, max_upload: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI application serving ``index`` (kept open by the caller)."""
    app = FastAPI(title="streamsim", docs_url=None, redoc_url=None, openapi_url=None)
    dedup_cache: dict[str, Any] = {"key": None, "groups": []}
    dedup_lock = threading.Lock()

    @app.exception_handler(HTTPException)
    async def _http(request, err: HTTPException):
        return JSONResponse({"error": str(err.detail)}, err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, 422)

    @app.exception_handler(_TooLarge)
    async def _big(request, err):
        return _too_large(max_upload)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    @app.get("/api/status")
    def status():
        return index.status()

    @app.post("/api/images")
    async def upload(request: Request):
        files = await _files(request)
        for name, data in files:
            why = _over_pixel_limit(data)
            if why:
                raise _error(413, f"{name}: {why}; nothing of this upload was stored")
        outcomes = await run_in_threadpool(index.ingest, [data for _, data in files])
        return [{"name": name, "outcome": o.outcome, "id": o.id, "reason": o.reason}
                for (name, _), o in zip(files, outcomes)]

    @app.post("/api/search")
    async def search(request: Request):
        k = _int(request, "k", 10, 1, MAX_K)
        mode = request.query_params.get("mode") or "similar"
        if mode not in MODES:
            raise _error(400, f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
        files = await _files(request)
        if len(files) != 1:
            raise _error(400, f"send one query image in field `file`, got {len(files)}")
        name, data = files[0]
        try:
            matches = await run_in_threadpool(index.search, data, k, mode=mode)
        except images.ImageError as err:
            raise _image_error(err, name) from None
        return [m.to_dict() | {"thumbnail": thumbnail_url(m.id)} for m in matches]

    def stored(image_id: int) -> dict[str, Any]:
        found = index.get(image_id) if 0 < image_id <= MAX_ID else None
        if found is None:
            raise _error(404, f"no stored image {image_id}")
        return found

    @app.get("/api/images/{image_id}")
    def get(image_id: int):
        return stored(image_id)

    @app.get("/api/images/{image_id}/pixels.png")
    def pixels(image_id: int):
        from PIL import Image

        try:
            px = index.pixels(stored(image_id)["id"])
        except KeyError:  # removed meanwhile
            raise _error(404, f"no stored image {image_id}") from None
        buf = io.BytesIO()
        Image.fromarray(np.asarray(px, np.uint8)).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    def groups() -> list[dict[str, Any]]:
        """``Index.dedup``, recomputed only when the store, its version, its rule or its decisions
        changed — on an index of its own (the same store), so that searches go on meanwhile."""
        catalog = index.catalog
        with dedup_lock:
            key = (catalog.max_image_id(), len(index), index.active_version, index.duplicate_rule(),
                   len(catalog.decisions()))
            if dedup_cache["key"] != key:
                with Index.open(index.root, create=False, reconcile=False, policy=index.policy) as own:
                    dedup_cache["groups"], dedup_cache["key"] = own.dedup(), key
            return dedup_cache["groups"]

    @app.get("/api/duplicates")
    def duplicates(request: Request):
        page_ = _int(request, "page", 1, 1, MAX_ID)
        size = _int(request, "size", 20, 1, MAX_PAGE_SIZE)
        found = groups()
        start = (page_ - 1) * size
        return {"groups": found[start : start + size], "page": page_, "size": size, "total": len(found),
                "pages": math.ceil(len(found) / size)}

    @app.post("/api/duplicates/decisions")
    async def decide(request: Request):
        try:
            body = await request.json()
        except _TooLarge:
            raise
        except Exception:  # noqa: BLE001 - any undecodable body
            raise _error(400, 'send JSON: {"ids": [...], "decision": "not_duplicates" or "keep_all"}') from None
        if not isinstance(body, dict) or not isinstance(body.get("ids"), list) or not isinstance(body.get("decision"), str):
            raise _error(400, 'send JSON: {"ids": [...], "decision": "not_duplicates" or "keep_all"}')
        ids = body["ids"]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in ids):
            raise _error(400, "ids must be a non-empty list of image ids (whole numbers)")
        try:
            return await run_in_threadpool(index.decide, ids, body["decision"])
        except KeyError as err:
            raise _error(404, str(err.args[0])) from None
        except ValueError as err:
            raise _error(400, str(err)) from None

    @app.get("/api/versions")
    def versions():
        return index.versions()

    @app.post("/api/versions/{version}/activate")
    def activate(version: int):
        if not 0 < version <= MAX_ID or index.catalog.version(version) is None:
            raise _error(404, f"no encoder version {version}")
        previous = index.active_version
        t0 = time.perf_counter()
        try:
            index.rollback(version)
        except ValueError as err:
            raise _error(409, str(err)) from None
        return {"active_version": index.active_version, "previous": previous,
                "seconds": round(time.perf_counter() - t0, 2)}

    @app.get("/api/events")
    def events(request: Request):
        from .store import events as store_events

        kinds = [k for k in request.query_params.getlist("kind") if k] or None
        return store_events(index.root, kinds=kinds, last=_int(request, "last", None, 1, MAX_ID))

    @app.get("/api/drift")
    def drift(request: Request):
        from .defaults import DRIFT_WINDOW
        from .store import drift_summary

        return drift_summary(index.catalog, _int(request, "window", DRIFT_WINDOW, 1, 1_000_000))

    @app.get("/api/drift.png")
    def drift_png():
        from .plots import plot_stream

        catalog = index.catalog
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            plot_stream(catalog.score_stream(), catalog.events(), f.name)
            return Response(Path(f.name).read_bytes(), media_type="image/png", headers={"Cache-Control": "no-store"})

    return _Guard(app, token=token, max_body=max_upload)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), int(port)))
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({decode.os_reason(err)})") from err
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Server:
    """The app on a socket: ``run()`` serves until SIGINT/SIGTERM; as a context manager it serves
    from a background thread until the block ends. ``port=0`` takes a free port; :attr:`url` says
    which. Refuses a non-loopback ``host`` without a ``token`` (:func:`check_host`)."""

    def __init__(self, index: Index, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
                 max_upload: int = MAX_UPLOAD_BYTES):
        import uvicorn

        check_host(host, token)
        if max_upload < 1:
            raise ServeError(f"the upload limit must be positive, got {max_upload}")
        self._socket = _bind(host, port)
        bound = self._socket.getsockname()[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
        config = uvicorn.Config(create_app(index, token=token, max_upload=max_upload), log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM (in the main thread: the requests in hand
        are finished, then it returns), or until :meth:`stop`."""
        import signal

        main = threading.current_thread() is threading.main_thread()
        # uvicorn shuts down on these, then raises the signal again for the handler it found: a
        # handler that ignores it makes a stop by signal a normal return
        saved = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """Ask the server to finish the requests in hand and return."""
        self._server.should_exit = True

    def __enter__(self) -> "Server":
        self._thread = threading.Thread(target=self.run, name="streamsim-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise ServeError(f"the server at {self.url} did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
