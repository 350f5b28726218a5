"""The stream: the store's adaptive loop that every producer feeds (:class:`Stream`,
``Index.stream()``), and its first producer, the folder watcher (:class:`Watcher`).

A :class:`Stream` stores what it is fed, feeds each stored image's normalised reconstruction score
to the drift detectors of the active version, and follows the drift episode an alarm opens —
adapting in the background unless told not to (:mod:`streamsim.adapt`).

The watcher tails a folder: every image that lands there is ingested once, through crashes and
restarts.

Files are seen two ways — OS file events (``watchdog``: inotify on Linux) and a periodic rescan,
because event queues overflow and network filesystems drop events — and ingested only when they
are complete:

- a file renamed into place, or closed after writing (inotify ``IN_CLOSE_WRITE``), is ready at once;
- a file that appeared through an event and was never opened for writing (moved in from another
  folder) is ready after ``CREATED_SETTLE`` seconds;
- a file opened for writing waits for its close; if no close ever comes (a writer that died, a
  filesystem without close events) it is ready after ``open_timeout`` seconds with size and mtime
  unchanged;
- a file found only by a rescan is ready when its size and mtime have not changed for ``settle``
  seconds;
- and a file that changes while it is read is put back (``busy``), never stored half-written.

Hidden and temporary names (``.*``, ``*.part``, ``*.tmp``, ``~*``) are ignored until renamed.
Files ready together are taken in arrival order (mtime, then name) in micro-batches (at most
``batch_files`` files, or whatever arrived within ``batch_ms``). The catalog journals every
file's (path, size, mtime, byte hash, outcome) in the same transaction that stores it, so a file
is processed at most once across restarts, and files that arrived while the watcher was down are
picked up by the first scan. The watcher never deletes, moves or rewrites user files.

The watcher feeds its files to the store's stream (``retrain`` off: alarms are recorded, nothing
adapts), and passes on the stream's events (``drift``, ``retraining``, ``activated``, ...) with its
own, while it goes on ingesting and other processes search.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import images
from .defaults import FINETUNE_STEPS, WATCH_RESCAN, WATCH_SETTLE
from .adapt import MIN_NEW, RETRAIN_WAIT, RETRY_AFTER, Adapter
from .store import file_stat, try_lock
from .workers import Decoder

# A file that appeared through an event but was never opened for writing here (moved in from
# another folder, hard-linked) is complete; this short wait lets a writer's open event arrive first.
CREATED_SETTLE = 0.2
POOL_MIN_BATCH = 64  # a batch this big starts worker processes for decoding (kept while watching)
TEMP_PATTERNS = (".*", "*.part", "*.tmp", "~*", "*.crdownload", "*.swp")
ERROR_BACKOFF = 1.0  # seconds before a step that failed (full disk, locked catalog) is retried ...
ERROR_BACKOFF_MAX = 60.0  # ... doubling each time up to this
ONCE_ERRORS = 5  # `watch --once` gives up after this many such errors in a row
SCAN_CHUNK = 500  # files a rescan looks up in the journal at once
_LOOK_UP = object()  # Watcher.offer: look the file up in the journal


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    folder: Path
    recursive: bool = False
    patterns: tuple[str, ...] = ()  # file-name globs; default: the image suffixes streamsim reads
    settle: float = WATCH_SETTLE  # seconds a rescan-found file must stay unchanged
    open_timeout: float = 30.0  # seconds an open-for-writing file may stay silent before it is taken
    rescan: float = WATCH_RESCAN  # seconds between rescans
    batch_files: int = 256
    batch_ms: float = 100.0
    use_events: bool = True
    retrain: bool = True  # fine-tune in the background after a drift alarm
    keep: int | None = None  # index files to keep after a swap (see Index.prune); None: all
    min_new: int = MIN_NEW  # images since the estimated change point before a fine-tune starts ...
    retrain_wait: float = RETRAIN_WAIT  # ... or this many seconds after the alarm, whichever comes first
    attempts: int | None = None  # attempts per drift episode (None: adapt.ATTEMPTS)
    cpu_budget: float | None = None  # CPU seconds per hour the attempts may use (None: no limit)


@dataclasses.dataclass
class WatchStats:
    ingested: int = 0
    duplicates: int = 0
    failed: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        dt = time.monotonic() - self.started
        return (self.ingested + self.duplicates) / dt if dt > 0 else 0.0


@dataclasses.dataclass
class _Pending:
    stat: tuple[int, int]
    stable_since: float
    by_event: bool = False  # seen through an OS event (else only by a scan)
    writing: bool = False  # opened or modified, not closed since
    modified: bool = False  # modified since it was last opened
    closed: bool = False  # closed after writing, or renamed into place


_TEMP_RE = re.compile("|".join(fnmatch.translate(p) for p in TEMP_PATTERNS))


@functools.lru_cache(maxsize=8)
def _pattern_re(patterns: tuple[str, ...]):
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)) if patterns else None


def wanted(name: str, patterns: tuple[str, ...] = ()) -> bool:
    """Whether a file name is one the watcher takes (not hidden/temporary; matching patterns).

    >>> wanted("scan.png"), wanted(".scan.png"), wanted("scan.png.part"), wanted("notes.txt")
    (True, False, False, False)
    >>> wanted("notes.txt", ("*.txt",))
    True
    """
    if _TEMP_RE.match(name):
        return False
    pattern = _pattern_re(patterns)
    if pattern is not None:
        return pattern.match(name) is not None
    return os.path.splitext(name)[1].lower() in images.IMAGE_SUFFIXES


class WatchError(RuntimeError):
    """The watcher cannot go on (an error that is not about one file keeps coming back)."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class StreamLockError(RuntimeError):
    """Another stream (a watcher, or a program's ``Index.stream()``) holds this store."""


