"""Drift: false alarms, detection delay, alarm → new version, precision before/after, re-encoding.

    python bench/bench_drift.py [--skip-reencode] [--reencode-images 100000] [--trials 20] > drift.json

Needs ``river`` (``pip install '.[bench]'``) for the reference detectors. Sections:

1. **False alarms** on stationary streams under the shipped encoder: the 1,000 held-out real
   digits, and 50,000 draws from them in random order; also 50,000 images made from them with
   small writer-like deformations (rotation ≤ 8°, scale ± 5 %, shift ± 2 px), which the encoder
   scores half a reference spread higher — a mild change of style, where an alarm is defensible.
   Every detector (streamsim's and river's ADWIN / PageHinkley on the same normalised scores) runs
   over the same streams; reported per 10,000 images.
2. **Detection delay**: 2,000 held-out digits (drawn at random), then a script the encoder has never seen (printed
   Georgian, Armenian, Hebrew, Greek from the DejaVu fonts), 20 random orders each; delay =
   images after the switch until the first alarm (a miss if none within 2,000).
3. **Alarm → new active version**: a store of 4,700 digit-like images, then Georgian glyphs
   arriving in batches of 64 through ``Index.add_many``; a :class:`DriftMonitor` as the watcher runs
   it; after the alarm, the fine-tune starts once 256 images have arrived since the estimated change
   (the watcher's default) and runs :meth:`Index.retrain`. Reported: the delay, the images stored at
   the swap, the wait for images and the fine-tune + re-encode + swap time (cold: programs compiled
   in this process), and P@10 on the new script (same character, leave-one-out among 1,000 held-out
   glyphs) under the old and the new version.
4. **Re-encoding** N stored images into a new version's index (encode + index build), as
   :meth:`Index.rollback` to a version without an index does it.
5. **The watcher and the stream agree** (``--stream-vs-watch``): the same 1,000 held-out digits then 1,000
   Georgian glyphs, once dropped as PNG files into ``streamsim watch --once`` and once fed as arrays
   to ``Index.stream()`` in batches of 64, each into a fresh store: the images where an alarm
   fired, and the drift episode's outcome (every attempt's numbers), in both.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "checkpoints"))
from data import mnist_raw  # noqa: E402

SCRIPTS = {
    "georgian": range(0x10D0, 0x10F0),
    "armenian": range(0x0561, 0x0586),
    "hebrew": range(0x05D0, 0x05EA),
    "greek": range(0x03B1, 0x03CA),
}
FONT_GLOB = "/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"


def render(chars) -> tuple[np.ndarray, np.ndarray]:
    import build_default as B

    fonts = sorted(glob.glob(FONT_GLOB))
    if not fonts:
        raise SystemExit(f"no DejaVu fonts at {FONT_GLOB}: install fonts-dejavu-core")
    B.GLYPHS = "".join(map(chr, chars))
    return B.render_glyphs(fonts)


def deformed(raw: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n copies of raw digits with small writer-like affine changes, normalised as any input."""
    import jax

    from streamsim import images
    from streamsim.train import Corruptions, corrupt

    c = Corruptions(p_noise=0.0, p_salt_pepper=0.0, p_affine=1.0, rotate_deg=8.0, scale=0.05, shift=2.0,
                    p_elastic=0.0, p_stroke=0.0)
    rng = np.random.default_rng(seed)
    pick = raw[rng.integers(0, len(raw), n)].astype(np.float32) / 255.0
    fn = jax.jit(corrupt, static_argnums=2)
    out = np.concatenate([np.asarray(fn(jax.random.key(seed + i), pick[s : s + 4096], c))
                          for i, s in enumerate(range(0, n, 4096))])
    return np.stack([images.normalise(np.round(x * 255).astype(np.uint8)) for x in out])


def scores(enc, norm, px: np.ndarray) -> np.ndarray:
    from streamsim import drift

    _, err = enc.encode_with_error(px)
    return norm.score(err, drift.ink(px))


def detectors(norm):
    from streamsim import drift

    made = {
        "cusum": lambda: drift.CUSUM(),
        "ks_window": lambda: drift.KSWindow(quantiles=norm.quantiles),
        "page_hinkley": lambda: drift.PageHinkley(),
    }
    try:
        from river import drift as rdrift

        made["river_adwin"] = lambda: rdrift.ADWIN()
        made["river_page_hinkley"] = lambda: rdrift.PageHinkley(mode="up")
    except ImportError:
        print("river is not installed: reference detectors skipped (pip install '.[bench]')", file=sys.stderr)
    return made


