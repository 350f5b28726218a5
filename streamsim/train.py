"""Training: corruptions drawn per batch from a JAX key, the loss, a pure jitted step, ``fit``.

The denoising autoencoder sees a corrupted copy of each image and must reconstruct the clean one,
so its code keeps the glyph's shape and drops what the product must survive: clipped Gaussian noise
(σ up to 0.3 — the seed meant to train on it and never did), salt-and-pepper, small shifts,
rotations and rescaling, elastic deformation and stroke thickening/thinning. An optional
*invariance* term pulls the code of the corrupted copy towards the code of its clean original
(cosine), which is what makes near-duplicates land next to each other.

Everything is seeded: the same data, config and seed give the same weights.

Example:
    >>> from streamsim import model as M
    >>> x = np.zeros((16, 28, 28), np.uint8); x[:, 8:20, 12:16] = 255
    >>> m, hist = fit(M.build("dense", {"code_dim": 8}), x, TrainConfig(epochs=2, batch_size=8))
    >>> len(hist["loss"])
    2
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .model import SIDE, bce


@dataclasses.dataclass(frozen=True)
class Corruptions:
    """Probabilities and strengths of the corruptions applied to each training image."""

    noise_sigma: float = 0.3  # Gaussian σ, drawn uniformly in [0, noise_sigma] per image, then clipped
    p_noise: float = 0.5
    salt_pepper: float = 0.05  # fraction of pixels flipped, drawn in [0, salt_pepper]
    p_salt_pepper: float = 0.3
    shift: float = 2.0  # pixels, uniform in [-shift, shift] on each axis
    rotate_deg: float = 10.0
    scale: float = 0.1  # relative, uniform in [1 - scale, 1 + scale]
    p_affine: float = 0.7
    elastic: float = 1.5  # pixels of smooth displacement
    p_elastic: float = 0.3
    elastic_grid: int = 4  # the displacement is drawn on this × this grid, then upsampled: larger is more local
    p_stroke: float = 0.3  # thicken or thin the strokes by one pixel

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = float(getattr(self, f.name))
            if value < 0 or (f.name.startswith("p_") and value > 1) or (f.name == "elastic_grid" and not 2 <= value <= SIDE):
                raise ValueError(f"corruption {f.name} = {value} is out of range")
            object.__setattr__(self, f.name, int(value) if f.name == "elastic_grid" else value)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    invariance: float = 0.0  # weight of the code-invariance term
    contrastive: float = 0.0  # weight of the instance-discrimination (NT-Xent) term between two views
    temperature: float = 0.1  # of the NT-Xent term
    ema: float = 0.0  # if > 0, return the exponential moving average of the weights, with this decay per step
    seed: int = 0
    corruptions: Corruptions = dataclasses.field(default_factory=Corruptions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sample_affine(key: jax.Array, img: jax.Array, c: Corruptions) -> jax.Array:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    theta = jnp.deg2rad(jax.random.uniform(k1, (), minval=-c.rotate_deg, maxval=c.rotate_deg))
    s = jax.random.uniform(k2, (), minval=1 - c.scale, maxval=1 + c.scale)
    t = jax.random.uniform(k3, (2,), minval=-c.shift, maxval=c.shift)
    centre = (SIDE - 1) / 2
    rr, cc = jnp.meshgrid(jnp.arange(SIDE, dtype=jnp.float32), jnp.arange(SIDE, dtype=jnp.float32), indexing="ij")
    r0, c0 = rr - centre - t[0], cc - centre - t[1]
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    src_r = (cos * r0 - sin * c0) / s + centre
    src_c = (sin * r0 + cos * c0) / s + centre
    # Elastic: a smooth random displacement field, upsampled from a coarse grid.
    field = jax.random.normal(k4, (2, c.elastic_grid, c.elastic_grid)) * c.elastic
    field = jax.image.resize(field, (2, SIDE, SIDE), "cubic")
    return src_r, src_c, field


def _warp(img: jax.Array, key: jax.Array, c: Corruptions) -> jax.Array:
    ka, kpa, kpe = jax.random.split(key, 3)
    src_r, src_c, field = _sample_affine(ka, img, c)
    rr, cc = jnp.meshgrid(jnp.arange(SIDE, dtype=jnp.float32), jnp.arange(SIDE, dtype=jnp.float32), indexing="ij")
    use_aff = jax.random.bernoulli(kpa, c.p_affine)
    use_el = jax.random.bernoulli(kpe, c.p_elastic)
    r = jnp.where(use_aff, src_r, rr) + jnp.where(use_el, field[0], 0.0)
    col = jnp.where(use_aff, src_c, cc) + jnp.where(use_el, field[1], 0.0)
    return jax.scipy.ndimage.map_coordinates(img, [r, col], order=1, mode="constant", cval=0.0)


def _stroke(x: jax.Array, key: jax.Array, c: Corruptions) -> jax.Array:
    k1, k2 = jax.random.split(key)
    window = (1, 3, 3)
    thick = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, (1, 1, 1), "SAME")
    thin = -jax.lax.reduce_window(-x, -jnp.inf, jax.lax.max, window, (1, 1, 1), "SAME")
    # Soften: a half-strength change keeps strokes from vanishing or blotting.
    thick = 0.5 * (x + thick)
    thin = 0.5 * (x + thin)
    which = jax.random.bernoulli(k1, 0.5, (x.shape[0], 1, 1))
    use = jax.random.bernoulli(k2, c.p_stroke, (x.shape[0], 1, 1))
    return jnp.where(use, jnp.where(which, thick, thin), x)


def corrupt(key: jax.Array, x: jax.Array, c: Corruptions = Corruptions()) -> jax.Array:
    """A corrupted copy of a float batch ``[B, 28, 28]`` in ``[0, 1]``; result stays in ``[0, 1]``."""
    b = x.shape[0]
    kw, ks, kn, kns, knp, ksp, ksv, kspp = jax.random.split(key, 8)
    x = jax.vmap(lambda img, k: _warp(img, k, c))(x, jax.random.split(kw, b))
    x = _stroke(x, ks, c)
    sigma = jax.random.uniform(kns, (b, 1, 1), maxval=c.noise_sigma)
    use_noise = jax.random.bernoulli(knp, c.p_noise, (b, 1, 1))
    x = jnp.where(use_noise, x + sigma * jax.random.normal(kn, x.shape), x)
    rate = jax.random.uniform(ksp, (b, 1, 1), maxval=c.salt_pepper)
    use_sp = jax.random.bernoulli(kspp, c.p_salt_pepper, (b, 1, 1))
    u = jax.random.uniform(ksv, x.shape)
    x = jnp.where(use_sp & (u < rate / 2), 0.0, x)
    x = jnp.where(use_sp & (u > 1 - rate / 2), 1.0, x)
    return jnp.clip(x, 0.0, 1.0)


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def _cosine_gap(a: jax.Array, b: jax.Array) -> jax.Array:
    a = a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-6)
    b = b / (jnp.linalg.norm(b, axis=-1, keepdims=True) + 1e-6)
    return 1.0 - jnp.sum(a * b, axis=-1)


def nt_xent(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
    """Instance discrimination between two views: row ``i`` of ``a`` must pick row ``i`` of ``b``
    (and vice versa) among the batch, by cosine similarity / ``temperature``."""
    a = a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-6)
    b = b / (jnp.linalg.norm(b, axis=-1, keepdims=True) + 1e-6)
    logits = a @ b.T / temperature
    labels = jnp.arange(a.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def make_train_step(graphdef, optimizer: optax.GradientTransformation, config: TrainConfig):
    """A pure, jitted ``train_step(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

    ``batch`` is uint8 pixels ``[B, 28, 28]``, or a pair ``(pixels, views)`` where ``views`` are
    ready-made corrupted copies of the same images (say, re-normalised scans); without views the
    second view is another draw of :func:`corrupt`. The model reconstructs the clean image from
    each view; ``contrastive`` weighs an NT-Xent term between the two views' codes and
    ``invariance`` a cosine pull of the first view's code to the clean image's.
    """
    two_views = config.contrastive > 0

    def loss_fn(params, x1, x2, x_clean):
        model = nnx.merge(graphdef, params)
        z = model.encode(x1)
        recon = bce(model.decode(z), x_clean).mean()
        if two_views:
            z2 = model.encode(x2)
            recon = 0.5 * (recon + bce(model.decode(z2), x_clean).mean())
            con = nt_xent(z, z2, config.temperature)
        else:
            con = jnp.zeros(())
        if config.invariance > 0:
            z_clean = jax.lax.stop_gradient(model.encode(x_clean))
            inv = _cosine_gap(z, z_clean).mean()
        else:
            inv = jnp.zeros(())
        return recon + config.invariance * inv + config.contrastive * con, (recon, inv, con)

    @jax.jit
    def train_step(params, opt_state, batch, key):
        pixels, views = batch if isinstance(batch, tuple) else (batch, None)
        x = pixels.astype(jnp.float32) / 255.0
        k1, k2 = jax.random.split(key)
        x1 = corrupt(k1, x, config.corruptions)
        x2 = x1 if not two_views else (corrupt(k2, x, config.corruptions) if views is None
                                       else views.astype(jnp.float32) / 255.0)
        (loss, (recon, inv, con)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x1, x2, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "recon": recon, "invariance": inv, "contrastive": con}

    return train_step


def fit(
    model: nnx.Module,
    images: np.ndarray,
    config: TrainConfig = TrainConfig(),
    *,
    views: np.ndarray | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[nnx.Module, dict[str, list[float]]]:
    """Train ``model`` on uint8 pixels ``[N, 28, 28]``; returns the trained model and loss history.

    ``views`` (uint8 ``[N, V, 28, 28]``, optional) are ready-made corrupted copies of each image;
    with a ``contrastive`` weight, each step pairs a fresh corruption of an image with one of its
    views. With ``config.ema``, the returned weights are the moving average of the weights over
    the steps (Polyak averaging), not the last step's. The input model is not modified.
    ``progress(epoch, epochs, metrics)`` is called after each epoch.
    """
    if not 0.0 <= config.ema < 1.0:
        raise ValueError(f"ema decay must be in [0, 1), got {config.ema}")
    images = np.asarray(images, np.uint8)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or len(images) == 0:
        raise ValueError(f"training needs uint8 pixels [N, 28, 28] with N > 0, got {images.shape}")
    if views is not None:
        views = np.asarray(views, np.uint8)
        if views.ndim != 4 or views.shape[0] != len(images) or views.shape[2:] != (SIDE, SIDE):
            raise ValueError(f"views must be uint8 [N, V, 28, 28] with N = {len(images)}, got {views.shape}")
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(config.learning_rate)
    opt_state = optimizer.init(params)
    step = make_train_step(graphdef, optimizer, config)
    key = jax.random.key(config.seed)
    n = len(images)
    bs = min(config.batch_size, n)
    steps = max(1, n // bs)
    data = jnp.asarray(images)
    view_data = None if views is None else jnp.asarray(views)
    history: dict[str, list[float]] = {"loss": [], "recon": [], "invariance": [], "contrastive": [], "seconds": []}
    averaged, average = params, None
    if config.ema > 0:
        decay = float(config.ema)
        mix = lambda a, b: decay * a + (1.0 - decay) * b if jnp.issubdtype(a.dtype, jnp.floating) else b  # noqa: E731
        average = jax.jit(lambda avg, new: jax.tree.map(mix, avg, new))
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        key, kperm, kview = jax.random.split(key, 3)
        perm = jax.random.permutation(kperm, n)
        pick = None if view_data is None else jax.random.randint(kview, (n,), 0, view_data.shape[1])
        sums = {"loss": 0.0, "recon": 0.0, "invariance": 0.0, "contrastive": 0.0}
        for i in range(steps):
            key, kstep = jax.random.split(key)
            rows = perm[i * bs : (i + 1) * bs]
            batch = data[rows] if view_data is None else (data[rows], view_data[rows, pick[rows]])
            params, opt_state, metrics = step(params, opt_state, batch, kstep)
            if average is not None:
                averaged = average(averaged, params)
            for name in sums:
                sums[name] += float(metrics[name])
        for name, total in sums.items():
            value = total / steps
            if not math.isfinite(value):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1}: {name} = {value}")
            history[name].append(value)
        history["seconds"].append(time.perf_counter() - t0)
        if progress is not None:
            progress(epoch + 1, config.epochs, {k: history[k][-1] for k in sums})
    return nnx.merge(graphdef, averaged if average is not None else params), history
