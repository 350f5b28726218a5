"""``Index``: the public facade over a store — add, search (three modes), versions, training.

A store is a folder (:mod:`streamsim.store`)::

    catalog.sqlite          the source of truth (images, pixels, paths, versions, events)
    encoders/v0001/         orbax checkpoint + meta.json of each encoder version
    vectors/v0001.usearch   the vectors of each version, keyed by image id

Each concern has its own module and ``Index`` calls into them: ingest (:mod:`streamsim.ingest`),
the search modes and dedup (:mod:`streamsim.search`), the version lifecycle
(:mod:`streamsim.versions`), store checks (:mod:`streamsim.check`).

Example:
    >>> import tempfile, numpy as np
    >>> glyph = np.zeros((28, 28), np.uint8); glyph[6:22, 12:16] = 255
    >>> with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
    ...     i = index.add(glyph)
    ...     [m.id for m in index.search(glyph, k=1)] == [i]
    True
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import engines, images, ingest, search, versions
from .catalog import CATALOG_FILE, Catalog
from .defaults import GATE_MARGIN
from .ingest import FileOutcome, IngestReport
from .search import DEFAULT_POLICY, MODES, UNKNOWN_MODE_MSG, Match, SearchPolicy
from .store import Store, StoreError, encoder_dir
from .versions import BuildCancelled, RetrainResult
from .workers import Decoder

__all__ = ["Index", "Match", "FileOutcome", "IngestReport", "RetrainResult", "BuildCancelled", "StoreError",
           "SearchPolicy", "MODES"]


class Index:
    """A searchable store of character images. Open with :meth:`Index.open`."""

    def __init__(self, store: Store, policy: SearchPolicy = DEFAULT_POLICY):
        self._store = store
        self._searcher = search.Searcher(store, policy)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True, reconcile: bool = True,
             policy: SearchPolicy = DEFAULT_POLICY) -> "Index":
        """Open the store at ``path``; with ``create`` (the default) make it if missing.

        A new store gets the shipped encoder as version 1. Opening reconciles the store (unless
        ``reconcile`` is off: to :meth:`check` it as it was found): versions left half-built by a
        process that died are discarded, and images the catalog holds but the active vectors miss
        are encoded and added. ``policy``: how the search modes rank (:class:`SearchPolicy`).
        """
        root = Path(path).expanduser().absolute()
        db = root / CATALOG_FILE
        if not db.exists():
            if not create:
                raise StoreError(f"{root}: no streamsim store here (create it with `streamsim add` or create=True)")
            if root.exists() and not root.is_dir():
                raise StoreError(f"{root}: exists and is not a folder")
        store = Store(root, Catalog(db))
        try:
            store.bootstrap()
            if reconcile:
                versions.discard_dead_builds(store)
                store.reconcile()
        except BaseException:
            store.catalog.close()
            raise
        return cls(store, policy)

    def close(self) -> None:
        """Let a calibration in progress finish, write pending vectors and close the catalog."""
        self.wait_for_calibration()
        self._store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self) -> None:
        """Write the active vectors now (they are also written on close and every few seconds)."""
        self._store.flush()

    def autosave(self) -> None:
        """Write the active vectors if they changed and the last write is a few seconds old."""
        self._store.autosave()

    # -- what it holds ------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._store.root

    @property
    def catalog(self) -> Catalog:
        """The store's SQLite catalog (the source of truth)."""
        return self._store.catalog

    @property
    def policy(self) -> SearchPolicy:
        return self._searcher.policy

    @property
    def active_version(self) -> int:
        return self._store.active_version

    def versions(self) -> list[dict[str, Any]]:
        """Every encoder version: ``version``, ``state``, ``parent``, ``reason``, ``created``, summary."""
        return self.catalog.version_rows()

    def meta(self, version: int) -> dict[str, Any]:
        """The metadata recorded with ``version``'s checkpoint."""
        return self._store.meta(version)

    def normaliser(self, version: int | None = None):
        """How ``version`` (default: the active one) turns reconstruction error into a drift score."""
        return self._store.normaliser(version)

    def encoder(self, version: int | None = None):
        """The encoder of ``version`` (default: the active one), cached: codes, errors and
        reconstructions in numpy (:class:`~streamsim.infer.NumpyEncoder`; batches of more than 512
        images and training go through the JAX :class:`~streamsim.model.Encoder`)."""
        return self._store.encoder(version)

    def vectors(self, version: int | None = None):
        """The :class:`~streamsim.vectors.Vectors` of ``version`` (default: the active one), loaded."""
        store = self._store
        return store.vectors(store.active_version if version is None else int(version))

    def status(self) -> dict[str, Any]:
        """What ``streamsim status --json`` prints (:func:`streamsim.store.status`)."""
        from .store import status

        return status(self.root, self.catalog)

    def get(self, image_id: int) -> dict[str, Any] | None:
        """``{"id", "path", "paths", "added", "digest"}`` for a stored image, or ``None``."""
        return self.catalog.get(int(image_id))

    def pixels(self, image_id: int) -> np.ndarray:
        """The stored (normalised) pixels of an image, ``uint8 [28, 28]``."""
        return self.catalog.pixels([int(image_id)])[0]

    def __len__(self) -> int:
        return self.catalog.count_images()

    def recover(self) -> None:
        """Discard versions left half-built by a process that died (as opening the store does)."""
        versions.discard_dead_builds(self._store)

    def check(self, *, repair: bool = False) -> dict[str, Any]:
        """Whether the store is whole: ``{"ok", "problems", "repaired", "notes", "images",
        "active_version"}`` (:func:`streamsim.check.run`; with ``repair``, what can be derived is
        rebuilt). Open with ``reconcile=False`` to see the store exactly as it was found."""
        from . import check

        return check.run(self._store, repair=repair)

    # -- adding -------------------------------------------------------------------------------

    def add(self, image: Any) -> int:
        """Store one image; returns its id (the existing id if the same bytes are stored already)."""
        return self.add_many([image])[0]

    def add_many(self, images_: Iterable[Any] | np.ndarray) -> list[int]:
        """Store several images; returns their ids in order. Raises :class:`ImageError` on bad input
        before anything of the batch is stored."""
        loaded = [images.load(x) for x in images_]  # a uint8 [N, H, W] array iterates image by image
        return [s.id for s in ingest.store_images(self._store, loaded).rows]

    def ingest(self, items: Iterable[Any] | np.ndarray) -> list[FileOutcome]:
        """Store items of any kind :meth:`add_many` takes, each answered in order by a
        :class:`~streamsim.ingest.FileOutcome`: ``stored`` (with its drift score), ``duplicate``, or
        ``failed`` with the reason (a path's failure is recorded, as ``add`` records it) — bad data
        never raises; an unsupported Python type is a ``TypeError``."""
        out: list[FileOutcome | None] = []
        good: list[tuple[int, Any]] = []
        for x in items:
            try:
                loaded = images.load(x)
            except images.ImageError as e:
                path = os.path.realpath(x) if isinstance(x, (str, os.PathLike)) else None
                if path is not None:
                    self.catalog.record_failure(path, e.reason)
                out.append(FileOutcome(path, "failed", None, e.reason))
                continue
            good.append((len(out), loaded))
            out.append(None)
        done = ingest.store_images(self._store, [x for _, x in good])
        for j, (i, x) in enumerate(good):
            out[i] = done.outcome(j, x.path)
        return out

    def stream(self, *, adapt: bool = True, budget: int | None = None, keep: int | None = None, **options: Any):
        """The store's adaptive loop, for a producer of images (:class:`~streamsim.stream.Stream`;
        a context manager): ``feed`` it batches, read background ``events``, follow its ``state``.
        ``adapt``: fine-tune after drift (else alarms are recorded and the episode waits for an
        adapting stream, ``watch`` or ``retrain``); ``budget``: fine-tune attempts per drift
        episode; ``keep``: see :meth:`prune`. One stream per store (a second is refused)."""
        from .stream import Stream

        return Stream(self, adapt=adapt, budget=budget, keep=keep, **options)

    def add_files(self, paths: Iterable[str | os.PathLike], *, recursive: bool = True, batch: int = 512,
                  on_file: Callable[[str, str, int | None], None] | None = None,
                  on_batch: Callable[[list[FileOutcome]], Any] | None = None,
                  engine: "str | engines.Engine | None" = None, address: str | None = None) -> IngestReport:
        """Store image files and folders (walked recursively), recording files that fail.

        ``on_file(path, outcome, id)`` is called for each file with ``outcome`` one of ``"added"``,
        ``"duplicate"`` or the failure reason (id ``None``); ``on_batch(outcomes)`` with each
        batch's outcomes (a :class:`~streamsim.stream.Stream` feeds its detectors so). Files are known
        by their resolved path. Whatever a file holds, it is stored or recorded as failed, and the
        rest go on. ``engine``: ``"ray"`` (``address``: a cluster's) decodes, normalises and encodes
        in its workers (:mod:`streamsim.engines`); the catalog and vectors are written here alike.
        """
        added: list[int] = []
        dups: list[int] = []
        failed: list[tuple[str, str]] = []
        files = [os.path.realpath(f) for f in images.iter_image_files(paths, recursive=recursive)]
        pending: list[tuple[str, Any]] = []

        def flush(encoded: ingest.Encoded | None = None) -> None:
            outcomes = ingest.ingest_results(self._store, pending, None, encoded)
            if on_batch is not None:
                on_batch(outcomes)
            for o in outcomes:
                if o.outcome == "failed":
                    failed.append((o.path, o.reason))
                else:
                    (added if o.outcome == "stored" else dups).append(o.id)
                if on_file:
                    on_file(o.path, {"stored": "added", "duplicate": "duplicate"}.get(o.outcome, o.reason), o.id)
            pending.clear()

        if not engines.is_local(engine):
            with engines.using(engine, address=address) as eng:
                version = self.active_version
                for results, codes, errors in eng.load_encode(encoder_dir(self.root, version), files, batch=batch):
                    pending.extend(results)
                    flush(ingest.Encoded(version, codes, errors))
            return IngestReport(added, dups, failed)
        if address is not None:
            raise ValueError(engines.ADDRESS_MSG)
        with Decoder() as decoder:
            for path, result in decoder.load(files):  # decoding runs ahead in workers while batches are stored
                pending.append((path, result))
                if len(pending) >= batch:
                    flush()
            flush()
        return IngestReport(added, dups, failed)

    def ingest_files(self, files: Sequence[tuple[str, int, int]], *, decoder: Decoder | None = None,
                     decoded: Iterable[tuple[str, Any]] | None = None) -> list[FileOutcome]:
        """Ingest files seen as ``(path, size, mtime_ns)``, journalling each outcome in the catalog.

        A file whose size or mtime changed while it was read is not stored (outcome ``"busy"``)
        and should be offered again once it is complete. Failures are journalled with the stat
        they had, so the same unchanged file is not retried. ``decoder``: the
        :class:`~streamsim.workers.Decoder` to read with (its worker processes), else one for the call;
        ``decoded``: the files' ``(path, Loaded | ImageError)``, in order, read already (a
        :class:`~streamsim.workers.Decoding` the caller started while it stored the batch before).
        """
        stats = {str(f[0]): (int(f[1]), int(f[2])) for f in files}
        if decoded is not None:
            results = list(decoded)
        elif decoder is None:
            with Decoder() as own:
                results = list(own.load([str(f[0]) for f in files]))
        else:
            results = list(decoder.load([str(f[0]) for f in files]))
        return ingest.ingest_results(self._store, results, stats)

    def wait_for_calibration(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait until a calibration of the duplicate rule on this store's own images, started by
        itself in the background after an ingest, has finished (``close`` waits too); returns what
        is recorded for the active version (:meth:`store_calibration`)."""
        running = getattr(self._store, "calibrating", None)
        if running is not None:
            running.join(timeout)
        return self.store_calibration()

    def remove(self, image_id: int) -> bool:
        """Delete an image (its pixels, paths and vectors). Returns False if there was none."""
        store = self._store
        with store.lock:
            gone = store.catalog.remove(int(image_id))
            if gone:
                store.vectors(store.active_version).remove(np.asarray([int(image_id)], np.int64))
                store.autosave()
            return gone

    # -- searching ----------------------------------------------------------------------------

    def search(self, image: Any, k: int = 10, *, mode: str = "similar") -> list[Match]:
        """The ``k`` stored images closest to ``image``, best first.

        ``mode``: ``"similar"`` (search by image, favouring precision: stored near-duplicates of
        the query first, then the nearest stored image by code, then the nearest codes to the
        query's code expanded by its three nearest stored neighbours), ``"duplicate"`` (identical
        pixels, then near-duplicates only, by the version's calibrated check,
        :meth:`duplicate_rule`; may be empty) or ``"recall"`` (the query, corrected variants of it
        and the query expanded by its nearest neighbours, each searched with a wider pool, lists
        fused: every plausible match, at some cost in precision). ``Match.distance`` is always the
        cosine distance between codes (the query's own and the match's; in ``recall`` mode, the
        smallest any variant gives), so a ``similar`` list, ordered by the expanded code, need not
        have increasing distances. See ``docs/search-modes.md``.
        """
        return self.search_many([image], k, mode=mode)[0]

    def search_many(self, images_: Iterable[Any] | np.ndarray, k: int = 10, *, mode: str = "similar") -> list[list[Match]]:
        """:meth:`search` for several images at once."""
        if mode not in MODES:
            raise ValueError(UNKNOWN_MODE_MSG.format(mode=mode))
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        checks = mode != "recall"  # only similar and duplicate check candidates against the query's frame
        loaded = [images.load(x, frame=checks) for x in images_]
        pixels = np.stack([x.pixels for x in loaded]) if loaded else np.zeros((0, *images.PIXELS_SHAPE), np.uint8)
        return self.search_pixels(pixels, int(k), mode=mode, frames=[x.frame for x in loaded] if checks else None)

    def search_pixels(self, pixels: np.ndarray, k: int = 10, *, mode: str = "similar",
                      frames: list[images.Frame] | None = None) -> list[list[Match]]:
        """Search with already-normalised pixels ``uint8 [N, 28, 28]``; ``frames`` (from
        ``images.load(..., frame=True)``) let the near-duplicate check see the queries' noise —
        without them each query's frame is its pixels (:meth:`images.Frame.of_pixels`)."""
        return self._searcher.search(pixels, int(k), mode, frames)

    def duplicate_rule(self, version: int | None = None) -> float:
        """The duplicate threshold of ``version`` (default: the active one)
        (:func:`streamsim.search.duplicate_rule`); a threshold calibrated on this store's own
        images (:meth:`calibrate_duplicates`) takes precedence."""
        return search.duplicate_rule(self._store, version)

    def store_calibration(self, version: int | None = None) -> dict[str, Any] | None:
        """What calibrating ``version`` (default: the active one) on this store's own images
        recorded — by :meth:`calibrate_duplicates`, or by itself once the store held enough
        images (:func:`streamsim.calibrate.auto_calibrate`) — or None."""
        return search.store_calibration(self._store, self.active_version if version is None else int(version))

    def calibrate_duplicates(self, *, seed: int = 0) -> dict[str, Any]:
        """Recalibrate the active version's duplicate threshold on this store's own images, for
        a store whose images are unlike the version's calibration sample (other scripts, other
        scanners, printed type): near-duplicates of up to 1,000 stored images against the store's
        other images (:func:`streamsim.calibrate.calibrate`, a pool of up to 4,000).

        The result only ever *tightens* the version's rule, and by at most half
        (:data:`streamsim.calibrate.STORE_CALIBRATION_FLOOR`): a store that holds real
        near-duplicates of its own images makes them look like "distinct images that are very
        alike", which would otherwise drive the threshold towards zero. Recorded with the version
        in the catalog (every process sees it; :meth:`duplicate_rule` uses it); a new version is
        calibrated afresh. Returns what was recorded: ``threshold`` (in use), ``measured`` (on the
        store), ``version_threshold``, ``images``, ``copy_recall`` / ``distinct_within`` (at the
        measured threshold), ``version``.
        """
        from .calibrate import calibrate_store

        return calibrate_store(self._store, seed=seed)

    def dedup(self, *, k: int = 16, decided: bool = False) -> list[dict[str, Any]]:
        """Groups of duplicates across the store (:meth:`streamsim.search.Searcher.dedup`):
        ``{"ids", "paths", "max_distance"}`` each, smallest id first. Groups settled by a
        :meth:`decide` are left out (with ``decided``: listed, each with its ``"decision"``)."""
        return self._searcher.dedup(k, decided=decided)

    def decide(self, ids: Iterable[int], decision: str) -> dict[str, Any]:
        """Record a verdict on a group of duplicates, kept in the catalog for every later
        :meth:`dedup`: ``"not_duplicates"`` (the images are distinct: never linked to each other
        again) or ``"keep_all"`` (duplicates, all kept: the group is not listed again unless another
        image joins it). Returns ``{"ids", "decision", "time"}``."""
        return self.catalog.add_decision(ids, decision)

    # -- versions -----------------------------------------------------------------------------

    def train(self, pixels: np.ndarray | None = None, *, epochs: int = 10, activate: bool = True,
              reason: str = "manual", arch: str | None = None, seed: int = 0, keep: int | None = None,
              progress: Callable[[int, int, dict], None] | None = None,
              engine: "str | engines.Engine | None" = None, address: str | None = None) -> int:
        """Train the next encoder version and build its index; returns the new version number
        (:func:`streamsim.versions.train`: fine-tuned from the active encoder on ``pixels``,
        default every stored image, or a fresh ``arch``; activated unless ``activate`` is off;
        ``keep``: see :meth:`prune`; ``engine``/``address``: where the new index is encoded, as
        :meth:`reindex`)."""
        with engines.attached(self._store, engine, address=address):
            return versions.train(self._store, pixels, epochs=epochs, activate=activate, reason=reason, arch=arch,
                                  seed=seed, keep=keep, progress=progress)

    def retrain(self, *, since: int | None = None, epochs: int | None = None, steps: int | None = None,
                replay: float = 1.0, margin: float = GATE_MARGIN, retrieval_margin: float | None = None,
                fresh: str | None = None, reason: str = "manual", activate: bool = True,
                keep: int | None = None, seed: int = 0, stop: threading.Event | None = None,
                progress: Callable[[int, int, dict], None] | None = None,
                engine: "str | engines.Engine | None" = None, address: str | None = None) -> RetrainResult:
        """Fine-tune the active encoder on the images since a change (``since``, default
        :meth:`change_start`), with a replay of older ones — or with ``fresh`` (an architecture:
        ``"conv"``, ``"mlp"``, ``"dense"``) train a fresh model on the whole store — and promote the
        result only if it passes the validation gate (:mod:`streamsim.gate`): retrieval of
        perturbed copies of held-out recent images improves, that of older images drops by at most
        ``retrieval_margin``, their reconstruction error rises by at most ``margin``
        (:func:`streamsim.versions.retrain`). ``epochs`` defaults to about ``steps`` optimiser steps
        (800; 2,400 for a fresh model). Setting ``stop`` cancels the build. ``engine``/``address``:
        where the new index is encoded, as :meth:`reindex`."""
        with engines.attached(self._store, engine, address=address):
            return versions.retrain(self._store, since=since, epochs=epochs, steps=steps, replay=replay, margin=margin,
                                    retrieval_margin=retrieval_margin, fresh=fresh, reason=reason,
                                    activate=activate, keep=keep, seed=seed, stop=stop, progress=progress)

    def reindex(self, version: int | None = None, *, engine: "str | engines.Engine" = "local",
                address: str | None = None, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
        """Rebuild ``version``'s vectors (default: the active version's) from the stored pixels and
        swap them in once complete; searches are answered from the old ones until then.

        ``engine``: ``"local"`` (this process) or ``"ray"`` (workers on a Ray cluster: ``address``
        of a running one, else a local cluster started for the call; needs ``streamsim[ray]``, and
        ``ray`` imported before the store was opened), or an :class:`~streamsim.engines.Engine`.
        ``progress(images)`` is called after each encoded batch. Returns ``{"version", "images",
        "engine", "workers", "seconds"}`` (:func:`streamsim.engines.reindex`)."""
        return engines.reindex(self._store, version, engine=engine, address=address, progress=progress)

    def change_start(self) -> int:
        """The first image id of the newest unhandled change (:func:`streamsim.versions.change_start`)."""
        return versions.change_start(self.catalog)

    def rollback(self, version: int, *, keep: int | None = None) -> None:
        """Make ``version`` (encoder and index together) active: older or newer than the active one
        (roll back or forward). Its index is rebuilt from the catalog's pixels if it was pruned,
        and caught up with images added since."""
        versions.rollback(self._store, version, keep=keep)

    def prune(self, *, keep: int) -> list[int]:
        """Delete the index files of all but the ``keep`` newest versions that have one (never the
        active version's or its parent's; checkpoints are kept): returns the versions retired."""
        return versions.prune(self._store, keep=keep)
