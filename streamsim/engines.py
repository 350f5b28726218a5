"""Where the heavy maps run: ``local`` (this process, as always) or ``ray`` (a Ray cluster).

Both heavy jobs of a store have the same shape — load an encoder once, map it over batches:
re-encoding the stored pixels into a version's vectors (``reindex``, and a new version's index
after ``train``/``retrain``) and decoding, normalising and encoding new files (``add``). An
:class:`Engine` does the map; the catalog and the vector files are written by the calling
process only, so exactly-once ingest, identity by bytes and the atomic swap are the same whatever
the engine.

- :class:`LocalEngine` encodes here with the store's cached encoder (what the store always did).
- :class:`RayEngine` (``pip install 'streamsim[ray]'``) starts one actor per worker (one per GPU
  where the cluster has GPUs, else one per CPU); each loads the encoder once — its checkpoint
  files travel through Ray's object store, so workers need no access to the store's folder —
  and answers batches. An actor that dies is restarted and its batch retried
  (``retries`` times); past that the job fails with one line and nothing stored has changed.

Nothing here imports Ray until a Ray engine is asked for. Ray's native libraries must be loaded
before usearch's — the other order aborts the process in ``ray.init`` (``std::regex_error``) — so
a program imports ``ray`` before it opens a store (the ``streamsim`` command starts the engine
first); :func:`open_engine` refuses the wrong order with an :class:`EngineError` instead.

Example:
    >>> import tempfile, numpy as np
    >>> from streamsim.index import Index
    >>> glyph = np.zeros((28, 28), np.uint8); glyph[6:22, 12:16] = 255
    >>> with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
    ...     _ = index.add(glyph)
    ...     r = index.reindex(engine="local")
    ...     (r["version"], r["images"], r["engine"], r["workers"])
    (1, 1, 'local', 1)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .defaults import DECODE_TIMEOUT

ENGINES = ("local", "ray")
RAY_MISSING_MSG = "the ray engine needs Ray, which is not installed: pip install 'streamsim[ray]'"
RAY_ORDER_MSG = ("Ray was imported after usearch in this process, and ray.init would abort it: "
                 "`import ray` before opening a store (the `streamsim` command does this for you)")
ENCODE_BATCH = 4096  # stored images per task of a reindex
FILES_BATCH = 512  # files per task of an add
ADDRESS_MSG = "--address names a Ray cluster: use it with --engine ray"
IN_FLIGHT = 2  # tasks queued per worker, so that a worker never waits for the driver


class EngineError(RuntimeError):
    """An engine cannot be started or its job failed; nothing stored has changed."""


class Engine:
    """Runs the heavy maps of a store. ``name``, ``workers`` (how many encode at once);
    ``min_images``: below this many images a map is cheaper here than sent out."""

    name = "engine"
    workers = 1
    min_images = 0
    decodes = False  # whether files are decoded by the engine's workers (else by the store's own)
    encoded = 0  # images this engine has encoded so far

    def encode(self, checkpoint: Path, batches: Iterator[tuple[np.ndarray, np.ndarray]],
               progress: Callable[[int], Any] | None = None, *, errors: bool = False
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """``(ids, pixels)`` batches → ``(ids, codes float32 [n, d], errors float32 [n])`` batches,
        encoded with the encoder checkpointed in ``checkpoint`` (``errors``: the reconstruction
        errors too, else ``None``); ``progress(images)`` after each."""
        raise NotImplementedError

    def load_encode(self, checkpoint: Path, files: Sequence[str], *, batch: int = FILES_BATCH,
                    timeout: float | None = DECODE_TIMEOUT) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
        """Files → batches of ``(results, codes, errors)``: ``results`` as
        :meth:`streamsim.workers.Decoder.load` gives them (``(path, Loaded | ImageError)``, in
        order), ``codes``/``errors`` one row per result (zeros for a failed file). Only where
        :attr:`decodes`."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalEngine(Engine):
    """This process: the store's own encoder, as without an engine."""

    name = "local"

    def __init__(self, encoder_of: Callable[[Path], Any] | None = None):
        self._encoder_of = encoder_of or _load_encoder
        self._cache: dict[Path, Any] = {}

    def _encoder(self, checkpoint: Path):
        if checkpoint not in self._cache:
            self._cache[checkpoint] = self._encoder_of(checkpoint)
        return self._cache[checkpoint]

    def encode(self, checkpoint, batches, progress=None, *, errors=False):
        enc = self._encoder(Path(checkpoint))
        for ids, px in batches:
            codes, err = _encode(enc, px, errors)
            self.encoded += len(ids)
            if progress is not None:
                progress(len(ids))
            yield ids, codes, err


