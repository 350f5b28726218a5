"""Worker processes for decoding image files, for ingest and eval alike.

Decoding and normalising hold the GIL, so a batch of files is spread over processes, not threads.
A :class:`Decoder` turns files into :class:`~streamsim.images.Loaded` pixels or an
:class:`~streamsim.images.ImageError` each, and no file can stop it:

- a file that takes longer than ``timeout`` seconds to decode is failed (an interval timer
  interrupts the work in the process that does it; a codec stuck in C code is caught by a wait
  on its batch, and the stuck workers are killed);
- a worker that dies (a codec crash) costs its batch a retry one file at a time in fresh
  workers; the file that kills a worker again is failed and the rest are decoded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import images
from .defaults import DECODE_TIMEOUT

PARALLEL_LOAD_MIN = 512  # files; below this, starting worker processes costs more than it saves
POOL_BATCH_MIN = 16  # files; a smaller batch is decoded here even when a pool is running
MAX_WORKERS = 8
# a 1×1 grey PNG: what a new worker decodes once to warm up (its codec imported, its caches filled)
_TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b550000000a49444154"
                          "789c636000000002000148afa4710000000049454e44ae426082")
CRASHED = "the decoder crashed on this file (its worker process died)"
TIMED_OUT = "took longer than {seconds:g} s to decode"

class _TimedOut(BaseException):
    """Raised inside a decode by the interval timer (a BaseException, so that the loader's
    catch-all does not turn it into an ordinary decoding error)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Interrupt the block with :class:`_TimedOut` after ``seconds`` — where that can be done:
    in a process's main thread, with ``SIGALRM`` not used by anyone else. Elsewhere the block
    runs unbounded (a pool's wait on the batch is then the backstop)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None))
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _TimedOut

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def load_or_error(path, timeout: float | None = DECODE_TIMEOUT):
    """``images.load(path)``, or the :class:`~streamsim.images.ImageError` that says why not —
    including a decode that ran past ``timeout`` seconds. Never raises for a file's content."""
    source = str(path)
    try:
        with time_limit(timeout):
            return images.load(path)
    except images.ImageError as e:
        return e
    except _TimedOut:
        return images.ImageError(source, TIMED_OUT.format(seconds=timeout))
    except Exception as e:  # noqa: BLE001 - e.g. a TypeError for a path of an odd type: that file's failure
        return images.ImageError(source, f"{type(e).__name__}: {e}")


def _load_chunk(loader: Callable, paths: list, timeout: float | None) -> list:
    return [loader(p, timeout) for p in paths]


def workers_allowed() -> bool:
    """Whether worker processes may be, and are worth being, started here: not on one core; and
    they are spawned, and a spawned process imports the main module of the program first, so a
    script without an ``if __name__ == "__main__":`` guard would run again in every worker (and
    the pool break). So: yes for an interactive session or ``python -c``, and for a main module
    whose source has such a guard (the ``streamsim`` command, pytest, a well-formed script); no
    otherwise — the work then runs in this process."""
    if (os.cpu_count() or 1) < 2:
        return False
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:
        return True
    try:
        return "__main__" in Path(path).read_text(errors="replace")
    except OSError:
        return False


def _exit_with_parent(parent: int, nice: int = 0, loader: Callable | None = None) -> None:
    """In a worker: exit as soon as the process that started it is gone (even SIGKILLed), so
    that no orphaned worker outlives a crashed watcher; run ``nice`` lower in priority. ``loader``
    (unpickled here, which imports its module) is warmed up on a tiny image when it is the usual
    one, so that the first batch of files does not wait for imports."""
    if loader is load_or_error:
        loader(_TINY_PNG, None)
        import scipy.ndimage  # noqa: F401 - what normalising a grainy or speckled scan needs, imported now
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def process_pool(workers: int | None = None, *, nice: int = 0, loader: Callable | None = None):
    """Spawned worker processes that exit with this one (``nice``: that much lower in priority),
    each with ``loader``'s module imported; start them only where :func:`workers_allowed`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or min(os.cpu_count() or 1, MAX_WORKERS)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(), nice, loader))


def kill_pool(pool) -> None:
    """Stop a pool now, killing its workers (one may be stuck in a codec's C code)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for p in processes:
        with contextlib.suppress(Exception):
            p.kill()
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(timeout=5)


class Decoder:
    """Files → ``(path, Loaded | ImageError)``, in order, in worker processes where allowed.

    ``processes``: ``True`` keeps a pool running from the start (the watcher), ``None`` starts
    one for a batch of at least :data:`PARALLEL_LOAD_MIN` files and keeps it, ``False`` decodes
    here. ``loader(path, timeout)`` is :func:`load_or_error` (a test passes one that crashes or
    hangs: it must be importable by a spawned worker).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, *, processes: bool | None = None, timeout: float | None = DECODE_TIMEOUT,
                 loader: Callable = load_or_error, workers: int | None = None, grace: float = 10.0):
        self.timeout = timeout
        self.grace = grace  # beyond the files' own time limits, how long a batch may take before its workers are killed
        self.loader = loader
        self.workers = workers or min(os.cpu_count() or 1, MAX_WORKERS)
        self._allowed = processes is not False and workers_allowed()
        self._pool = None
        self.crashes = 0  # worker deaths and stuck workers killed, for reports
        if processes and self._allowed:
            self.start()

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes now (where allowed), for a bulk of files to come."""
        if self._allowed and self._pool is None:
            self._pool = process_pool(self.workers, loader=self.loader)
            for _ in range(self.workers):  # a spawned pool starts a worker per task that finds none idle
                self._pool.submit(int)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def load(self, files: Iterable) -> Iterator[tuple]:
        yield from self.submit(files)

    def submit(self, files: Iterable) -> "Decoding":
        """Start decoding ``files`` and return at once: the :class:`Decoding` yields
        ``(file, result)`` in order. Workers decode it while the caller does other work (stores the
        batch before); a batch too small for the workers is decoded when it is read."""
        files = list(files)
        if self._allowed and (len(files) >= PARALLEL_LOAD_MIN or (self._pool is not None and len(files) >= POOL_BATCH_MIN)):
            if self._pool is None:
                self._pool = process_pool(self.workers, loader=self.loader)
            size = max(1, min(64, -(-len(files) // (4 * self.workers))))
            chunks = [files[i : i + size] for i in range(0, len(files), size)]
            pool = self._pool
            return Decoding(self, chunks, pool, [pool.submit(_load_chunk, self.loader, c, self.timeout) for c in chunks])
        return Decoding(self, [files], None, None)

    def _wait(self, chunk_len: int) -> float | None:
        return None if self.timeout is None else self.timeout * chunk_len + self.grace

    def _results(self, chunk: list, pool, future) -> list:
        """One chunk's results: its future's, or — where a worker died or hangs — each file's
        again in fresh workers."""
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result(timeout=self._wait(len(chunk)))
        except (BrokenProcessPool, FutureTimeout, RuntimeError):
            # a worker died or hangs: the pool is gone; this chunk (and every later one submitted
            # to it, whose futures fail the same way) is retried one file at a time
            if self._pool is pool:
                self.crashes += 1
                kill_pool(pool)
                self._pool = None
            return self._one_by_one(chunk)

    def _one_by_one(self, chunk: list) -> list:
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures.process import BrokenProcessPool

        out = []
        for f in chunk:
            if self._pool is None:
                self._pool = process_pool(self.workers, loader=self.loader)
            try:
                out.append(self._pool.submit(_load_chunk, self.loader, [f], self.timeout).result(
                    timeout=self._wait(1))[0])
                continue
            except BrokenProcessPool:
                reason = CRASHED
            except FutureTimeout:
                reason = TIMED_OUT.format(seconds=self.timeout)
            self.crashes += 1
            kill_pool(self._pool)
            self._pool = None
            out.append(images.ImageError(str(f), reason))
        return out


class Decoding:
    """Files being decoded by a :class:`Decoder` (:meth:`Decoder.submit`): iterating yields
    ``(file, Loaded | ImageError)`` in the files' order, waiting for each chunk as needed."""

    def __init__(self, decoder: Decoder, chunks: list[list], pool, futures: list | None):
        self._decoder, self._chunks, self._pool, self._futures = decoder, chunks, pool, futures

    def done(self) -> bool:
        """Whether every file is decoded (reading the results then waits for nothing)."""
        return self._futures is None or all(f.done() for f in self._futures)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`done`."""
        if self._futures is not None:
            from concurrent.futures import wait

            wait(self._futures, timeout=timeout)
        return self.done()

    def cancel(self) -> None:
        """Drop the files not yet decoded (what is running finishes in its worker, unread)."""
        for f in self._futures or ():
            f.cancel()

    def __iter__(self) -> Iterator[tuple]:
        decoder = self._decoder
        if self._futures is None:  # decoded here, one file at a time as they are read
            for f in self._chunks[0]:
                yield f, decoder.loader(f, decoder.timeout)
            return
        for chunk, future in zip(self._chunks, self._futures):
            yield from zip(chunk, decoder._results(chunk, self._pool, future))
