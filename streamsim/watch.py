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
from .defaults import WATCH_RESCAN, WATCH_SETTLE
from .adapt import MIN_NEW, RETRAIN_WAIT
from .store import file_stat
from .stream import Stream, outcome_event
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
