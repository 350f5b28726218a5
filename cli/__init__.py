"""The ``streamsim`` command: parses arguments, calls the library, prints. No logic of its own.

JAX and the encoder load only inside the commands that need them, so ``--help`` and ``status``
answer at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from streamsim import defaults

app = typer.Typer(
    name="streamsim",
    help="Search, de-duplicate and continuously re-index character images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_STORE = "./.streamsim"
StoreOpt = Annotated[
    Path,
    typer.Option("--store", envvar="STREAMSIM_STORE", help="Store folder.", show_default=True),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="Where the encoding runs: local (this process) or ray "
                                        "(a Ray cluster; pip install 'streamsim[ray]').")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="A running Ray cluster's address "
                                                   "(default: a local cluster for this command).")]


class _Errors:
    """Turn the library's errors into one line on stderr and a non-zero exit, never a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, SystemExit)):
            return False
        if isinstance(exc, KeyboardInterrupt):
            typer.echo("streamsim: interrupted", err=True)
            raise typer.Exit(130)
        import sqlite3

        if isinstance(exc, (ValueError, OSError, KeyError, RuntimeError, sqlite3.Error)):
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            typer.echo(f"streamsim: {msg}", err=True)
            raise typer.Exit(1)
        return False


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _engine(engine: str, address: Optional[str]):
    """The engine for a command, started before the store is opened (Ray must load before usearch):
    a context manager giving ``"local"`` or the started engine."""
    import contextlib

    from streamsim import engines

    if engines.is_local(engine):
        if address is not None:
            raise ValueError(engines.ADDRESS_MSG)
        return contextlib.nullcontext("local")
    return engines.using(engine, address=address)


def _open(store: Path, *, create: bool = True):
    from streamsim.index import Index

    return Index.open(store, create=create)


@app.command()
def add(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (walked recursively).")],
    store: StoreOpt = Path(DEFAULT_STORE),
    adapt: Annotated[bool, typer.Option("--adapt", help="If the images drift, fine-tune now and wait for the "
                                        "outcome (default: record the alarm; `watch` or `retrain` adapts).")] = False,
    as_json: JsonOpt = False,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Store images. The same bytes under another name are recorded as another path, not stored twice.

    Files that cannot be stored are reported on stderr, one line each, and recorded (see `status`);
    the rest are stored. The images feed the store's drift detectors as a watcher's do: an alarm
    opens a drift episode (see `status`). Exit status 1 if any input failed.
    """
    with _Errors():
        missing = [p for p in paths if not p.exists()]
        for p in missing:
            typer.echo(f"streamsim: {p}: file not found", err=True)
        present = [p for p in paths if p.exists()]
        t0 = time.perf_counter()

        def on_file(path: str, outcome: str, image_id):
            if image_id is None:
                typer.echo(f"streamsim: {path}: {outcome}", err=True)

        from streamsim.stream import StreamLockError

        drifts: list[dict] = []
        background: list[dict] = []
        with _engine(engine, address) as eng, _open(store) as index:
            try:
                stream = index.stream(adapt=adapt)
            except StreamLockError:  # a watcher holds the store's stream: its detectors see these images later
                stream = None
                typer.echo("streamsim: a watcher holds this store's stream: storing without drift detection", err=True)
            try:
                report = index.add_files(present, on_file=on_file, engine=eng,
                                         on_batch=(lambda outcomes: drifts.extend(stream.observe(outcomes))) if stream else None)
                if stream is not None and adapt:
                    stream.step(now=True)
                    stream.wait(now=True)  # every attempt the budget allows, until one is promoted
                    background = stream.events()
            finally:
                if stream is not None:
                    stream.close()
            total = len(index)
            episode = stream.state if stream is not None else None
        seconds = time.perf_counter() - t0
        summary = {
            "added": len(report.added), "duplicates": len(report.duplicates), "failed": len(report.failed) + len(missing),
            "files": report.files, "images": total, "seconds": round(seconds, 3),
            "drift": drifts, "adaptation": background, "drift_state": episode,
        }
        if as_json:
            _print_json(summary)
        else:
            rate = report.files / seconds if seconds > 0 else 0.0
            typer.echo(
                f"added {summary['added']}, duplicates {summary['duplicates']}, failed {summary['failed']} "
                f"({report.files} files in {seconds:.1f}s, {rate:,.0f} files/s); store holds {total} images"
            )
            for e in drifts + background:
                detail = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "time", "validation"))
                typer.echo(f"{e['event']}: {detail}")
            if drifts and not adapt:
                typer.echo("the images drifted: `streamsim watch`, `streamsim retrain` or `add --adapt` adapts the encoder")
        if summary["failed"]:
            raise typer.Exit(1)


@app.command()
def search(
    image: Annotated[Path, typer.Argument(help="The query image.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many matches.")] = 10,
    mode: Annotated[str, typer.Option("--mode", help="similar | duplicate | recall")] = "similar",
    as_json: JsonOpt = False,
    show: Annotated[Optional[Path], typer.Option("--show", help="Write a PNG of the query and its hits.")] = None,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Find the stored images closest to IMAGE, best first."""
    with _Errors():
        with _open(store, create=False) as index:
            matches = index.search(image, k, mode=mode)  # the library's own query path, whatever the door
            if show is not None:
                from streamsim import images

                hits = [(index.pixels(m.id), f"#{m.id} d={m.distance:.3f}") for m in matches]
                images.contact_sheet(images.load(image).pixels, hits, show)
        if as_json:
            _print_json([m.to_dict() for m in matches])
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(matches)} matches for {image} ({mode})")
        for col in ("rank", "id", "distance", "version", "path"):
            table.add_column(col, justify="right" if col in ("rank", "id", "distance", "version") else "left")
        for rank, m in enumerate(matches, 1):
            table.add_row(str(rank), str(m.id), f"{m.distance:.4f}", str(m.encoder_version), m.path or "(in memory)")
        Console().print(table)
        if show is not None:
            typer.echo(f"wrote {show}")


