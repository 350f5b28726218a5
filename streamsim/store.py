"""The store's folder: its layout, locks, file stats, and what ``status`` reports.

A store is a folder::

    catalog.sqlite          the source of truth (images, pixels, paths, versions, events)
    encoders/v0001/         orbax checkpoint + meta.json of each encoder version
    vectors/v0001.usearch   the vectors of each version, keyed by image id
    build.lock, watch.lock  one version build, one watcher at a time

Nothing here imports JAX: ``streamsim status`` answers from the catalog alone.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .defaults import DRIFT_WINDOW



class StoreError(ValueError):
    """The store cannot be opened or used as asked."""


def encoders_dir(root: Path) -> Path:
    return Path(root) / "encoders"


def encoder_dir(root: Path, version: int) -> Path:
    """The checkpoint folder of ``version``."""
    return encoders_dir(root) / f"v{int(version):04d}"


def vectors_dir(root: Path) -> Path:
    return Path(root) / "vectors"


def vectors_path(root: Path, version: int) -> Path:
    """The USearch file of ``version``."""
    return vectors_dir(root) / f"v{int(version):04d}.usearch"


def try_lock(path: Path):
    """Take an exclusive ``flock`` on ``path`` (created if missing) and write our pid in it.

    Returns ``(file, None)`` — the lock is held for as long as ``file`` stays open — or
    ``(None, holder)`` when another process holds it (``holder``: the pid it wrote)."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f, None


def lock_builds(root: Path):
    """Hold ``<store>/build.lock`` (one version build at a time per store) until closed."""
    f, holder = try_lock(Path(root) / "build.lock")
    if f is None:
        raise StoreError(f"{root}: an encoder version is being built already (pid {holder}); "
                         "wait for it (see `streamsim versions`)")
    return f


def file_stat(path: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file, or ``None`` if it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns)


