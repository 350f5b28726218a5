"""Flax ``nnx`` denoising autoencoders over 28×28 pixels; encode, reconstruct, per-image error.

No I/O lives here. An architecture is named by a string and a small config dict, both recorded in
every checkpoint so that any version can be rebuilt exactly:

- ``"dense"`` — the seed's autoencoder: ``Dense(784→code, relu)`` / ``Dense(code→784, sigmoid)``.
- ``"conv"`` — two strided convolutions to a linear code, mirrored by transposed convolutions.
- ``"mlp"`` — a dense encoder with one hidden layer and a linear code (fast on CPUs).

Inputs are float arrays ``[N, 28, 28]`` in ``[0, 1]`` (``pixels / 255``). ``__call__`` returns
*logits* of the reconstruction; apply ``jax.nn.sigmoid`` for pixel values. The hot encode path is
:class:`Encoder`, which splits the model once and runs a plain ``jax.jit`` over its state with
batches padded to a few fixed sizes, so XLA compiles a handful of programs and no more.

Example:
    >>> model = build("dense", {"code_dim": 8}, seed=0)
    >>> enc = Encoder(model)
    >>> enc(np.zeros((3, 28, 28), np.uint8)).shape
    (3, 8)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .defaults import SIDE
from .infer import DEFAULT_CONFIGS, as_batch

N_PIXELS = SIDE * SIDE

ARCHITECTURES = ("dense", "mlp", "conv")
UNKNOWN_ARCH_MSG = "unknown architecture {arch!r}; choose one of " + ", ".join(ARCHITECTURES)


class DenseAE(nnx.Module):
    """The seed's autoencoder: 784 → code (ReLU) → 784 (sigmoid logits)."""

    def __init__(self, *, code_dim: int = 100, rngs: nnx.Rngs):
        self.enc = nnx.Linear(N_PIXELS, code_dim, rngs=rngs)
        self.dec = nnx.Linear(code_dim, N_PIXELS, rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.enc(x.reshape(x.shape[0], N_PIXELS)))

    def decode(self, z: jax.Array) -> jax.Array:
        return self.dec(z).reshape(z.shape[0], SIDE, SIDE)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


class MlpAE(nnx.Module):
    """784 → hidden (ReLU) → code (linear) → hidden (ReLU) → 784 logits."""

    def __init__(self, *, code_dim: int = 64, hidden: int = 256, rngs: nnx.Rngs):
        self.enc1 = nnx.Linear(N_PIXELS, hidden, rngs=rngs)
        self.enc2 = nnx.Linear(hidden, code_dim, rngs=rngs)
        self.dec1 = nnx.Linear(code_dim, hidden, rngs=rngs)
        self.dec2 = nnx.Linear(hidden, N_PIXELS, rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.enc1(x.reshape(x.shape[0], N_PIXELS)))
        return self.enc2(h)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.dec2(jax.nn.relu(self.dec1(z))).reshape(z.shape[0], SIDE, SIDE)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


