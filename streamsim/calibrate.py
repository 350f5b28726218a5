"""Per-version numbers computed when an encoder version is made, stored in its metadata.

- ``reference`` — reconstruction-error statistics on a reference sample;
- ``drift_reference`` — the fit that turns an image's reconstruction error and ink into its
  normalised drift score (:class:`streamsim.drift.Normaliser`), on the same sample;
- ``duplicate_threshold`` and ``duplicate_calibration`` — the rule by which ``duplicate`` search,
  ``similar`` search's near-duplicates-first ordering and dedup call a stored image a copy of the
  query: among the query's nearest stored images by code, one whose pixels, registered onto the
  query, leave an *excess* (:mod:`streamsim.verify`) at most ``threshold`` — calibrated on
  near-duplicates (shifts, noise, stray pixels, re-normalised like a re-scan) versus distinct
  images (``docs/search-modes.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .model import Encoder
from .search import unit

DISTINCT_RATE = 0.01  # at most this fraction of distinct images may have a neighbour within the threshold
COPY_QUANTILE = 0.99
POOL = 4000  # distinct neighbours are looked for among at most this many images
MISSED = 1e3  # the excess recorded for a copy whose original is not among its candidates
DUPLICATE_SAMPLE = 1000  # images (of the sample) whose copies and neighbours calibrate the duplicate rule


def perturbed_copies(pixels: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, list]:
    """Near-duplicates of uint8 pixels (:func:`streamsim.perturb.copies`: shifts, noise, stray
    pixels), passed through the same normalisation as any input: ``(pixels, frames)``."""
    from .perturb import copies, normalise_all

    return normalise_all(copies(pixels, seed=seed), pixels, frames=True)


def error_stats(errors: np.ndarray) -> dict[str, float]:
    e = np.asarray(errors, np.float64)
    q = np.quantile(e, [0.01, 0.05, 0.5, 0.95, 0.99])
    return {
        "count": len(e), "mean": float(e.mean()), "std": float(e.std()),
        "q01": float(q[0]), "q05": float(q[1]), "median": float(q[2]), "q95": float(q[3]), "q99": float(q[4]),
    }


def separating_threshold(copy_score: np.ndarray, distinct_score: np.ndarray) -> float:
    """The duplicate threshold from the copies' scores against their originals and the distinct
    images' scores against their closest other image (lower = more alike; ``inf`` = not found).

    Copies and distinct images apart (the copies' 99th percentile below the distinct images' 1st):
    the middle of that gap. Overlapping: the distinct images' 1st percentile, so that at most
    :data:`DISTINCT_RATE` of distinct images are called copies.

    Example:
        >>> round(separating_threshold(np.full(100, 0.01), np.full(100, 0.04)), 3)
        0.025
    """
    copy_q = float(np.quantile(np.asarray(copy_score, np.float64), COPY_QUANTILE))
    if len(distinct_score) == 0:
        return copy_q
    distinct_q = float(np.quantile(np.asarray(distinct_score, np.float64), DISTINCT_RATE))
    if copy_q < distinct_q:
        return 0.5 * (copy_q + distinct_q)
    return distinct_q


def calibrate(encoder: Encoder, pixels: np.ndarray, *, seed: int = 0, sample: int = 2000) -> dict[str, Any]:
    """Reference error statistics and the duplicate threshold for ``encoder`` on ``pixels``.

    ``pixels`` should be real, distinct images; ``sample`` of them are measured (the first
    :data:`DUPLICATE_SAMPLE` of those for the duplicate rule). The threshold separates the
    *excess* (:func:`streamsim.verify.scores`) of near-duplicates of sample images over their
    originals — each copy searched by code among up to :data:`POOL` of ``pixels``, its original
    included, and its candidates checked as a query's are — from the smallest excess of the sample
    images themselves over the *other* images of the pool (what a false duplicate would be).
    """
    from . import verify
    from .images import Frame

    rng = np.random.default_rng(seed)
    pool = pixels if len(pixels) <= POOL else pixels[np.sort(rng.choice(len(pixels), POOL, replace=False))]
    pick = np.sort(rng.choice(len(pool), min(sample, len(pool)), replace=False))
    pixels = pool[pick]
    codes, errors = encoder.encode_with_error(pixels)
    ink = pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0
    pool_u = unit(encoder(pool))
    dup = slice(0, min(DUPLICATE_SAMPLE, len(pixels)))
    own = pick[dup]

    def nearest(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = min(max(verify.CANDIDATES, verify.NOISY_CANDIDATES), d.shape[1])
        keys = np.argsort(d, axis=1, kind="stable")[:, :k]
        return keys, np.take_along_axis(d, keys, axis=1)

    # copies: the excess over their own original, when it is among the candidates checked
    copy_px, copy_frames = perturbed_copies(pixels[dup], seed=seed)
    keys, dist = nearest(1.0 - unit(encoder(copy_px)) @ pool_u.T)
    copy_rows = verify.check(copy_frames, keys, dist, lambda ids: pool[ids])
    copy_ex = np.array([min([e for key, _, _, e in row if key == own[i]], default=MISSED) for i, row in enumerate(copy_rows)])
    # distinct images: the smallest excess over any other stored image (exact pixel twins are identical, not near)
    d = 1.0 - unit(codes[dup]) @ pool_u.T
    where: dict[bytes, list[int]] = {}
    for j, p in enumerate(pool):
        where.setdefault(p.tobytes(), []).append(j)
    for i, p in enumerate(pixels[dup]):
        d[i, where.get(p.tobytes(), [])] = np.inf
    keys, dist = nearest(d)
    keys = np.where(np.isfinite(dist), keys, -1)
    rows = verify.check([Frame.of_pixels(p) for p in pixels[dup]], keys, dist, lambda ids: pool[ids])
    distinct_ex = np.array([min([e for *_, e in row], default=MISSED) for row in rows])
    threshold = separating_threshold(copy_ex, distinct_ex)
    from .drift import Normaliser

    q = lambda a, at: float(np.quantile(a, at))  # noqa: E731
    return {
        "drift_reference": Normaliser.fit(errors, ink).to_dict(),
        "reference": {
            "error": error_stats(errors),
            "error_per_ink": error_stats(errors / np.maximum(ink, 1e-3)),
            "ink": error_stats(ink),
        },
        "duplicate_threshold": threshold,
        "duplicate_calibration": {
            "method": verify.METHOD,
            "rule": (f"among the query's {verify.CANDIDATES} nearest stored images by code (within {verify.GATE:g}x the "
                     f"nearest one's distance; a noisy query's {verify.NOISY_CANDIDATES}, within {verify.NOISY_GATE:g}x), "
                     "those whose pixels, registered onto the query, leave an excess (per unit of edge energy) "
                     f"<= threshold (for a noisy query, only among those whose residual is within {verify.GAP:g} of the best "
                     f"one's; the best one alone up to {verify.NOISY_MARGIN:g} x threshold when it leads all others by that "
                     "much); threshold: the middle between the copies' "
                     f"q{COPY_QUANTILE * 100:.0f} and the distinct images' q{DISTINCT_RATE * 100:.0f} excess "
                     "when apart, else the latter"),
            "candidates": verify.CANDIDATES,
            "gate": verify.GATE,
            "noisy_candidates": verify.NOISY_CANDIDATES,
            "noisy_gate": verify.NOISY_GATE,
            "copy_recall": float(np.mean([any(c[0] == own[i] for c in verify.accepted(row, f, threshold))
                                          for i, (row, f) in enumerate(zip(copy_rows, copy_frames))])),
            "distinct_within": float(np.mean(distinct_ex <= threshold)),
            # the copies again, their own original removed from their candidates: noisy queries of
            # images the store does not hold (the check's weak spot, docs/search-modes.md)
            "noisy_distinct_within": float(np.mean([
                bool(verify.accepted([c for c in row if c[0] != own[i]], f, threshold))
                for i, (row, f) in enumerate(zip(copy_rows, copy_frames)) if f.sigma > 0] or [0.0])),
            "copy_excess_median": q(copy_ex, 0.5),
            "copy_excess_q95": q(copy_ex, 0.95),
            "copy_excess_q99": q(copy_ex, COPY_QUANTILE),
            "distinct_excess_q01": q(distinct_ex, DISTINCT_RATE),
            "distinct_excess_median": q(distinct_ex, 0.5),
            "sample": int(len(own)), "pool": len(pool), "seed": seed,
        },
    }


MIN_STORE_CALIBRATION = 100  # stored images, at least, to calibrate the duplicate rule on a store
STORE_CALIBRATION_FLOOR = 0.5  # a store's own calibration may lower the version's threshold to this share, not below


def calibrate_store(store, *, version: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Recalibrate a version's (default: the active one's) duplicate threshold on the store's own
    images (see :meth:`streamsim.index.Index.calibrate_duplicates`), record it with the version,
    return it. Every new version is calibrated so before it is switched to, where the store holds
    at least :data:`MIN_STORE_CALIBRATION` images (:func:`streamsim.versions.complete`)."""
    import time

    from . import verify
    from .search import version_threshold
    from .store import StoreError

    version = store.active_version if version is None else int(version)
    ids = store.catalog.ids()
    if len(ids) < MIN_STORE_CALIBRATION:
        raise StoreError(f"calibrating on the store needs at least {MIN_STORE_CALIBRATION} stored images; "
                         f"it holds {len(ids)}")
    pick = np.sort(np.random.default_rng(seed).choice(ids, min(POOL, len(ids)), replace=False))
    cal = calibrate(store.encoder(version), store.catalog.pixels(pick.tolist()), seed=seed)
    base = version_threshold(store, version)
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
    store.catalog.update_version_meta(version, store_calibration=record, duplicate_threshold=record["threshold"])
    store.catalog.add_event("calibrated", version=version, detail={k: record[k] for k in ("threshold", "measured", "images")})
    return record


