"""Versioned encoder checkpoints on orbax: save, load, list, metadata.

A store keeps one folder per encoder version under ``<store>/encoders/``::

    encoders/v0001/state/       orbax checkpoint of ``nnx.state(model)``
    encoders/v0001/meta.json    architecture, config, parent, training summary, losses,
                                reference reconstruction-error statistics, time
    encoders/v0001/weights.npz  a plain-array copy of the state for inference (its sha256 is in
                                meta.json; loaded without pickle, and only if the hash matches)
    encoders/v0001/reference.npz  up to 1,000 images of what the version was trained for

``meta.json`` is written last, atomically, after orbax has finished: a folder without it is an
unfinished save and is never loaded (it is removed by :func:`discard_incomplete`). Version 1 of
every store is a copy of the encoder shipped inside the package (``streamsim/checkpoints/v1``).

Numbers are never reused: the catalog hands them out, and this module refuses to overwrite a
finished version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .defaults import PIXELS_SHAPE

META = "meta.json"
REFERENCE = "reference.npz"  # a sample of what the version was trained for (replay, forgetting check)
STATE = "state"
WEIGHTS = "weights.npz"  # the same arrays as state/, for a fast start without importing orbax


class CheckpointError(ValueError):
    """A checkpoint folder is missing, unfinished or does not match its metadata."""


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{int(version):04d}"


def shipped_dir() -> Path:
    """The folder of the default encoder shipped inside the package."""
    return Path(str(resources.files("streamsim.checkpoints") / "v1"))


def is_complete(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / META).is_file() and (d / STATE).is_dir()


def read_meta(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    try:
        return json.loads((d / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d}: no {META}; the checkpoint is missing or unfinished") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / META}: unreadable metadata ({e})") from None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model, directory: str | Path, meta: dict[str, Any], *, reference: np.ndarray | None = None) -> Path:
    """Save ``nnx.state(model)`` with orbax, wait for it to finish, then write ``meta.json``.

    ``meta`` must name ``arch`` and ``config``. ``reference``: a sample of the images the version
    was trained for (uint8 ``[N, 28, 28]``), kept as ``reference.npz`` — later fine-tunes replay it
    and check against it that old material is not forgotten. Refuses to overwrite a finished
    checkpoint.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    d = Path(directory).absolute()
    if is_complete(d):
        raise CheckpointError(f"{d}: a finished checkpoint is already there; versions are never reused")
    for key in ("arch", "config"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata needs {key!r}")
    if d.exists():
        shutil.rmtree(d)  # an unfinished earlier attempt at this same version
    d.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(d / STATE, nnx.state(model))
    checkpointer.wait_until_finished()
    checkpointer.close()
    meta = {**meta, "weights_sha256": write_weights(model, d / WEIGHTS)}
    if reference is not None:
        np.savez_compressed(d / REFERENCE, images=np.ascontiguousarray(reference, np.uint8))
    _write_json_atomic(d / META, meta)
    return d


def load_reference(directory: str | Path) -> np.ndarray:
    """The reference sample kept with a checkpoint (uint8 ``[N, 28, 28]``; empty if there is none
    or it cannot be read)."""
    try:
        with np.load(Path(directory) / REFERENCE, allow_pickle=False) as f:
            x = f["images"]
    except (OSError, KeyError, ValueError):
        return np.zeros((0, *PIXELS_SHAPE), np.uint8)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != PIXELS_SHAPE:
        return np.zeros((0, *PIXELS_SHAPE), np.uint8)
    return x


def _flat_state(model) -> dict[str, Any]:
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def write_weights(model, path: Path) -> str:
    """Write the model's arrays to ``path`` (npz, atomically); returns the file's sha256."""
    import hashlib

    arrays = {k: np.asarray(v) for k, v in _flat_state(model).items()}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{f"a{i}": arrays[k] for i, k in enumerate(sorted(arrays))}, keys=np.array(sorted(arrays)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_weights(directory: str | Path, meta: dict[str, Any] | None = None) -> dict[str, np.ndarray] | None:
    """The arrays of ``weights.npz`` (keyed by their place in the model's state) if the file is
    there and its sha256 matches the metadata's; else ``None``. Numpy only (no pickle)."""
    import hashlib
    import io

    d = Path(directory)
    meta = read_meta(d) if meta is None else meta
    path = d / WEIGHTS
    if not path.is_file() or "weights_sha256" not in meta:
        return None
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta["weights_sha256"]:
        return None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            keys = [str(k) for k in z["keys"]]
            return {k: z[f"a{i}"] for i, k in enumerate(keys)}
    except (OSError, KeyError, ValueError):
        return None


def model_from_arrays(arch: str, config: dict[str, Any] | None, arrays: dict[str, np.ndarray]):
    """The Flax model of ``arch``/``config`` holding ``arrays`` (as :func:`read_weights` returns
    them), or ``None`` when they do not fit its state."""
    import jax
    from flax import nnx

    from . import model as M

    abstract = M.abstract(arch, config)
    graphdef, abstract_state = nnx.split(abstract)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    leaves = []
    for p, spec in paths:
        a = arrays.get(jax.tree_util.keystr(p))
        if a is None or a.shape != spec.shape or a.dtype != spec.dtype:
            return None
        leaves.append(a)
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, jax.device_put(leaves)))


