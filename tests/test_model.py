"""One shared suite that every encoder architecture must pass."""

import jax
import numpy as np
import pytest

from streamsim import encoders
from streamsim import model as M
from streamsim import train as T


@pytest.fixture(scope="module")
def glyphs():
    rng = np.random.default_rng(0)
    x = np.zeros((64, 28, 28), np.uint8)
    for i in range(64):
        r, c = rng.integers(4, 12, 2)
        h, w = rng.integers(6, 14, 2)
        x[i, r : r + h, c : c + w] = 255
    return x


@pytest.mark.parametrize("arch", M.ARCHITECTURES)
def test_shapes_and_error(arch, glyphs):
    model = M.build(arch, seed=0)
    enc = M.Encoder(model)
    z = enc(glyphs)
    assert z.shape == (64, enc.dim) and z.dtype == np.float32
    assert enc(glyphs[0]).shape == (enc.dim,)
    z2, err = enc.encode_with_error(glyphs)
    np.testing.assert_allclose(z, z2, rtol=1e-5, atol=1e-5)
    assert err.shape == (64,) and np.all(err > 0)
    rec = enc.reconstruct(glyphs[:3])
    assert rec.shape == (3, 28, 28) and rec.dtype == np.uint8


@pytest.mark.parametrize("arch", M.ARCHITECTURES)
def test_padding_does_not_change_codes(arch, glyphs):
    enc = M.Encoder(M.build(arch, seed=1))
    one_by_one = np.stack([enc(g) for g in glyphs[:5]])
    np.testing.assert_allclose(one_by_one, enc(glyphs[:5]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", M.ARCHITECTURES)
def test_training_lowers_error_and_is_reproducible(arch, glyphs):
    cfg = T.TrainConfig(epochs=3, batch_size=16, learning_rate=3e-3, seed=3)
    before = M.Encoder(M.build(arch, seed=0)).encode_with_error(glyphs)[1].mean()
    m1, h1 = T.fit(M.build(arch, seed=0), glyphs, cfg)
    m2, h2 = T.fit(M.build(arch, seed=0), glyphs, cfg)
    after = M.Encoder(m1).encode_with_error(glyphs)[1].mean()
    assert after < before
    assert h1["loss"] == h2["loss"]
    np.testing.assert_array_equal(M.Encoder(m1)(glyphs), M.Encoder(m2)(glyphs))


@pytest.mark.slow
def test_weight_averaging_returns_the_average_and_leaves_training_alone(glyphs):
    """``TrainConfig.ema``: the same steps are taken (same losses), but the weights returned are
    their moving average — between the initial weights and the last step's."""
    import dataclasses

    from flax import nnx

    cfg = T.TrainConfig(epochs=1, batch_size=16, learning_rate=3e-3, seed=1)
    last, h_last = T.fit(M.build("dense", seed=0), glyphs, cfg)
    avg, h_avg = T.fit(M.build("dense", seed=0), glyphs, dataclasses.replace(cfg, ema=0.9))
    assert h_avg["loss"] == h_last["loss"]
    leaves = [jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (M.build("dense", seed=0), last, avg)]
    moved = [float(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(leaves[0], w))) for w in leaves[1:]]
    assert 0 < moved[1] < moved[0]
    with pytest.raises(ValueError, match="ema"):
        T.fit(M.build("dense", seed=0), glyphs, dataclasses.replace(cfg, ema=1.0))


@pytest.mark.parametrize("arch", M.ARCHITECTURES)
def test_checkpoint_round_trip(arch, glyphs, tmp_path):
    model = M.build(arch, seed=2)
    encoders.save(model, tmp_path / "v0002", {"arch": arch, "config": M.DEFAULT_CONFIGS[arch]})
    assert encoders.list_versions(tmp_path) == [2]
    loaded, meta = encoders.load(tmp_path / "v0002")
    assert meta["arch"] == arch
    np.testing.assert_array_equal(M.Encoder(model)(glyphs), M.Encoder(loaded)(glyphs))
    with pytest.raises(encoders.CheckpointError):
        encoders.save(model, tmp_path / "v0002", {"arch": arch, "config": {}})


def test_unfinished_checkpoint_is_not_loaded(tmp_path):
    (tmp_path / "v0003" / "state").mkdir(parents=True)
    assert encoders.list_versions(tmp_path) == []
    with pytest.raises(encoders.CheckpointError, match="meta.json"):
        encoders.load(tmp_path / "v0003")
    encoders.discard_incomplete(tmp_path)
    assert not (tmp_path / "v0003").exists()


@pytest.mark.slow
def test_corruptions_stay_in_range_and_differ_by_key(glyphs):
    import jax

    x = glyphs.astype(np.float32) / 255
    a = np.asarray(T.corrupt(jax.random.key(0), x))
    b = np.asarray(T.corrupt(jax.random.key(1), x))
    again = np.asarray(T.corrupt(jax.random.key(0), x))
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).mean() > 0.01


