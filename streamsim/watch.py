"""The folder watcher (:class:`Watcher`), the first producer of the store's stream
(:class:`~streamsim.stream.Stream`, :mod:`streamsim.stream`).

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
Files ready together are taken in arrival order (mtime, then name) in micro-batches of at most
``batch_files`` files, pipelined: while one batch is stored (one catalog transaction, one encode,
one vector add), the next ones — up to :data:`PIPELINE_DEPTH` batches — are decoding in worker
processes, and batches are stored in the order they were taken. The catalog journals every file's
(path, size, mtime, byte hash, outcome) in the same transaction that stores it, so a file is
processed at most once across restarts (a batch still decoding when the watcher stops or dies is
not journalled: the next run takes it), and files that arrived while the watcher was down are
picked up by the first scan. The watcher never deletes, moves or rewrites user files.

The watcher feeds its files to the store's stream (``retrain`` off: alarms are recorded, nothing
adapts), and passes on the stream's events (``drift``, ``retraining``, ``activated``, ...) with its
own, while it goes on ingesting and other processes search.
"""

from __future__ import annotations

import collections
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
from .defaults import PIXELS_SHAPE, WATCH_RESCAN, WATCH_SETTLE
from .adapt import MIN_NEW, RETRAIN_WAIT
from .store import file_stat
from .stream import Stream, outcome_event
from .workers import Decoder, Decoding

