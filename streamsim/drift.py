"""Drift in reconstruction error: the normalised score and small streaming detectors.

**The score.** Raw reconstruction error (mean binary cross-entropy) grows with the amount of ink:
a new alphabet of thin letters can score *lower* than the training digits. Each encoder version
therefore records, on its reference sample, a fit of ``log(error)`` against ``log(ink)``; an
image's score is its residual from that fit in units of the reference residuals' standard
deviation. On images like the reference the score has mean 0 and standard deviation 1; an
unfamiliar script sits higher (see ``docs/benchmarks.md``).

**The detectors** watch the stream of scores. Each is a small class: ``update(x) -> self``, a
``drift_detected`` property (true on the update that raised the alarm), ``change_point`` (how many
updates ago the change is estimated to have begun) and a reset after each alarm followed by a
``cooldown`` during which no alarm is raised, so that one change raises one alarm:

- :class:`CUSUM` — Page's cumulative sum of ``x - reference - slack`` against the calibrated
  reference (mean 0), so it also fires when a stream is unfamiliar from its very first image;
- :class:`KSWindow` — a one-sided Kolmogorov–Smirnov test of the last ``window`` scores against the
  reference distribution (the quantiles recorded with the version), every ``step`` scores;
- :class:`PageHinkley` — the Page–Hinkley test against the stream's own running mean (it sees
  changes within a stream, not a stream that starts unfamiliar).

After an alarm the reference-based detectors take the scores seen during the cooldown as their new
reference (the store may keep its version when a fine-tune is rejected; the same shift must not
alarm again and again). The defaults are calibrated with :func:`calibrate_threshold` so that on
scores like the reference the mean run between false alarms is well over ``FALSE_ALARM_RUN``
images (``bench/bench_drift.py`` measures it on real held-out digits).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> stream = np.concatenate([rng.normal(0, 1, 2000), rng.normal(1.5, 1, 500)])
    >>> det = CUSUM()
    >>> [i for i, x in enumerate(stream) if det.update(x).drift_detected]
    [2020]
"""

from __future__ import annotations

import collections
import functools
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FALSE_ALARM_RUN = 10_000  # images: the budget, a mean run between false alarms of at least this
COOLDOWN = 500  # updates after an alarm during which no alarm is raised
_INK_FLOOR = 1e-3
_ERROR_FLOOR = 1e-6


# -- the normalised score --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """Turns (reconstruction error, ink) into the normalised drift score of one encoder version.

    ``score = (log(error) - intercept - slope * log(ink)) / scale``, fitted on a reference sample.
    ``quantiles`` are the reference scores' quantiles at ``QUANTILE_LEVELS`` (for :class:`KSWindow`).
    """

    intercept: float
    slope: float
    scale: float
    quantiles: tuple[float, ...] = ()
    two_sided: bool = False  # fitted on the stream as it is now: a drop of the score is a change too
    images: int = 0  # the size of a two-sided reference sample (its mean is known to about 1/sqrt(images))

    QUANTILE_LEVELS = tuple(np.linspace(0.0, 1.0, 101))

    @classmethod
    def fit(cls, errors: np.ndarray, ink: np.ndarray) -> "Normaliser":
        """Fit on a reference sample's per-image errors and ink fractions (at least 10 images)."""
        e, i = _logs(errors, ink)
        if len(e) < 10:
            raise ValueError(f"the drift reference needs at least 10 images, got {len(e)}")
        design = np.stack([np.ones_like(i), i], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, e, rcond=None)
        resid = e - design @ np.array([a, b])
        scale = float(resid.std()) or 1.0
        q = np.quantile(resid / scale, cls.QUANTILE_LEVELS)
        return cls(float(a), float(b), scale, tuple(round(float(x), 5) for x in q))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Normaliser":
        """The normaliser recorded with a version (``meta["drift_reference"]``). A version made
        before it was recorded falls back to its error-per-ink statistics."""
        ref = meta.get("drift_reference")
        if ref:
            return cls(ref["intercept"], ref["slope"], ref["scale"], tuple(ref.get("quantiles", ())),
                       bool(ref.get("two_sided", False)), int(ref.get("images", 0)))
        per_ink = meta.get("reference", {}).get("error_per_ink", {})
        mean, std = float(per_ink.get("mean", 1.0)), float(per_ink.get("std", 1.0)) or 1.0
        # log(error / ink) ≈ log(mean) with a relative spread of std / mean
        return cls(math.log(max(mean, _ERROR_FLOOR)), 1.0, max(std / max(mean, _ERROR_FLOOR), 1e-3))

    def to_dict(self) -> dict[str, Any]:
        return {"intercept": self.intercept, "slope": self.slope, "scale": self.scale,
                "quantiles": list(self.quantiles), "two_sided": self.two_sided, "images": self.images,
                "formula": "(log(error) - intercept - slope*log(ink)) / scale"}

    def score(self, errors: np.ndarray, ink: np.ndarray) -> np.ndarray:
        """Normalised scores (float64 ``[N]``) of images with these errors and ink fractions."""
        e, i = _logs(errors, ink)
        return (e - self.intercept - self.slope * i) / self.scale


