"""Inference with a stored encoder's weights in plain numpy: no JAX, no Flax.

A search answers one image at a time, and a fresh ``streamsim search`` process answers one image in
all. For that, importing JAX and Flax, building the model and compiling its programs costs far
more than the forward pass itself; this module applies the checkpoint's plain-array copy
(``weights.npz``, :mod:`streamsim.encoders`) with numpy instead — the same layers as
:mod:`streamsim.model`, in float32, equal to the JAX encoder's output to about 1e-6 (tested for every
architecture).

:class:`NumpyEncoder` has the :class:`streamsim.model.Encoder` interface. Codes for up to
:data:`NUMPY_MAX_CODES` images (a search's query and its variants) and codes with errors for up to
:data:`NUMPY_MAX_ERRORS` (one file added) run in numpy; larger batches (ingest, re-encoding a store)
go to the JAX encoder, built from the same arrays on first need: its compiled programs are faster
on batches (the decoder's 256 → 784 layer and the error above all), and an accelerator serves
them when there is one. A search's queries, however many (``Index.search_many``), are encoded in
numpy all the same (:meth:`NumpyEncoder.query_codes`): a batch of searches never waits for JAX to
load and compile, and each query gets the code it would get searched alone. Training needs the JAX
model too: ``graphdef`` and ``state`` build it.

Example:
    >>> rng = np.random.default_rng(0)
    >>> arrays = {"['enc']['kernel'].value": rng.normal(size=(784, 4)).astype(np.float32),
    ...           "['enc']['bias'].value": np.zeros(4, np.float32),
    ...           "['dec']['kernel'].value": rng.normal(size=(4, 784)).astype(np.float32),
    ...           "['dec']['bias'].value": np.zeros(784, np.float32)}
    >>> enc = NumpyEncoder("dense", {"code_dim": 4}, arrays)
    >>> enc(np.zeros((3, 28, 28), np.uint8)).shape, enc.dim
    ((3, 4), 4)
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from .defaults import SIDE

N_PIXELS = SIDE * SIDE
# Larger batches go to the JAX encoder. Measured on the 2-core CPU (shipped encoder, ms per batch,
# numpy / JAX): codes of 1 image 0.017 / 0.080, of 16 0.58 / 0.42; codes and errors of 1 image
# 0.10 / 0.11, of 16 4.0 / 1.0 (numpy's multi-threaded BLAS also suffers most when other work
# shares the cores).
NUMPY_MAX_CODES = 16
NUMPY_MAX_ERRORS = 2
QUERY_CHUNK = 1024  # queries encoded at once by NumpyEncoder.query_codes
DEFAULT_CONFIGS: dict[str, dict[str, int]] = {  # each architecture's config (streamsim.model builds with them)
    "dense": {"code_dim": 100},
    "mlp": {"code_dim": 64, "hidden": 256},
    "conv": {"code_dim": 64, "channels": 16},
}
_NAME = re.compile(r"\['([^']+)'\]")


class WeightsError(ValueError):
    """Stored weights do not fit the architecture they claim."""


def layers(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{"['enc1']['kernel'].value": a, ...}`` (the flattened model state, as
    :func:`streamsim.encoders.write_weights` keys it) → ``{"enc1": {"kernel": a, ...}, ...}``.

    >>> sorted(layers({"['enc']['bias'].value": np.zeros(2)})["enc"])
    ['bias']
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, a in arrays.items():
        names = _NAME.findall(key)
        if len(names) != 2:
            raise WeightsError(f"unexpected weight name {key!r}")
        out.setdefault(names[0], {})[names[1]] = np.asarray(a, np.float32)
    return out


def as_batch(pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """Pixels as a batch ``[N, 28, 28]``, and whether one image ``[28, 28]`` was given."""
    x = np.asarray(pixels)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3 or x.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"expected pixels of shape [N, 28, 28], got {x.shape}")
    return x, single


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, *, stride: int, pad: tuple[int, int],
          dilate: int = 1) -> np.ndarray:
    """A 2-d cross-correlation as XLA computes it for ``lax.conv_general_dilated`` (NHWC, HWIO):
    the input dilated by ``dilate`` (zeros between pixels), padded ``pad`` (low, high) on both
    axes, windows taken every ``stride`` pixels."""
    n, h, w, c = x.shape
    if dilate > 1:
        d = np.zeros((n, (h - 1) * dilate + 1, (w - 1) * dilate + 1, c), x.dtype)
        d[:, ::dilate, ::dilate] = x
        x = d
    x = np.pad(x, ((0, 0), pad, pad, (0, 0)))
    kh, kw, cin, cout = kernel.shape
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    cols = np.concatenate([x[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
                           for i in range(kh) for j in range(kw)], axis=-1)  # [N, oh, ow, kh·kw·cin]
    return cols @ kernel.reshape(kh * kw * cin, cout) + bias


class NumpyModel:
    """The forward passes of :mod:`streamsim.model`'s architectures over plain arrays."""

    def __init__(self, arch: str, config: dict[str, Any] | None, arrays: dict[str, np.ndarray]):
        if arch not in DEFAULT_CONFIGS:
            raise WeightsError(f"unknown architecture {arch!r}")
        self.arch = arch
        self.config = {**DEFAULT_CONFIGS[arch], **(config or {})}
        self.p = layers(arrays)
        want = {"dense": ("enc", "dec"), "mlp": ("enc1", "enc2", "dec1", "dec2"),
                "conv": ("conv1", "conv2", "to_code", "from_code", "up1", "up2")}[arch]
        for name in want:
            if not {"kernel", "bias"} <= set(self.p.get(name, {})):
                raise WeightsError(f"{arch} weights lack layer {name!r}")
        self.dim = int(self.p[{"dense": "enc", "mlp": "enc2", "conv": "to_code"}[arch]]["bias"].shape[0])
        try:  # shapes that do not fit the architecture fail here, not on the first query
            ok = self.decode(self.encode(np.zeros((1, SIDE, SIDE), np.float32))).shape == (1, SIDE, SIDE)
        except ValueError as e:
            raise WeightsError(f"{arch} weights do not fit the architecture: {e}") from None
        if not ok:
            raise WeightsError(f"{arch} weights do not fit the architecture")

    def _dense(self, name: str, x: np.ndarray) -> np.ndarray:
        layer = self.p[name]
        return x @ layer["kernel"] + layer["bias"]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes ``[N, dim]`` of float images ``[N, 28, 28]`` in 0..1."""
        n = x.shape[0]
        if self.arch == "dense":
            return _relu(self._dense("enc", x.reshape(n, N_PIXELS)))
        if self.arch == "mlp":
            return self._dense("enc2", _relu(self._dense("enc1", x.reshape(n, N_PIXELS))))
        h = x.reshape(n, SIDE, SIDE, 1)
        for name in ("conv1", "conv2"):  # SAME, stride 2: XLA pads (0, 1) for 3×3 windows on even sizes
            h = _relu(_conv(h, self.p[name]["kernel"], self.p[name]["bias"], stride=2, pad=(0, 1)))
        return self._dense("to_code", h.reshape(n, -1))

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Reconstruction logits ``[N, 28, 28]`` of codes ``[N, dim]``."""
        n = z.shape[0]
        if self.arch == "dense":
            return self._dense("dec", z).reshape(n, SIDE, SIDE)
        if self.arch == "mlp":
            return self._dense("dec2", _relu(self._dense("dec1", z))).reshape(n, SIDE, SIDE)
        c = self.config["channels"]
        h = _relu(self._dense("from_code", z)).reshape(n, SIDE // 4, SIDE // 4, 2 * c)
        # a SAME transposed convolution of stride 2 (lax.conv_transpose): the input dilated by 2,
        # padded (2, 1) for 3×3 windows, then a plain convolution with the kernel as it is
        h = _relu(_conv(h, self.p["up1"]["kernel"], self.p["up1"]["bias"], stride=1, pad=(2, 1), dilate=2))
        h = _conv(h, self.p["up2"]["kernel"], self.p["up2"]["bias"], stride=1, pad=(2, 1), dilate=2)
        return h.reshape(n, SIDE, SIDE)


def bce(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image mean binary cross-entropy (as :func:`streamsim.model.bce`)."""
    per_pixel = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    return per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.float32(1) / (np.float32(1) + np.exp(-x))


class NumpyEncoder:
    """:class:`streamsim.model.Encoder`'s interface over a version's stored weights: codes,
    reconstructions and errors for uint8 pixels ``[N, 28, 28]`` (or ``[28, 28]``). Thread-safe."""

    def __init__(self, arch: str, config: dict[str, Any] | None, arrays: dict[str, np.ndarray], *,
                 max_codes: int = NUMPY_MAX_CODES, max_errors: int = NUMPY_MAX_ERRORS):
        self.arch, self.config = arch, config
        self.model = NumpyModel(arch, config, arrays)
        self.dim = self.model.dim
        self.max_codes, self.max_errors = int(max_codes), int(max_errors)
        self._arrays = arrays
        self._jax = None
        self._lock = threading.Lock()

    # -- the JAX encoder, for big batches and for training -------------------------------------

    def jax_encoder(self):
        """The :class:`streamsim.model.Encoder` of the same weights (built once, on first need)."""
        with self._lock:
            if self._jax is None:
                from . import encoders
                from .model import Encoder

                model = encoders.model_from_arrays(self.arch, self.config, self._arrays)
                if model is None:
                    raise WeightsError(f"{self.arch} weights do not fit the Flax model's state")
                self._jax = Encoder(model)
            return self._jax

    @property
    def graphdef(self):
        return self.jax_encoder().graphdef

    @property
    def state(self):
        return self.jax_encoder().state

    # -- inference ----------------------------------------------------------------------------

    def _pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
        return as_batch(pixels)


    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Codes ``float32 [N, dim]`` for uint8 pixels ``[N, 28, 28]``."""
        x, single = self._pixels(pixels)
        if len(x) > self.max_codes:
            return self.jax_encoder()(pixels)
        z = self.model.encode(x.astype(np.float32) / np.float32(255)).astype(np.float32)
        return z[0] if single else z

    def query_codes(self, pixels: np.ndarray) -> np.ndarray:
        """Codes ``float32 [N, dim]`` of a search's queries, however many, in numpy (in chunks of
        :data:`QUERY_CHUNK`): a batch of queries never waits for JAX to load and compile, and
        gets the codes each query would get searched alone."""
        x, _ = self._pixels(pixels)
        if len(x) <= QUERY_CHUNK:
            return self.model.encode(x.astype(np.float32) / np.float32(255)).astype(np.float32)
        return np.concatenate([self.query_codes(x[s : s + QUERY_CHUNK]) for s in range(0, len(x), QUERY_CHUNK)])

    def _both(self, pixels: np.ndarray):
        x, single = self._pixels(pixels)
        xf = x.astype(np.float32) / np.float32(255)
        z = self.model.encode(xf)
        logits = self.model.decode(z)
        out = (z.astype(np.float32), bce(logits, xf).astype(np.float32), logits)
        return tuple(o[0] for o in out) if single else out

    def encode_with_error(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and per-image reconstruction error (mean binary cross-entropy)."""
        if len(self._pixels(pixels)[0]) > self.max_errors:
            return self.jax_encoder().encode_with_error(pixels)
        z, err, _ = self._both(pixels)
        return z, err

    def reconstruct(self, pixels: np.ndarray) -> np.ndarray:
        """Reconstructed pixels as uint8 ``[N, 28, 28]``."""
        if len(self._pixels(pixels)[0]) > self.max_errors:
            return self.jax_encoder().reconstruct(pixels)
        _, _, logits = self._both(pixels)
        return np.round(_sigmoid(logits) * 255).astype(np.uint8)