# A file that appeared through an event but was never opened for writing here (moved in from
# another folder, hard-linked) is complete; this short wait lets a writer's open event arrive first
# (the kernel queues a new file's create and open events within the same system call).
CREATED_SETTLE = 0.1
POOL_MIN_BATCH = 64  # a batch this big starts worker processes for decoding (kept while watching)
PIPELINE_DEPTH = 3  # batches taken at once: one being stored while the next ones decode
IDLE_WAIT = 0.05  # seconds the loop waits for file events when nothing is due sooner
TEMP_PATTERNS = (".*", "*.part", "*.tmp", "~*", "*.crdownload", "*.swp")
ERROR_BACKOFF = 1.0  # seconds before a step that failed (full disk, locked catalog) is retried ...
ERROR_BACKOFF_MAX = 60.0  # ... doubling each time up to this
ONCE_ERRORS = 5  # `watch --once` gives up after this many such errors in a row
SCAN_CHUNK = 500  # files a rescan looks up in the journal at once
_LOOK_UP = object()  # Watcher.offer: look the file up in the journal
_READ_ONLY = ("opened", "closed_no_write")  # events that say only that somebody opened or read a file


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    folder: Path
    recursive: bool = False
    patterns: tuple[str, ...] = ()  # file-name globs; default: the image suffixes streamsim reads
    settle: float = WATCH_SETTLE  # seconds a rescan-found file must stay unchanged
    open_timeout: float = 30.0  # seconds an open-for-writing file may stay silent before it is taken
    rescan: float = WATCH_RESCAN  # seconds between rescans
    batch_files: int = 256
    batch_ms: float = 0.0  # with nothing in progress, wait this long for more files to join a small batch
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
    closed: bool = False  # closed after writing, renamed into place, or quiet for as long as it had to be
    inflight: bool = False  # taken: in a batch being decoded or stored


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
        self._inflight: collections.deque[tuple[list[tuple[str, int, int]], Decoding]] = collections.deque()
        self._next_due = float("inf")  # when the next pending file may become ready (monotonic)
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

        import watchdog.events

        # only the events read above (no directory-modified, attribute or delete events: fewer for
        # the kernel to queue and for watchdog's threads to turn into objects, per file)
        wanted_events = [getattr(watchdog.events, name) for name in (
            "FileCreatedEvent", "FileModifiedEvent", "FileOpenedEvent", "FileClosedEvent", "FileClosedNoWriteEvent",
            "FileMovedEvent", "DirMovedEvent") if hasattr(watchdog.events, name)]
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.config.folder), recursive=self.config.recursive,
                                event_filter=wanted_events)
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
        p = self._pending.get(path)
        if st is None:
            if p is not None and not p.inflight:  # a batch in flight settles its files itself
                del self._pending[path]
            return
        if journalled is _LOOK_UP:
            journalled = self.index.catalog.journal_stats([path]).get(path)
        if journalled == st:
            if p is not None and not p.inflight:
                del self._pending[path]
            return
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
        """Take the file events queued (waiting up to ``timeout`` seconds for the first), looking
        their files up in the journal with one query."""
        try:
            events = [self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()]
        except queue.Empty:
            return
        while len(events) < SCAN_CHUNK:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        patterns = self.config.patterns
        # a file that is not pending and only opened or read (our own workers reading what was just
        # stored, most of the time) has nothing to tell: a write shows as `modified`, a new file as
        # `created` or `closed`, and the rescan finds anything else
        paths = {path for kind, path in events if kind != "rescan" and (kind not in _READ_ONLY or path in self._pending)
                 and wanted(os.path.basename(path), patterns)}
        known = self.index.catalog.journal_stats(list(paths)) if paths else {}
        for kind, path in events:
            if kind == "rescan":
                self.scan()
            elif path in paths:
                self.offer(path, kind, now, known.get(path))

    # -- readiness ------------------------------------------------------------------------------

    def ready(self) -> list[tuple[str, int, int]]:
        """Files complete now and not yet taken, in arrival order (mtime, then name)."""
        now = time.monotonic()
        out = []
        next_due = float("inf")
        for path, p in list(self._pending.items()):
            if p.inflight:
                continue
            if p.closed:  # complete by its events; ingest re-checks size and mtime after reading
                out.append((path, p.stat[0], p.stat[1]))
                continue
            if p.writing:
                wait = self.config.open_timeout  # a writer still has it open: wait for the close
            elif p.by_event:
                wait = min(self.config.settle, CREATED_SETTLE)  # e.g. renamed in from another folder
            else:
                wait = self.config.settle
            if now - p.stable_since < wait:  # not due yet: looked at (stat) once it is
                next_due = min(next_due, p.stable_since + wait)
                continue
            st = file_stat(path)
            if st is None:
                del self._pending[path]
            elif st != p.stat:
                p.stat, p.stable_since, p.closed = st, now, False
                next_due = min(next_due, now + wait)
            else:
                p.closed = True  # complete: not looked at again until an event or a read says it changed
                out.append((path, st[0], st[1]))
        self._next_due = next_due
        out.sort(key=lambda f: (f[2], os.path.basename(f[0]), f[0]))
        return out

    # -- ingesting ------------------------------------------------------------------------------

    def ingest(self, files: list[tuple[str, int, int]], decoded: Decoding | None = None) -> None:
        """Store ``files`` (``(path, size, mtime_ns)``; ``decoded``: their decoding, started by
        :meth:`take`) and report each one's outcome."""
        if len(files) >= POOL_MIN_BATCH:
            self._decoder.start()  # a bulk drop: decode in worker processes from now on
        if self.stream is None:
            self._open_stream()
        outcomes, drifts = self.stream.feed_files(files, decoder=self._decoder, decoded=decoded)
        for outcome in outcomes:
            if outcome.outcome == "busy":
                p = self._pending.get(outcome.path)
                if p is not None:
                    p.closed, p.stable_since, p.inflight = False, time.monotonic(), False
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

    def take(self, files: list[tuple[str, int, int]]) -> None:
        """Start decoding ``files`` (a batch, in arrival order); :meth:`store_next` stores the
        batches in the order they were taken."""
        if len(files) >= POOL_MIN_BATCH:
            self._decoder.start()  # a bulk drop: decode in worker processes from now on
        for path, _, _ in files:
            self._pending[path].inflight = True
        self._inflight.append((files, self._decoder.submit([f[0] for f in files])))

    def store_next(self, wait: float = 0.0) -> bool:
        """Store the oldest batch taken once it is decoded (waiting up to ``wait`` seconds for
        that); returns whether one was stored."""
        if not self._inflight:
            return False
        files, decoding = self._inflight[0]
        if not decoding.wait(wait):
            return False
        self._inflight.popleft()
        try:
            self.ingest(files, decoding)
        except BaseException:
            self._release(files)
            raise
        return True

    def _release(self, files: list[tuple[str, int, int]]) -> None:
        for path, _, _ in files:
            p = self._pending.get(path)
            if p is not None:
                p.inflight = False

    def _drop_inflight(self) -> None:
        """Forget the batches taken and not stored (an error, or stopping): they are taken again."""
        while self._inflight:
            files, decoding = self._inflight.popleft()
            decoding.cancel()
            self._release(files)

    def _pump(self, stop: threading.Event | None, wait: float = 0.02) -> bool:
        """One step of the pipeline: take what is ready (up to :data:`PIPELINE_DEPTH` batches in
        flight), then store the oldest batch if it is decoded (waiting up to ``wait`` seconds).
        Returns whether there was anything to do."""
        size = self.config.batch_files
        room = PIPELINE_DEPTH - len(self._inflight)
        if room > 0 and not (stop is not None and stop.is_set()):
            batch = self.ready()
            if batch and len(batch) < size and not self._inflight and self.config.batch_ms > 0:
                # nothing in progress: gather a little longer, a bulk drop is cheaper in one batch
                deadline = time.monotonic() + self.config.batch_ms / 1000
                while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
                    self._drain_events(timeout=max(0.0, deadline - time.monotonic()))
                batch = self.ready()
            for start in range(0, min(len(batch), room * size), size):
                self.take(batch[start : start + size])
        busy = bool(self._inflight)
        self.store_next(wait)
        return busy

    def warm(self) -> None:
        """Prepare the active encoder for the batch sizes the pipeline stores (compiled once), so
        that the first files of a bulk drop do not wait for it."""
        import numpy as np

        encoder = self.index.encoder()
        for size in sorted({8, 64, self.config.batch_files}):
            encoder.encode_with_error(np.zeros((size, *PIXELS_SHAPE), np.uint8))

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

    def run_once(self, stop: threading.Event | None = None) -> None:
        """Ingest what is in the folder now (waiting for files still being written), then return
        (early, after the batch in hand, once ``stop`` is set). An error that keeps coming back
        (:data:`ONCE_ERRORS` times in a row) is raised."""
        self._open_stream()
        self.scan()
        try:
            while self._pending and not (stop is not None and stop.is_set()):
                if time.monotonic() < self._retry_at:
                    time.sleep(0.05)
                    continue
                busy: list[bool] = []
                if not self._guarded(lambda: busy.append(self._pump(stop))):
                    self._drop_inflight()
                    if self._errors >= ONCE_ERRORS:
                        raise WatchError(f"giving up after {self._errors} errors in a row; the files not yet "
                                         "stored are taken by the next run")
                elif not busy[0]:
                    time.sleep(min(0.05, max(0.0, self._next_due - time.monotonic())))
            if not (stop is not None and stop.is_set()):
                self.stream.step(now=True)  # a drift alarm in this catch-up: adapt before exiting
                self.stream.wait(now=True)
                self._background()
        finally:
            self._drop_inflight()
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
            self.warm()
            self.scan()
            last_scan = time.monotonic()
            self.on_event({"event": "watching", "folder": str(self.config.folder), "pending": len(self._pending),
                           "time": time.time()})
            while not stop.is_set():
                # with batches in flight, only look at the events that came; else wait for one,
                # or until a pending file is due (and a failed step may be retried)
                idle = IDLE_WAIT if not self._inflight else 0.0
                wake = max(self._next_due, self._retry_at)
                self._drain_events(timeout=min(idle, max(0.0, wake - time.monotonic())))
                now = time.monotonic()
                if now - last_scan >= self.config.rescan:
                    self.scan()
                    last_scan = now
                if now < self._retry_at:
                    continue
                if not self._guarded(lambda: self._pump(stop)):
                    self._drop_inflight()
                    continue
                self._guarded(self._background)  # starts an adaptation that came due, passes on outcomes
                self._guarded(self.index.autosave)
        finally:
            self._drop_inflight()
            self._close_stream()
            self._stop_events()
            self._decoder.close()
            self.index.flush()