AUTO_CALIBRATION = 1000  # stored images from which a store calibrates its active version by itself ...
AUTO_GROWTH = 2.0  # ... and again each time it has grown this many times since, until its pool is full
AUTO_RETRY = 1.25  # after a failed calibration, tried again once the store has grown this many times


def calibration_due(store) -> bool:
    """Whether the active version should be calibrated on the store's own images now: the store
    holds at least :data:`AUTO_CALIBRATION` images, and the version was not calibrated on it yet —
    or was, on fewer than 1 / :data:`AUTO_GROWTH` of the images it holds now and on fewer than a
    full :data:`POOL` (beyond which a calibration measures the same thing again)."""
    from .search import store_calibration

    own = store_calibration(store, store.active_version)
    had = 0 if own is None else int(own.get("images", 0))
    if had >= POOL:
        return False
    return store.catalog.count_images() >= max(AUTO_CALIBRATION, AUTO_GROWTH * had if own is not None else 0)


def auto_calibrate(store):
    """Start calibrating the active version on the store's own images (:func:`calibrate_store`)
    in a background thread when :func:`calibration_due` — ingest goes on meanwhile, and searches
    use the rule in force until the new one is recorded. Returns the
    thread calibrating now (this one or one already running), or None. A store too small is left
    on the version's own threshold (calibrated on its training data). A failed calibration is an
    event (``calibration_failed``, with the reason) and is tried again once the store has grown by
    a quarter (:data:`AUTO_RETRY`) in this process. Called by every ingest that stored something
    (:func:`streamsim.ingest.store_images`)."""
    import threading

    running = getattr(store, "calibrating", None)
    if running is not None and running.is_alive():
        return running
    failed = getattr(store, "calibration_failed_at", None)
    if failed is not None and store.catalog.count_images() < AUTO_RETRY * failed:
        return None
    if not calibration_due(store):
        return None
    version = store.active_version

    def run() -> None:
        try:
            calibrate_store(store, version=version)
            store.calibration_failed_at = None
        except Exception as e:  # noqa: BLE001 - a failed calibration leaves the rule in force; say why
            store.calibration_failed_at = store.catalog.count_images()
            store.catalog.add_event("calibration_failed", version=version, detail={"reason": f"{type(e).__name__}: {e}"})

    store.calibrating = threading.Thread(target=run, name="streamsim-calibrate", daemon=True)
    store.calibrating.start()
    return store.calibrating