def _load_encoder(checkpoint: Path):
    from . import encoders
    from .model import Encoder

    model, _ = encoders.load(checkpoint)
    return Encoder(model)


def _encode(enc, pixels: np.ndarray, errors: bool) -> tuple[np.ndarray, np.ndarray | None]:
    return enc.encode_with_error(pixels) if errors else (enc(pixels), None)


def _encode_results(enc, results: list) -> tuple[np.ndarray, np.ndarray]:
    """Codes and errors of the loaded ones of ``results`` (zeros where a file failed)."""
    from .images import Loaded

    good = [i for i, (_, r) in enumerate(results) if isinstance(r, Loaded)]
    codes = np.zeros((len(results), enc.dim), np.float32)
    errors = np.zeros(len(results), np.float32)
    if good:
        c, e = enc.encode_with_error(np.stack([results[i][1].pixels for i in good]))
        codes[good], errors[good] = c, e
    return codes, errors


def checkpoint_files(checkpoint: Path) -> dict[str, bytes]:
    """The files a worker needs to load a version's encoder: its metadata and weights (the orbax
    state too where there is no plain-array copy). Small: the encoders are a few hundred KB."""
    from . import encoders

    d = Path(checkpoint)
    names = [encoders.META]
    if (d / encoders.WEIGHTS).is_file():
        names.append(encoders.WEIGHTS)
    else:
        names += [str(p.relative_to(d)) for p in (d / encoders.STATE).rglob("*") if p.is_file()]
    return {n: (d / n).read_bytes() for n in names}


