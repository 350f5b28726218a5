"""The stream: the store's adaptive loop that every producer feeds (:class:`Stream`,
``Index.stream()``; its first producer is the folder watcher, :mod:`streamsim.watch`).

A :class:`Stream` stores what it is fed, feeds each stored image's normalised reconstruction score
to the drift detectors of the active version, and follows the drift episode an alarm opens —
adapting in the background unless told not to (:mod:`streamsim.adapt`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from .adapt import MIN_NEW, RETRAIN_WAIT, RETRY_AFTER, Adapter
from .defaults import FINETUNE_STEPS
from .store import try_lock


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

    def feed_files(self, files, *, decoder=None, decoded=None) -> tuple[list, list[dict[str, Any]]]:
        """Store files seen as ``(path, size, mtime_ns)`` (:meth:`Index.ingest_files`, for producers
        that track files: the watcher, which passes them ``decoded`` already); returns their outcomes
        and the ``drift`` events they raised."""
        outcomes = self.index.ingest_files(files, decoder=decoder, decoded=decoded)
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