def checkpoint_digest(directory: Path) -> str:
    """sha256 over a checkpoint folder's files (relative names and contents, sorted), so that a
    changed, added or removed file changes it (:func:`_not_checkpoint` files aside)."""
    d = Path(directory)
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file() and not _not_checkpoint(p.relative_to(d))):
        h.update(str(f.relative_to(d)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _not_checkpoint(rel: Path) -> bool:
    """Files beside a checkpoint that are not part of it: the package's own (the shipped folder's
    model card, Python files, caches), which a store's copy leaves out."""
    return rel.suffix in (".md", ".py", ".pyc") or "__pycache__" in rel.parts


def drift_summary(catalog: Catalog, window: int = DRIFT_WINDOW) -> dict[str, Any]:
    """The current drift score (mean normalised reconstruction score of the active version's
    latest ``window`` images; about 0 on images like its reference), the latest alarm, and the
    drift episode (``state``: ``stable``, ``drifting``, ``adapting`` or ``unresolved``;
    :func:`streamsim.adapt.episode`)."""
    active = catalog.active_version()
    s = catalog.score_stream(last=window)
    mine = s["score"][s["version"] == active]
    from .adapt import episode

    events = catalog.events()
    alarms = [e for e in events if e["kind"] == "drift"]
    last = alarms[-1] if alarms else None
    ep = episode(events)
    return {
        "score": round(float(mine.mean()), 4) if len(mine) else None,
        "window": int(len(mine)),
        "alarms": len(alarms),
        "last_alarm": {k: last[k] for k in ("time", "version", "image_id", "path")} if last else None,
        "state": ep["state"],
        "episode": ep,
    }


def status(root: str | os.PathLike, catalog: Catalog | None = None) -> dict[str, Any]:
    """What a store holds: ``store``, ``images``, ``files``, ``failed``, ``active_version``,
    ``drift`` (:func:`drift_summary`) and ``versions`` — read from the catalog alone (``catalog``:
    an open one, else the store's is opened read-only)."""
    root = Path(root).expanduser().absolute()
    if catalog is None:
        with Catalog.of_store(root, readonly=True) as cat:
            return status(root, cat)
    return {
        "store": str(root),
        "images": catalog.count_images(),
        "files": catalog.count_paths(),
        "failed": catalog.count_failures(),
        "active_version": catalog.active_version(),
        "drift": drift_summary(catalog),
        "versions": catalog.version_rows(),
    }


def versions(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every encoder version of the store (``status``'s ``versions``), read from the catalog alone."""
    with Catalog.of_store(Path(root).expanduser().absolute(), readonly=True) as cat:
        return cat.version_rows()


def events(root: str | os.PathLike, *, kinds: list[str] | None = None, last: int | None = None) -> list[dict[str, Any]]:
    """The store's event log, flattened: ``time``, ``kind``, ``version``, ``image_id``, ``path``
    and the event's details; only ``kinds`` if given, only the ``last`` n if given."""
    with Catalog.of_store(Path(root), readonly=True) as cat:
        rows = [{k: e[k] for k in ("time", "kind", "version", "image_id", "path")} | e["detail"]
                for e in cat.events() if not kinds or e["kind"] in kinds]
    return rows[-last:] if last else rows


def failures(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Files that could not be stored: ``path``, ``reason``, ``time``."""
    with Catalog.of_store(Path(root), readonly=True) as cat:
        return [{"path": r["path"], "reason": r["reason"], "time": r["time"]} for r in cat.failures()]


CHECKPOINT_HASH = "checkpoint_sha256"  # the key of a version's recorded checkpoint hash (catalog meta)
SAVE_INTERVAL_S = 2.0  # vectors are written at most this long after an add (the catalog at once)
ENCODE_CHUNK = 4096  # images encoded at a time when vectors are built from the catalog


class Store:
    """An open store: its catalog, and the encoder versions and vectors loaded from it (cached).

    The parts of the library share one: :class:`~streamsim.index.Index` (the facade), the search
    modes (:mod:`streamsim.search`), the version lifecycle (:mod:`streamsim.versions`) and ingest
    (:mod:`streamsim.ingest`). Methods are thread-safe (one re-entrant ``lock``).
    """

    def __init__(self, root: Path, catalog: Catalog):
        self.root = Path(root)
        self.catalog = catalog
        self.lock = threading.RLock()
        self.calibrating: threading.Thread | None = None  # calibrate.auto_calibrate's background thread ...
        self.calibration_failed_at: int | None = None  # ... and the store's size when it last failed
        self._encoders: dict[int, Any] = {}
        self._metas: dict[int, dict] = {}
        self._normalisers: dict[int, Any] = {}
        self._vectors = None
        self._vectors_version: int | None = None
        self._last_save = time.monotonic()
        self._known_max = 0  # every image id up to this one is in the active vectors
        self.engine = None  # where big re-encodes run (streamsim.engines); None: here

    # -- versions and encoders -------------------------------------------------------------------

    @property
    def active_version(self) -> int:
        v = self.catalog.active_version()
        if v is None:
            raise StoreError(f"{self.root}: no active encoder version")
        return v

    def bootstrap(self) -> None:
        """Give a new store the shipped encoder as version 1, and an active version."""
        from . import encoders

        encoders_dir(self.root).mkdir(parents=True, exist_ok=True)
        vectors_dir(self.root).mkdir(exist_ok=True)
        if self.catalog.active_version() is not None:
            return
        with self.lock:
            if not self.catalog.versions():
                d = encoders.copy_shipped(encoders_dir(self.root), 1)
                meta = encoders.read_meta(d)
                # another process may be bootstrapping the same store: first one wins
                self.catalog.add_version(1, state="ready", parent=None, reason="shipped",
                                         meta={**summary(meta), CHECKPOINT_HASH: checkpoint_digest(d)}, if_missing=True)
            ready = [v["version"] for v in self.catalog.versions() if v["state"] in ("ready", "active")]
            if not ready:
                raise StoreError(f"{self.root}: no usable encoder version; see `streamsim versions`")
            self.catalog.activate(max(ready))

    def meta(self, version: int) -> dict[str, Any]:
        """The metadata recorded with ``version``'s checkpoint, cached."""
        from . import encoders

        if version not in self._metas:
            self._metas[version] = encoders.read_meta(encoder_dir(self.root, version))
        return self._metas[version]

    def normaliser(self, version: int | None = None):
        """How ``version`` (default: the active one) turns reconstruction error into a drift score."""
        from . import drift

        version = self.active_version if version is None else int(version)
        if version not in self._normalisers:
            self._normalisers[version] = drift.Normaliser.from_meta(self.meta(version))
        return self._normalisers[version]

    def encoder(self, version: int | None = None):
        """The encoder of ``version`` (default: the active one), cached: a
        :class:`~streamsim.infer.NumpyEncoder` (:func:`streamsim.encoders.load_encoder`)."""
        from . import encoders

        version = self.active_version if version is None else int(version)
        with self.lock:
            if version not in self._encoders:
                # numpy over the version's plain-array weights (JAX only for big batches and training)
                enc, meta = encoders.load_encoder(encoder_dir(self.root, version))
                self._metas[version] = meta
                self._encoders[version] = enc
            return self._encoders[version]

    def remember(self, version: int, encoder, meta: dict[str, Any]) -> None:
        """Cache a version just trained (its encoder and metadata)."""
        with self.lock:
            self._metas[version] = meta
            self._encoders[version] = encoder

    def forget(self, version: int) -> None:
        """Drop what is cached of ``version`` (its files were removed or replaced)."""
        with self.lock:
            self._encoders.pop(version, None)
            self._metas.pop(version, None)
            self._normalisers.pop(version, None)
            if self._vectors_version == version:
                self._vectors, self._vectors_version, self._known_max = None, None, 0

    # -- vectors ---------------------------------------------------------------------------------

    def vectors(self, version: int):
        """The :class:`~streamsim.vectors.Vectors` of ``version``, loaded (one version's at a time)."""
        from .vectors import Vectors

        with self.lock:
            if self._vectors_version != version:
                if self._vectors is not None and self._vectors.dirty:
                    self._vectors.save()
                self._vectors = Vectors.open(vectors_path(self.root, version), self.encoder(version).dim)
                self._vectors_version = version
                self._known_max = 0  # another version's file: check every id again (cheap: contains)
            return self._vectors

    def encode_into(self, vectors, ids, version: int) -> None:
        """Encode the stored images ``ids`` with ``version`` and add them to ``vectors`` — through
        the store's :attr:`engine` when one is set and ``ids`` are enough to be worth it."""
        engine = self.engine
        if engine is not None and len(ids) >= max(1, engine.min_images):
            chunks = (ids[s : s + ENCODE_CHUNK] for s in range(0, len(ids), ENCODE_CHUNK))
            for got, codes, _ in engine.encode(encoder_dir(self.root, version), ((c, self.catalog.pixels(c)) for c in chunks)):
                vectors.add(got, codes)
            return
        enc = self.encoder(version)
        for start in range(0, len(ids), ENCODE_CHUNK):
            chunk = ids[start : start + ENCODE_CHUNK]
            vectors.add(chunk, enc(self.catalog.pixels(chunk)))

    def sync_vectors(self, version: int, vectors=None):
        """Make ``version``'s vectors hold exactly the catalog's images, and write them.

        Only the missing images are read and encoded; ids the catalog no longer has are removed.
        Returns the :class:`~streamsim.vectors.Vectors` (``vectors`` if given, else the loaded one
        when ``version`` is loaded, else its file's) and the highest image id it now holds.
        """
        import numpy as np

        from .vectors import Vectors

        path = vectors_path(self.root, version)
        if vectors is None:
            vectors = self._vectors if self._vectors_version == version else Vectors.open(path, self.encoder(version).dim)
        stored = self.catalog.ids()
        have = vectors.keys().astype(np.int64)
        extra = np.setdiff1d(have, stored)
        if len(extra):
            vectors.remove(extra)
        self.encode_into(vectors, np.setdiff1d(stored, have), version)
        if vectors.dirty or not path.exists():
            vectors.dirty = True
            vectors.save()
        return vectors, int(stored.max()) if len(stored) else 0

    def rebuild_vectors(self, version: int, engine, *, progress=None) -> int:
        """Build ``version``'s vectors afresh from the catalog's pixels through ``engine``
        (:mod:`streamsim.engines`), in memory while the current ones keep serving; then bring them
        up to the catalog (images added or removed meanwhile) and swap them in: the file replaced
        atomically, and the loaded vectors under the lock. Returns how many images they hold."""
        from .vectors import Vectors

        fresh = Vectors(vectors_path(self.root, version), self.encoder(version).dim)
        for ids, codes, _ in engine.encode(encoder_dir(self.root, version),
                                           self.catalog.iter_pixels(batch=ENCODE_CHUNK), progress):
            fresh.add(ids, codes)
        with self.lock:
            fresh.dirty = True  # written even when it holds what the old file held
            self.sync_vectors(version, fresh)
            if self._vectors_version == version:
                self._vectors, self._known_max = fresh, 0
                self.catch_up(version)
            return len(fresh)

    def reconcile(self) -> None:
        """Bring the active version's vectors in line with the catalog (after a crash, say)."""
        with self.lock:
            _, self._known_max = self.sync_vectors(self.active_version)

    def catch_up(self, version: int) -> None:
        """Make images stored by another process (a watcher, say) searchable here at once.

        Cheap when nothing changed: one ``MAX(id)`` query. New ids are encoded from the catalog's
        pixels and added in memory (the writer saves the vector file on its own schedule)."""
        import numpy as np

        top = self.catalog.max_image_id()
        if top <= self._known_max:
            return
        vectors = self.vectors(version)
        if not vectors.dirty:
            vectors.reload_if_changed()
        ids = np.asarray(self.catalog.ids_after(self._known_max), np.int64)
        missing = ids[~vectors.contains(ids)] if len(ids) else ids
        self.encode_into(vectors, missing, version)
        self._known_max = top

    def switch(self, version: int, *, kind: str, detail: dict | None = None) -> None:
        """Make ``version`` active: its vectors brought up to date, then the pointer moved in one
        catalog transaction (``kind``: the event recorded, ``activated`` or ``rollback``)."""
        with self.lock:
            vectors, _ = self.sync_vectors(version)
            if self._vectors is not None and self._vectors is not vectors and self._vectors.dirty:
                self._vectors.save()
            self.catalog.activate(version, kind=kind, detail=detail)
            self._vectors, self._vectors_version, self._known_max = vectors, version, 0
            self.catch_up(version)

    def flush(self) -> None:
        """Write the loaded vectors now if they changed."""
        with self.lock:
            if self._vectors is not None and self._vectors.dirty:
                self._vectors.save()
            self._last_save = time.monotonic()

    def autosave(self) -> None:
        """Write the loaded vectors if they changed and the last write is :data:`SAVE_INTERVAL_S` old."""
        if time.monotonic() - self._last_save >= SAVE_INTERVAL_S:
            self.flush()

    def close(self) -> None:
        """Write pending vectors and close the catalog."""
        with self.lock:
            try:
                if self._vectors is not None and self._vectors.dirty:
                    self._vectors.save()
            finally:
                self.catalog.close()


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What of a checkpoint's metadata the catalog keeps with its version (for `versions`)."""
    keys = ("arch", "config", "training", "duplicate_threshold", "final_loss", "version_of", "validation")
    return {k: meta[k] for k in keys if k in meta}