def encoder_from_files(files: dict[str, bytes]):
    """The :class:`~streamsim.model.Encoder` of a checkpoint shipped by :func:`checkpoint_files`
    (written to a private temporary folder and loaded the usual way: hashes checked, no pickle)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="streamsim-encoder-") as tmp:
        for name, data in files.items():
            p = Path(tmp) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return _load_encoder(Path(tmp))


class _Worker:
    """A Ray actor's body: encoders loaded once each (keyed by checkpoint), answering batches.
    The checkpoint's files come with every call as a reference into the object store, so that a
    restarted actor (after a crash) needs nothing from its constructor."""

    def __init__(self):
        self.encoders: dict[str, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def _encoder(self, key: str, files: dict[str, bytes]):
        if key not in self.encoders:
            self.encoders[key] = encoder_from_files(files)
        return self.encoders[key]

    def encode(self, key: str, files: dict[str, bytes], ids: np.ndarray, pixels: np.ndarray, errors: bool):
        return (ids, *_encode(self._encoder(key, files), pixels, errors))

    def load_encode(self, key: str, files: dict[str, bytes], paths: list[str], timeout: float | None):
        from .workers import load_or_error

        results = [(p, load_or_error(p, timeout)) for p in paths]
        return (results, *_encode_results(self._encoder(key, files), results))


class RayEngine(Engine):
    """A Ray cluster: ``address`` of a running one (``ray start --head`` prints it), or ``None``
    for a local cluster of this process's own, started now and stopped by :meth:`close`. A Ray
    already initialised in this process (a test's cluster, a program's own) is used as it is.

    ``workers``: actors (default: one per free GPU where the cluster has GPUs, else one per free CPU);
    ``retries``: how often a batch whose actor died is retried on a restarted one;
    ``min_images``: smaller maps run here (a handful of images is not worth a round trip).
    """

    name = "ray"
    decodes = True

    def __init__(self, address: str | None = None, *, workers: int | None = None, retries: int = 2,
                 batch: int = ENCODE_BATCH, min_images: int = 1024):
        ray = import_ray()
        self._ray = ray
        self._own = False
        if not ray.is_initialized():
            import logging

            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "logging_level": logging.ERROR, "configure_logging": True}
            try:
                if address is None:
                    ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, **options)
                else:
                    unreachable = _unreachable(address)
                    if unreachable:  # Ray itself would retry for minutes
                        raise EngineError(f"cannot reach the Ray cluster at {address}: {unreachable}")
                    ray.init(address=address, **options)
            except EngineError:
                raise
            except Exception as e:  # noqa: BLE001 - Ray raises many types; one line says which cluster and why
                raise EngineError(f"cannot start Ray ({'a local cluster' if address is None else address}): "
                                  f"{_first_line(e)}") from None
            self._own = True
        # what is free now: actors asking for more would wait for other jobs to finish
        resources = ray.available_resources()
        gpus = int(resources.get("GPU", 0))
        self.gpus = gpus > 0
        self.workers = int(workers or gpus or max(1, int(resources.get("CPU", 1))))
        self.retries = int(retries)
        self.batch = int(batch)
        self.min_images = int(min_images)
        self._actors: list = []
        self._files: dict[str, Any] = {}

    def actors(self) -> list:
        """The actors (started on first use), one per worker."""
        if not self._actors:
            ray = self._ray
            cls = ray.remote(num_cpus=0 if self.gpus else 1, num_gpus=1 if self.gpus else 0,
                             max_restarts=self.retries, max_task_retries=self.retries)(_Worker)
            self._actors = [cls.remote() for _ in range(self.workers)]
        return self._actors

    def checkpoint(self, checkpoint: Path) -> tuple[str, Any]:
        """``(key, reference)``: ``checkpoint``'s files put into the object store once."""
        key = str(Path(checkpoint).absolute())
        if key not in self._files:
            self._files[key] = self._ray.put(checkpoint_files(Path(checkpoint)))
        return key, self._files[key]

    def worker_pids(self) -> list[int]:
        """The process ids of the actors (for tests and tools)."""
        return self._get([a.pid.remote() for a in self.actors()])

    def _get(self, refs):
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayError as e:
            raise EngineError(f"a Ray worker failed and the job was stopped: {_first_line(e)}") from None

    def _map(self, actors: list, calls: Iterator[tuple[str, tuple]]) -> Iterator[Any]:
        """Send calls round-robin, ``IN_FLIGHT`` per actor, and yield the results in order."""
        pending: list = []
        limit = IN_FLIGHT * len(actors)
        for n, (method, args) in enumerate(calls):
            pending.append(getattr(actors[n % len(actors)], method).remote(*args))
            if len(pending) >= limit:
                yield self._get(pending.pop(0))
        while pending:
            yield self._get(pending.pop(0))

    def encode(self, checkpoint, batches, progress=None, *, errors=False):
        ray, (key, files) = self._ray, self.checkpoint(checkpoint)

        def calls():
            for ids, px in batches:
                for s in range(0, len(ids), self.batch):
                    yield "encode", (key, files, ids[s : s + self.batch], ray.put(px[s : s + self.batch]), errors)

        for ids, codes, err in self._map(self.actors(), calls()):
            self.encoded += len(ids)
            if progress is not None:
                progress(len(ids))
            yield ids, codes, err

    def load_encode(self, checkpoint, files, *, batch=FILES_BATCH, timeout=DECODE_TIMEOUT):
        key, ref = self.checkpoint(checkpoint)
        files = [str(f) for f in files]
        calls = (("load_encode", (key, ref, files[s : s + batch], timeout)) for s in range(0, len(files), batch))
        for results, codes, errors in self._map(self.actors(), calls):
            self.encoded += len(results)
            yield results, codes, errors

    def close(self) -> None:
        for a in self._actors:
            with contextlib.suppress(Exception):
                self._ray.kill(a)
        self._actors, self._files = [], {}
        if self._own:
            self._own = False
            with contextlib.suppress(Exception):
                self._ray.shutdown()


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a ``[scheme://]host:port`` address (``None`` when something does,
    or when the address is not of that form, e.g. ``auto``)."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def import_ray():
    """``ray``, imported; :class:`EngineError` with how to install it where it is missing, or
    where usearch was loaded first in this process (see the module's notes)."""
    order = list(sys.modules)
    if "ray" not in sys.modules and "usearch" in order:
        raise EngineError(RAY_ORDER_MSG)
    if "ray" in sys.modules and "usearch" in order and order.index("usearch") < order.index("ray"):
        raise EngineError(RAY_ORDER_MSG)
    try:
        import ray
    except ImportError:
        raise EngineError(RAY_MISSING_MSG) from None
    return ray


