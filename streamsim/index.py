"""``Index``: the public facade over a store — add, search (three modes), versions, training.

A store is a folder::

    catalog.sqlite          the source of truth (images, pixels, paths, versions, events)
    encoders/v0001/         orbax checkpoint + meta.json of each encoder version
    vectors/v0001.usearch   the vectors of each version, keyed by image id

Example:
    >>> import tempfile, numpy as np
    >>> glyph = np.zeros((28, 28), np.uint8); glyph[6:22, 12:16] = 255
    >>> with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
    ...     i = index.add(glyph)
    ...     [m.id for m in index.search(glyph, k=1)] == [i]
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import drift, encoders, images, verify
from .catalog import CATALOG_FILE, Catalog
from .check import CHECKPOINT_HASH
from .defaults import FINETUNE_STEPS, GATE_MARGIN
from .store import StoreError, checkpoint_digest, encoder_dir, file_stat, lock_builds, vectors_path
from .workers import Decoder

MODES = ("similar", "duplicate", "recall")
SIMILAR_MARGIN = 3.0  # similar search puts first the candidates within this × the duplicate threshold
SIMILAR_CANDIDATES = 8  # ... among a clean query's this many nearest (a noisy query's verify.NOISY_CANDIDATES)
SIMILAR_EXPAND = (3,)  # similar search ranks by the query's code plus its nearest neighbours' codes
SIMILAR_POOL = 64  # ... among at least this many of the query's nearest stored images (see similar_pool)
SIMILAR_COPIES = True  # ... a query found to be a copy of a stored image ranked by the two codes averaged
UNKNOWN_MODE_MSG = "unknown search mode {mode!r}; choose one of similar, duplicate, recall"
SAVE_INTERVAL_S = 2.0  # vectors are written at most this long after an add (the catalog at once)
RECALL_POOL = 4  # recall mode searches k * RECALL_POOL candidates per query variant
FINETUNE_LR = 5e-4
MIN_RECENT = 10  # images since the change needed to fine-tune at all
MIN_REPLAY = 256  # older images replayed at least (where the store has them)
REFERENCE_SAMPLE = 500  # older images held out to check that old material is not forgotten
REFERENCE_KEEP = 1000  # training images kept with each checkpoint (replayed and checked by fine-tunes)
RECALL_EXPAND = (3, 10, 20)  # recall mode also searches with the query expanded in rounds by its neighbours


MIN_STORE_CALIBRATION = 100  # stored images, at least, to calibrate the duplicate rule on a store
STORE_CALIBRATION_FLOOR = 0.5  # a store's own calibration may lower the version's threshold to this share, not below


class BuildCancelled(RuntimeError):
    """A version build was stopped before it finished (the version is recorded as failed)."""


@dataclass(frozen=True)
class RetrainResult:
    """What :meth:`Index.retrain` did: the version it made and its ``state`` (``active``, ``ready``
    or ``rejected``), the validation numbers, why it was rejected (else ``None``), and how long it took."""

    version: int
    state: str
    validation: dict[str, Any]
    rejected_because: str | None
    seconds: float

    @property
    def promoted(self) -> bool:
        return self.state in ("active", "ready")


@dataclass(frozen=True)
class Match:
    """One search hit. ``distance`` is the cosine distance between codes (smaller is closer)."""

    id: int
    path: str | None
    distance: float
    encoder_version: int

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "path", "distance", "encoder_version"}``, as ``search --json`` prints it."""
        return {"id": self.id, "path": self.path, "distance": self.distance, "encoder_version": self.encoder_version}


@dataclass(frozen=True)
class FileOutcome:
    """What ingesting one file did: ``stored``, ``duplicate`` (same bytes already stored; the path
    was recorded as another path of ``id``), ``failed`` (with ``reason``), ``busy`` (the file
    changed while it was read; offer it again) or ``gone`` (removed before it could be read).
    A ``stored`` image carries its drift ``score`` under ``version``, the encoder that scored it."""

    path: str
    outcome: str
    id: int | None
    reason: str | None
    score: float | None = None
    version: int | None = None


@dataclass(frozen=True)
class IngestReport:
    """What :meth:`Index.add_files` did: new images, files that were already stored, failures."""

    added: list[int]
    duplicates: list[int]
    failed: list[tuple[str, str]]  # (path, reason)

    @property
    def files(self) -> int:
        return len(self.added) + len(self.duplicates) + len(self.failed)


