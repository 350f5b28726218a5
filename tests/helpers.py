"""Helpers the tests share: files made in ``tmp_path``, the ``streamsim`` command as users run it,
and a loader for decoder workers that crashes or hangs on demand (importable by spawned workers)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

EXE = str(Path(sys.executable).parent / "streamsim")


class WatchProcess:
    def __init__(self, folder: Path, store: Path, *extra: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [EXE, "watch", str(folder), "--store", str(store), "--json", "--settle", "0.3", "--rescan", "0.5", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder.parent, env=env,
        )
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait_for(self, predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"timed out; events: {self.events[-5:]}; stderr: {self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def count(self, kind: str) -> int:
        return sum(e["event"] == kind for e in self.events)

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def status(store: Path) -> dict:
    out = subprocess.run([EXE, "status", "--store", str(store), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def write_pngs(folder, arrays, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        p = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def cli_json(*args: str, check: bool = True):
    """Run ``streamsim ARGS --json`` in a real process; returns ``(exit code, parsed stdout)``."""
    run = subprocess.run([EXE, *args, "--json"], capture_output=True, text=True, timeout=600)
    if check and run.returncode not in (0, 1):
        raise AssertionError(f"streamsim {' '.join(args)} exited {run.returncode}: {run.stderr[-2000:]}")
    return run.returncode, (json.loads(run.stdout) if run.stdout.strip() else None)


def misbehaving_loader(path, timeout):
    """A decoder worker's loader that dies on files named ``*crash*``, hangs in the normaliser on
    ``*slow*`` (the time limit must stop it) and hangs past any signal on ``*stuck*`` (only the
    wait on the batch can); anything else loads as usual."""
    from streamsim import normalise, workers

    name = os.path.basename(str(path))
    if "crash" in name:
        os._exit(3)
    if "stuck" in name:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)
    if "slow" in name:
        real = normalise.normalise_grey

        def slow(*a, **k):
            time.sleep(120)
            return real(*a, **k)

        normalise.normalise_grey = slow
        try:
            return workers.load_or_error(path, timeout)
        finally:
            normalise.normalise_grey = real
    return workers.load_or_error(path, timeout)


def _made_up_script(n: int, seed: int, strokes) -> np.ndarray:
    """``n`` glyphs (uint8 [n, 56, 56], white on black), each drawn by ``strokes(draw, rng)``."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 56, 56), np.uint8)
    for i in range(n):
        im = Image.new("L", (56, 56), 0)
        strokes(ImageDraw.Draw(im), rng)
        out[i] = np.asarray(im)
    return out


def dot_glyphs(n: int, seed: int = 1) -> np.ndarray:
    """Glyphs of a made-up script: clusters of dots (uint8 [n, 56, 56], white on black)."""

    def dots(d, rng):
        for _ in range(rng.integers(6, 14)):
            x, y = rng.integers(6, 50, 2)
            r = rng.integers(2, 5)
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)

    return _made_up_script(n, seed, dots)


def bar_glyphs(n: int, seed: int = 1) -> np.ndarray:
    """Glyphs of another made-up script: two to four thick straight strokes (uint8 [n, 56, 56],
    white on black)."""

    def bars(d, rng):
        for _ in range(rng.integers(2, 5)):
            x0, y0, x1, y1 = rng.integers(4, 52, 4)
            d.line([x0, y0, x1, y1], fill=255, width=int(rng.integers(3, 6)))

    return _made_up_script(n, seed, bars)
