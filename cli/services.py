"""The ``streamsim`` commands that keep running: ``watch`` (tail a folder) and ``serve`` (the HTTP
API and page). Registered on :data:`streamsim.cli.app` when the package is imported."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from streamsim import defaults

from . import DEFAULT_STORE, StoreOpt, _Errors, _open, app


@app.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="The folder to tail.")],
    recursive: Annotated[bool, typer.Option("--recursive", help="Also watch sub-folders.")] = False,
    pattern: Annotated[Optional[list[str]], typer.Option("--pattern", help="File-name glob to take (repeatable); default: image suffixes.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Ingest what is there now, then exit.")] = False,
    settle: Annotated[float, typer.Option("--settle", help="Seconds a file found by a rescan must stay unchanged.")] = defaults.WATCH_SETTLE,
    rescan: Annotated[float, typer.Option("--rescan", help="Seconds between rescans of the folder.")] = defaults.WATCH_RESCAN,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per event on stdout.")] = False,
    retrain: Annotated[bool, typer.Option("--retrain/--no-retrain", help="Fine-tune in the background after a drift alarm.")] = True,
    keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="After a swap keep the index files of only the N newest versions.")] = None,
    attempts: Annotated[Optional[int], typer.Option("--attempts", min=1, help="Attempts per drift episode before it is unresolved (default 3: fine-tune, longer fine-tune, fresh conv model).")] = None,
    cpu_budget: Annotated[Optional[float], typer.Option("--cpu-budget", min=1.0, help="CPU seconds per hour the attempts may use (default: no limit).")] = None,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Ingest every image that lands in FOLDER, once, until SIGINT/SIGTERM (or with --once, now);
    watch the reconstruction error for drift and fine-tune when it drifts."""
    import signal
    import threading

    with _Errors():
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder")
        from streamsim.stream import lock_store
        from streamsim.watch import Watcher, WatchConfig

        lock = lock_store(Path(store).absolute())
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        config = WatchConfig(folder=folder, recursive=recursive, patterns=tuple(pattern or ()), settle=settle,
                             rescan=rescan, retrain=retrain, keep=keep, attempts=attempts, cpu_budget=cpu_budget)
        with lock, _open(store) as index:
            if as_json:
                def emit(event):
                    sys.stdout.write(json.dumps(event) + "\n")
                    sys.stdout.flush()

                watcher = Watcher(index, config, emit, lock=lock)
                watcher.run_once(stop) if once else watcher.run(stop)
                emit({"event": "stopped", "ingested": watcher.stats.ingested, "duplicates": watcher.stats.duplicates,
                      "failed": watcher.stats.failed, "time": time.time()})
            else:
                _watch_live(index, config, once, stop, lock)


def _watch_live(index, config, once: bool, stop, lock) -> None:
    from rich.console import Console
    from rich.live import Live

    from streamsim.watch import Watcher

    err = Console(stderr=True)
    holder: dict = {}

    def line() -> str:
        w = holder.get("w")
        if w is None:
            return f"watching {config.folder}"
        st = w.stats
        return (f"watching {w.config.folder} — ingested {st.ingested} · duplicates {st.duplicates} · "
                f"failed {st.failed} · {st.rate:,.0f} files/s")

    with Live(line(), console=Console(), refresh_per_second=4, transient=False) as live:
        def on_event(event):
            if event["event"] not in ("stored", "duplicate", "failed", "watching"):  # drift and versions
                detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time", "validation"))
                live.console.print(f"{event['event']}: {detail}", markup=False, highlight=False)
            if event["event"] == "failed":
                live.console.print(f"[red]{event['path']}: {event['reason']}[/red]") if live.console.is_terminal else err.print(f"{event['path']}: {event['reason']}", markup=False, highlight=False)
            live.update(line())

        holder["w"] = watcher = Watcher(index, config, on_event, lock=lock)
        watcher.run_once(stop) if once else watcher.run(stop)
        live.update(line())


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on; other than loopback only with a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8765,
    token: Annotated[Optional[str], typer.Option("--token", envvar="STREAMSIM_TOKEN", help="Every /api request must "
                                                 "send `Authorization: Bearer TOKEN`.", show_default=False)] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest request body (uploads), in MB.")] = 20.0,
    store: StoreOpt = Path(DEFAULT_STORE),
) -> None:
    """Serve the store over HTTP: a JSON API and a web page to search by image, review duplicates,
    see versions and drift, and roll back (docs/serve.md). Runs until Ctrl-C."""
    with _Errors():
        try:
            from streamsim.server import Server, check_host
        except ImportError as err:
            raise RuntimeError(f"serve needs the serve extra ({err.name} is missing): pip install 'streamsim[serve]'") from err

        check_host(host, token)  # before the store and the encoder load
        with _open(store) as index:
            server = Server(index, host=host, port=port, token=token or None, max_upload=int(max_upload_mb * 1024 * 1024))
            typer.echo(f"serving {index.root} on {server.url}/" + (" (token required)" if token else ""))
            server.run()
