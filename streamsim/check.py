"""Is a store whole? What ``streamsim check`` and :meth:`Index.check` look at.

:func:`inspect` only reads: the catalog's own integrity, every version's checkpoint against the
hash the catalog recorded for it, the active version's vectors against the catalog's images,
versions left half-built, and the journal against the catalog. Each problem found is a
:class:`Problem`; ``repairable`` says whether :meth:`Index.check` with ``repair=True`` can
derive what is missing (vectors from the stored pixels, a dead build discarded, a journal row
dropped so the file is taken again, the shipped encoder copied afresh) — it never deletes a
user's images, paths or checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from . import encoders
from .catalog import Catalog
from .store import CHECKPOINT_HASH, checkpoint_digest, encoder_dir, try_lock, vectors_path
SERVED = ("ready", "active", "retired")  # states whose checkpoint must be whole


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: ``kind`` (a short name), ``detail`` (one line, for people),
    the ``version`` it concerns (if any), and whether a repair can fix it."""

    kind: str
    detail: str
    version: int | None = None
    repairable: bool = False
    paths: tuple[str, ...] = ()  # journal paths, for kind "journal"

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "detail": self.detail, "version": self.version, "repairable": self.repairable}
        if self.paths:
            out["paths"] = list(self.paths)
        return out


def inspect(root: Path, catalog: Catalog) -> tuple[list[Problem], list[str]]:
    """The problems of the store at ``root`` and notes (things worth knowing that are not wrong)."""
    problems: list[Problem] = []
    notes: list[str] = []
    for line in catalog.integrity()[:5]:
        problems.append(Problem("catalog", f"the catalog's database is damaged: {line}"))
    versions = catalog.versions()
    active = catalog.active_version()
    if active is None:
        problems.append(Problem("active", "no active encoder version", repairable=False))
    building = [v["version"] for v in versions if v["state"] == "building"]
    if building:
        lock, holder = try_lock(Path(root) / "build.lock")
        if lock is None:
            notes.append(f"version {building[-1]} is being built now (pid {holder})")
        else:
            lock.close()
            for v in building:
                problems.append(Problem("half_built", f"version {v} was left building by a process that stopped",
                                        v, repairable=True))
    for v in versions:
        if v["state"] in SERVED:
            problems += _checkpoint_problems(root, v, notes)
    if active is not None and not any(p.kind == "checkpoint" and p.version == active for p in problems):
        problems += _vector_problems(root, catalog, active, notes)
    dangling = catalog.dangling_journal()
    if dangling:
        paths = tuple(r["path"] for r in dangling)
        problems.append(Problem("journal", f"{len(paths)} journalled files name an image the catalog never stored "
                                           f"(first: {paths[0]}); a repair lets the watcher take them again", repairable=True, paths=paths))
    return problems, notes


def _checkpoint_problems(root: Path, row: dict[str, Any], notes: list[str]) -> list[Problem]:
    v = int(row["version"])
    d = encoder_dir(root, v)
    if not encoders.is_complete(d):
        shipped = _is_shipped(row)
        return [Problem("checkpoint", f"version {v}'s checkpoint is missing or unfinished ({d})", v,
                        repairable=shipped)]
    recorded = row["meta"].get(CHECKPOINT_HASH)
    if recorded is None:
        notes.append(f"version {v}'s checkpoint has no recorded hash (a repair records it)")
        return []
    if checkpoint_digest(d) != recorded:
        return [Problem("checkpoint", f"version {v}'s checkpoint does not match its recorded hash: its files "
                                      "were changed; restore them from a backup, or roll back to another version",
                        v, repairable=_is_shipped(row))]
    return []


def _is_shipped(row: dict[str, Any]) -> bool:
    """Whether a version is a copy of the encoder this package ships (so a repair can copy it again)."""
    return row.get("reason") == "shipped" and row["meta"].get(CHECKPOINT_HASH) == shipped_digest()


@functools.lru_cache(maxsize=1)
def shipped_digest() -> str:
    """The hash of the encoder shipped in the package, as a store's copy of it is recorded."""
    return checkpoint_digest(encoders.shipped_dir())