def lock_store(root: Path):
    """Hold ``<store>/watch.lock`` — one stream per store: a watcher, ``streamsim add`` or a program's
    ``Index.stream()`` — for as long as the returned file stays open."""
    root.mkdir(parents=True, exist_ok=True)
    f, holder = try_lock(root / "watch.lock")
    if f is None:
        raise StreamLockError(f"{root}: a watcher or another stream is already running on this store (pid {holder})")
    return f


BACKGROUND = ("retraining", "activated", "rejected", "build_failed", "build_cancelled", "unresolved", "budget_wait")


class Stream:
    """The adaptive loop of a store, fed by any producer: ``Index.stream()`` returns one.

    Every batch it stores feeds the drift detectors of the active version (warmed from the scores
    the store recorded, so drift is seen across runs of a program that feeds a few images each
    time); an alarm opens a drift episode, and with ``adapt`` a fine-tune runs in the background
    until a new version serves the new data or the episode's ``budget`` of attempts is spent
    (:mod:`streamsim.adapt`). One stream per store: a second is refused (:class:`StreamLockError`),
    as a second watcher is. Leaving the ``with`` block cancels a running build cleanly (recorded;
    the active version keeps serving).

    Example:
        >>> import tempfile, numpy as np
        >>> from streamsim import Index
        >>> glyph = np.zeros((28, 28), np.uint8); glyph[6:22, 12:16] = 255
        >>> with tempfile.TemporaryDirectory() as d, Index.open(d) as index, index.stream() as s:
        ...     [e["event"] for e in s.feed([glyph, glyph, b"not an image"])], s.state
        (['stored', 'duplicate', 'failed'], 'stable')
    """

    def __init__(self, index, *, adapt: bool = True, budget: int | None = None, keep: int | None = None,
                 min_new: int = MIN_NEW, retrain_wait: float = RETRAIN_WAIT, fine_tune: str = "process",
                 cpu_budget: float | None = None, retry_after: float = RETRY_AFTER, steps: int = FINETUNE_STEPS,
                 lock=None):
        self.index = index
        self._lock = lock if lock is not None else lock_store(Path(index.root))
        self._background: list[dict[str, Any]] = []
        self._inline: list[dict[str, Any]] | None = None
        self._cond = threading.Condition()
        try:
            self.adapter = Adapter(index, self._emit, retrain=adapt, budget=budget, keep=keep, min_new=min_new,
                                   retrain_wait=retrain_wait, fine_tune=fine_tune, cpu_budget=cpu_budget,
                                   retry_after=retry_after, steps=steps)
            self.adapter.warm()
        except BaseException:
            self._lock.close()
            raise
        self._closed = False

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel a running build (recorded; the active version keeps serving), write the vectors,
        release the store."""
        if self._closed:
            return
        self._closed = True
        try:
            self.adapter.stop()
            self.index.flush()
        finally:
            self._lock.close()

    def _emit(self, event: dict[str, Any]) -> None:
        if self._inline is not None and event["event"] not in BACKGROUND:
            self._inline.append(event)
            return
        with self._cond:
            self._background.append(event)
            self._cond.notify_all()

    @property
    def state(self) -> str:
        """The drift episode: ``stable``, ``drifting``, ``adapting`` or ``unresolved``."""
        return self.adapter.state

    def feed(self, images_) -> list[dict[str, Any]]:
        """Store a batch — anything :meth:`Index.add_many` takes — and return its events in the
        order of the batch, one each, in ``watch --json``'s vocabulary: ``stored`` / ``duplicate``
        (``id``, ``path`` where there is one) or ``failed`` (``reason``), and a ``drift`` event where a
        detector fired (``id``, ``detector``, ``score``, ``change_image_id``). A bad item is a
        ``failed`` event, never an exception (an unsupported Python type is a ``TypeError``)."""
        outcomes = self.index.ingest(images_)
        return self._observe(outcomes, [outcome_event(o) for o in outcomes])

    def feed_files(self, files, *, decoder=None) -> tuple[list, list[dict[str, Any]]]:
        """Store files seen as ``(path, size, mtime_ns)`` (:meth:`Index.ingest_files`, for producers
        that track files: the watcher); returns their outcomes and the ``drift`` events they raised."""
        outcomes = self.index.ingest_files(files, decoder=decoder)
        return outcomes, self._observe(outcomes, [])

    def observe(self, outcomes) -> list[dict[str, Any]]:
        """Feed the detectors outcomes stored by another door (``Index.add_files``'s batches);
        returns the ``drift`` events they raised."""
        return self._observe(outcomes, [])

    def _observe(self, outcomes, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        stored = sorted((o.id, o.path) for o in outcomes if o.outcome == "stored")
        scores = {o.id: (o.version, o.score) for o in outcomes if o.outcome == "stored" and o.score is not None}
        self._inline = []
        try:
            self.adapter.feed(stored, scores)
            drifts = self._inline
        finally:
            self._inline = None
        self.adapter.step()
        at = {e["id"]: e for e in drifts}
        if not events:
            return drifts
        out = []
        for o, e in zip(outcomes, events):
            out.append(e)
            if o.id in at and o.outcome == "stored":
                out.append(at.pop(o.id))
        return out + list(at.values())

    def step(self, *, now: bool = False) -> None:
        """Start a pending adaptation when its time has come (with ``now``: as soon as there are
        images enough), and collect a finished one's outcome for :meth:`events`."""
        self.adapter.step(now=now)

    def events(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """What happened in the background since the last call — ``retraining``, ``activated``,
        ``rejected``, ``build_failed``, ``build_cancelled``, ``unresolved`` — waiting up to
        ``timeout`` seconds for at least one when there are none (``None``: answer at once). A
        pending adaptation whose time has come is started first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                self.adapter.reap()
            else:
                self.adapter.step()
            with self._cond:
                if self._background or deadline is None or time.monotonic() >= deadline:
                    out, self._background = self._background, []
                    return out
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))

    def wait(self, timeout: float | None = None, *, now: bool = False) -> bool:
        """Wait up to ``timeout`` seconds (``None``: for as long as it takes) until no fine-tune is
        running or due: a retry that comes due when an attempt is rejected starts and is waited
        for too — with ``now``, every retry is due at once, so the episode ends resolved or with
        its budget spent (or waiting for CPU budget). True once none is (the outcomes are then in
        :meth:`events`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.adapter.reap(wait=True, timeout=left)
            if self.adapter.building:
                return False
            if not self._closed:
                self.adapter.step(now=now)
            if not self.adapter.building:
                return True


def outcome_event(o) -> dict[str, Any]:
    """A :class:`~streamsim.ingest.FileOutcome` as an event of ``watch --json``'s vocabulary."""
    event: dict[str, Any] = {"event": o.outcome, "time": time.time()}
    if o.path is not None:
        event["path"] = o.path
    if o.id is not None:
        event["id"] = o.id
    if o.reason is not None:
        event["reason"] = o.reason
    return event


class Watcher:
    """Feeds the files of one folder to the store's :class:`Stream`.

    ``on_event(dict)`` receives one event per file (``stored``, ``duplicate``, ``failed``) with
    ``path``, ``id`` / ``reason`` and ``time``, and the stream's (``drift``, ``retraining``,
    ``activated``, ``rejected``, ``unresolved``, ...) and the watcher's own (``watching``, ``error``).
    ``lock``: the store's stream lock, if the caller took it already (:func:`lock_store`).
    """

    def __init__(self, index, config: WatchConfig, on_event: Callable[[dict[str, Any]], None] | None = None,
                 *, lock=None):
        self.index = index
        self.config = dataclasses.replace(config, folder=Path(config.folder).resolve())
        self.on_event = on_event or (lambda e: None)
        self.stats = WatchStats()
        # queue.Queue, not SimpleQueue: CPython 3.11's SimpleQueue.get(timeout=...) can block forever
        # when a signal (the Ctrl-C that stops the watcher) interrupts it after its deadline passed
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._observer = None
        self._decoder = Decoder()
        self._errors = 0  # errors in a row (not about one file): the retry waits longer each time
        self._retry_at = 0.0
        self._lock = lock  # the store's stream lock, if the caller took it already
        self.stream: Stream | None = None  # the store's adaptive loop, while running

    def _open_stream(self) -> None:
        self.stream = Stream(self.index, adapt=self.config.retrain, keep=self.config.keep, min_new=self.config.min_new,
                             retrain_wait=self.config.retrain_wait, budget=self.config.attempts,
                             cpu_budget=self.config.cpu_budget, lock=self._lock)

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()  # cancels a running build (reported below), writes the vectors
            self._background()
            self.stream = None

    def _background(self) -> None:
        """Pass on what the stream did in the background (fine-tunes and their outcomes); an open
        stream first starts an adaptation that came due (:meth:`Stream.events`)."""
        for event in self.stream.events() if self.stream is not None else ():
            self.on_event(event)

    # -- seeing files -------------------------------------------------------------------------

    def _start_events(self) -> None:
        if not self.config.use_events:
            return
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        events = self._events

        kinds = {"created", "opened", "modified", "closed", "closed_no_write"}

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type == "moved":  # renamed into place: complete
                    events.put(("rescan", event.dest_path) if event.is_directory else ("closed", event.dest_path))
                elif not event.is_directory and event.event_type in kinds:
                    events.put((event.event_type, event.src_path))

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.config.folder), recursive=self.config.recursive)
        self._observer.daemon = True
        self._observer.start()

    def _stop_events(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def offer(self, path: str, kind: str, now: float, journalled: Any = _LOOK_UP) -> None:
        """Consider ``path`` (seen by an event of ``kind`` or a scan). A file journalled with its
        current size and mtime was taken already: the catalog's journal says so (looked up here,
        or passed in as ``journalled``, ``(size, mtime_ns)`` or ``None``, by a scan that looked up
        many at once) — the watcher keeps no copy of it, so its memory does not grow with the
        files it has taken."""
        if not wanted(os.path.basename(path), self.config.patterns):
            return
        folder = str(self.config.folder)
        parent = os.path.dirname(path)
        if parent != folder:
            if not self.config.recursive:
                return
            rel = os.path.relpath(parent, folder)
            if rel.startswith("..") or any(part.startswith(".") for part in rel.split(os.sep)):
                return  # outside the folder, or inside a hidden sub-folder
        st = file_stat(path)
        if st is None:
            self._pending.pop(path, None)
            return
        if journalled is _LOOK_UP:
            journalled = self.index.catalog.journal_stats([path]).get(path)
        if journalled == st:
            self._pending.pop(path, None)
            return
        p = self._pending.get(path)
        if p is None:
            p = self._pending[path] = _Pending(st, now)
        elif p.stat != st:
            p.stat, p.stable_since, p.closed = st, now, False
        if kind == "scan":
            return
        p.by_event = True
        if kind == "opened":
            if not p.writing:  # a reader opening a file being written must not reset the writer's state
                p.writing, p.modified = True, False
        elif kind == "modified":
            p.writing, p.modified, p.closed = True, True, False
        elif kind == "closed":
            p.writing, p.closed = False, True
        elif kind == "closed_no_write" and not p.modified:
            p.writing = False  # somebody only read it

    def scan(self) -> None:
        """Look at every file in the folder (the start, and every ``rescan`` seconds)."""
        now = time.monotonic()
        folder = str(self.config.folder)
        if self.config.recursive:
            walker = os.walk(folder)
        else:
            try:
                walker = [(folder, [], [e.name for e in os.scandir(folder) if e.is_file()])]
            except OSError:
                return
        catalog = self.index.catalog
        for root, dirs, files in walker:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            paths = [p for p in (os.path.join(root, name) for name in files) if p not in self._pending]
            for start in range(0, len(paths), SCAN_CHUNK):
                chunk = paths[start : start + SCAN_CHUNK]
                known = catalog.journal_stats(chunk)  # one query for many files
                for path in chunk:
                    self.offer(path, "scan", now, known.get(path))

    def _drain_events(self, timeout: float) -> None:
        now = time.monotonic()
        try:
            kind, path = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if kind == "rescan":
                self.scan()
            else:
                self.offer(path, kind, now)
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return

    # -- readiness ------------------------------------------------------------------------------

    def ready(self) -> list[tuple[str, int, int]]:
        """Files complete now, in arrival order (mtime, then name)."""
        now = time.monotonic()
        out = []
        for path, p in list(self._pending.items()):
            if p.closed:  # complete by its events; ingest re-checks size and mtime after reading
                out.append((path, p.stat[0], p.stat[1]))
                continue
            st = file_stat(path)
            if st is None:
                del self._pending[path]
                continue
            if st != p.stat:
                p.stat, p.stable_since, p.closed = st, now, False
                continue
            quiet = now - p.stable_since
            if p.closed:
                wait = 0.0
            elif p.writing:
                wait = self.config.open_timeout  # a writer still has it open: wait for the close
            elif p.by_event:
                wait = min(self.config.settle, CREATED_SETTLE)  # e.g. renamed in from another folder
            else:
                wait = self.config.settle
            if quiet >= wait:
                out.append((path, st[0], st[1]))
        out.sort(key=lambda f: (f[2], os.path.basename(f[0]), f[0]))
        return out

    # -- ingesting ------------------------------------------------------------------------------

    def ingest(self, files: list[tuple[str, int, int]]) -> None:
        if len(files) >= POOL_MIN_BATCH:
            self._decoder.start()  # a bulk drop: decode in worker processes from now on
        if self.stream is None:
            self._open_stream()
        outcomes, drifts = self.stream.feed_files(files, decoder=self._decoder)
        for outcome in outcomes:
            if outcome.outcome == "busy":
                p = self._pending.get(outcome.path)
                if p is not None:
                    p.closed, p.stable_since = False, time.monotonic()
                continue
            if outcome.outcome == "gone":
                self._pending.pop(outcome.path, None)
                continue
            self._pending.pop(outcome.path, None)  # journalled with its stat in the batch's transaction
            if outcome.outcome == "stored":
                self.stats.ingested += 1
            elif outcome.outcome == "duplicate":
                self.stats.duplicates += 1
            else:
                self.stats.failed += 1
            self.on_event(outcome_event(outcome))
        for event in drifts:
            self.on_event(event)
        self._background()

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run one step of the loop; an error that is not about one file (a full disk, a locked
        or broken catalog, a bug) is reported as an ``error`` event and the step is retried later,
        with the files it held still unacknowledged. Returns whether the step ran through."""
        try:
            step()
        except Exception as e:  # noqa: BLE001 - the watcher reports it and goes on
            self._errors += 1
            wait = min(ERROR_BACKOFF_MAX, ERROR_BACKOFF * 2 ** (self._errors - 1))
            self._retry_at = time.monotonic() + wait
            self.on_event({"event": "error", "reason": f"{type(e).__name__}: {_one_line(e)}",
                           "retry_in": round(wait, 1), "time": time.time()})
            return False
        self._errors = 0
        return True

    def _ingest_ready(self, stop: threading.Event | None) -> None:
        batch = self.ready()
        for start in range(0, len(batch), self.config.batch_files):
            self.ingest(batch[start : start + self.config.batch_files])
            if stop is not None and stop.is_set():
                break

    def run_once(self, stop: threading.Event | None = None) -> None:
        """Ingest what is in the folder now (waiting for files still being written), then return
        (early, after the batch in hand, once ``stop`` is set). An error that keeps coming back
        (:data:`ONCE_ERRORS` times in a row) is raised."""
        self._open_stream()
        self.scan()
        try:
            while self._pending and not (stop is not None and stop.is_set()):
                batch = self.ready()[: self.config.batch_files] if time.monotonic() >= self._retry_at else []
                if not batch:
                    time.sleep(0.05)
                    continue
                if not self._guarded(lambda: self.ingest(batch)) and self._errors >= ONCE_ERRORS:
                    raise WatchError(f"giving up after {self._errors} errors in a row; the files not yet "
                                     "stored are taken by the next run")
            if not (stop is not None and stop.is_set()):
                self.stream.step(now=True)  # a drift alarm in this catch-up: adapt before exiting
                self.stream.wait(now=True)
                self._background()
        finally:
            self._close_stream()
            self._decoder.close()
            self.index.flush()

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set; then finish the batch in hand, save and return."""
        self._start_events()
        self._decoder.close()
        self._decoder = Decoder(processes=True)  # started now, so the first bulk drop does not wait for them
        try:
            self._open_stream()
            self.scan()
            last_scan = time.monotonic()
            self.on_event({"event": "watching", "folder": str(self.config.folder), "pending": len(self._pending),
                           "time": time.time()})
            while not stop.is_set():
                self._drain_events(timeout=0.05)
                now = time.monotonic()
                if now - last_scan >= self.config.rescan:
                    self.scan()
                    last_scan = now
                if now < self._retry_at:
                    continue
                batch = self.ready()
                if batch and len(batch) < self.config.batch_files:
                    # gather a little longer: a bulk drop is cheaper in one batch
                    deadline = time.monotonic() + self.config.batch_ms / 1000
                    while time.monotonic() < deadline and not stop.is_set():
                        self._drain_events(timeout=max(0.0, deadline - time.monotonic()))
                if batch and not self._guarded(lambda: self._ingest_ready(stop)):
                    continue
                self._guarded(self._background)  # starts an adaptation that came due, passes on outcomes
                self._guarded(self.index.autosave)
        finally:
            self._close_stream()
            self._stop_events()
            self._decoder.close()
            self.index.flush()