def _load_weights(d: Path, meta: dict[str, Any]):
    """The model from ``weights.npz`` if present and its hash matches ``meta``; else ``None``."""
    arrays = read_weights(d, meta)
    return None if arrays is None else model_from_arrays(meta["arch"], meta["config"], arrays)


def load_encoder(directory: str | Path):
    """An encoder for inference and the checkpoint's metadata: a
    :class:`~streamsim.infer.NumpyEncoder` over ``weights.npz`` when it is there and whole (no JAX
    imported), else the :class:`~streamsim.model.Encoder` of :func:`load` (orbax)."""
    from .infer import NumpyEncoder, WeightsError

    d = Path(directory).absolute()
    meta = read_meta(d)
    arrays = read_weights(d, meta)
    if arrays is not None:
        try:
            return NumpyEncoder(meta["arch"], meta.get("config"), arrays), meta
        except (WeightsError, KeyError, ValueError):
            pass
    from .model import Encoder

    model, meta = load(d)
    return Encoder(model), meta


def load(directory: str | Path, *, fast: bool = True):
    """Load a finished checkpoint; returns ``(model, meta)``.

    With ``fast`` the plain-array copy (``weights.npz``) is used when its hash matches the
    metadata, which spares importing orbax; otherwise (or with ``fast=False``) orbax restores it.
    """
    d = Path(directory).absolute()
    meta = read_meta(d)
    if fast:
        model = _load_weights(d, meta)
        if model is not None:
            return model, meta
    import orbax.checkpoint as ocp
    from flax import nnx

    from . import model as M

    if not (d / STATE).is_dir():
        raise CheckpointError(f"{d}: no {STATE}/ folder; the checkpoint is incomplete")
    abstract = M.abstract(meta["arch"], meta["config"])
    graphdef, abstract_state = nnx.split(abstract)
    checkpointer = ocp.StandardCheckpointer()
    try:
        state = checkpointer.restore(d / STATE, abstract_state)
    except Exception as e:  # orbax raises many types; say which checkpoint failed and why
        raise CheckpointError(f"{d}: cannot restore encoder ({type(e).__name__}: {e})") from None
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, state), meta


def copy_shipped(root: str | Path, version: int = 1) -> Path:
    """Copy the shipped default encoder into ``root`` as ``version`` (atomic: copy, then rename)."""
    src = shipped_dir()
    if not is_complete(src):
        raise CheckpointError(f"{src}: the shipped encoder is missing from this installation")
    dst = version_dir(root, version)
    if is_complete(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.copying-"))
    try:
        shutil.copytree(src, tmp / "v", ignore=shutil.ignore_patterns("*.md", "__pycache__", "*.py"))
        if not is_complete(dst):  # another process may have finished the same copy first
            shutil.rmtree(dst, ignore_errors=True)
            try:
                os.replace(tmp / "v", dst)
            except OSError:
                if not is_complete(dst):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def list_versions(root: str | Path) -> list[int]:
    """Finished versions found on disk, ascending."""
    out = []
    for d in Path(root).glob("v[0-9]*"):
        if d.is_dir() and d.name[1:].isdigit() and is_complete(d):
            out.append(int(d.name[1:]))
    return sorted(out)


def discard_incomplete(root: str | Path) -> list[Path]:
    """Remove unfinished checkpoint folders (no ``meta.json``) and orbax temporaries."""
    removed = []
    for d in Path(root).glob("*"):
        if d.is_dir() and not is_complete(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed

