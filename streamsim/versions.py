"""The version lifecycle: train a new encoder version, fine-tune with the validation gate,
re-encode every stored image into the version's own vectors, switch, roll back, prune.

A build holds ``<store>/build.lock`` and a ``building`` version row; any error (or a cancel)
marks the version ``failed`` and removes its files, and a build whose process died is found and
discarded on the next open (:func:`discard_dead_builds`). The active version keeps serving until
the switch, one catalog transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import encoders
from .defaults import FINETUNE_STEPS, GATE_MARGIN
from .images import PIXELS_SHAPE
from .store import CHECKPOINT_HASH, StoreError, checkpoint_digest, encoder_dir, lock_builds, summary, vectors_path

FINETUNE_LR = 5e-4
MIN_RECENT = 10  # images since the change needed to fine-tune at all
MIN_REPLAY = 256  # older images replayed at least (where the store has them)
REFERENCE_SAMPLE = 500  # older images held out to check that old material is not forgotten
REFERENCE_KEEP = 1000  # training images kept with each checkpoint (replayed and checked by fine-tunes)
FRESH_STEPS = 2400  # a fresh model after drift: about this many optimiser steps over the whole store
MIN_DRIFT_REFERENCE = 30  # held-out recent images, at least, to measure a new version's drift scores against
FRESH_MAX_EPOCHS = 100  # ... but not more passes over a small store than this
FRESH_MAX = 50_000  # stored images, at most, a fresh model trains on (a seeded sample beyond that)


class BuildCancelled(RuntimeError):
    """A version build was stopped before it finished (the version is recorded as failed)."""


@dataclass(frozen=True)
class RetrainResult:
    """What :func:`retrain` did: the version it made and its ``state`` (``active``, ``ready``
    or ``rejected``), the validation numbers, why it was rejected (else ``None``), and how long it took."""

    version: int
    state: str
    validation: dict[str, Any]
    rejected_because: str | None
    seconds: float

    @property
    def promoted(self) -> bool:
        return self.state in ("active", "ready")


def train(store, pixels: np.ndarray | None = None, *, epochs: int = 10, activate: bool = True,
          reason: str = "manual", arch: str | None = None, seed: int = 0, keep: int | None = None,
          progress: Callable[[int, int, dict], None] | None = None) -> int:
    """Train the next encoder version and build its index; returns the new version number.

    Fine-tunes from the active encoder on ``pixels`` (default: every stored image); with
    ``arch`` a fresh model of that architecture is trained instead. The new version's vectors
    are built from the catalog's pixels while the active version keeps serving, then (with
    ``activate``) it becomes active in one transaction. ``keep``: see :func:`prune`.
    """
    from . import train as T
    from .model import Encoder, build

    if pixels is None:
        pixels = np.concatenate([px for _, px in store.catalog.iter_pixels()] or [np.zeros((0, *PIXELS_SHAPE), np.uint8)])
    pixels = np.asarray(pixels, np.uint8)
    if len(pixels) == 0:
        raise StoreError("nothing to train on: the data (or the store) holds no images")
    parent = store.active_version
    with building(store, parent=parent, reason=reason) as version:
        if arch is None:
            model = clone_model(store.encoder(parent))
            arch_name, config = store.meta(parent)["arch"], store.meta(parent)["config"]
            cfg = parent_config(store.meta(parent), epochs=epochs, seed=seed)
        else:
            from .model import DEFAULT_CONFIGS
            arch_name, config = arch, dict(DEFAULT_CONFIGS.get(arch, {}))
            model = build(arch_name, config, seed=seed)
            cfg = T.TrainConfig(epochs=epochs, seed=seed)
        model, history = T.fit(model, pixels, cfg, progress=progress)
        enc = Encoder(model)
        meta = build_meta(enc, arch_name, config, pixels, history, cfg, parent=parent,
                          version=version, reason=reason, seed=seed)
        complete(store, version, enc, meta, activate=activate, keep=keep, reference=reference_sample(pixels, seed=seed))
    return version


def retrain(store, *, since: int | None = None, epochs: int | None = None, steps: int | None = None, replay: float = 1.0,
            margin: float = GATE_MARGIN, retrieval_margin: float | None = None, fresh: str | None = None,
            reason: str = "manual", activate: bool = True, keep: int | None = None, seed: int = 0,
            stop: threading.Event | None = None,
            progress: Callable[[int, int, dict], None] | None = None) -> "RetrainResult":
    """Fine-tune the active encoder on the images since a change, with a replay of older ones
    (or, with ``fresh``, train a fresh model of that architecture on the whole store), and promote
    the result only if it passes the validation gate (:mod:`streamsim.gate`).

    ``since``: the first image id of the change (default: :func:`change_start`). A fifth of
    those images is held out; the rest, plus ``replay`` times as many older images (at least
    ``MIN_REPLAY`` where the store has them), are the training set. Another sample of older
    images (up to ``REFERENCE_SAMPLE``) is the reference. The parent's own reference sample
    (kept with its checkpoint, see :func:`reference_sample`) is split in two: half is replayed
    too, half joins the reference, so a small store does not forget what the encoder knew. A
    fresh model trains on every stored image but the held-out ones (up to ``FRESH_MAX``), plus the
    replayed half. ``epochs`` defaults to about ``steps`` optimiser steps (default
    ``FINETUNE_STEPS``; ``FRESH_STEPS`` for a fresh model), however few the images; the objective
    and corruptions are the parent's (:func:`parent_config`).

    The gate (:func:`streamsim.gate.judge`) compares the candidate with the parent on the held-out
    recent images and the reference: self-retrieval of perturbed copies, neighbourhood agreement,
    reconstruction error; ``retrieval_margin`` (default ``gate.RETRIEVAL_MARGIN``) and ``margin``
    are its allowances. A rejected candidate is recorded as ``rejected`` with the numbers and the
    store keeps its version. Setting ``stop`` cancels the build (the version is recorded as ``failed``).
    """
    from . import gate
    from . import train as T
    from .model import ARCHITECTURES, DEFAULT_CONFIGS, UNKNOWN_ARCH_MSG, Encoder, build

    started = time.monotonic()
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if fresh is not None and fresh not in ARCHITECTURES:
        raise ValueError(UNKNOWN_ARCH_MSG.format(arch=fresh))
    retrieval_margin = gate.RETRIEVAL_MARGIN if retrieval_margin is None else float(retrieval_margin)
    since = change_start(store.catalog) if since is None else int(since)
    ids = store.catalog.ids()
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
    if fresh is None:
        replay_ids = pool[: min(len(pool), max(int(round(len(fit_ids) * replay)), MIN_REPLAY if replay > 0 else 0))]
    else:
        replay_ids = pool
        fit_ids = fit_ids[: max(FRESH_MAX // 2, FRESH_MAX - len(replay_ids))]
        replay_ids = replay_ids[: FRESH_MAX - len(fit_ids)]
    train_ids = np.sort(np.concatenate([fit_ids, replay_ids]))
    parent = store.active_version
    # what the parent was trained for (kept with its checkpoint): half replayed, half checked
    kept = encoders.load_reference(encoder_dir(store.root, parent))
    kept = kept[rng.permutation(len(kept))]
    kept_check, kept_replay = kept[: len(kept) // 2], kept[len(kept) // 2 :] if replay > 0 else kept[:0]
    with building(store, parent=parent, reason=reason) as version:
        pixels = np.concatenate([store.catalog.pixels(train_ids), kept_replay])
        meta_p = store.meta(parent)
        if fresh is None:
            arch, config = meta_p["arch"], meta_p["config"]
            model = clone_model(store.encoder(parent))
            cfg = parent_config(meta_p, seed=seed, learning_rate=FINETUNE_LR)
        else:
            arch, config = fresh, dict(DEFAULT_CONFIGS.get(fresh, {}))
            model = build(arch, config, seed=seed)
            cfg = parent_config(meta_p, seed=seed, learning_rate=T.TrainConfig().learning_rate)
        if epochs is None:
            budget = steps or (FRESH_STEPS if fresh else FINETUNE_STEPS)
            epochs = max(1, -(-budget // max(1, len(pixels) // cfg.batch_size)))
            if fresh and steps is None:
                epochs = min(epochs, FRESH_MAX_EPOCHS)  # a small store: each image seen often enough
        cfg = dataclasses.replace(cfg, epochs=epochs)

        def tick(epoch, total, metrics):
            if stop is not None and stop.is_set():
                raise BuildCancelled("the fine-tune was cancelled")
            if progress is not None:
                progress(epoch, total, metrics)

        model, history = T.fit(model, pixels, cfg, progress=tick)
        candidate = Encoder(model)
        val_px, ref_px = store.catalog.pixels(val_ids), np.concatenate([store.catalog.pixels(ref_ids), kept_check])
        verdict = gate.judge(store.encoder(parent), candidate, val_px, ref_px, margin=margin,
                             retrieval_margin=retrieval_margin, seed=seed)
        why = verdict.pop("why", None)
        validation = {
            "since_image_id": since, "recent_images": int(len(recent)), "trained_on_recent": int(len(fit_ids)),
            "replayed": int(len(replay_ids) + len(kept_replay)), "held_out_recent": int(len(val_ids)),
            "reference_images": int(len(ref_px)), "recipe": {"fresh": fresh, "arch": arch, "epochs": cfg.epochs,
                                                            "steps": int(cfg.epochs * max(1, len(pixels) // cfg.batch_size)),
                                                            "replay": replay, "images": int(len(pixels))},
            **verdict,
        }
        if not validation["passed"]:
            store.catalog.update_version_meta(version, validation=validation)
            store.catalog.set_version_state(version, "rejected")
            store.catalog.add_event("rejected", version=version, image_id=store.catalog.max_image_id() or None,
                                    detail={"why": why, **validation})
            return RetrainResult(version, "rejected", validation, why, time.monotonic() - started)
        meta = build_meta(candidate, arch, config, pixels, history, cfg, parent=parent,
                          version=version, reason=reason, seed=seed)
        meta["validation"] = validation
        if len(val_px) >= MIN_DRIFT_REFERENCE:
            # the new normal is the data since the change: its drift scores are measured against the
            # held-out recent images (never trained on), so a stream that goes on as it is raises no alarm
            from .drift import Normaliser

            errors = candidate.encode_with_error(val_px)[1]
            ink = val_px.reshape(len(val_px), -1).mean(axis=1) / 255.0
            meta["drift_reference"] = dataclasses.replace(Normaliser.fit(errors, ink), two_sided=True,
                                                          images=int(len(val_px))).to_dict()
            meta["drift_reference_sample"] = {"images": int(len(val_px)), "of": "held-out images since the change"}
        complete(store, version, candidate, meta, activate=activate, keep=keep, stop=stop,
                 reference=reference_sample(pixels, seed=seed))
    state = "active" if activate else "ready"
    return RetrainResult(version, state, validation, None, time.monotonic() - started)


def change_start(catalog) -> int:
    """The first image id of the newest unhandled change: the estimated change point of the
    last drift alarm after the last switch of version, or else the first image stored since
    that switch."""
    last_switch, start = None, None
    for e in catalog.events():
        if e["kind"] in ("activated", "rollback"):
            last_switch, start = e, None
        elif e["kind"] == "drift":
            start = e["detail"].get("change_image_id") or e["image_id"]
    if start is not None:
        return int(start)
    if last_switch is not None and last_switch.get("image_id") is not None:
        return int(last_switch["image_id"]) + 1
    return 1


@contextlib.contextmanager
def building(store, *, parent: int, reason: str):
    """Hold the store's build lock and a new version in state ``building``; on any error the
    version is marked ``failed`` and its partial files removed."""
    lock = lock_builds(store.root)
    try:
        version = store.catalog.new_version(state="building", parent=parent, reason=reason)
        try:
            yield version
        except BaseException as e:
            discard(store, version, f"{type(e).__name__}: {e}")
            raise
    finally:
        lock.close()


def discard(store, version: int, why: str) -> None:
    """Mark a ``building`` version ``failed`` (an event says ``why``) and remove its files."""
    info = store.catalog.version(version)
    if info is None or info["state"] != "building":
        return
    store.catalog.set_version_state(version, "failed")
    store.catalog.add_event("build_failed", version=version, detail={"why": why})
    vectors_path(store.root, version).unlink(missing_ok=True)
    shutil.rmtree(encoder_dir(store.root, version), ignore_errors=True)
    store.forget(version)


def discard_dead_builds(store) -> None:
    """Versions left ``building`` by a process that died: marked ``failed``, files removed."""
    building = [v["version"] for v in store.catalog.versions() if v["state"] == "building"]
    if not building:
        return
    try:
        lock = lock_builds(store.root)
    except StoreError:
        return  # a build is running in another process
    try:
        for version in building:
            discard(store, version, "the build was interrupted (the process stopped)")
    finally:
        lock.close()


def complete(store, version: int, enc, meta: dict[str, Any], *, activate: bool, keep: int | None,
             reference: np.ndarray, stop: threading.Event | None = None) -> None:
    """Save a trained version (its :class:`Encoder` and reference sample), build its vectors in
    the background of searches, switch."""
    from flax import nnx

    from .calibrate import MIN_STORE_CALIBRATION, calibrate_store

    encoders.save(nnx.merge(enc.graphdef, enc.state), encoder_dir(store.root, version), meta,
                  reference=reference)
    store.remember(version, enc, meta)
    if stop is not None and stop.is_set():
        raise BuildCancelled("the build was cancelled")
    # built while the active version keeps serving; images added meanwhile are caught up
    # when this version is switched to (now, or by a later rollback)
    store.sync_vectors(version)
    if store.catalog.count_images() >= MIN_STORE_CALIBRATION:  # duplicate mode stays right on the store's own images
        calibrate_store(store, version=version)
    with store.lock:
        store.catalog.update_version_meta(version, **summary(meta),
                                         **{CHECKPOINT_HASH: checkpoint_digest(encoder_dir(store.root, version))})
        store.catalog.set_version_state(version, "ready")
    if activate:
        store.switch(version, kind="activated")
    if keep is not None:
        prune(store, keep=keep)


def rollback(store, version: int, *, keep: int | None = None) -> None:
    """Make ``version`` (encoder and index together) active: older or newer than the active one
    (roll back or forward). Its index is rebuilt from the catalog's pixels if it was pruned,
    and caught up with images added since."""
    version = int(version)
    info = store.catalog.version(version)
    if info is None:
        raise StoreError(f"no encoder version {version}; see `streamsim versions`")
    if info["state"] in ("building", "rejected", "failed") or not encoders.is_complete(
            encoder_dir(store.root, version)):
        raise StoreError(f"encoder version {version} cannot be activated (state {info['state']}); "
                         "choose a ready, retired or active version from `streamsim versions`")
    previous = store.active_version
    store.switch(version, kind="rollback", detail={"from": previous})
    if keep is not None:
        prune(store, keep=keep)


def prune(store, *, keep: int) -> list[int]:
    """Delete the index files of all but the ``keep`` newest versions that have one; the active
    version and its parent always keep theirs. Checkpoints are never deleted (they are small),
    so a pruned (``retired``) version can be rolled back to: its index is rebuilt from pixels.
    Returns the versions retired."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    with store.lock:
        active = store.active_version
        rows = store.catalog.versions()
        parent = next((v["parent"] for v in rows if v["version"] == active), None)
        indexed = [v["version"] for v in rows if v["state"] in ("ready", "active") and vectors_path(store.root, v["version"]).exists()]
        kept = set(sorted(indexed)[-keep:]) | {active} | ({parent} if parent else set())
        retired = []
        for v in indexed:
            if v not in kept:
                vectors_path(store.root, v).unlink(missing_ok=True)
                store.catalog.set_version_state(v, "retired")
                store.catalog.add_event("retired", version=v, detail={"keep": keep})
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


def mean_error(encoder, pixels: np.ndarray) -> float:
    if len(pixels) == 0:
        return 0.0
    return float(np.mean(encoder.encode_with_error(pixels)[1]))


def clone_model(enc) -> Any:
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
