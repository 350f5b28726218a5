"""Encode and training throughput on an accelerator (also runs on a CPU, slowly).

    python bench/bench_gpu.py [--n 4194304] [--batch 65536] [--train-batch 4096] [--json]

Synthetic digit-like uint8 images (random strokes), resident on the device, so the numbers are
the model's throughput, not the host link's; the host→device path through ``Encoder`` is
reported separately. Architectures: dense (the seed's 784→100→784) and mlp (the shipped one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    r = rng.integers(4, 16, n)
    c = rng.integers(4, 16, n)
    for i in range(8):  # eight bars of random position per image, vectorised over images
        rr = np.clip(r + rng.integers(-3, 4, n), 0, 20)
        cc = np.clip(c + rng.integers(-3, 4, n), 0, 20)
        idx = np.arange(n)
        for d in range(8):
            x[idx, rr + (d if i % 2 else 0), cc + (0 if i % 2 else d)] = 255
    return x


def timed(fn, *args, repeat=5):
    out = fn(*args)
    __import__("jax").block_until_ready(out)
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    __import__("jax").block_until_ready(out)
    return (time.perf_counter() - t) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 22)
    ap.add_argument("--batch", type=int, default=1 << 16)
    ap.add_argument("--train-batch", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from streamsim import model as M
    from streamsim import train as T

    dev = jax.devices()[0]
    out = {"device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}", "jax": jax.__version__, "results": {}}
    host = synthetic(min(args.n, 1 << 20))
    data = jnp.asarray(np.tile(host, (max(1, args.n // len(host)), 1, 1)))
    for arch in ("dense", "mlp"):
        res = {}
        model = M.build(arch, seed=0)
        graphdef, state = nnx.split(model)

        @jax.jit
        def encode_all(state, x):
            m = nnx.merge(graphdef, state)
            xb = x.reshape(-1, args.batch, 28, 28)
            f = lambda b: m.encode(b.astype(jnp.float32) / 255.0).astype(jnp.bfloat16)  # noqa: E731
            return jax.lax.map(f, xb)

        s = timed(encode_all, state, data)
        res["encode_device_resident_per_s"] = data.shape[0] / s

        @jax.jit
        def encode_bf16(state, x):
            m = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
            xb = x.reshape(-1, args.batch, 28, 28)
            return jax.lax.map(lambda b: m.encode(b.astype(jnp.bfloat16) / 255.0), xb)

        s = timed(encode_bf16, state, data)
        res["encode_device_resident_bf16_per_s"] = data.shape[0] / s

        enc = M.Encoder(model, buckets=(1, 64, 4096, args.batch))
        chunk = host[: args.batch * 4]
        s = timed(lambda x: enc(x), chunk, repeat=3)
        res["encode_from_host_per_s"] = len(chunk) / s

        cfg = T.TrainConfig(batch_size=args.train_batch, seed=0)
        opt = T.make_optimizer(cfg.learning_rate)
        for name, c in (("train_full_corruptions_per_s", cfg), ("train_noise_only_per_s", None)):
            if c is None:
                c = T.TrainConfig(batch_size=args.train_batch, seed=0, corruptions=T.Corruptions(
                    p_noise=1.0, p_salt_pepper=0, p_affine=0, p_elastic=0, p_stroke=0))
            step = T.make_train_step(graphdef, opt, c)
            params = state
            opt_state = opt.init(params)
            batches = data[: args.train_batch * args.train_steps].reshape(args.train_steps, args.train_batch, 28, 28)

            @jax.jit
            def run(params, opt_state, batches, key):
                def body(carry, b):
                    p, o, k = carry
                    k, sub = jax.random.split(k)
                    p, o, _ = step(p, o, b, sub)
                    return (p, o, k), None
                (p, o, _), _ = jax.lax.scan(body, (params, opt_state, key), batches)
                return p

            s = timed(run, params, opt_state, batches, jax.random.key(0), repeat=3)
            res[name] = args.train_batch * args.train_steps / s
        out["results"][arch] = res
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(out["device"], "jax", out["jax"])
        for arch, res in out["results"].items():
            for k, v in res.items():
                print(f"{arch:6s} {k:36s} {v:>16,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