def open_engine(engine: "str | Engine | None" = "local", *, address: str | None = None) -> Engine:
    """An :class:`Engine` by name (``local`` or ``ray``; ``address``: a Ray cluster's), or
    ``engine`` itself when it is one. Close it (or use it as a context manager) when done."""
    if isinstance(engine, Engine):
        return engine
    name = "local" if engine is None else str(engine)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of " + ", ".join(ENGINES))
    if name == "local":
        if address is not None:
            raise ValueError(ADDRESS_MSG)
        return LocalEngine()
    return RayEngine(address)


@contextlib.contextmanager
def using(engine: "str | Engine | None", *, address: str | None = None):
    """An engine for the block: opened by name (and closed after), or a given one (left open)."""
    if isinstance(engine, Engine):
        yield engine
        return
    e = open_engine(engine, address=address)
    try:
        yield e
    finally:
        e.close()


def is_local(engine: "str | Engine | None") -> bool:
    """Whether ``engine`` means this process (``None``, ``"local"`` or a :class:`LocalEngine`)."""
    return engine is None or isinstance(engine, LocalEngine) or (isinstance(engine, str) and engine == "local")


@contextlib.contextmanager
def attached(store, engine: "str | Engine | None", *, address: str | None = None):
    """The store's big re-encodes (a new version's index, a rollback's rebuild) run through
    ``engine`` for the block (:meth:`streamsim.store.Store.encode_into`); ``local``/``None``
    changes nothing."""
    if is_local(engine):
        if address is not None:
            raise ValueError(ADDRESS_MSG)
        yield None
        return
    with using(engine, address=address) as eng:
        before, store.engine = store.engine, eng
        try:
            yield eng
        finally:
            store.engine = before


def reindex(store, version: int | None = None, *, engine: "str | Engine | None" = "local",
            address: str | None = None, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Rebuild ``version``'s vectors (default: the active version's) from the catalog's pixels
    through ``engine``, and swap them in when complete (:meth:`streamsim.store.Store.replace_vectors`);
    the old vectors serve until then. Holds the store's build lock. Returns ``{"version",
    "images", "engine", "workers", "seconds"}``."""
    from . import encoders
    from .store import StoreError, encoder_dir, lock_builds

    started = time.monotonic()
    version = store.active_version if version is None else int(version)
    info = store.catalog.version(version)
    if info is None:
        raise StoreError(f"no encoder version {version}; see `streamsim versions`")
    if info["state"] not in ("active", "ready", "retired") or not encoders.is_complete(encoder_dir(store.root, version)):
        raise StoreError(f"encoder version {version} has no index to rebuild (state {info['state']}); "
                         "choose a ready, retired or active version from `streamsim versions`")
    if is_local(engine) and not isinstance(engine, Engine):
        if address is not None:
            raise ValueError(ADDRESS_MSG)
        engine = LocalEngine(lambda _: store.encoder(version))  # the store's own, cached encoder
    with using(engine, address=address) as eng:
        lock = lock_builds(store.root)
        try:
            images = store.rebuild_vectors(version, eng, progress=progress)
            if info["state"] == "retired":  # its index files are back
                store.catalog.set_version_state(version, "ready")
        finally:
            lock.close()
        seconds = time.monotonic() - started
        store.catalog.add_event("reindexed", version=version, detail={
            "engine": eng.name, "workers": eng.workers, "images": images, "seconds": round(seconds, 3)})
        return {"version": version, "images": images, "engine": eng.name, "workers": eng.workers,
                "seconds": round(seconds, 3)}
