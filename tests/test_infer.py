"""The numpy inference path (``streamsim.infer``) against the JAX encoder, and what a fresh
process imports for the commands that need neither JAX nor Flax."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from streamsim import encoders, infer
from streamsim import model as M

HEAVY = ("jax", "flax", "orbax", "optax")
LIGHT = ("versions", "events")  # commands that need not even numpy


def _arrays(model) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _assert_same(jax_enc, np_enc, pixels):
    """Codes, errors and reconstructions of the numpy path (every batch in numpy) and the JAX one."""
    np_enc = infer.NumpyEncoder(np_enc.arch, np_enc.config, np_enc._arrays, max_codes=len(pixels), max_errors=len(pixels))
    z1, e1 = jax_enc.encode_with_error(pixels)
    z2, e2 = np_enc.encode_with_error(pixels)
    np.testing.assert_allclose(z2, z1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(e2, e1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np_enc(pixels), z1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np_enc(pixels[0]), jax_enc(pixels[0]), rtol=0, atol=1e-5)
    assert np.abs(np_enc.reconstruct(pixels).astype(int) - jax_enc.reconstruct(pixels)).max() <= 1


@pytest.mark.parametrize("arch", M.ARCHITECTURES)
def test_numpy_encoder_equals_the_jax_encoder(arch, digits):
    from streamsim import images

    pixels = np.stack([images.normalise(x) for x in digits[0][:96]])
    config = {"code_dim": 16} if arch != "mlp" else None
    rng = np.random.default_rng(2)
    # every weight moved off its initialisation (biases start at 0): each one must be applied right
    arrays = {k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in _arrays(M.build(arch, config, seed=2)).items()}
    model = encoders.model_from_arrays(arch, config, arrays)
    _assert_same(M.Encoder(model), infer.NumpyEncoder(arch, config, arrays), pixels)


def test_the_shipped_encoder_loads_as_numpy_and_equals_jax(digits):
    from streamsim import images

    pixels = np.stack([images.normalise(x) for x in digits[0][:128]])
    enc, meta = encoders.load_encoder(encoders.shipped_dir())
    assert isinstance(enc, infer.NumpyEncoder) and enc.dim == meta["code_dim"]
    model, _ = encoders.load(encoders.shipped_dir(), fast=False)  # the orbax checkpoint itself
    _assert_same(M.Encoder(model), enc, pixels)
    # batches above the numpy limits go to the JAX encoder: the same codes and errors either way
    assert len(pixels) > enc.max_codes and len(pixels) > enc.max_errors
    np.testing.assert_allclose(enc(pixels), M.Encoder(model)(pixels), rtol=0, atol=1e-5)
    np.testing.assert_allclose(enc(pixels[:3]), M.Encoder(model)(pixels[:3]), rtol=0, atol=1e-5)


def test_a_saved_version_loads_as_numpy_and_a_damaged_copy_falls_back(tmp_path, digits):
    model = M.build("conv", seed=1)
    d = encoders.save(model, tmp_path / "v0002", {"arch": "conv", "config": {}})
    enc, _ = encoders.load_encoder(d)
    assert isinstance(enc, infer.NumpyEncoder)
    _assert_same(M.Encoder(model), enc, digits[0][:16])
    (d / encoders.WEIGHTS).write_bytes(b"not weights")  # hash no longer matches: orbax restores it
    again, _ = encoders.load_encoder(d)
    assert isinstance(again, M.Encoder)
    np.testing.assert_allclose(again(digits[0][:16]), enc(digits[0][:16]), atol=1e-5)


def test_weights_that_do_not_fit_are_refused():
    arrays = _arrays(M.build("dense", {"code_dim": 8}, seed=0))
    with pytest.raises(infer.WeightsError):
        infer.NumpyEncoder("mlp", None, arrays)
    bad = {k: (v[:10] if "kernel" in k else v) for k, v in arrays.items()}
    with pytest.raises(infer.WeightsError):
        infer.NumpyEncoder("dense", {"code_dim": 8}, bad)


def _imports(tmp_path, *args) -> tuple[dict, str]:
    """Run the installed command in a fresh interpreter; returns which heavy packages it imported
    and its stdout."""
    code = ("import json, sys\nfrom streamsim.cli import main\nsys.argv = ['streamsim', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r} + ('usearch', 'numpy')}}), file=sys.stderr)\n"
            "sys.exit(code)")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stderr.strip().splitlines()[-1]), res.stdout


def test_status_versions_events_and_search_import_no_jax(tmp_path, digit_files):
    store = tmp_path / "store"
    _imports(tmp_path, "add", str(digit_files[0].parent), "--store", str(store), "--json")
    for command in (["status", "--json"], ["versions", "--json"], ["events", "--json"], ["status"]):
        seen, out = _imports(tmp_path, *command, "--store", str(store))
        assert not any(seen[m] for m in HEAVY), (command, seen)
        assert not seen["usearch"], command
        assert command[0] not in LIGHT or not seen["numpy"], command
        assert command[0] == "events" or out.strip()
    seen, out = _imports(tmp_path, "search", str(digit_files[3]), "--store", str(store), "--json", "-k", "3")
    assert not any(seen[m] for m in HEAVY), seen
    assert json.loads(out)[0]["path"] == str(digit_files[3].resolve())


def test_query_codes_are_numpy_codes_for_any_number_of_queries(digits, monkeypatch):
    from streamsim import images

    pixels = np.stack([images.normalise(x) for x in digits[0][:40]])
    enc, _ = encoders.load_encoder(encoders.shipped_dir())
    monkeypatch.setattr(infer, "QUERY_CHUNK", 16)  # 40 queries: three chunks
    codes = enc.query_codes(pixels)
    assert enc._jax is None  # a batch of queries never builds the JAX encoder
    for s in range(0, 40, 16):
        np.testing.assert_array_equal(codes[s : s + 16], enc(pixels[s : s + 16]))