def _vector_problems(root: Path, catalog: Catalog, version: int, notes: list[str]) -> list[Problem]:
    from .vectors import Vectors

    path = vectors_path(root, version)
    stored = catalog.ids()
    if not path.exists():
        if not len(stored):
            return []
        return [Problem("vectors", f"the active version {version} has no vector file ({path.name}); "
                                   f"{len(stored)} images are not searchable", version, repairable=True)]
    try:
        dim = int(encoders.read_meta(encoder_dir(root, version))["code_dim"])
        have = Vectors.open(path, dim).keys()
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        return [Problem("vectors", f"the active version {version}'s vector file cannot be read ({e})", version,
                        repairable=True)]
    missing = np.setdiff1d(stored, have)
    stray = np.setdiff1d(have, stored)
    out = []
    if len(missing):
        out.append(Problem("vectors", f"{len(missing)} stored images have no vector in version {version}'s index "
                                      f"(first: image {int(missing[0])})", version, repairable=True))
    if len(stray):
        out.append(Problem("vectors", f"version {version}'s index holds {len(stray)} keys of no stored image "
                                      f"(first: {int(stray[0])})", version, repairable=True))
    return out


def run(store, *, repair: bool = False) -> dict[str, Any]:
    """Whether the store is whole: ``{"ok", "problems", "repaired", "notes", "images",
    "active_version"}``, each problem ``{"kind", "detail", "version", "repairable"}``. With
    ``repair``, what can be derived is rebuilt — the active vectors from the catalog's pixels, a
    dead build discarded, journal rows that name no stored image dropped (the watcher takes those
    files again), the shipped encoder copied afresh — and the store checked again; ``problems``
    then lists what is still wrong. Never deletes an image, a path or a checkpoint (a damaged copy
    of the shipped encoder is moved aside)."""
    with store.lock:
        recorded = record_missing_hashes(store) if repair else []
        problems, notes = inspect(store.root, store.catalog)
        repaired: list[dict[str, Any]] = []
        for _ in range(3 if repair else 0):  # a repair may uncover more: vectors are inspected once
            fixable = [p for p in problems if p.repairable]  # their encoder is sound
            if not fixable:
                break
            for p in fixable:
                repair_one(store, p)
                repaired.append(p.to_dict())
            problems, notes = inspect(store.root, store.catalog)
    return {"ok": not problems, "problems": [p.to_dict() for p in problems], "repaired": repaired,
            "notes": recorded + notes, "images": store.catalog.count_images(),
            "active_version": store.catalog.active_version()}


def repair_one(store, problem: Problem) -> None:
    """Rebuild what ``problem`` lacks from what the store still has."""
    import os
    import time

    from . import versions

    if problem.kind == "half_built":
        versions.discard_dead_builds(store)
    elif problem.kind == "journal":
        store.catalog.forget_journal(problem.paths)
    elif problem.kind == "checkpoint":  # only the shipped encoder's is repairable
        d = encoder_dir(store.root, problem.version)
        if d.exists():
            os.replace(d, d.with_name(f".{d.name}.damaged-{int(time.time())}"))
        encoders.copy_shipped(d.parent, problem.version)
        store.forget(problem.version)
    elif problem.kind == "vectors":
        from .vectors import Vectors

        path = vectors_path(store.root, problem.version)
        with store.lock:
            if path.exists():
                try:
                    Vectors.open(path, store.encoder(problem.version).dim)
                except ValueError:  # unreadable: set it aside and build it afresh
                    os.replace(path, path.with_name(f".{path.name}.damaged-{int(time.time())}"))
            store.forget(problem.version)
            store.reconcile()


def record_missing_hashes(store) -> list[str]:
    """Record the checkpoint hash of versions that have none (made by an older release)."""
    notes = []
    for v in store.catalog.versions():
        d = encoder_dir(store.root, v["version"])
        if v["state"] in SERVED and CHECKPOINT_HASH not in v["meta"] and encoders.is_complete(d):
            store.catalog.update_version_meta(v["version"], **{CHECKPOINT_HASH: checkpoint_digest(d)})
            notes.append(f"recorded the hash of version {v['version']}'s checkpoint")
    return notes