@pytest.mark.slow
def test_elastic_grid_makes_the_displacement_local():
    """A finer grid gives a displacement field whose values 7 px apart are less alike."""
    import jax

    def correlation(grid):
        c = T.Corruptions(elastic=2.0, elastic_grid=grid)
        img = np.zeros((28, 28), np.float32)
        fields = np.stack([np.asarray(T._sample_affine(k, img, c)[2][0]) for k in jax.random.split(jax.random.key(0), 400)])
        return np.corrcoef(fields[:, 10, 7], fields[:, 10, 14])[0, 1]

    assert correlation(4) > 0.3 and correlation(10) < 0.15
    for bad in (1, 29):
        with pytest.raises(ValueError, match="elastic_grid"):
            T.Corruptions(elastic_grid=bad)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        M.build("transformer")


def test_fast_weights_match_orbax_and_tampering_falls_back(tmp_path, glyphs):
    model = M.build("mlp", seed=4)
    d = encoders.save(model, tmp_path / "v0001", {"arch": "mlp", "config": M.DEFAULT_CONFIGS["mlp"]})
    fast, meta = encoders.load(d)
    slow, _ = encoders.load(d, fast=False)
    assert "weights_sha256" in meta
    np.testing.assert_array_equal(M.Encoder(fast)(glyphs), M.Encoder(slow)(glyphs))
    raw = bytearray((d / encoders.WEIGHTS).read_bytes())
    raw[-100] ^= 0xFF
    (d / encoders.WEIGHTS).write_bytes(bytes(raw))
    assert encoders._load_weights(d, meta) is None  # hash mismatch: not trusted
    again, _ = encoders.load(d)  # falls back to the orbax checkpoint
    np.testing.assert_array_equal(M.Encoder(again)(glyphs), M.Encoder(slow)(glyphs))


@pytest.mark.slow
@pytest.mark.parametrize("arch", M.ARCHITECTURES)
def test_contrastive_training_with_views(arch, glyphs):
    views = np.stack([np.roll(glyphs, 1, axis=2), np.roll(glyphs, -1, axis=1)], axis=1)
    cfg = T.TrainConfig(epochs=2, batch_size=16, contrastive=1.0, seed=0)
    m1, h1 = T.fit(M.build(arch, seed=0), glyphs, cfg, views=views)
    m2, h2 = T.fit(M.build(arch, seed=0), glyphs, cfg, views=views)
    assert h1["loss"] == h2["loss"] and h1["contrastive"][-1] > 0
    assert h1["contrastive"][-1] < h1["contrastive"][0] or h1["recon"][-1] < h1["recon"][0]
    with pytest.raises(ValueError, match="views must be"):
        T.fit(M.build(arch, seed=0), glyphs, cfg, views=views[:10])


def test_nt_xent_prefers_matching_rows():
    import jax.numpy as jnp

    a = jnp.eye(4)
    assert float(T.nt_xent(a, a, 0.1)) < float(T.nt_xent(a, a[::-1], 0.1))
