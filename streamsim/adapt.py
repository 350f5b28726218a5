"""What happens on drift: the normalised score of each stored image feeds a
:class:`~streamsim.drift.DriftMonitor` for the active version; an alarm is recorded as a ``drift``
event, and (unless adaptation is off) a fine-tune (:meth:`Index.retrain`) runs in a background
thread once enough images have arrived since the estimated change, while ingest goes on.

An :class:`Adapter` is driven by whoever stores images (the folder watcher today): ``feed`` the
stored images' scores, call ``step`` now and then, ``stop`` at the end. Its events (``drift``,
``retraining``, ``activated``, ``rejected``, ``build_failed``, ``build_cancelled``) go to ``emit``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from . import drift
from .versions import MIN_RECENT, BuildCancelled

WARM_SCORES = 5000  # recorded scores replayed into the drift monitor when adaptation resumes
MIN_NEW = 256  # images since the estimated change point before a fine-tune starts ...
RETRAIN_WAIT = 30.0  # ... or this many seconds after the alarm, whichever comes first


class Adapter:
    """The drift monitor of a store's active version and the fine-tune an alarm starts.

    ``retrain``: fine-tune after an alarm (else alarms are only recorded); ``keep``: index files
    kept after a swap (:meth:`Index.prune`); ``min_new`` / ``retrain_wait``: when the fine-tune
    starts after an alarm."""

    def __init__(self, index, emit: Callable[[dict[str, Any]], None], *, retrain: bool = True,
                 keep: int | None = None, min_new: int = MIN_NEW, retrain_wait: float = RETRAIN_WAIT):
        self.index = index
        self.emit = emit
        self.retrain = retrain
        self.keep = keep
        self.min_new = min_new
        self.retrain_wait = retrain_wait
        self._monitor: drift.DriftMonitor | None = None
        self._alarm: tuple[drift.Alarm, float] | None = None  # waiting for its fine-tune to start
        self._build: threading.Thread | None = None
        self._build_outcome: dict[str, Any] | None = None
        self._build_stop = threading.Event()

    def warm(self) -> None:
        """Feed the monitor what the last run would have seen: the active version's scores since
        the last drift alarm or version switch (at most :data:`WARM_SCORES`), in the cool-down of
        that alarm if the last run raised one."""
        after, alarmed = 0, False
        for e in self.index.catalog.events():
            if e["kind"] in ("activated", "rollback", "drift") and e["image_id"] is not None:
                after, alarmed = int(e["image_id"]), e["kind"] == "drift"
        s = self.index.catalog.score_stream(after=after, last=WARM_SCORES)
        active = self.index.active_version
        scores = {i: (v, z) for i, v, z in zip(s["id"].tolist(), s["version"].tolist(), s["score"].tolist()) if v == active}
        self._monitor = drift.DriftMonitor(version=active, normaliser=self.index.normaliser(active))
        if alarmed:  # the last run was in the cool-down after that alarm, as this one is now
            self._monitor.cool_down()
        self.feed([(i, None) for i in scores], scores)

    def feed(self, items, scores: dict[int, tuple[int, float]]) -> None:
        """Feed stored images, ``(id, path)`` in arrival order, with their ``(version, score)``."""
        for image_id, path in items:
            if image_id not in scores:
                continue
            version, score = scores[image_id]
            if self._monitor is None or self._monitor.version != version:
                self._monitor = drift.DriftMonitor(version=version, normaliser=self.index.normaliser(version))
            alarm = self._monitor.update(score, image_id=image_id, path=path)
            if alarm is not None:
                self._on_alarm(alarm, version)

    def _on_alarm(self, alarm: drift.Alarm, version: int) -> None:
        path = alarm.path
        if path is None and alarm.image_id is not None:
            path = (self.index.get(alarm.image_id) or {}).get("path")
        detail = {"detector": alarm.detector, "score": round(alarm.score, 4), "statistic": round(alarm.statistic, 4),
                  "change_image_id": alarm.change_image_id}
        self.index.catalog.add_event("drift", version=version, image_id=alarm.image_id, path=path, detail=detail)
        self.emit({"event": "drift", "version": version, "id": alarm.image_id, "path": path, **detail,
                   "time": time.time()})
        if self.retrain and self._build is None:
            self._alarm = (alarm, time.monotonic())

    def step(self, *, now: bool = False) -> None:
        """Start the fine-tune for a pending alarm once enough images have arrived since it (with
        ``now``, as soon as there are any to train on), and report one that finished."""
        self._maybe_start(now=now)
        self.reap()

    def _maybe_start(self, *, now: bool = False) -> None:
        if self._alarm is None or self._build is not None:
            return
        alarm, at = self._alarm
        since = alarm.change_image_id or alarm.image_id or 1
        new = self.index.catalog.count_images_from(since)
        waited = time.monotonic() - at >= self.retrain_wait
        if new < MIN_RECENT or not (now or waited or new >= self.min_new):
            return
        self._alarm = None
        self.emit({"event": "retraining", "since": since, "images": new, "time": time.time()})

        def work():
            try:
                r = self.index.retrain(since=since, reason="drift", keep=self.keep, stop=self._build_stop)
                self._build_outcome = {"event": r.state if r.state == "rejected" else "activated", "version": r.version,
                                       "seconds": round(r.seconds, 2), "validation": r.validation,
                                       **({"reason": r.rejected_because} if r.rejected_because else {})}
            except BuildCancelled:
                self._build_outcome = {"event": "build_cancelled"}
            except Exception as e:  # noqa: BLE001 - reported as an event; ingest goes on
                self._build_outcome = {"event": "build_failed", "reason": f"{type(e).__name__}: {e}"}

        self._build = threading.Thread(target=work, name="streamsim-retrain", daemon=True)
        self._build.start()

    def reap(self, *, wait: bool = False) -> None:
        """Report a fine-tune that has finished (with ``wait``, wait for a running one)."""
        if self._build is None or (self._build.is_alive() and not wait):
            return
        self._build.join()
        self._build = None
        outcome, self._build_outcome = self._build_outcome or {"event": "build_failed", "reason": "unknown"}, None
        self.emit({**outcome, "time": time.time()})

    def stop(self) -> None:
        """Cancel a running fine-tune (recorded as failed; the active version keeps serving)."""
        if self._build is not None:
            self._build_stop.set()
            self.reap(wait=True)
            self._build_stop.clear()
