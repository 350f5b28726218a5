"""What happens on drift: the drift *episode*, from the alarm to a version that serves the new data
— or to a plain statement that none was found.

The normalised score of each stored image feeds a :class:`~streamsim.drift.DriftMonitor` for the
active version. An alarm is a ``drift`` event and opens an episode (``drifting``); unless
adaptation is off, a fine-tune (:meth:`Index.retrain`) runs in a background thread once enough
images have arrived since the estimated change (``adapting``), while ingest goes on. Promoted:
the episode ends (``stable``, on the new version). Rejected, failed or cancelled: the episode stays
open and the next attempt waits until the images since the change have doubled, with a stronger
recipe (twice the optimiser steps and more replay each time); when the episode's budget of attempts
is spent it is ``unresolved``, said in an ``unresolved`` event with what to try. Every step is an
event in the store's log, so the episode survives restarts: :func:`episode` reads it back, and
``streamsim status`` shows it. A promoted version was trained on the first few hundred images of
the change; as the new data keeps coming it is *refined* — fine-tuned again on every image since
the change each time they have doubled (at most :data:`REFINEMENTS` times), through the same gate;
the first refinement the gate rejects ends the refining. The new version's drift scores are
measured against held-out images since the change, so the stream going on as it is raises no new
alarm.

An :class:`Adapter` is driven by whoever stores images — :class:`~streamsim.stream.Stream`, which
the folder watcher, ``streamsim add`` and programs feed: ``feed`` it the stored images' scores,
call ``step`` now and then, ``stop`` at the end.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import drift
from .defaults import FINETUNE_STEPS

WARM_SCORES = 5000  # recorded scores replayed into the drift monitor when adaptation resumes
MIN_NEW = 256  # images since the estimated change point before a fine-tune starts ...
RETRAIN_WAIT = 30.0  # ... or this many seconds after the alarm, whichever comes first
ATTEMPTS = 3  # attempts one drift episode may make before it is unresolved (the default budget)
RETRY_AFTER = 60.0  # seconds after a failed attempt when the next one starts even if no more images came
FRESH_ARCH = "conv"  # the last attempt of an episode trains a fresh model of this architecture
REFINEMENTS = 3  # fine-tunes after a promoted one, each once the images since the change have doubled
FINE_TUNE_NICE = 10  # a fine-tune's worker process runs this much nicer than ingest
STATES = ("stable", "drifting", "adapting", "unresolved")
UNRESOLVED_ADVICE = ("try `streamsim retrain --steps 5000 --replay 2`, `streamsim retrain --fresh conv --steps 6000`, "
                     "or a looser gate (`--retrieval-margin 0.05 --margin 0.5`); `streamsim versions --json` has every "
                     "attempt's numbers")


def recipe(attempt: int, budget: int, steps: int = FINETUNE_STEPS) -> dict[str, Any]:
    """What attempt ``attempt`` (1-based) of an episode with ``budget`` attempts trains: a fine-tune
    with twice the optimiser steps and one more replay share each time; the last of two or more, a
    fresh :data:`FRESH_ARCH` model on the whole store.

    >>> [recipe(a, 3)["fresh"] for a in (1, 2, 3)], recipe(2, 3)["steps"]
    ([None, None, 'conv'], 1600)
    """
    if budget >= 2 and attempt >= budget:
        return {"steps": None, "replay": 1.0, "fresh": FRESH_ARCH}
    return {"steps": steps * 2 ** (attempt - 1), "replay": float(attempt), "fresh": None}


def episode(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The newest drift episode as the store's event log tells it: ``state`` (one of
    :data:`STATES`), ``since_image_id`` (the first image of the change), ``alarm_image_id``,
    ``attempts`` and, after an attempt, ``last_attempt_images`` (images since the change it saw).

    A switch of version (``activated``, ``rollback``) ends an episode; an alarm opens one — also
    while one is ``drifting`` or ``unresolved`` (the data changed again: the newest change is what
    to adapt to), but not while an attempt runs; ``retraining`` is an attempt (``adapting``);
    ``rejected`` / ``build_failed`` / ``build_cancelled`` leave it ``drifting``; ``unresolved``
    closes the attempts. A promoted attempt leaves it ``stable`` with ``refine`` (``since``,
    ``images`` trained on, ``count`` of refinements so far): a *refinement* (a ``retraining`` event
    with ``refinement``) is ``adapting`` too; its rejection or failure ends the refining.

    >>> episode([{"kind": "drift", "image_id": 40, "detail": {"change_image_id": 31}},
    ...          {"kind": "retraining", "image_id": None, "detail": {"images": 300}},
    ...          {"kind": "rejected", "image_id": None, "detail": {}}])["state"]
    'drifting'
    """
    out: dict[str, Any] = {"state": "stable", "since_image_id": None, "alarm_image_id": None, "attempts": 0}
    for e in events:
        kind, detail = e["kind"], e.get("detail") or {}
        if kind == "activated" and out["state"] == "adapting":  # an attempt promoted: refine it as data comes
            out = {"state": "stable", "since_image_id": None, "alarm_image_id": None, "attempts": 0,
                   "refine": {"since": out["since_image_id"], "images": out.get("last_attempt_images") or 0,
                              "count": out.get("refining", 0)}}
        elif kind in ("activated", "rollback"):
            out = {"state": "stable", "since_image_id": None, "alarm_image_id": None, "attempts": 0}
        elif kind == "retraining" and out["state"] == "stable" and detail.get("refinement") and out.get("refine"):
            out.update(state="adapting", since_image_id=out["refine"]["since"], refining=detail["refinement"],
                       last_attempt_images=detail.get("images"))
        elif out.get("refining") and kind in ("rejected", "build_failed", "build_cancelled"):
            out = {"state": "stable", "since_image_id": None, "alarm_image_id": None, "attempts": 0}  # refined enough
        elif kind == "drift" and out["state"] in ("stable", "drifting", "unresolved"):
            # an alarm while no attempt runs: the data changed (again): adapt to the newest change
            out = {"state": "drifting", "since_image_id": detail.get("change_image_id") or e.get("image_id"),
                   "alarm_image_id": e.get("image_id"), "attempts": 0}
        elif out["state"] == "stable":
            continue  # a manual retrain's outcome, say: no episode to follow
        elif kind == "retraining":
            out["state"] = "adapting"
            out["attempts"] += 1
            out["last_attempt_images"] = detail.get("images")
        elif kind in ("rejected", "build_failed", "build_cancelled") and out["state"] == "adapting":
            out["state"] = "drifting"
        elif kind == "unresolved":
            out["state"] = "unresolved"
            out["advice"] = detail.get("advice") or UNRESOLVED_ADVICE
    return out