class ConvAE(nnx.Module):
    """28×28 → two stride-2 convolutions (14×14, 7×7) → linear code; mirrored decoder."""

    def __init__(self, *, code_dim: int = 64, channels: int = 16, rngs: nnx.Rngs):
        c = channels
        self.c = c
        self.conv1 = nnx.Conv(1, c, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c, 2 * c, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.to_code = nnx.Linear(7 * 7 * 2 * c, code_dim, rngs=rngs)
        self.from_code = nnx.Linear(code_dim, 7 * 7 * 2 * c, rngs=rngs)
        self.up1 = nnx.ConvTranspose(2 * c, c, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.up2 = nnx.ConvTranspose(c, 1, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], SIDE, SIDE, 1)
        h = jax.nn.relu(self.conv1(h))
        h = jax.nn.relu(self.conv2(h))
        return self.to_code(h.reshape(h.shape[0], -1))

    def decode(self, z: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.from_code(z)).reshape(z.shape[0], 7, 7, 2 * self.c)
        h = jax.nn.relu(self.up1(h))
        return self.up2(h).reshape(z.shape[0], SIDE, SIDE)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


_CLASSES = {"dense": DenseAE, "mlp": MlpAE, "conv": ConvAE}


def build(arch: str, config: dict[str, Any] | None = None, *, seed: int = 0) -> nnx.Module:
    """Build a freshly initialised autoencoder of architecture ``arch``."""
    if arch not in _CLASSES:
        raise ValueError(UNKNOWN_ARCH_MSG.format(arch=arch))
    cfg = {**DEFAULT_CONFIGS[arch], **(config or {})}
    return _CLASSES[arch](**cfg, rngs=nnx.Rngs(seed))


def abstract(arch: str, config: dict[str, Any] | None = None) -> nnx.Module:
    """An abstract (shape-only) model to restore a checkpoint into; allocates no weights."""
    return nnx.eval_shape(lambda: build(arch, config))


def code_dim(model: nnx.Module) -> int:
    out = jax.eval_shape(lambda x: model.encode(x), jax.ShapeDtypeStruct((1, SIDE, SIDE), jnp.float32))
    return int(out.shape[-1])


def bce(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Per-image mean binary cross-entropy between reconstruction logits and target pixels."""
    per_pixel = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)


# Batches are padded up to one of these sizes (larger inputs are cut into chunks of the largest),
# so the encoder compiles at most len(BUCKETS) programs.
BUCKETS = (1, 8, 64, 512, 4096)


_PROGRAMS: dict[tuple, Any] = {}  # compiled encoder programs, by architecture, weight shapes and batch size


class Encoder:
    """Fast, thread-safe inference over a fixed model: codes, reconstructions and errors.

    Takes uint8 pixels ``[N, 28, 28]`` (or ``[28, 28]`` for one) and returns numpy arrays. The model
    is split once; each padded batch size is compiled ahead of time and called with the flat list
    of weights, which skips per-call pytree handling (the hot path for one image at a time).
    """

    def __init__(self, model: nnx.Module, *, buckets: tuple[int, ...] = BUCKETS):
        self.buckets = tuple(sorted(buckets))
        graphdef, state = nnx.split(model)
        self.graphdef = graphdef
        self.state = state
        self.dim = code_dim(model)
        self._leaves, self._treedef = jax.tree.flatten(state)
        treedef = self._treedef

        def _encode(leaves, x):
            m = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return (m.encode(x.astype(jnp.float32) / 255.0),)

        def _both(leaves, x):
            xf = x.astype(jnp.float32) / 255.0
            m = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            z = m.encode(xf)
            logits = m.decode(z)
            return z, bce(logits, xf), jax.nn.sigmoid(logits)

        self._fns = {"encode": jax.jit(_encode), "both": jax.jit(_both)}
        self._compiled: dict[tuple[str, int], Any] = {}

    def _program(self, name: str, size: int):
        key = (name, size)
        prog = self._compiled.get(key)
        if prog is None:
            # encoders of the same architecture (every version fine-tuned from one) share programs:
            # the weights are arguments, so a new version costs no compilation
            shared = (self.graphdef, self._treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in self._leaves), name, size)
            prog = _PROGRAMS.get(shared)
            if prog is None:
                spec = jax.ShapeDtypeStruct((size, SIDE, SIDE), jnp.uint8)
                prog = _PROGRAMS[shared] = self._fns[name].lower(self._leaves, spec).compile()
            self._compiled[key] = prog
        return prog

    def _run(self, name: str, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        x, single = as_batch(pixels)
        x = np.ascontiguousarray(x, np.uint8)
        outs = []
        step = self.buckets[-1]
        for start in range(0, max(len(x), 1), step):
            chunk = x[start : start + step]
            n = len(chunk)
            b = next(b for b in self.buckets if n <= b)
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, SIDE, SIDE), np.uint8)])
            res = self._program(name, b)(self._leaves, chunk)
            outs.append(tuple(np.asarray(r)[:n] for r in res))
        if len(outs) == 1:
            merged = outs[0]
        else:
            merged = tuple(np.concatenate([o[i] for o in outs]) for i in range(len(outs[0])))
        if single:
            merged = tuple(m[0] for m in merged)
        return merged

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Codes ``float32 [N, dim]`` for uint8 pixels ``[N, 28, 28]``."""
        return self._run("encode", pixels)[0]

    def encode_with_error(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and per-image reconstruction error (mean binary cross-entropy)."""
        z, err, _ = self._run("both", pixels)
        return z, err

    def reconstruct(self, pixels: np.ndarray) -> np.ndarray:
        """Reconstructed pixels as uint8 ``[N, 28, 28]``."""
        _, _, rec = self._run("both", pixels)
        return np.round(rec * 255).astype(np.uint8)