def _status_data(store: Path) -> dict:
    from streamsim.store import status as store_status

    return store_status(store)


@app.command()
def status(store: StoreOpt = Path(DEFAULT_STORE), as_json: JsonOpt = False) -> None:
    """What the store holds (answered from the catalog, without loading the encoder)."""
    with _Errors():
        data = _status_data(store)
        if as_json:
            _print_json(data)
            return
        typer.echo(f"store           {data['store']}")
        typer.echo(f"images          {data['images']}")
        typer.echo(f"files           {data['files']}")
        typer.echo(f"failed          {data['failed']}")
        typer.echo(f"active version  {data['active_version']}")
        typer.echo(f"versions        {len(data['versions'])}")
        d = data["drift"]
        score = "-" if d["score"] is None else f"{d['score']:+.2f} (mean of the last {d['window']} images; ~0 is like the reference)"
        typer.echo(f"drift score     {score}")
        typer.echo(f"drift alarms    {d['alarms']}")
        ep = d["episode"]
        typer.echo(f"drift state     {d['state']}" + (f" (since image {ep['since_image_id']}, {ep['attempts']} attempts)"
                                                     if d["state"] != "stable" else ""))
        if d["state"] == "unresolved":
            typer.echo(f"                no new version served the new images better: {ep['advice']}")
        elif ep.get("refine"):
            r = ep["refine"]
            from streamsim.adapt import REFINEMENTS

            typer.echo(f"                adapted to the images since {r['since']}; refined {r['count']} times"
                       + (f", again once {2 * r['images']} of them are stored" if r["count"] < REFINEMENTS else ""))


@app.command()
def versions(store: StoreOpt = Path(DEFAULT_STORE), as_json: JsonOpt = False) -> None:
    """Encoder versions: number, parent, state, reason, created, training summary and the
    validation numbers of a fine-tune (error on recent and on reference images, before → after)."""
    with _Errors():
        from streamsim.store import versions as store_versions

        rows = store_versions(store)  # the catalog alone: no drift summary to compute
        if as_json:
            _print_json(rows)
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="encoder versions")
        for col in ("v", "state", "parent", "reason", "created", "arch", "trained on", "loss", "recent err", "ref err"):
            table.add_column(col)
        for v in rows:
            created = time.strftime("%m-%d %H:%M", time.localtime(v["created"]))
            val = v.get("validation") or {}
            recent = f"{val['recent_error_before']:.3f}→{val['recent_error_after']:.3f}" if val else "-"
            ref = f"{val['reference_error_before']:.3f}→{val['reference_error_after']:.3f}" if val else "-"
            loss = v.get("final_loss")
            table.add_row(str(v["version"]), v["state"], str(v["parent"] or "-"), v["reason"], created,
                          str(v.get("arch", "")), str((v.get("training") or {}).get("count", "")),
                          "-" if loss is None else f"{loss:.3f}", recent, ref)
        Console().print(table)