def _logs(errors, ink) -> tuple[np.ndarray, np.ndarray]:
    e = np.log(np.maximum(np.asarray(errors, np.float64), _ERROR_FLOOR))
    i = np.log(np.maximum(np.asarray(ink, np.float64), _INK_FLOOR))
    return e, i


def ink(pixels: np.ndarray) -> np.ndarray:
    """Fraction of ink of normalised uint8 pixels ``[N, 28, 28]`` (mean intensity / 255)."""
    return np.asarray(pixels).reshape(len(pixels), -1).mean(axis=1) / 255.0


# -- detectors --------------------------------------------------------------------------------


class _Detector:
    """Shared alarm, reset and cooldown plumbing. Subclasses implement ``_step(x) -> bool``."""

    def __init__(self, *, cooldown: int = COOLDOWN):
        if cooldown < 0:
            raise ValueError(f"cooldown must be >= 0, got {cooldown}")
        self.cooldown = int(cooldown)
        self.n = 0  # updates seen
        self.alarms = 0
        self.change_point: int | None = None  # after an alarm: how many of the last updates are changed
        self.statistic = 0.0  # the test statistic now
        self.alarm_statistic = 0.0  # the statistic when the last alarm fired
        self._detected = False
        self._cool = 0
        self._cool_seen: list[float] = []
        self._reset()

    @property
    def drift_detected(self) -> bool:
        """True on the update that raised an alarm."""
        return self._detected

    def update(self, x: float) -> "_Detector":
        x = float(x)
        self.n += 1
        self._detected = False
        if not math.isfinite(x):
            return self
        if self._cool > 0:
            self._cool -= 1
            self._cool_seen.append(x)
            self._during_cooldown(x)
            if self._cool == 0:
                self._rebaseline(np.asarray(self._cool_seen))
                self._cool_seen = []
            return self
        if self._step(x):
            self._detected = True
            self.alarms += 1
            self.change_point = self._since_change()
            self.alarm_statistic = self.statistic
            self._reset()
            self._cool = self.cooldown
        return self

    # hooks
    def _reset(self) -> None:
        raise NotImplementedError

    def _step(self, x: float) -> bool:
        raise NotImplementedError

    def _since_change(self) -> int:
        raise NotImplementedError

    def _during_cooldown(self, x: float) -> None:
        self._step(x)  # keep learning, never alarm

    def _rebaseline(self, seen: np.ndarray) -> None:
        self._reset()


class CUSUM(_Detector):
    """Page's one-sided CUSUM: ``s = max(0, s + x - reference - slack)``, alarm when ``s > threshold``.

    ``reference`` starts at 0 (the calibrated mean of the score) and becomes the mean of the
    cooldown's scores after an alarm. The change is estimated to begin where ``s`` last left 0.

    >>> det = CUSUM(threshold=5.0)
    >>> [i for i, x in enumerate([0.0] * 10 + [2.0] * 10) if det.update(x).drift_detected]
    [12]
    >>> det.change_point  # the last three updates (10, 11, 12) are the change
    3
    """

    def __init__(self, *, slack: float = 0.25, threshold: float = 20.0, reference: float = 0.0,
                 cooldown: int = COOLDOWN):
        self.slack, self.threshold, self.reference = float(slack), float(threshold), float(reference)
        super().__init__(cooldown=cooldown)

    def _reset(self) -> None:
        self.s = 0.0
        self._last_zero = self.n

    def _step(self, x: float) -> bool:
        self.s = self.statistic = max(0.0, self.s + x - self.reference - self.slack)
        if self.s == 0.0:
            self._last_zero = self.n
        return self.s > self.threshold

    def _since_change(self) -> int:
        return self.n - self._last_zero

    def _during_cooldown(self, x: float) -> None:
        pass

    def _rebaseline(self, seen: np.ndarray) -> None:
        if len(seen):
            self.reference = float(seen.mean())
        self._reset()