def retrain_in_worker(root: str, **kw: Any) -> dict[str, Any]:
    """In a worker process: open the store as it is (another process owns its reconciliation)
    and run :meth:`Index.retrain`; returns what it did, as plain values."""
    from .index import Index

    cpu = time.process_time()
    with Index.open(root, create=False, reconcile=False) as index:
        r = index.retrain(reason="drift", **kw)
    return {"state": r.state, "version": r.version, "seconds": r.seconds, "validation": r.validation,
            "rejected_because": r.rejected_because, "cpu_seconds": time.process_time() - cpu}


class Adapter:
    """The drift monitor of a store's active version and the episode an alarm opens.

    ``retrain``: fine-tune after an alarm (else alarms are recorded and the episode is left open for
    a later adapting stream, ``watch`` or ``retrain``); ``budget``: attempts per episode (default
    :data:`ATTEMPTS`; each one's recipe: :func:`recipe`); ``cpu_budget``: CPU seconds the attempts
    may use per hour (None: no limit; an attempt that would start past it waits, with a
    ``budget_wait`` event); ``retry_after``: seconds after a failed attempt when the next starts
    even if no more images came; ``steps``: the first fine-tune's optimiser steps;
    ``keep``: index files kept after a swap (:meth:`Index.prune`);
    ``min_new`` / ``retrain_wait``: when the first attempt starts after an alarm; ``fine_tune``:
    ``"process"`` (a lower-priority worker process, where worker processes are allowed:
    :func:`streamsim.workers.workers_allowed`) or ``"thread"`` (in this process)."""

    def __init__(self, index, emit: Callable[[dict[str, Any]], None], *, retrain: bool = True,
                 budget: int | None = None, keep: int | None = None, min_new: int = MIN_NEW,
                 retrain_wait: float = RETRAIN_WAIT, fine_tune: str = "process", cpu_budget: float | None = None,
                 retry_after: float = RETRY_AFTER, steps: int = FINETUNE_STEPS):
        if fine_tune not in ("process", "thread"):
            raise ValueError(f"fine_tune must be 'process' or 'thread', got {fine_tune!r}")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be at least 1 attempt, got {budget}")
        self.index = index
        self.emit = emit
        self.retrain = retrain
        if cpu_budget is not None and cpu_budget <= 0:
            raise ValueError(f"cpu_budget must be a positive number of CPU seconds per hour, got {cpu_budget}")
        self.budget = ATTEMPTS if budget is None else int(budget)
        self.cpu_budget = cpu_budget
        self.retry_after = retry_after
        self.steps = steps
        self._spent: list[tuple[float, float]] = []  # (monotonic end, CPU seconds) of this run's attempts
        self._ended = time.monotonic()  # when the last attempt ended
        self._budget_waiting = False
        self.keep = keep
        self.min_new = min_new
        self.retrain_wait = retrain_wait
        self.fine_tune = fine_tune
        self._monitor: drift.DriftMonitor | None = None
        self._episode: dict[str, Any] = {"state": "stable", "since_image_id": None, "attempts": 0}
        self._opened = time.monotonic()  # when the open episode's alarm came (or adaptation resumed)
        self._build: threading.Thread | None = None
        self._build_outcome: dict[str, Any] | None = None
        self._build_stop = threading.Event()

    @property
    def state(self) -> str:
        """The episode: ``stable``, ``drifting``, ``adapting`` (a fine-tune is running) or ``unresolved``."""
        if self._build is not None:
            return "adapting"
        return "drifting" if self._episode["state"] == "adapting" else self._episode["state"]

    @property
    def building(self) -> bool:
        return self._build is not None

    def warm(self) -> None:
        """Resume where the store's log leaves off: the episode (:func:`episode`), and the monitor
        fed what the last run would have seen — the active version's scores since the last drift
        alarm or version switch (at most :data:`WARM_SCORES`), in the cool-down of that alarm if
        the last run raised one."""
        events = self.index.catalog.events()
        self._episode = episode(events)
        self._opened = time.monotonic()
        after, alarmed = 0, False
        for e in events:
            if e["kind"] in ("activated", "rollback", "drift") and e["image_id"] is not None:
                after, alarmed = int(e["image_id"]), e["kind"] == "drift"
        s = self.index.catalog.score_stream(after=after, last=WARM_SCORES)
        active = self.index.active_version
        scores = {i: (v, z) for i, v, z in zip(s["id"].tolist(), s["version"].tolist(), s["score"].tolist()) if v == active}
        self._monitor = drift.DriftMonitor(version=active, normaliser=self.index.normaliser(active))
        if alarmed:  # the last run was in the cool-down after that alarm, as this one is now
            self._monitor.cool_down()
        self.feed([(i, None) for i in scores], scores, replay=True)

    def feed(self, items, scores: dict[int, tuple[int, float]], *, replay: bool = False) -> None:
        """Feed stored images, ``(id, path)`` in arrival order, with their ``(version, score)``
        (``replay``: scores already seen by an earlier run, which raise no new alarm)."""
        for image_id, path in items:
            if image_id not in scores:
                continue
            version, score = scores[image_id]
            if self._monitor is None or self._monitor.version != version:
                self._monitor = drift.DriftMonitor(version=version, normaliser=self.index.normaliser(version))
            alarm = self._monitor.update(score, image_id=image_id, path=path)
            if alarm is not None and not replay:
                self._on_alarm(alarm, version)

    def _record(self, kind: str, **detail: Any) -> dict[str, Any]:
        catalog = self.index.catalog  # image_id: where in the stream it happened (the drift plot)
        catalog.add_event(kind, version=self.index.active_version, image_id=catalog.max_image_id() or None, detail=detail)
        event = {"event": kind, **detail, "time": time.time()}
        self.emit(event)
        return event

    def _on_alarm(self, alarm: drift.Alarm, version: int) -> None:
        path = alarm.path
        if path is None and alarm.image_id is not None:
            path = (self.index.get(alarm.image_id) or {}).get("path")
        detail = {"detector": alarm.detector, "score": round(alarm.score, 4), "statistic": round(alarm.statistic, 4),
                  "change_image_id": alarm.change_image_id}
        self.index.catalog.add_event("drift", version=version, image_id=alarm.image_id, path=path, detail=detail)
        self.emit({"event": "drift", "version": version, "id": alarm.image_id, "path": path, **detail,
                   "time": time.time()})
        if self._build is None and self._episode["state"] != "adapting":  # the newest change is what to adapt to
            self._episode = {"state": "drifting", "since_image_id": alarm.change_image_id or alarm.image_id,
                             "alarm_image_id": alarm.image_id, "attempts": 0}
            self._opened = time.monotonic()

    def cpu_spent(self) -> float:
        """CPU seconds this run's attempts used in the last hour."""
        hour_ago = time.monotonic() - 3600.0
        self._spent = [(t, c) for t, c in self._spent if t >= hour_ago]
        return sum(c for _, c in self._spent)

    def step(self, *, now: bool = False) -> None:
        """Report a fine-tune that finished, and start the next attempt of an open episode when its
        time has come (the first once :attr:`min_new` images arrived since the change or
        :attr:`retrain_wait` seconds passed — with ``now``, as soon as there are enough to train on;
        a retry once the images since the change have doubled since the last attempt, or
        :attr:`retry_after` seconds after it ended — with ``now``, at once), within the CPU budget."""
        from .versions import MIN_RECENT

        self.reap()
        ep = self._episode
        if not self.retrain or self._build is not None:
            return
        if ep["state"] == "stable":
            self._refine()
            return
        if ep["state"] not in ("drifting", "adapting"):
            return
        since = int(ep["since_image_id"] or 1)
        new = self.index.catalog.count_images_from(since)
        if new < MIN_RECENT:
            return
        if ep["attempts"] == 0:
            if not (now or new >= self.min_new or time.monotonic() - self._opened >= self.retrain_wait):
                return
        elif not (now or new >= 2 * int(ep.get("last_attempt_images") or 0)
                  or time.monotonic() - self._ended >= self.retry_after):
            return
        if self._within_budget():
            self._start(since, new)

    def _refine(self) -> None:
        """After a promoted attempt the new data keeps coming: fine-tune the new version again on
        every image since the change once they have doubled since it was trained, up to
        :data:`REFINEMENTS` times; a refinement the gate rejects means it has converged."""
        ref = self._episode.get("refine")
        if not ref or ref["count"] >= REFINEMENTS:
            return
        new = self.index.catalog.count_images_from(int(ref["since"]))
        if new >= 2 * int(ref["images"]) and self._within_budget():
            self._start(int(ref["since"]), new, refinement=ref["count"] + 1)

    def _within_budget(self) -> bool:
        """Whether the CPU budget leaves room for an attempt now (once per wait, a ``budget_wait`` event)."""
        if self.cpu_budget is not None and self.cpu_spent() >= self.cpu_budget:
            if not self._budget_waiting:
                self._budget_waiting = True
                oldest = min(t for t, _ in self._spent)
                self.emit({"event": "budget_wait", "cpu_seconds": round(self.cpu_spent(), 1),
                           "cpu_budget": self.cpu_budget, "resume_in": round(oldest + 3600.0 - time.monotonic(), 1),
                           "time": time.time()})
            return False
        self._budget_waiting = False
        return True

    def _start(self, since: int, images: int, *, refinement: int | None = None) -> None:
        ep = self._episode
        if refinement is None:
            attempt = ep["attempts"] + 1
            how = recipe(attempt, self.budget, self.steps)  # a stronger recipe each time
            ep.update(state="adapting", attempts=attempt, last_attempt_images=images)
            self._record("retraining", since=since, images=images, attempt=attempt, budget=self.budget, **how)
        else:
            attempt = None
            how = recipe(1, self.budget, self.steps)  # the same fine-tune, on more of the new data
            ep.update(state="adapting", since_image_id=since, refining=refinement, last_attempt_images=images)
            self._record("retraining", since=since, images=images, refinement=refinement, **how)

        from .versions import BuildCancelled
        from .workers import workers_allowed

        in_process = self.fine_tune == "process" and workers_allowed()

        def work():
            try:
                if in_process:
                    r = self._retrain_in_child(since=since, **how)
                else:
                    cpu = time.process_time()  # the whole process's: ingest's share too
                    r = dataclasses.asdict(self.index.retrain(since=since, reason="drift", keep=self.keep,
                                                              stop=self._build_stop, **how))
                    r["cpu_seconds"] = time.process_time() - cpu
                self._build_outcome = {"event": r["state"] if r["state"] == "rejected" else "activated",
                                       "version": r["version"], "seconds": round(r["seconds"], 2),
                                       "cpu_seconds": round(r["cpu_seconds"], 1),
                                       "validation": r["validation"], "attempt": attempt,
                                       **({"reason": r["rejected_because"]} if r["rejected_because"] else {})}
            except BuildCancelled:
                self._build_outcome = {"event": "build_cancelled", "attempt": attempt}
            except Exception as e:  # noqa: BLE001 - reported as an event; ingest goes on
                self._build_outcome = {"event": "build_failed", "reason": f"{type(e).__name__}: {e}", "attempt": attempt}
            finally:
                if refinement is not None:
                    self._build_outcome = {**(self._build_outcome or {}), "refinement": refinement}
                if "cpu_seconds" not in (self._build_outcome or {}):
                    self._build_outcome = {**(self._build_outcome or {}), "cpu_seconds": round(time.monotonic() - wall, 1)}

        wall = time.monotonic()

        self._build = threading.Thread(target=work, name="streamsim-retrain", daemon=True)
        self._build.start()

    def _retrain_in_child(self, **kw) -> dict[str, Any]:
        """Run the fine-tune in a worker process at a lower priority (:data:`FINE_TUNE_NICE`), so
        that it takes the cores only when ingest and searches leave them; the worker builds and
        switches the new version in the store itself, and this process picks it up at its next
        search or store. A worker that dies or is cancelled leaves a half-built version, discarded
        here at once."""
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures.process import BrokenProcessPool

        from .versions import BuildCancelled
        from .workers import kill_pool, process_pool

        pool = process_pool(1, nice=FINE_TUNE_NICE)
        try:
            future = pool.submit(retrain_in_worker, str(self.index.root), keep=self.keep, **kw)
            while True:
                try:
                    return future.result(timeout=0.2)
                except FutureTimeout:
                    if self._build_stop.is_set():
                        kill_pool(pool)
                        self.index.recover()
                        raise BuildCancelled("the fine-tune was cancelled") from None
                except BrokenProcessPool:
                    self.index.recover()
                    raise RuntimeError("the fine-tune's process died") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def reap(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """Report a fine-tune that has finished (with ``wait``, wait for a running one, up to
        ``timeout`` seconds)."""
        if self._build is None or (self._build.is_alive() and not wait):
            return
        self._build.join(timeout)
        if self._build.is_alive():
            return
        self._build = None
        self._ended = time.monotonic()
        outcome, self._build_outcome = self._build_outcome or {"event": "build_failed", "reason": "unknown"}, None
        self._spent.append((self._ended, float(outcome.get("cpu_seconds") or 0.0)))
        if outcome["event"] == "build_cancelled":
            # recorded for the episode (the build itself recorded its failure as build_failed)
            self.index.catalog.add_event("build_cancelled", version=self.index.active_version,
                                         detail={"attempt": outcome.get("attempt")})
        self.emit({**outcome, "time": time.time()})
        ep = self._episode
        stable = {"state": "stable", "since_image_id": None, "alarm_image_id": None, "attempts": 0}
        if outcome["event"] == "activated":
            self._episode = {**stable, "refine": {"since": ep["since_image_id"], "images": ep["last_attempt_images"],
                                                  "count": ep.get("refining", 0)}}
        elif ep.get("refining"):
            self._episode = stable  # the gate found nothing better: refined enough
        elif ep["attempts"] >= self.budget:
            ep["state"] = "unresolved"
            self._record("unresolved", since=ep["since_image_id"], attempts=ep["attempts"], advice=UNRESOLVED_ADVICE)
        else:
            ep["state"] = "drifting"

    def stop(self) -> None:
        """Cancel a running fine-tune (a failed attempt; the active version keeps serving)."""
        if self._build is not None:
            self._build_stop.set()
            self.reap(wait=True)
            self._build_stop.clear()