def alarms(det, stream) -> list[int]:
    out = []
    for i, x in enumerate(stream):
        det.update(float(x))  # river's detectors return None, streamsim's return themselves
        if det.drift_detected:
            out.append(i)
    return out


def p_at_10(codes: np.ndarray, labels: np.ndarray) -> float:
    z = codes / (np.linalg.norm(codes, axis=1, keepdims=True) + 1e-12)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return float((labels[np.argsort(-s, axis=1)[:, :10]] == labels[:, None]).mean())


def stream_vs_watch(n_new: int = 1000) -> dict:
    """Section 5: the same images through ``streamsim watch --once`` (files) and ``Index.stream()``
    (arrays): alarms and the episode's outcome in each."""
    import subprocess

    from PIL import Image

    from streamsim import Index

    _, _, digits, _ = mnist_raw()  # the 1,000 held-out digits: no alarm on them (section 1)
    geo, _ = render(SCRIPTS["georgian"])
    new = geo[np.random.default_rng(2).permutation(len(geo))[:n_new]]
    stream = np.concatenate([digits, new])
    out = {"digits": len(digits), "new_glyphs": n_new}
    with tempfile.TemporaryDirectory() as d:
        inbox = Path(d) / "inbox"
        inbox.mkdir()
        t0 = time.time() - len(stream)
        for i, px in enumerate(stream):  # arrival order: one second of mtime apart
            f = inbox / f"{i:05d}.png"
            Image.fromarray(px).save(f)
            os.utime(f, (t0 + i, t0 + i))
        exe = str(Path(sys.executable).parent / "streamsim")
        t = time.perf_counter()
        run = subprocess.run([exe, "watch", str(inbox), "--once", "--json", "--store", str(Path(d) / "w")],
                             capture_output=True, text=True, timeout=3600)
        events = [json.loads(x) for x in run.stdout.splitlines()]
        out["watch"] = {"seconds": round(time.perf_counter() - t, 1), "exit": run.returncode,
                        "alarms_at": [e["id"] for e in events if e["event"] == "drift"],
                        "episode": [{k: v for k, v in e.items() if k not in ("time",)} for e in events
                                    if e["event"] in ("retraining", "activated", "rejected", "build_failed", "unresolved")]}
        with Index.open(Path(d) / "s") as index:
            t = time.perf_counter()
            with index.stream() as s:
                fed = [e for start in range(0, len(stream), 64) for e in s.feed(stream[start : start + 64])]
                s.step(now=True)
                s.wait()
                background = s.events()
                state = s.state
            out["stream"] = {"seconds": round(time.perf_counter() - t, 1), "state": state,
                             "alarms_at": [e["id"] for e in fed if e["event"] == "drift"],
                             "episode": [{k: v for k, v in e.items() if k not in ("time",)} for e in background]}
        with Index.open(Path(d) / "w", create=False) as w:
            out["watch"]["state"] = w.status()["drift"]["state"]
    out["same_alarms"] = out["watch"]["alarms_at"] == out["stream"]["alarms_at"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-reencode", action="store_true")
    ap.add_argument("--reencode-images", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--stream-vs-watch", action="store_true", help="Only section 5.")
    args = ap.parse_args(argv)
    if args.stream_vs_watch:
        print(json.dumps(stream_vs_watch(), indent=2))
        return 0
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp()  # cold: nothing compiled before

    from streamsim import Index, drift, encoders
    from streamsim.model import Encoder

    shipped = Path(__file__).parent.parent / "checkpoints" / "v1"
    model, meta = encoders.load(shipped)
    enc, norm = Encoder(model), drift.Normaliser.from_meta(meta)
    _, _, raw, _ = mnist_raw()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"}

    # 1. false alarms ------------------------------------------------------------------------
    from streamsim import images

    held = scores(enc, norm, np.stack([images.normalise(x) for x in raw]))
    streams = {"held-out digits (1,000)": held,
               "held-out digits resampled (50,000)": np.random.default_rng(5).choice(held, 50_000),
               "deformed held-out digits (50,000)": scores(enc, norm, deformed(raw, 50_000, seed=3))}
    made = detectors(norm)
    fa = {}
    for sname, s in streams.items():
        fa[sname] = {"images": len(s), "score_mean": round(float(s.mean()), 3), "score_std": round(float(s.std()), 3)}
        for dname, mk in made.items():
            fa[sname][dname] = round(len(alarms(mk(), s)) * 10_000 / len(s), 2)
    results["false_alarms_per_10k"] = fa

    # 2. detection delay ---------------------------------------------------------------------
    base = held
    rng = np.random.default_rng(0)
    delay = {}
    for script, chars in SCRIPTS.items():
        px, _ = render(chars)
        new = scores(enc, norm, px)
        rows = {d: [] for d in made}
        for _ in range(args.trials):
            before = rng.choice(base, 2000, replace=True)
            after = rng.choice(new, 2000, replace=True)
            stream = np.concatenate([before, after])
            for dname, mk in made.items():
                hits = [a for a in alarms(mk(), stream) if a >= 2000]
                rows[dname].append(hits[0] - 2000 if hits else None)
        delay[script] = {"score_mean": round(float(new.mean()), 3)}
        for dname, d in rows.items():
            found = [x for x in d if x is not None]
            delay[script][dname] = {"median": float(np.median(found)) if found else None,
                                    "max": max(found) if found else None, "missed": len(d) - len(found)}
    results["detection_delay"] = delay

    # 3. alarm → new active version ------------------------------------------------------------
    geo, geo_labels = render(SCRIPTS["georgian"])
    order = np.random.default_rng(1).permutation(len(geo))
    geo, geo_labels = geo[order], geo_labels[order]
    test_px, test_labels, stream_px = geo[:1000], geo_labels[:1000], geo[1000:]
    with tempfile.TemporaryDirectory() as d:
        with Index.open(d) as index:
            index.add_many(deformed(raw, 4700, seed=11))
            mon = drift.DriftMonitor(version=1, normaliser=index.normaliser())
            t_alarm = alarm = None
            first_new = index.catalog.max_image_id() + 1
            for start in range(0, len(stream_px), 64):
                ids = index.add_many(stream_px[start : start + 64])
                sc = index.catalog.scores_of(ids)
                for i in ids:
                    a = mon.update(sc[i][1], image_id=i)
                    if a is not None and alarm is None:
                        alarm, t_alarm = a, time.perf_counter()
                if alarm is not None and index.catalog.count_images_from(alarm.change_image_id) >= 256:
                    break
            t_start = time.perf_counter()
            before_p10 = p_at_10(index.encoder(1)(test_px), test_labels)
            r = index.retrain(since=alarm.change_image_id, reason="drift")
            t_done = time.perf_counter()
            results["alarm_to_active"] = {
                "stored_images_at_swap": len(index), "detector": alarm.detector,
                "delay_images": alarm.image_id - first_new, "change_image_id": alarm.change_image_id,
                "first_new_image_id": first_new, "state": r.state,
                "wait_for_images_s": round(t_start - t_alarm, 2), "retrain_and_swap_s": round(t_done - t_start, 2),
                "alarm_to_active_s": round(t_done - t_alarm, 2), "validation": r.validation,
                "p_at_10_new_script_before": round(before_p10, 4),
                "p_at_10_new_script_after": round(p_at_10(index.encoder(r.version)(test_px), test_labels), 4),
                "p_at_10_digits_before": None, "p_at_10_digits_after": None,
            }
            _, yl, te, yte = mnist_raw()
            held_norm = np.stack([images.normalise(x) for x in te])
            results["alarm_to_active"]["p_at_10_digits_before"] = round(p_at_10(index.encoder(1)(held_norm), yte), 4)
            results["alarm_to_active"]["p_at_10_digits_after"] = round(p_at_10(index.encoder(r.version)(held_norm), yte), 4)

    # 4. re-encoding ---------------------------------------------------------------------------
    if not args.skip_reencode:
        n = args.reencode_images
        with tempfile.TemporaryDirectory() as d:
            px = deformed(raw, n, seed=21)
            with Index.open(d) as index:
                index.catalog.add_images([(f"bench-{i}", p, None) for i, p in enumerate(px)])
                index.check(repair=True)  # vectors for the images added to the catalog
                # version 2: the same weights under a new number, no index yet
                shutil.copytree(Path(d) / "encoders" / "v0001", Path(d) / "encoders" / "v0002")
                index.catalog.add_version(2, state="ready", parent=1, reason="manual", meta={})
                index.encoder(2)(px[:4096])  # compiled, as in a running watcher
                t = time.perf_counter()
                index.rollback(2)
                results["reencode"] = {"images": n, "seconds": round(time.perf_counter() - t, 2),
                                       "images_per_s": round(n / (time.perf_counter() - t))}

    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