class Index:
    """A searchable store of character images. Open with :meth:`Index.open`."""

    def __init__(self, root: Path, catalog: Catalog):
        self.root = root
        self.catalog = catalog
        self._lock = threading.RLock()
        self._encoders: dict[int, Any] = {}
        self._metas: dict[int, dict] = {}
        self._normalisers: dict[int, drift.Normaliser] = {}
        self._vectors = None
        self._vectors_version: int | None = None
        self._last_save = time.monotonic()
        self._known_max = 0  # every image id up to this one is in the active vectors
        self._checks = weakref.WeakKeyDictionary()  # query frame -> pixel-check scores by image id (verify.check)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True, reconcile: bool = True) -> "Index":
        """Open the store at ``path``; with ``create`` (the default) make it if missing.

        A new store gets the shipped encoder as version 1. Opening reconciles the store (unless
        ``reconcile`` is off: to :meth:`check` it as it was found): versions left half-built by a
        process that died are discarded, and images the catalog holds but the active vectors miss
        are encoded and added.
        """
        root = Path(path).expanduser().absolute()
        db = root / CATALOG_FILE
        if not db.exists():
            if not create:
                raise StoreError(f"{root}: no streamsim store here (create it with `streamsim add` or create=True)")
            if root.exists() and not root.is_dir():
                raise StoreError(f"{root}: exists and is not a folder")
        index = cls(root, Catalog(db))
        try:
            index._bootstrap()
            if reconcile:
                index._discard_dead_builds()
                index._reconcile()
        except BaseException:
            index.catalog.close()
            raise
        return index

    def _bootstrap(self) -> None:
        enc_root = self.root / "encoders"
        enc_root.mkdir(parents=True, exist_ok=True)
        (self.root / "vectors").mkdir(exist_ok=True)
        if self.catalog.active_version() is not None:
            return
        with self._lock:
            if not self.catalog.versions():
                d = encoders.copy_shipped(enc_root, 1)
                meta = encoders.read_meta(d)
                # another process may be bootstrapping the same store: first one wins
                self.catalog.add_version(1, state="ready", parent=None, reason="shipped",
                                         meta={**_summary(meta), CHECKPOINT_HASH: checkpoint_digest(d)}, if_missing=True)
            ready = [v["version"] for v in self.catalog.versions() if v["state"] in ("ready", "active")]
            if not ready:
                raise StoreError(f"{self.root}: no usable encoder version; see `streamsim versions`")
            self.catalog.activate(max(ready))

    def _reconcile(self) -> None:
        """Bring the active version's vectors in line with the catalog (after a crash, say)."""
        _, self._known_max = self._sync_vectors(self.active_version)

    def _sync_vectors(self, version: int):
        """Make ``version``'s vectors hold exactly the catalog's images, and write them.

        Only the missing images are read and encoded; ids the catalog no longer has are removed.
        Returns the :class:`~streamsim.vectors.Vectors` (the loaded one when ``version`` is active)
        and the highest image id it now holds.
        """
        from .vectors import Vectors

        enc = self.encoder(version)
        path = self._vectors_path(version)
        vectors = self._vectors if self._vectors_version == version else Vectors.open(path, enc.dim)
        stored = self.catalog.ids()
        have = vectors.keys().astype(np.int64)
        extra = np.setdiff1d(have, stored)
        if len(extra):
            vectors.remove(extra)
        missing = np.setdiff1d(stored, have)
        for start in range(0, len(missing), 4096):
            ids = missing[start : start + 4096]
            vectors.add(ids, enc(self.catalog.pixels(ids)))
        if vectors.dirty or not path.exists():
            vectors.dirty = True
            vectors.save()
        return vectors, int(stored.max()) if len(stored) else 0

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Write pending vectors and close the catalog."""
        with self._lock:
            try:
                if self._vectors is not None and self._vectors.dirty:
                    self._vectors.save()
            finally:
                self.catalog.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self) -> None:
        """Write the active vectors now (they are also written on close and every few seconds)."""
        with self._lock:
            if self._vectors is not None and self._vectors.dirty:
                self._vectors.save()
            self._last_save = time.monotonic()

    def autosave(self) -> None:
        """Write the active vectors if they changed and the last write is :data:`SAVE_INTERVAL_S` old."""
        if time.monotonic() - self._last_save >= SAVE_INTERVAL_S:
            self.flush()

    @property
    def active_version(self) -> int:
        v = self.catalog.active_version()
        if v is None:
            raise StoreError(f"{self.root}: no active encoder version")
        return v

    def versions(self) -> list[dict[str, Any]]:
        """Every encoder version: ``version``, ``state``, ``parent``, ``reason``, ``created``, summary."""
        return self.catalog.version_rows()

    def meta(self, version: int) -> dict[str, Any]:
        if version not in self._metas:
            self._metas[version] = encoders.read_meta(encoder_dir(self.root, version))
        return self._metas[version]

    def normaliser(self, version: int | None = None) -> drift.Normaliser:
        """How ``version`` (default: the active one) turns reconstruction error into a drift score."""
        version = self.active_version if version is None else int(version)
        if version not in self._normalisers:
            self._normalisers[version] = drift.Normaliser.from_meta(self.meta(version))
        return self._normalisers[version]

    def encoder(self, version: int | None = None):
        """The :class:`~streamsim.model.Encoder` of ``version`` (default: the active one), cached."""
        from .model import Encoder

        version = self.active_version if version is None else int(version)
        with self._lock:
            if version not in self._encoders:
                model, meta = encoders.load(encoder_dir(self.root, version))
                self._metas[version] = meta
                self._encoders[version] = Encoder(model)
            return self._encoders[version]

    def _vectors_path(self, version: int) -> Path:
        return vectors_path(self.root, version)

    def _vectors_for(self, version: int):
        from .vectors import Vectors

        with self._lock:
            if self._vectors_version != version:
                if self._vectors is not None and self._vectors.dirty:
                    self._vectors.save()
                self._vectors = Vectors.open(self._vectors_path(version), self.encoder(version).dim)
                self._vectors_version = version
                self._known_max = 0  # another version's file: check every id again (cheap: contains)
            return self._vectors

    # -- checking -----------------------------------------------------------------------------

    def check(self, *, repair: bool = False) -> dict[str, Any]:
        """Whether the store is whole (:mod:`streamsim.check`): ``{"ok", "problems", "repaired",
        "notes", "images", "active_version"}``, each problem ``{"kind", "detail", "version",
        "repairable"}``. With ``repair``, what can be derived is rebuilt — the active vectors from
        the catalog's pixels, a dead build discarded, journal rows that name no stored image
        dropped (the watcher takes those files again), the shipped encoder copied afresh — and
        the store checked again; ``problems`` then lists what is still wrong. Never deletes an
        image, a path or a checkpoint (a damaged copy of the shipped encoder is moved aside).
        Open with ``reconcile=False`` to see the store exactly as it was found."""
        from . import check

        with self._lock:
            recorded = self._record_missing_hashes() if repair else []
            problems, notes = check.inspect(self.root, self.catalog)
            repaired: list[dict[str, Any]] = []
            for _ in range(3 if repair else 0):  # a repair may uncover more (vectors are looked at once
                fixable = [p for p in problems if p.repairable]  # their encoder is sound)
                if not fixable:
                    break
                for p in fixable:
                    self._repair(p)
                    repaired.append(p.to_dict())
                problems, notes = check.inspect(self.root, self.catalog)
            notes = recorded + notes
        return {"ok": not problems, "problems": [p.to_dict() for p in problems], "repaired": repaired,
                "notes": notes, "images": self.catalog.count_images(), "active_version": self.catalog.active_version()}

    def _repair(self, problem) -> None:
        if problem.kind == "half_built":
            self._discard_dead_builds()
        elif problem.kind == "journal":
            self.catalog.forget_journal(problem.paths)
        elif problem.kind == "checkpoint":  # only the shipped encoder's is repairable
            d = encoder_dir(self.root, problem.version)
            if d.exists():
                os.replace(d, d.with_name(f".{d.name}.damaged-{int(time.time())}"))
            encoders.copy_shipped(self.root / "encoders", problem.version)
            with self._lock:
                self._encoders.pop(problem.version, None)
                self._metas.pop(problem.version, None)
        elif problem.kind == "vectors":
            path = self._vectors_path(problem.version)
            with self._lock:
                if path.exists():
                    try:
                        from .vectors import Vectors

                        Vectors.open(path, self.encoder(problem.version).dim)
                    except ValueError:  # unreadable: set it aside and build it afresh
                        os.replace(path, path.with_name(f".{path.name}.damaged-{int(time.time())}"))
                if self._vectors_version == problem.version:
                    self._vectors, self._vectors_version = None, None
                self._reconcile()

    def _record_missing_hashes(self) -> list[str]:
        from . import check

        notes = []
        for v in self.catalog.versions():
            d = encoder_dir(self.root, v["version"])
            if v["state"] in check.SERVED and CHECKPOINT_HASH not in v["meta"] and encoders.is_complete(d):
                self.catalog.update_version_meta(v["version"], **{CHECKPOINT_HASH: checkpoint_digest(d)})
                notes.append(f"recorded the hash of version {v['version']}'s checkpoint")
        return notes

    # -- adding -------------------------------------------------------------------------------

    def add(self, image: Any) -> int:
        """Store one image; returns its id (the existing id if the same bytes are stored already)."""
        return self.add_many([image])[0]

    def add_many(self, images_: Iterable[Any] | np.ndarray) -> list[int]:
        """Store several images; returns their ids in order. Raises :class:`ImageError` on bad input
        before anything of the batch is stored."""
        loaded = [images.load(x) for x in images_]  # a uint8 [N, H, W] array iterates image by image
        return [s.id for s in self._store(loaded)]

    def add_files(self, paths: Iterable[str | os.PathLike], *, recursive: bool = True, batch: int = 512,
                  on_file: Callable[[str, str, int | None], None] | None = None) -> IngestReport:
        """Store image files and folders (walked recursively), recording files that fail.

        ``on_file(path, outcome, id)`` is called for each file with ``outcome`` one of ``"added"``,
        ``"duplicate"`` or the failure reason (id ``None``). Files are known by their resolved
        path. Whatever a file holds, it is stored or recorded as failed, and the rest go on.
        """
        added: list[int] = []
        dups: list[int] = []
        failed: list[tuple[str, str]] = []
        files = [os.path.realpath(f) for f in images.iter_image_files(paths, recursive=recursive)]
        pending: list[tuple[str, Any]] = []

        def flush() -> None:
            for o in self._ingest_results(pending, None):
                if o.outcome == "failed":
                    failed.append((o.path, o.reason))
                else:
                    (added if o.outcome == "stored" else dups).append(o.id)
                if on_file:
                    on_file(o.path, {"stored": "added", "duplicate": "duplicate"}.get(o.outcome, o.reason), o.id)
            pending.clear()

        with Decoder() as decoder:
            for path, result in decoder.load(files):  # decoding runs ahead in workers while batches are stored
                pending.append((path, result))
                if len(pending) >= batch:
                    flush()
            flush()
        return IngestReport(added, dups, failed)

    def ingest_files(self, files: Sequence[tuple[str, int, int]], *, decoder: Decoder | None = None) -> list[FileOutcome]:
        """Ingest files seen as ``(path, size, mtime_ns)``, journalling each outcome in the catalog.

        A file whose size or mtime changed while it was read is not stored (outcome ``"busy"``)
        and should be offered again once it is complete. Failures are journalled with the stat
        they had, so the same unchanged file is not retried. ``decoder``: the
        :class:`~streamsim.workers.Decoder` to read with (its worker processes), else one for the call.
        """
        stats = {str(f[0]): (int(f[1]), int(f[2])) for f in files}
        if decoder is None:
            with Decoder() as own:
                results = list(own.load([str(f[0]) for f in files]))
        else:
            results = list(decoder.load([str(f[0]) for f in files]))
        return self._ingest_results(results, stats)

    def _ingest_results(self, results: Sequence[tuple[str, Any]], seen: dict[str, tuple[int, int]] | None
                        ) -> list[FileOutcome]:
        """Store or journal decoded files, ``(path, Loaded | ImageError)``. With ``seen`` (each
        path's stat before it was read) a file changed meanwhile is ``busy`` and a removed one
        ``gone``; without, what was read is stored (``add``: nobody waits for writers)."""
        out: list[FileOutcome] = []
        to_store: list[tuple[int, images.Loaded, tuple[int, int] | None]] = []
        for path, result in results:
            path = str(path)
            now = file_stat(path)
            if seen is not None and now is None:
                out.append(FileOutcome(path, "gone", None, None))  # removed before we could read it
            elif seen is not None and now != seen[path]:
                out.append(FileOutcome(path, "busy", None, None))  # still being written
            elif isinstance(result, images.ImageError):
                self.catalog.record_failure(path, result.reason, stat=now)
                out.append(FileOutcome(path, "failed", None, result.reason))
            else:
                # journal and first path under the name it was seen by (a symlink stays a symlink)
                to_store.append((len(out), dataclasses.replace(result, path=path), now))
                out.append(FileOutcome(path, "pending", None, None))
        if to_store:
            stored, version, scores = self._store([x for _, x, _ in to_store], journal=[st for _, _, st in to_store],
                                                  with_scores=True)
            for (i, _, _), s, z in zip(to_store, stored, scores):
                out[i] = FileOutcome(out[i].path, "stored" if s.new else "duplicate", s.id, None,
                                     z if s.new else None, version if s.new else None)
        return out

    def _store(self, loaded: Sequence[images.Loaded], journal: list[tuple[int, int]] | None = None,
               with_scores: bool = False):
        """Store loaded images in one transaction; returns the catalog's ``Stored`` list (with
        ``with_scores``: and the active version and each image's drift score)."""
        if not loaded:
            return ([], None, []) if with_scores else []
        with self._lock:
            v = self.active_version
            self._catch_up(v)  # images other processes stored since we looked
            px = np.stack([x.pixels for x in loaded])
            codes, errors = self.encoder(v).encode_with_error(px)
            scores = self.normaliser(v).score(errors, drift.ink(px))
            stored = self.catalog.add_images([(x.digest, x.pixels, x.path) for x in loaded], journal,
                                             scores=[(v, float(e), float(z)) for e, z in zip(errors, scores)])
            new_ids, rows, seen = [], [], set()
            for i, s in enumerate(stored):
                if s.new and s.id not in seen:
                    seen.add(s.id)
                    new_ids.append(s.id)
                    rows.append(i)
            if new_ids:
                self._vectors_for(v).add(np.asarray(new_ids, np.int64), codes[rows])
                self._catch_up(v)  # only ids stored elsewhere meanwhile are encoded here
                self.autosave()
            return (stored, v, [float(z) for z in scores]) if with_scores else stored

    def remove(self, image_id: int) -> bool:
        """Delete an image (its pixels, paths and vectors). Returns False if there was none."""
        with self._lock:
            gone = self.catalog.remove(int(image_id))
            if gone:
                self._vectors_for(self.active_version).remove(np.asarray([int(image_id)], np.int64))
                self.autosave()
            return gone

    def get(self, image_id: int) -> dict[str, Any] | None:
        """``{"id", "path", "paths", "added", "digest"}`` for a stored image, or ``None``."""
        return self.catalog.get(int(image_id))

    def pixels(self, image_id: int) -> np.ndarray:
        return self.catalog.pixels([int(image_id)])[0]

    def __len__(self) -> int:
        return self.catalog.count_images()

    # -- searching ----------------------------------------------------------------------------

    def search(self, image: Any, k: int = 10, *, mode: str = "similar") -> list[Match]:
        """The ``k`` stored images closest to ``image``, best first.

        ``mode``: ``"similar"`` (search by image, favouring precision: stored near-duplicates of
        the query first, then the nearest stored image by code, then the nearest codes to the
        query's code expanded by its three nearest stored neighbours), ``"duplicate"`` (identical pixels, then
        near-duplicates only, by the version's calibrated check, :meth:`duplicate_rule`; may be
        empty) or ``"recall"`` (the query, corrected variants of it and the query expanded by its
        nearest neighbours, each searched with a wider pool, lists fused: every plausible match,
        at some cost in precision). ``Match.distance`` is always the cosine distance between codes
        (the query's own and the match's; in ``recall`` mode, the smallest any variant gives), so a
        ``similar`` list, ordered by the expanded code, need not have increasing distances. See
        ``docs/search-modes.md``.
        """
        return self.search_many([image], k, mode=mode)[0]

    def search_many(self, images_: Iterable[Any] | np.ndarray, k: int = 10, *, mode: str = "similar") -> list[list[Match]]:
        if mode not in MODES:
            raise ValueError(UNKNOWN_MODE_MSG.format(mode=mode))
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        checks = mode != "recall"  # only similar and duplicate check candidates against the query's frame
        loaded = [images.load(x, frame=checks) for x in images_]
        pixels = np.stack([x.pixels for x in loaded]) if loaded else np.zeros((0, 28, 28), np.uint8)
        return self.search_pixels(pixels, int(k), mode=mode, frames=[x.frame for x in loaded] if checks else None)

    def search_pixels(self, pixels: np.ndarray, k: int = 10, *, mode: str = "similar",
                      frames: list[images.Frame] | None = None) -> list[list[Match]]:
        """Search with already-normalised pixels ``uint8 [N, 28, 28]``; ``frames`` (from
        ``images.load(..., frame=True)``) let the near-duplicate check see the queries' noise —
        without them each query's frame is its pixels (:meth:`images.Frame.of_pixels`)."""
        if mode not in MODES:
            raise ValueError(UNKNOWN_MODE_MSG.format(mode=mode))
        if len(pixels) == 0:
            return []
        if frames is None and mode != "recall":
            frames = [images.Frame.of_pixels(p) for p in pixels]
        with self._lock:
            v = self.active_version
            enc = self.encoder(v)
            vectors = self._vectors_for(v)
            self._catch_up(v)
            if mode == "similar":
                hits = self._similar_hits(pixels, frames, k, enc, vectors, v)
            elif mode == "duplicate":
                hits = self._duplicate_hits(pixels, frames, k, enc, vectors, v)
            else:
                hits = self._recall_hits(pixels, k, enc, vectors)
        return self._matches(hits, v)

    def _catch_up(self, version: int) -> None:
        """Make images stored by another process (a watcher, say) searchable here at once.

        Cheap when nothing changed: one ``MAX(id)`` query. New ids are encoded from the catalog's
        pixels and added in memory (the writer saves the vector file on its own schedule)."""
        top = self.catalog.max_image_id()
        if top <= self._known_max:
            return
        vectors = self._vectors_for(version)
        if not vectors.dirty:
            vectors.reload_if_changed()
        ids = np.asarray([i for i in self.catalog.ids_after(self._known_max)], np.int64)
        missing = ids[~vectors.contains(ids)] if len(ids) else ids
        if len(missing):
            enc = self.encoder(version)
            for start in range(0, len(missing), 4096):
                chunk = missing[start : start + 4096]
                vectors.add(chunk, enc(self.catalog.pixels(chunk)))
        self._known_max = top

    def _checked(self, frames, keys, dist, version, width: int = verify.CANDIDATES, margin: float = 1.0):
        """Per query, its candidates that pass the version's duplicate check (its threshold times
        ``margin``), ``(key, distance)`` ordered by how well they explain the query
        (:mod:`streamsim.verify`)."""
        threshold = self.duplicate_rule(version) * margin
        rows = verify.check(frames, keys, dist, self._candidate_pixels, width, memo=self._checks)
        return [[(key, d) for key, d, _r, _e in verify.accepted(row, f, threshold)] for row, f in zip(rows, frames)]

    def _candidate_pixels(self, ids: list[int]) -> np.ndarray:
        """Stored pixels of ``ids``, in order; blank for an image removed (by another process) whose
        vector this one still holds — a blank explains nothing, and the match is dropped anyway."""
        try:
            return self.catalog.pixels(ids)
        except KeyError:
            have = set(self.catalog.existing_ids(ids))
            out = np.zeros((len(ids), 28, 28), np.uint8)
            kept = [n for n, i in enumerate(ids) if int(i) in have]
            if kept:
                out[kept] = self.catalog.pixels([ids[n] for n in kept])
            return out

    def _similar_hits(self, pixels, frames, k, enc, vectors, version):
        """Stored near-duplicates of the query first (among the candidates :func:`verify.checked`
        picks: the most similar image is a copy), then the nearest stored image by code, then the
        rest of the query's nearest :func:`similar_pool` stored images ranked by the query's code
        expanded by its :data:`SIMILAR_EXPAND` nearest (average query expansion: the
        neighbourhood pulls a deformed or noisy query back towards its class). A query that is a
        copy of a stored image is ranked as the average of the two (:func:`_with_copies`). One
        code search; distances are between the query's own code and the match's."""
        codes = enc(pixels)
        keys, dist = vectors.search(codes, max(verify.search_width(frames, max(k, verify.CANDIDATES)), similar_pool(k)))
        firsts = self._checked(frames, keys, dist, version, SIMILAR_CANDIDATES, margin=SIMILAR_MARGIN)
        found = keys >= 0
        pooled = np.zeros((*keys.shape, codes.shape[1]), np.float32)  # the pool's unit codes (0 where absent)
        if found.any():
            pooled[found] = _unit(vectors.get(keys[found]))
        query = _with_copies(codes, firsts if SIMILAR_COPIES else [], keys, pooled)
        near = np.argsort(np.where(found, -np.einsum("nkd,nd->nk", pooled, query), np.inf), axis=1, kind="stable")
        expanded = _expanded(query, vectors, SIMILAR_EXPAND, np.take_along_axis(pooled, near[:, :, None], axis=1))
        score = np.where(found, np.einsum("nkd,nd->nk", pooled, expanded), -np.inf)  # the expanded code's cosine
        out = []
        for dups, row_k, row_d, row_s in zip(firsts, keys.tolist(), dist.tolist(), score):
            first = [key for key, _ in dups]
            at = {key: d for key, d in zip(row_k, row_d) if key >= 0}
            rest = [row_k[0]] if row_k[0] >= 0 and row_k[0] not in first else []
            skip = set(first) | set(rest)
            rest += [row_k[j] for j in np.argsort(-row_s, kind="stable").tolist() if row_k[j] >= 0 and row_k[j] not in skip]
            out.append(dups[:k] + [(key, max(float(at[key]), 0.0)) for key in rest[: max(0, k - len(dups))]])
        return out

    def _duplicate_hits(self, pixels, frames, k, enc, vectors, version):
        """Identical pixels first (distance 0), then stored images that pass the version's
        duplicate check (:meth:`duplicate_rule`), best explained first."""
        width = max(k, verify.CANDIDATES)
        keys, dist = vectors.search(enc(pixels), verify.search_width(frames, width))
        out = []
        for px, row in zip(pixels, self._checked(frames, keys, dist, version, width)):
            exact = self.catalog.find_pixels(px)
            seen = set(exact)
            out.append(([(key, 0.0) for key in exact] + [(key, d) for key, d in row if key not in seen])[:k])
        return out

    def duplicate_rule(self, version: int | None = None) -> float:
        """The duplicate threshold of ``version`` (default: the active one): a stored image among a
        query's nearest by code is a near-duplicate when its pixels, registered onto the query,
        leave an excess (:func:`streamsim.verify.scores`) of at most this — calibrated on perturbed
        copies and distinct images when the version was made (:mod:`streamsim.calibrate`).
        Versions calibrated otherwise (by an older release: another ``method``, another scale)
        use :data:`streamsim.verify.DEFAULT_THRESHOLD`. A threshold calibrated on this store's
        own images (:meth:`calibrate_duplicates`) takes precedence."""
        version = self.active_version if version is None else int(version)
        own = self._store_calibration(version)
        return float(own["threshold"]) if own is not None else self._version_threshold(version)

    def _version_threshold(self, version: int) -> float:
        meta = self.meta(version)
        if meta.get("duplicate_calibration", {}).get("method") != verify.METHOD:
            return verify.DEFAULT_THRESHOLD
        return float(meta["duplicate_threshold"])

    def _store_calibration(self, version: int) -> dict[str, Any] | None:
        row = self.catalog.version(version)
        own = (row or {}).get("meta", {}).get("store_calibration")
        return own if own and own.get("method") == verify.METHOD else None

    def calibrate_duplicates(self, *, seed: int = 0) -> dict[str, Any]:
        """Recalibrate the active version's duplicate threshold on this store's own images, for
        a store whose images are unlike the version's calibration sample (other scripts, other
        scanners, printed type): near-duplicates of up to 1,000 stored images against the store's
        other images (:func:`streamsim.calibrate.calibrate`, a pool of up to 4,000).

        The result only ever *tightens* the version's rule, and by at most half
        (:data:`STORE_CALIBRATION_FLOOR`): a store that holds real near-duplicates of its own
        images makes them look like "distinct images that are very alike", which would otherwise
        drive the threshold towards zero. Recorded with the version in the catalog (every process
        sees it; :meth:`duplicate_rule` uses it); a new version is calibrated afresh. Returns what
        was recorded: ``threshold`` (in use), ``measured`` (on the store), ``version_threshold``,
        ``images``, ``copy_recall`` / ``distinct_within`` (at the measured threshold), ``version``.
        """
        from .calibrate import POOL, calibrate

        version = self.active_version
        ids = self.catalog.ids()
        if len(ids) < MIN_STORE_CALIBRATION:
            raise StoreError(f"calibrating on the store needs at least {MIN_STORE_CALIBRATION} stored images; "
                             f"it holds {len(ids)}")
        pick = np.sort(np.random.default_rng(seed).choice(ids, min(POOL, len(ids)), replace=False))
        cal = calibrate(self.encoder(version), self.catalog.pixels(pick.tolist()), seed=seed)
        base = self._version_threshold(version)
        measured = float(cal["duplicate_threshold"])
        dc = cal["duplicate_calibration"]
        record = {
            "method": verify.METHOD, "version": version,
            "threshold": float(np.clip(measured, STORE_CALIBRATION_FLOOR * base, base)),
            "measured": measured, "version_threshold": base, "images": int(len(ids)),
            "sample": dc["sample"], "pool": dc["pool"], "seed": seed,
            "copy_recall": dc["copy_recall"], "distinct_within": dc["distinct_within"],
            "noisy_distinct_within": dc["noisy_distinct_within"], "created": time.time(),
        }
        self.catalog.update_version_meta(version, store_calibration=record, duplicate_threshold=record["threshold"])
        self.catalog.add_event("calibrated", version=version, detail={k: record[k] for k in ("threshold", "measured", "images")})
        return record

    def dedup(self, *, k: int = 16) -> list[dict[str, Any]]:
        """Groups of duplicates across the store, smallest id first: images stored under several
        paths, images with identical pixels, and near-duplicates — each stored image searched
        against the others and its nearest checked as ``search(..., mode="duplicate")`` checks a
        query's (:meth:`duplicate_rule`; a stored image is known by its pixels, so its frame is
        theirs), links joined transitively. Each group: ``{"ids", "paths", "max_distance"}``,
        where ``max_distance`` is the largest cosine distance of a link that joined the group (0
        for identical pixels); each image's ``k`` nearest neighbours are examined.
        """
        with self._lock:
            v = self.active_version
            vectors = self._vectors_for(v)
            self._catch_up(v)
            parent: dict[int, int] = {}
            worst: dict[int, float] = {}

            def root(a: int) -> int:
                while parent.setdefault(a, a) != a:
                    parent[a] = parent[parent[a]]
                    a = parent[a]
                return a

            def join(a: int, b: int, d: float) -> None:
                ra, rb = root(a), root(b)
                top = max(worst.pop(ra, 0.0), worst.pop(rb, 0.0), d)
                parent[max(ra, rb)] = min(ra, rb)
                worst[min(ra, rb)] = top

            for g in self.catalog.identical_file_groups():
                for i in g["ids"]:
                    join(g["ids"][0], i, 0.0)
            ids = self.catalog.ids()
            width = k + 1
            for start in range(0, len(ids), 4096):
                chunk = ids[start : start + 4096]
                keys, dist = vectors.search(vectors.get(chunk), width)
                # each image is a query against the others: drop itself from its own row
                others = keys != chunk[:, None]
                keys = np.stack([np.concatenate([r[m], [-1] * (width - m.sum())]) for r, m in zip(keys, others)])
                dist = np.stack([np.concatenate([r[m], [np.inf] * (width - m.sum())]) for r, m in zip(dist, others)])
                frames = [images.Frame.of_pixels(p) for p in self.catalog.pixels(chunk)]
                for a, row in zip(chunk, self._checked(frames, keys[:, :-1], dist[:, :-1], v, k)):
                    for b, d in row:
                        join(int(a), b, d)
        groups: dict[int, list[int]] = {}
        for a in parent:
            groups.setdefault(root(a), []).append(a)
        out = []
        for r, members in groups.items():
            members.sort()
            paths = [p for i in members for p in (self.catalog.get(i) or {}).get("paths", [])]
            if len(members) > 1 or len(paths) > 1:
                out.append({"ids": members, "paths": paths, "max_distance": round(worst.get(r, 0.0), 6)})
        return sorted(out, key=lambda g: g["ids"][0])

    def _recall_hits(self, pixels, k, enc, vectors):
        """Every plausible match: the query, corrected variants of it (±1 px shifts, thicker and
        thinner strokes) and the query expanded in rounds by its nearest stored neighbours
        (:data:`RECALL_EXPAND`: pseudo-relevance feedback, reaching further into the query's class
        than similar search's one round) are each searched with a wider pool; a candidate's
        distance is the smallest any of them gives it."""
        variants = _query_variants(pixels)  # [V, N, 28, 28]
        n_var, n = variants.shape[0], len(pixels)
        codes = enc(variants.reshape(-1, 28, 28)).reshape(n_var, n, -1)
        if len(vectors):
            codes = np.concatenate([codes, _expanded(codes[0], vectors, RECALL_EXPAND)[None]])
        keys, dist = vectors.search(codes.reshape(-1, codes.shape[-1]), k * RECALL_POOL)
        keys = keys.reshape(len(codes), n, -1).transpose(1, 0, 2).reshape(n, -1)
        dist = dist.reshape(len(codes), n, -1).transpose(1, 0, 2).reshape(n, -1)
        out = []
        for row_k, row_d in zip(keys, dist):
            ok = row_k >= 0
            row_k, row_d = row_k[ok], row_d[ok]
            order = np.lexsort((row_d, row_k))  # by key, then distance: each key's smallest first
            row_k, row_d = row_k[order], row_d[order]
            first = np.ones(len(row_k), bool)
            first[1:] = row_k[1:] != row_k[:-1]
            row_k, row_d = row_k[first], row_d[first]
            top = np.argsort(row_d, kind="stable")[:k]
            out.append([(int(a), float(b)) for a, b in zip(row_k[top], row_d[top])])
        return out

    def _matches(self, hits, version) -> list[list[Match]]:
        """``Match`` lists for ``(key, distance)`` rows; keys the catalog no longer has (removed
        by another process) and -1 padding are dropped."""
        hits = [[(int(key), float(d)) for key, d in row] for row in hits]
        paths = self.catalog.first_paths({key for row in hits for key, _ in row if key >= 0})
        return [[Match(key, paths[key], d, version) for key, d in row if key in paths] for row in hits]

    # -- versions -----------------------------------------------------------------------------

    def train(self, pixels: np.ndarray | None = None, *, epochs: int = 10, activate: bool = True,
              reason: str = "manual", arch: str | None = None, seed: int = 0, keep: int | None = None,
              progress: Callable[[int, int, dict], None] | None = None) -> int:
        """Train the next encoder version and build its index; returns the new version number.

        Fine-tunes from the active encoder on ``pixels`` (default: every stored image); with
        ``arch`` a fresh model of that architecture is trained instead. The new version's vectors
        are built from the catalog's pixels while the active version keeps serving, then (with
        ``activate``) it becomes active in one transaction. ``keep``: see :meth:`prune`.
        """
        from . import train as T
        from .model import build

        if pixels is None:
            pixels = np.concatenate([px for _, px in self.catalog.iter_pixels()] or [np.zeros((0, 28, 28), np.uint8)])
        pixels = np.asarray(pixels, np.uint8)
        if len(pixels) == 0:
            raise StoreError("nothing to train on: the data (or the store) holds no images")
        parent = self.active_version
        with self._building(parent=parent, reason=reason) as version:
            if arch is None:
                model = _clone_model(self.encoder(parent))
                arch_name, config = self.meta(parent)["arch"], self.meta(parent)["config"]
                cfg = parent_config(self.meta(parent), epochs=epochs, seed=seed)
            else:
                from .model import DEFAULT_CONFIGS
                arch_name, config = arch, dict(DEFAULT_CONFIGS.get(arch, {}))
                model = build(arch_name, config, seed=seed)
                cfg = T.TrainConfig(epochs=epochs, seed=seed)
            model, history = T.fit(model, pixels, cfg, progress=progress)
            enc = self._wrap(model)
            meta = build_meta(enc, arch_name, config, pixels, history, cfg, parent=parent,
                              version=version, reason=reason, seed=seed)
            self._complete(version, enc, meta, activate=activate, keep=keep, reference=reference_sample(pixels, seed=seed))
        return version

    def retrain(self, *, since: int | None = None, epochs: int | None = None, replay: float = 1.0,
                margin: float = GATE_MARGIN, reason: str = "manual", activate: bool = True,
                keep: int | None = None, seed: int = 0, stop: threading.Event | None = None,
                progress: Callable[[int, int, dict], None] | None = None) -> "RetrainResult":
        """Fine-tune the active encoder on the images since a change, with a replay of older ones,
        and promote the result only if it passes the validation gate.

        ``since``: the first image id of the change (default: :meth:`change_start`). A fifth of
        those images is held out; the rest, plus ``replay`` times as many older images (at least
        ``MIN_REPLAY`` where the store has them), are the training set. Another sample of older
        images (up to ``REFERENCE_SAMPLE``) is the reference. The parent's own reference sample
        (kept with its checkpoint, see :func:`reference_sample`) is split in two: half is replayed
        too, half joins the reference, so a small store does not forget what the encoder knew.
        ``epochs`` defaults to about ``FINETUNE_STEPS`` optimiser steps, however few the images;
        the objective and corruptions are the parent's (:func:`parent_config`).

        The new version is promoted when its reconstruction error on the held-out recent images is
        lower than the parent's and its error on the reference rises by at most ``margin``
        (relative); otherwise it is recorded as ``rejected`` with the numbers and the store keeps
        its version. Setting ``stop`` cancels the build (the version is recorded as ``failed``).
        """
        from . import train as T

        started = time.monotonic()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        since = self.change_start() if since is None else int(since)
        ids = self.catalog.ids()
        recent, older = ids[ids >= since], ids[ids < since]
        if len(recent) < MIN_RECENT:
            raise StoreError(f"only {len(recent)} images since image {since}; fine-tuning needs at least "
                             f"{MIN_RECENT} (wait for more, or pass an earlier --since)")
        rng = np.random.default_rng(seed)
        recent = rng.permutation(recent)
        n_val = max(2, len(recent) // 5)
        val_ids, fit_ids = recent[:n_val], recent[n_val:]
        older = rng.permutation(older)
        n_ref = min(REFERENCE_SAMPLE, len(older) // 3)
        ref_ids, pool = older[:n_ref], older[n_ref:]
        replay_ids = pool[: min(len(pool), max(int(round(len(fit_ids) * replay)), MIN_REPLAY if replay > 0 else 0))]
        train_ids = np.sort(np.concatenate([fit_ids, replay_ids]))
        parent = self.active_version
        # what the parent was trained for (kept with its checkpoint): half replayed, half checked
        kept = encoders.load_reference(encoder_dir(self.root, parent))
        kept = kept[rng.permutation(len(kept))]
        kept_check, kept_replay = kept[: len(kept) // 2], kept[len(kept) // 2 :] if replay > 0 else kept[:0]
        with self._building(parent=parent, reason=reason) as version:
            pixels = np.concatenate([self.catalog.pixels(train_ids), kept_replay])
            meta_p = self.meta(parent)
            cfg = parent_config(meta_p, seed=seed, learning_rate=FINETUNE_LR)
            if epochs is None:
                epochs = max(1, -(-FINETUNE_STEPS // max(1, len(pixels) // cfg.batch_size)))
            cfg = dataclasses.replace(cfg, epochs=epochs)

            def tick(epoch, total, metrics):
                if stop is not None and stop.is_set():
                    raise BuildCancelled("the fine-tune was cancelled")
                if progress is not None:
                    progress(epoch, total, metrics)

            model, history = T.fit(_clone_model(self.encoder(parent)), pixels, cfg, progress=tick)
            candidate = self._wrap(model)
            val_px, ref_px = self.catalog.pixels(val_ids), np.concatenate([self.catalog.pixels(ref_ids), kept_check])
            before = {"recent": _mean_error(self.encoder(parent), val_px), "reference": _mean_error(self.encoder(parent), ref_px)}
            after = {"recent": _mean_error(candidate, val_px), "reference": _mean_error(candidate, ref_px)}
            checks = {"recent_error_falls": bool(after["recent"] < before["recent"]),
                      "reference_within_margin": bool(len(ref_px) == 0 or after["reference"] <= before["reference"] * (1 + margin))}
            validation = {
                "since_image_id": since, "recent_images": int(len(recent)), "trained_on_recent": int(len(fit_ids)),
                "replayed": int(len(replay_ids) + len(kept_replay)), "held_out_recent": int(len(val_ids)),
                "reference_images": int(len(ref_px)),
                "recent_error_before": before["recent"], "recent_error_after": after["recent"],
                "reference_error_before": before["reference"], "reference_error_after": after["reference"],
                "margin": margin, **checks, "passed": all(checks.values()),
            }
            if not validation["passed"]:
                why = ("error on recent images did not fall" if not checks["recent_error_falls"]
                       else f"error on the reference rose more than {margin:.0%}")
                self.catalog.update_version_meta(version, validation=validation)
                self.catalog.set_version_state(version, "rejected")
                self.catalog.add_event("rejected", version=version, detail={"why": why, **validation})
                return RetrainResult(version, "rejected", validation, why, time.monotonic() - started)
            meta = build_meta(candidate, meta_p["arch"], meta_p["config"], pixels, history, cfg, parent=parent,
                              version=version, reason=reason, seed=seed)
            meta["validation"] = validation
            self._complete(version, candidate, meta, activate=activate, keep=keep, stop=stop,
                           reference=reference_sample(pixels, seed=seed))
        state = "active" if activate else "ready"
        return RetrainResult(version, state, validation, None, time.monotonic() - started)

    def change_start(self) -> int:
        """The first image id of the newest unhandled change: the estimated change point of the
        last drift alarm after the last switch of version, or else the first image stored since
        that switch."""
        last_switch, start = None, None
        for e in self.catalog.events():
            if e["kind"] in ("activated", "rollback"):
                last_switch, start = e, None
            elif e["kind"] == "drift":
                start = e["detail"].get("change_image_id") or e["image_id"]
        if start is not None:
            return int(start)
        if last_switch is not None and last_switch.get("image_id") is not None:
            return int(last_switch["image_id"]) + 1
        return 1

    def _wrap(self, model):
        from .model import Encoder

        return Encoder(model)

    @contextlib.contextmanager
    def _building(self, *, parent: int, reason: str):
        """Hold the store's build lock and a new version in state ``building``; on any error the
        version is marked ``failed`` and its partial files removed."""
        lock = lock_builds(self.root)
        try:
            version = self.catalog.new_version(state="building", parent=parent, reason=reason)
            try:
                yield version
            except BaseException as e:
                self._discard(version, f"{type(e).__name__}: {e}")
                raise
        finally:
            lock.close()

    def _discard(self, version: int, why: str) -> None:
        info = self.catalog.version(version)
        if info is None or info["state"] != "building":
            return
        self.catalog.set_version_state(version, "failed")
        self.catalog.add_event("build_failed", version=version, detail={"why": why})
        self._vectors_path(version).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(encoder_dir(self.root, version), ignore_errors=True)
        with self._lock:
            self._encoders.pop(version, None)
            self._metas.pop(version, None)
            self._normalisers.pop(version, None)

    def _discard_dead_builds(self) -> None:
        """Versions left ``building`` by a process that died: marked ``failed``, files removed."""
        building = [v["version"] for v in self.catalog.versions() if v["state"] == "building"]
        if not building:
            return
        try:
            lock = lock_builds(self.root)
        except StoreError:
            return  # a build is running in another process
        try:
            for version in building:
                self._discard(version, "the build was interrupted (the process stopped)")
        finally:
            lock.close()

    def _complete(self, version: int, enc, meta: dict[str, Any], *, activate: bool, keep: int | None,
                  reference: np.ndarray, stop: threading.Event | None = None) -> None:
        """Save a trained version (its :class:`Encoder` and reference sample), build its vectors in
        the background of searches, switch."""
        from flax import nnx

        encoders.save(nnx.merge(enc.graphdef, enc.state), encoder_dir(self.root, version), meta,
                      reference=reference)
        with self._lock:
            self._metas[version] = meta
            self._encoders[version] = enc
        if stop is not None and stop.is_set():
            raise BuildCancelled("the build was cancelled")
        # built while the active version keeps serving; images added meanwhile are caught up
        # when this version is switched to (now, or by a later rollback)
        self._sync_vectors(version)
        with self._lock:
            self.catalog.update_version_meta(version, **_summary(meta),
                                             **{CHECKPOINT_HASH: checkpoint_digest(encoder_dir(self.root, version))})
            self.catalog.set_version_state(version, "ready")
        if activate:
            self._switch(version, kind="activated")
        if keep is not None:
            self.prune(keep=keep)

    def _switch(self, version: int, *, kind: str, detail: dict | None = None) -> None:
        with self._lock:
            vectors, _ = self._sync_vectors(version)
            if self._vectors is not None and self._vectors is not vectors and self._vectors.dirty:
                self._vectors.save()
            self.catalog.activate(version, kind=kind, detail=detail)
            self._vectors, self._vectors_version, self._known_max = vectors, version, 0
            self._catch_up(version)

    def rollback(self, version: int, *, keep: int | None = None) -> None:
        """Make ``version`` (encoder and index together) active: older or newer than the active one
        (roll back or forward). Its index is rebuilt from the catalog's pixels if it was pruned,
        and caught up with images added since."""
        version = int(version)
        info = self.catalog.version(version)
        if info is None:
            raise StoreError(f"no encoder version {version}; see `streamsim versions`")
        if info["state"] in ("building", "rejected", "failed") or not encoders.is_complete(
                encoder_dir(self.root, version)):
            raise StoreError(f"encoder version {version} cannot be activated (state {info['state']}); "
                             "choose a ready, retired or active version from `streamsim versions`")
        previous = self.active_version
        self._switch(version, kind="rollback", detail={"from": previous})
        if keep is not None:
            self.prune(keep=keep)

    def prune(self, *, keep: int) -> list[int]:
        """Delete the index files of all but the ``keep`` newest versions that have one; the active
        version and its parent always keep theirs. Checkpoints are never deleted (they are small),
        so a pruned (``retired``) version can be rolled back to: its index is rebuilt from pixels.
        Returns the versions retired."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        with self._lock:
            active = self.active_version
            rows = self.catalog.versions()
            parent = next((v["parent"] for v in rows if v["version"] == active), None)
            indexed = [v["version"] for v in rows if v["state"] in ("ready", "active") and self._vectors_path(v["version"]).exists()]
            kept = set(sorted(indexed)[-keep:]) | {active} | ({parent} if parent else set())
            retired = []
            for v in indexed:
                if v not in kept:
                    self._vectors_path(v).unlink(missing_ok=True)
                    self.catalog.set_version_state(v, "retired")
                    self.catalog.add_event("retired", version=v, detail={"keep": keep})
                    retired.append(v)
            return retired


def parent_config(meta: dict[str, Any], **overrides: Any):
    """The :class:`~streamsim.train.TrainConfig` a version was trained with (its objective and
    corruptions, as recorded in its metadata), with ``overrides``; fields this release does not
    know are ignored."""
    from . import train as T

    recorded = dict(meta.get("train") or {})
    fields = {f.name for f in dataclasses.fields(T.TrainConfig)}
    corr_fields = {f.name for f in dataclasses.fields(T.Corruptions)}
    corruptions = {k: v for k, v in (recorded.pop("corruptions", None) or {}).items() if k in corr_fields}
    kwargs = {k: v for k, v in recorded.items() if k in fields}
    return T.TrainConfig(**{**kwargs, "corruptions": T.Corruptions(**corruptions), **overrides})


def reference_sample(pixels: np.ndarray, *, seed: int = 0, size: int = REFERENCE_KEEP) -> np.ndarray:
    """Up to ``size`` of a version's training images, seeded: kept with its checkpoint."""
    pixels = np.asarray(pixels, np.uint8)
    if len(pixels) <= size:
        return pixels
    return pixels[np.sort(np.random.default_rng(seed).choice(len(pixels), size, replace=False))]


def _mean_error(encoder, pixels: np.ndarray) -> float:
    if len(pixels) == 0:
        return 0.0
    return float(np.mean(encoder.encode_with_error(pixels)[1]))


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("arch", "config", "training", "duplicate_threshold", "final_loss", "version_of", "validation")
    return {k: meta[k] for k in keys if k in meta}


def _clone_model(enc) -> Any:
    from flax import nnx

    import jax

    return nnx.merge(enc.graphdef, jax.tree.map(lambda a: a.copy(), enc.state))


def build_meta(enc, arch: str, config: dict, pixels: np.ndarray, history: dict, cfg, *, parent: int | None,
               version: int | None, reason: str, seed: int, calibration: np.ndarray | None = None) -> dict[str, Any]:
    """The metadata recorded with a trained encoder (architecture, data, losses, calibration).

    ``calibration`` (default: the training pixels) is the sample the duplicate threshold and the
    reference error statistics are computed on."""
    import hashlib

    from .calibrate import calibrate

    cal = calibrate(enc, pixels if calibration is None else calibration, seed=seed)
    return {
        "arch": arch,
        "config": config,
        "code_dim": enc.dim,
        "parent": parent,
        "version_of": version,
        "reason": reason,
        "created": time.time(),
        "training": {
            "count": int(len(pixels)),
            "pixels_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
            "epochs": cfg.epochs,
            "seed": seed,
        },
        "train": cfg.to_dict(),
        "losses": {k: [round(float(x), 6) for x in v] for k, v in history.items()},
        "final_loss": round(float(history["recon"][-1]), 6) if history.get("recon") else None,
        **cal,
    }


def similar_pool(k: int) -> int:
    """How many of the query's nearest stored images (by its own code) a ``similar`` search of
    ``k`` ranks by the expanded code: :data:`SIMILAR_POOL`, or ``2k`` for a longer list."""
    return max(SIMILAR_POOL, 2 * int(k))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)


def _with_copies(codes: np.ndarray, copies: list[list[tuple[int, float]]], keys: np.ndarray,
                 pooled: np.ndarray) -> np.ndarray:
    """Unit query codes; where the check found the query to be a copy of a stored image (its
    best-explained candidate, ``copies[i][0]``), the unit average of the query's code and that
    image's: a noisy, shifted or re-scanned copy is searched much as its stored original would be,
    and a clean query (its own copy is itself) as before. ``keys``/``pooled``: the query's nearest
    stored images and their unit codes, among which the copies are."""
    q = _unit(np.asarray(codes, np.float32)).copy()
    for i, row in enumerate(copies):
        if row:
            at = np.flatnonzero(keys[i] == row[0][0])
            if len(at):
                q[i] = _unit(q[i] + pooled[i, at[0]])
    return q


def _expanded(codes: np.ndarray, vectors, sizes: tuple[int, ...], nearest: np.ndarray | None = None) -> np.ndarray:
    """Average query expansion, in rounds: each unit query code plus the unit codes of its
    ``sizes[0]`` nearest stored neighbours; each later round adds, to the query's own code, the
    ``sizes[i]`` nearest neighbours of the previous round's expanded code (fewer where the store
    holds fewer). ``nearest``: the queries' nearest stored codes, unit length, best first
    (``[N, M, d]``, zero where the store holds fewer), if already fetched."""
    q = _unit(np.asarray(codes, np.float32))
    out = q
    for r, n in enumerate(sizes if len(vectors) else ()):
        if r == 0 and nearest is not None and nearest.shape[1] >= n:
            neigh = nearest[:, :n]
        else:
            near, _ = vectors.search(out, n)
            ok = near >= 0
            neigh = np.zeros((*near.shape, q.shape[-1]), np.float32)
            if ok.any():
                neigh[ok] = _unit(vectors.get(near[ok]))
        out = _unit(q + neigh.sum(axis=1))
    return out


def _query_variants(pixels: np.ndarray) -> np.ndarray:
    """The query plus small corrected variants: ±1 px shifts, thickened and thinned strokes."""
    x = pixels.astype(np.int16)
    out = [x]
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        out.append(np.roll(x, (dy, dx), axis=(1, 2)))
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    stack = np.stack([pad[:, 1 + dy : 29 + dy, 1 + dx : 29 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    out.append((x + stack.max(axis=0)) // 2)
    out.append((x + stack.min(axis=0)) // 2)
    return np.stack(out).clip(0, 255).astype(np.uint8)