class PageHinkley(_Detector):
    """The Page–Hinkley test for an increase of the mean, against the running mean of the stream
    since the last reset: ``m += x - mean - delta``, alarm when ``m - min(m) > threshold``.

    >>> det = PageHinkley(threshold=10.0)
    >>> stream = [0.0, 0.1] * 50 + [3.0] * 20
    >>> [i for i, x in enumerate(stream) if det.update(x).drift_detected]
    [103]
    """

    def __init__(self, *, delta: float = 0.25, threshold: float = 22.0, min_instances: int = 100,
                 cooldown: int = COOLDOWN):
        self.delta, self.threshold, self.min_instances = float(delta), float(threshold), int(min_instances)
        super().__init__(cooldown=cooldown)

    def _reset(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m = 0.0
        self.m_min = 0.0
        self._at_min = self.n

    def _step(self, x: float) -> bool:
        self.count += 1
        self.mean += (x - self.mean) / self.count
        self.m += x - self.mean - self.delta
        if self.m < self.m_min:
            self.m_min, self._at_min = self.m, self.n
        self.statistic = self.m - self.m_min
        return self.count >= self.min_instances and self.statistic > self.threshold

    def _since_change(self) -> int:
        return self.n - self._at_min


class KSWindow(_Detector):
    """One-sided Kolmogorov–Smirnov test of the last ``window`` scores against a reference
    distribution (its ``quantiles`` at evenly spaced levels; default: the standard normal), every
    ``step`` updates. Alarm when the recent scores are larger than the reference by
    ``D+ = max(F_ref(x) - F_recent(x)) > threshold``.

    >>> rng = np.random.default_rng(1)
    >>> det = KSWindow()
    >>> stream = np.concatenate([rng.normal(0, 1, 3000), rng.normal(1.0, 1, 400)])
    >>> [i for i, x in enumerate(stream) if det.update(x).drift_detected]
    [3069]
    """

    def __init__(self, *, quantiles: Sequence[float] = (), window: int = 200, step: int = 10,
                 threshold: float = 0.17, cooldown: int = COOLDOWN):
        if window < 10 or step < 1:
            raise ValueError(f"window must be >= 10 and step >= 1, got {window} and {step}")
        self.window, self.step, self.threshold = int(window), int(step), float(threshold)
        self.reference = np.asarray(quantiles if len(quantiles) else _normal_quantiles(), np.float64)
        self._levels = np.linspace(0.0, 1.0, len(self.reference))
        super().__init__(cooldown=max(cooldown, self.window))

    def _reset(self) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=self.window)

    def _step(self, x: float) -> bool:
        self.recent.append(x)
        if len(self.recent) < self.window or self.n % self.step:
            return False
        r = np.sort(np.fromiter(self.recent, np.float64, len(self.recent)))
        f_ref = np.interp(r, self.reference, self._levels)
        self.statistic = float(np.max(f_ref - np.arange(len(r)) / len(r)))
        return self.statistic > self.threshold

    def _since_change(self) -> int:
        return self.window

    def _during_cooldown(self, x: float) -> None:
        pass

    def _rebaseline(self, seen: np.ndarray) -> None:
        if len(seen) >= 10:
            self.reference = np.quantile(seen, self._levels)
        self._reset()


def _normal_quantiles(levels: int = 101) -> np.ndarray:
    from statistics import NormalDist

    p = np.clip(np.linspace(0.0, 1.0, levels), 1e-4, 1 - 1e-4)
    return np.asarray([NormalDist().inv_cdf(float(q)) for q in p])


class CUSUMLow(CUSUM):
    """The mirror of :class:`CUSUM`: an alarm when the score *drops* — the data became easier for
    the version than the stream its drift reference was measured on. Run for a version adapted to
    a change (its reference is the new data, :attr:`Normaliser.two_sided`), so that a second switch
    to something simpler (back to digits, or Latin letters after Chinese characters) is seen too.

    >>> det = CUSUMLow(threshold=5.0)
    >>> [i for i, x in enumerate([0.0] * 10 + [-2.0] * 10) if det.update(x).drift_detected]
    [12]
    """

    def _step(self, x: float) -> bool:
        return super()._step(2 * self.reference - x)


