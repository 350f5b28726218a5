"""The store's folder: its layout, locks, file stats, and what ``status`` reports.

A store is a folder::

    catalog.sqlite          the source of truth (images, pixels, paths, versions, events)
    encoders/v0001/         orbax checkpoint + meta.json of each encoder version
    vectors/v0001.usearch   the vectors of each version, keyed by image id
    build.lock, watch.lock  one version build, one watcher at a time

Nothing here imports JAX: ``streamsim status`` answers from the catalog alone.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .defaults import DRIFT_WINDOW



class StoreError(ValueError):
    """The store cannot be opened or used as asked."""


def encoders_dir(root: Path) -> Path:
    return Path(root) / "encoders"


def encoder_dir(root: Path, version: int) -> Path:
    """The checkpoint folder of ``version``."""
    return encoders_dir(root) / f"v{int(version):04d}"


def vectors_dir(root: Path) -> Path:
    return Path(root) / "vectors"


def vectors_path(root: Path, version: int) -> Path:
    """The USearch file of ``version``."""
    return vectors_dir(root) / f"v{int(version):04d}.usearch"


def try_lock(path: Path):
    """Take an exclusive ``flock`` on ``path`` (created if missing) and write our pid in it.

    Returns ``(file, None)`` — the lock is held for as long as ``file`` stays open — or
    ``(None, holder)`` when another process holds it (``holder``: the pid it wrote)."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f, None


def lock_builds(root: Path):
    """Hold ``<store>/build.lock`` (one version build at a time per store) until closed."""
    f, holder = try_lock(Path(root) / "build.lock")
    if f is None:
        raise StoreError(f"{root}: an encoder version is being built already (pid {holder}); "
                         "wait for it (see `streamsim versions`)")
    return f


def file_stat(path: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file, or ``None`` if it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns)


def checkpoint_digest(directory: Path) -> str:
    """sha256 over a checkpoint folder's files (relative names and contents, sorted), so that a
    changed, added or removed file changes it (:func:`_not_checkpoint` files aside)."""
    d = Path(directory)
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file() and not _not_checkpoint(p.relative_to(d))):
        h.update(str(f.relative_to(d)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _not_checkpoint(rel: Path) -> bool:
    """Files beside a checkpoint that are not part of it: the package's own (the shipped folder's
    model card, Python files, caches), which a store's copy leaves out."""
    return rel.suffix in (".md", ".py", ".pyc") or "__pycache__" in rel.parts


def drift_summary(catalog: Catalog, window: int = DRIFT_WINDOW) -> dict[str, Any]:
    """The current drift score (mean normalised reconstruction score of the active version's
    latest ``window`` images; about 0 on images like its reference) and the latest alarm."""
    active = catalog.active_version()
    s = catalog.score_stream(last=window)
    mine = s["score"][s["version"] == active]
    alarms = [e for e in catalog.events() if e["kind"] == "drift"]
    last = alarms[-1] if alarms else None
    return {
        "score": round(float(mine.mean()), 4) if len(mine) else None,
        "window": int(len(mine)),
        "alarms": len(alarms),
        "last_alarm": {k: last[k] for k in ("time", "version", "image_id", "path")} if last else None,
    }


def status(root: str | os.PathLike, catalog: Catalog | None = None) -> dict[str, Any]:
    """What a store holds: ``store``, ``images``, ``files``, ``failed``, ``active_version``,
    ``drift`` (:func:`drift_summary`) and ``versions`` — read from the catalog alone (``catalog``:
    an open one, else the store's is opened read-only)."""
    root = Path(root).expanduser().absolute()
    if catalog is None:
        with Catalog.of_store(root, readonly=True) as cat:
            return status(root, cat)
    return {
        "store": str(root),
        "images": catalog.count_images(),
        "files": catalog.count_paths(),
        "failed": catalog.count_failures(),
        "active_version": catalog.active_version(),
        "drift": drift_summary(catalog),
        "versions": catalog.version_rows(),
    }


def events(root: str | os.PathLike, *, kinds: list[str] | None = None, last: int | None = None) -> list[dict[str, Any]]:
    """The store's event log, flattened: ``time``, ``kind``, ``version``, ``image_id``, ``path``
    and the event's details; only ``kinds`` if given, only the ``last`` n if given."""
    with Catalog.of_store(Path(root), readonly=True) as cat:
        rows = [{k: e[k] for k in ("time", "kind", "version", "image_id", "path")} | e["detail"]
                for e in cat.events() if not kinds or e["kind"] in kinds]
    return rows[-last:] if last else rows


def failures(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Files that could not be stored: ``path``, ``reason``, ``time``."""
    with Catalog.of_store(Path(root), readonly=True) as cat:
        return [{"path": r["path"], "reason": r["reason"], "time": r["time"]} for r in cat.failures()]