@app.command()
def events(
    kind: Annotated[Optional[list[str]], typer.Option("--kind", help="Only events of this kind (repeatable).")] = None,
    last: Annotated[Optional[int], typer.Option("--last", min=1, help="Only the latest N events.")] = None,
    as_json: JsonOpt = False,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """The store's event log: drift alarms, versions created, activated, rolled back, rejected,
    retired, duplicate threshold calibrated on the store."""
    with _Errors():
        from streamsim.store import events as store_events

        rows = store_events(store, kinds=kind, last=last)
        if as_json:
            _print_json(rows)
            return
        for e in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
            extra = " ".join(f"{k}={e[k]}" for k in e if k not in ("time", "kind", "version", "image_id", "path")
                             and not isinstance(e[k], (dict, list)))
            where = f" image {e['image_id']}" if e["image_id"] is not None else ""
            where += f" ({e['path']})" if e["path"] else ""
            typer.echo(f"{when}  {e['kind']:<16} v{e['version'] if e['version'] is not None else '-'}{where} {extra}".rstrip())


@app.command()
def drift(
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of the score over the stream, alarms and swaps marked.")] = None,
    window: Annotated[int, typer.Option("--window", min=1, help="Images in the current drift score.")] = defaults.DRIFT_WINDOW,
    as_json: JsonOpt = False,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """The normalised reconstruction score of incoming images: current level, alarms, and a plot."""
    with _Errors():
        from streamsim.catalog import Catalog
        from streamsim.store import drift_summary

        with Catalog.of_store(store, readonly=True) as cat:
            summary = drift_summary(cat, window)
            if plot is not None:
                from streamsim.plots import plot_stream

                plot_stream(cat.score_stream(), cat.events(), plot)
                summary["plot"] = str(plot)
        if as_json:
            _print_json(summary)
            return
        score = "-" if summary["score"] is None else f"{summary['score']:+.2f}"
        typer.echo(f"drift score {score} (mean of the last {summary['window']} images); {summary['alarms']} alarms")
        if summary["last_alarm"]:
            a = summary["last_alarm"]
            typer.echo(f"last alarm: image {a['image_id']} ({a['path'] or 'in memory'}) under version {a['version']}")
        if plot is not None:
            typer.echo(f"plot written to {plot}")


@app.command()
def retrain(
    since: Annotated[Optional[int], typer.Option("--since", help="First image id of the change (default: the last drift alarm's change point, else images since the last switch).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help=f"Default: about {defaults.FINETUNE_STEPS} optimiser steps.")] = None,
    replay: Annotated[float, typer.Option("--replay", min=0.0, help="Older images replayed, as a multiple of the recent ones.")] = 1.0,
    margin: Annotated[float, typer.Option("--margin", min=0.0, help="Allowed relative rise of the error on older (reference) images.")] = defaults.GATE_MARGIN,
    retrieval_margin: Annotated[float, typer.Option("--retrieval-margin", min=0.0, max=1.0, help="Allowed drop of older images' self-retrieval top-1 (absolute).")] = defaults.RETRIEVAL_MARGIN,
    fresh: Annotated[Optional[str], typer.Option("--fresh", help="Train a fresh model of this architecture (conv, mlp, dense) on the whole store instead of fine-tuning.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimiser steps, instead of --epochs.")] = None,
    activate: Annotated[bool, typer.Option("--activate/--no-activate", help="Make the new version active if it passes the gate.")] = True,
    keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="Keep the index files of only the N newest versions (checkpoints are kept).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
    store: StoreOpt = Path(DEFAULT_STORE),
    engine: EngineOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Fine-tune the active encoder on the images since a change (plus a replay of older ones);
    promote it only if the validation gate passes, re-encoding every image into its index."""
    with _Errors():
        with _engine(engine, address) as eng, _open(store, create=False) as index:
            parent = index.active_version
            r = index.retrain(since=since, epochs=epochs, steps=steps, replay=replay, margin=margin,
                              retrieval_margin=retrieval_margin, fresh=fresh, activate=activate, keep=keep, seed=seed,
                              engine=eng)
            result = {"version": r.version, "parent": parent, "state": r.state, "active_version": index.active_version,
                      "rejected_because": r.rejected_because, "validation": r.validation, "seconds": round(r.seconds, 2)}
        if as_json:
            _print_json(result)
        else:
            v = r.validation
            typer.echo(f"version {r.version}: {r.state}"
                       + (f" ({r.rejected_because})" if r.rejected_because else "")
                       + f"; recent retrieval {v['recent_retrieval_before']:.3f} → {v['recent_retrieval_after']:.3f}, "
                       f"recent error {v['recent_error_before']:.4f} → {v['recent_error_after']:.4f}, "
                       f"reference error {v['reference_error_before']:.4f} → {v['reference_error_after']:.4f}; "
                       f"active version {result['active_version']} ({result['seconds']:.1f}s)")
        if r.state == "rejected":
            raise typer.Exit(2)


@app.command()
def rollback(
    version: Annotated[int, typer.Argument(help="The version to make active (older or newer: roll back or forward).")],
    keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="Then keep the index files of only the N newest versions.")] = None,
    as_json: JsonOpt = False,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Make VERSION's encoder and index active together (the index is rebuilt if it was pruned)."""
    with _Errors():
        with _open(store, create=False) as index:
            previous = index.active_version
            t0 = time.perf_counter()
            index.rollback(version, keep=keep)
            result = {"active_version": index.active_version, "previous": previous,
                      "seconds": round(time.perf_counter() - t0, 2)}
        if as_json:
            _print_json(result)
        else:
            typer.echo(f"active version {result['active_version']} (was {previous})")


@app.command()
def reindex(
    version: Annotated[Optional[int], typer.Option("--version", help="The version whose index is rebuilt (default: the active one).")] = None,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    as_json: JsonOpt = False,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Rebuild a version's index from the stored pixels; the old index answers searches until the
    new one is complete, then it is swapped in."""
    with _Errors():
        with _engine(engine, address) as eng, _open(store, create=False) as index:
            result = index.reindex(version, engine=eng)
        if as_json:
            _print_json(result)
        else:
            typer.echo(f"version {result['version']}: {result['images']} images re-encoded by {result['engine']} "
                       f"({result['workers']} workers) in {result['seconds']:.1f}s")


@app.command()
def train(
    data: Annotated[Optional[Path], typer.Argument(help="A folder of images or an .npz with a uint8 `images` array; default: the store's own images.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    activate: Annotated[bool, typer.Option("--activate/--no-activate", help="Make the new version active.")] = True,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Train a fresh model of this architecture (dense, mlp, conv) instead of fine-tuning the active one.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
    store: StoreOpt = Path(DEFAULT_STORE),
    engine: EngineOpt = "local",
    address: AddressOpt = None,
) -> None:
    """Train the next encoder version, re-encode every stored image into its index, activate it."""
    with _Errors():
        from streamsim import images

        pixels = images.load_dataset(data) if data is not None else None
        t0 = time.perf_counter()
        with _engine(engine, address) as eng, _open(store) as index:
            parent = index.active_version
            if as_json:
                version = index.train(pixels, epochs=epochs, activate=activate, arch=arch, seed=seed, engine=eng)
            else:
                from rich.progress import Progress

                with Progress(transient=True) as bar:
                    task = bar.add_task("training", total=epochs)

                    def progress(epoch, total, metrics):
                        bar.update(task, completed=epoch, description=f"training (loss {metrics['recon']:.4f})")

                    version = index.train(pixels, epochs=epochs, activate=activate, arch=arch, seed=seed, progress=progress,
                                          engine=eng)
            meta = index.meta(version)
            result = {
                "version": version, "parent": parent, "active_version": index.active_version,
                "images": len(index), "trained_on": meta["training"]["count"], "epochs": epochs,
                "final_loss": meta["final_loss"], "duplicate_threshold": meta["duplicate_threshold"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
        if as_json:
            _print_json(result)
        else:
            typer.echo(
                f"version {version} trained on {result['trained_on']} images "
                f"(loss {result['final_loss']:.4f}, {result['seconds']:.1f}s); active version {result['active_version']}"
            )


@app.command()
def dedup(store: StoreOpt = Path(DEFAULT_STORE), as_json: JsonOpt = False,
          decided: Annotated[bool, typer.Option("--decided", help="Also list the groups settled by a decision "
                                                "(`serve`'s review), each with its \"decision\".")] = False) -> None:
    """Groups of duplicates: identical files, identical pixels, and near-duplicates within the active
    version's calibrated duplicate threshold (the one `search --mode duplicate` uses). Groups
    settled by a decision (not duplicates, keep all) are left out unless --decided."""
    with _Errors():
        with _open(store, create=False) as index:
            groups = index.dedup(decided=decided)
        if as_json:
            _print_json(groups)
            return
        for i, g in enumerate(groups, 1):
            typer.echo(f"group {i}: images {', '.join(map(str, g['ids']))} (distance ≤ {g['max_distance']:.4f})")
            for p in g["paths"]:
                typer.echo(f"  {p}")
        typer.echo(f"{len(groups)} groups of duplicates")


@app.command()
def calibrate(store: StoreOpt = Path(DEFAULT_STORE), seed: Annotated[int, typer.Option("--seed", help="Seed of the sample and the copies.")] = 0,
              as_json: JsonOpt = False) -> None:
    """Recalibrate the duplicate threshold of the active version on this store's own images (for
    images unlike the digits the shipped encoder was calibrated on). It only ever tightens the
    version's threshold, by at most half; `search --mode duplicate` and `dedup` use it."""
    with _Errors():
        with _open(store, create=False) as index:
            result = index.calibrate_duplicates(seed=seed)
        if as_json:
            _print_json(result)
            return
        typer.echo(f"version {result['version']}: duplicate threshold {result['threshold']:.4f} "
                   f"(measured on {result['images']} stored images {result['measured']:.4f}; "
                   f"the version's own {result['version_threshold']:.4f}); at the measured threshold "
                   f"{result['copy_recall']:.1%} of copies pass, {result['distinct_within']:.1%} of distinct images")


@app.command("eval")
def eval_(
    data: Annotated[Path, typer.Argument(help="An .npz with `images` (uint8 [N, H, W]) and `labels` ([N]).")],
    queries: Annotated[int, typer.Option("--queries", min=1, help="How many query images (and at most how many unseen ones).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and the perturbations.")] = 0,
    calibrate_store: Annotated[bool, typer.Option("--calibrate-store", help="Calibrate the duplicate threshold on the "
                                                  "stored images first, as `streamsim calibrate` does.")] = False,
    store: Annotated[Optional[Path], typer.Option("--store", help="Evaluate an encoder version of this store "
                                                  "(default: the shipped encoder).")] = None,
    version: Annotated[Optional[int], typer.Option("--version", min=1, help="With --store: which version "
                                                   "(default: the active one).")] = None,
    unseen: Annotated[str, typer.Option("--unseen", help="Hold out random images (images) or every image of "
                                        "random labels (labels: printed type, where one character in two "
                                        "typefaces may be the same drawing).")] = "images",
    as_json: JsonOpt = False,
) -> None:
    """Measure search quality on labelled images in a temporary store: streamsim against raw and
    centred pixels (and a perceptual hash if `imagehash` is installed), clean and perturbed. The
    encoder is the shipped one, or a version of a store (`--store`, `--version`)."""
    with _Errors():
        from streamsim import evaluate

        if version is not None and store is None:
            raise ValueError("--version needs --store: the store whose encoder version to evaluate")
        checkpoint = None
        if store is not None:
            from streamsim.store import encoder_dir, status

            version = version if version is not None else status(store)["active_version"]
            checkpoint = encoder_dir(Path(store).absolute(), version)
        x, y = evaluate.load_data(data)
        report = evaluate.evaluate(x, y, queries=queries, seed=seed, calibrate_store=calibrate_store, parallel=True,
                                   checkpoint=checkpoint, unseen=unseen)
        if store is not None:
            report["encoder"]["store"] = {"path": str(Path(store).absolute()), "version": version}
        if as_json:
            _print_json(report)
        else:
            typer.echo(evaluate.format_report(report))


@app.command()
def failed(store: StoreOpt = Path(DEFAULT_STORE), as_json: JsonOpt = False) -> None:
    """Files that could not be stored, with the reason."""
    with _Errors():
        from streamsim.store import failures

        rows = failures(store)
        if as_json:
            _print_json(rows)
            return
        for r in rows:
            typer.echo(f"{r['path']}: {r['reason']}")


@app.command()
def check(
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild what can be derived (vectors from the stored "
                                         "pixels, a dead build discarded); never deletes images, paths or checkpoints.")] = False,
    as_json: JsonOpt = False,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Is the store whole? Every stored image has a vector in the active index and no stray keys,
    every checkpoint matches its recorded hash, no version is half-built, the journal agrees with
    the catalog. Exit status 0 when whole, 1 with the list of problems otherwise."""
    with _Errors():
        from streamsim.index import Index

        with Index.open(store, create=False, reconcile=False) as index:
            report = index.check(repair=repair)
        if as_json:
            _print_json(report)
        else:
            for p in report["repaired"]:
                typer.echo(f"repaired: {p['detail']}")
            for p in report["problems"]:
                typer.echo(f"problem: {p['detail']}" + ("" if p["repairable"] else " (not repairable)"))
            for n in report["notes"]:
                typer.echo(f"note: {n}")
            typer.echo(f"{report['images']} images, active version {report['active_version']}: "
                       + ("whole" if report["ok"] else f"{len(report['problems'])} problems"))
        if not report["ok"]:
            raise typer.Exit(1)


# the commands that keep running (registered on ``app`` on import)
from . import services  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # compiled programs (training steps, encoders) are kept between runs: a fine-tune after drift
    # or a new version then starts in seconds instead of recompiling
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamsim" / "jax"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