DETECTORS: dict[str, Callable[..., _Detector]] = {"cusum": CUSUM, "ks": KSWindow, "page_hinkley": PageHinkley,
                                                  "cusum_low": CUSUMLow}
DEFAULT_DETECTORS = ("cusum", "ks")


# -- calibration ------------------------------------------------------------------------------


def false_alarms(make: Callable[[], _Detector], stream: np.ndarray) -> int:
    """How many alarms a fresh detector raises over ``stream``."""
    det = make()
    return sum(det.update(x).drift_detected for x in stream)


def calibrate_threshold(make: Callable[[float], _Detector], reference: np.ndarray, *,
                        budget: int = FALSE_ALARM_RUN, length: int = 200_000, lo: float, hi: float,
                        seed: int = 0, iterations: int = 12) -> float:
    """The smallest threshold at which a detector made by ``make(threshold)`` raises at most
    ``length / budget`` alarms on a stream of ``length`` scores bootstrapped from ``reference``
    (a bisection between ``lo`` and ``hi``)."""
    rng = np.random.default_rng(seed)
    stream = rng.choice(np.asarray(reference, np.float64), size=length, replace=True)
    allowed = length // budget
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if false_alarms(functools.partial(make, mid), stream) <= allowed:
            hi = mid
        else:
            lo = mid
    return hi


# -- the monitor the watcher runs -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Alarm:
    """A drift alarm: which detector, at which image, and where the change is estimated to begin."""

    detector: str
    image_id: int | None
    path: str | None
    score: float
    change_image_id: int | None
    statistic: float


class DriftMonitor:
    """The detectors of one encoder version over the stream of its images' scores.

    >>> mon = DriftMonitor(version=1, normaliser=None)
    >>> alarms = [mon.update(2.0, image_id=i) for i in range(1, 200)]
    >>> [(a.detector, a.image_id) for a in alarms if a]
    [('cusum', 12)]
    """

    def __init__(self, *, version: int, normaliser: Normaliser | None,
                 detectors: Sequence[str] = DEFAULT_DETECTORS, cooldown: int = COOLDOWN, history: int = 20_000):
        unknown = [d for d in detectors if d not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown drift detector {unknown[0]!r}; choose from {', '.join(DETECTORS)}")
        self.version = version
        self.detectors: dict[str, _Detector] = {}
        if normaliser is not None and normaliser.two_sided and "cusum_low" not in detectors:
            detectors = (*detectors, "cusum_low")
        for name in detectors:
            if name == "ks" and normaliser is not None and normaliser.quantiles:
                self.detectors[name] = KSWindow(quantiles=normaliser.quantiles, cooldown=cooldown)
            elif name in ("cusum", "cusum_low") and normaliser is not None and normaliser.two_sided and normaliser.images:
                # a reference of a few held-out images knows its mean only to ~1/sqrt(n) spreads:
                # the slack grows by three of those, so a stationary stream raises no alarm from it
                self.detectors[name] = DETECTORS[name](cooldown=cooldown, slack=0.25 + 3.0 / math.sqrt(normaliser.images))
            else:
                self.detectors[name] = DETECTORS[name](cooldown=cooldown)
        self._ids: collections.deque[int | None] = collections.deque(maxlen=history)
        self._cool = 0
        self.cooldown = cooldown

    def cool_down(self) -> "DriftMonitor":
        """Start the cool-down that follows an alarm (no alarm for ``cooldown`` images), as a
        monitor resumed after one that raised an alarm must."""
        self._cool = self.cooldown
        return self

    def update(self, score: float, *, image_id: int | None = None, path: str | None = None) -> Alarm | None:
        """Feed one image's score; returns an :class:`Alarm` when a detector fires (at most one
        alarm per ``cooldown`` images, whichever detector fires first)."""
        self._ids.append(image_id)
        fired = None
        for name, det in self.detectors.items():
            if det.update(score).drift_detected and fired is None:
                fired = (name, det)
        if self._cool > 0:
            self._cool -= 1
            return None
        if fired is None:
            return None
        name, det = fired
        self._cool = self.cooldown
        back = max(1, min(det.change_point or 1, len(self._ids)))
        change_id = self._ids[-back]  # the first image of the change
        return Alarm(name, image_id, path, float(score), change_id, det.alarm_statistic)
