"""One USearch file per encoder version: add (upsert), remove, search, atomic save.

A :class:`Vectors` holds the vectors of one encoder version, keyed by image id, with cosine
distance and float32 storage.  It knows nothing about images, encoders or the catalog (numpy and
usearch only); the catalog stays the source of truth and any vector file can be rebuilt from it.

Search is exact (brute force) while the store is small and HNSW above that, with graph settings
raised well past the USearch defaults so that recall@10 against exact search stays >= 0.99 (see the
constants below for the measurements behind them).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from usearch.index import BatchMatches, Index, MetricKind, ScalarKind

__all__ = [
    "Vectors",
    "EXACT_SEARCH_MAX",
    "CONNECTIVITY",
    "EXPANSION_ADD",
    "EXPANSION_SEARCH",
    "COMPACT_FRACTION",
    "MAX_KEY",
]

# --- Tuning, measured with bench/bench_vectors.py on a 2-core x86 CPU (AVX2, usearch 2.26.6, a
# shared machine, so +-30% on timings), 64-d non-negative vectors from a mixture of 50 gaussian
# clusters (centres N(0,1)) passed through ReLU — the shape of our encoder's codes.  "spread" is the
# within-cluster std: 1.0 (overlapping clusters) is our reference; 1.5 is nearly structureless.
#
# Exact search costs one distance per stored vector.  Single-query p50: 10k -> 0.46 ms,
# 20k -> 0.85 ms, 50k -> 2.9 ms, 100k -> 6.1-7.4 ms.  Up to EXACT_SEARCH_MAX live vectors we search
# exactly (recall 1.0, under 1 ms); above it the HNSW graph answers (0.5 ms at 50k).  The graph is
# always built, so crossing the threshold costs nothing.
EXACT_SEARCH_MAX = 20_000

# HNSW.  USearch defaults are connectivity 16, expansion_add 128, expansion_search 64.  Recall@10
# vs exact at 100k (spread 1.0 / spread 1.5), one bulk add:
#   M=16, ef_add=128, ef=64 / 128 / 256 -> (spread 0.5: 0.991 / 0.999 / 1.0)  0.915 / 0.970 / 0.991
#   M=32, ef_add=64,  ef=64 / 128 / 256 -> 0.987 / 0.996 / 0.999   and  0.948 / 0.982 / 0.994
#   M=32, ef_add=128, ef=64 / 128 / 256 -> 0.992 / 0.998 / 0.999   and  0.970 / 0.992 / 0.998
# single-query p50 ~0.5 / 1.1 / 1.5-2.4 ms for ef 64 / 128 / 256.  ef_add=128 took 2-3x longer to
# build (59-69 s vs 23-38 s at 100k) — that cost is paid on every re-encode after drift — so we
# keep ef_add=64 and spend the budget at query time.  With ef=192 (streamed adds of 1000):
# spread 1.0 -> recall 0.996, p50 0.8 ms, build 19 s at 100k; spread 1.5 -> 0.991, 1.5 ms;
# 128-d spread 1.0 -> 0.995, 1.4 ms.  Raise Vectors.expansion_search (measure_recall() tells)
# if a store's own codes are less clustered than this.
# On the shipped encoder's own codes of 100k distinct deformed MNIST digits (bench/bench_speed.py),
# recall@10 vs exact was 0.9995 / 1.0 / 1.0 / 1.0 at ef 64 / 96 / 128 / 192, with search 0.31 /
# 0.55 / 0.49 / 0.61 ms: 128 keeps a margin on less clustered data at half a millisecond.
CONNECTIVITY = 32
EXPANSION_ADD = 64
EXPANSION_SEARCH = 128

# save() rebuilds the index when tombstones (removed slots not yet reused) exceed this fraction of
# all slots: tombstones cost memory, file size and graph hops, and a rebuild of 100k takes ~20 s.
COMPACT_FRACTION = 0.20

# Keys are image ids (SQLite rowids): 0 <= key <= 2**63 - 1.  USearch reserves 2**64 - 1 (and does
# not reject it!), and search() returns keys as int64 with -1 as padding, so the top half of the
# uint64 range is refused rather than silently wrapped to negative numbers.
MAX_KEY = 2**63 - 1

FEW_QUERIES = 16  # searched on the calling thread

_METRIC = "cos"
_DTYPE = "f32"


def _file_signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or we cannot tell
        return True
    return True


class Vectors:
    """The vectors of one encoder version, keyed by image id (uint64, never 2**64-1), cosine
    distance, float32 storage.

    Keys must lie in ``[0, 2**63 - 1]`` so that they survive the int64 arrays search() returns.
    All methods are thread-safe (one re-entrant lock around mutations and searches), so a reader
    thread may search while a writer adds.  Another *process* sees a writer's changes after the
    writer's save() and the reader's reload_if_changed().
    """

    path: Path
    ndim: int
    dirty: bool

    # ------------------------------------------------------------------ construction

    def __init__(self, path: str | os.PathLike, ndim: int, *, expansion_search: int | None = None):
        """Prefer :meth:`open`.  Builds an empty, unsaved index for ``path`` (nothing is read)."""
        ndim = _check_ndim(ndim)
        self.path = Path(path)
        self.ndim = ndim
        self._expansion_search = EXPANSION_SEARCH if expansion_search is None else int(expansion_search)
        if self._expansion_search < 1:
            raise ValueError(f"expansion_search must be >= 1, got {expansion_search}")
        self._lock = threading.RLock()
        self._index = self._new_index()
        self._signature: tuple[int, int, int, int] | None = None
        self._generation = 0  # bumped by every change of contents; lets compact() build unlocked
        # dirty = changed since the last load/save.  A new index is clean: an object that never
        # added anything must not overwrite a file another process wrote meanwhile.
        self.dirty = False

    @classmethod
    def open(cls, path: str | os.PathLike, ndim: int, *, expansion_search: int | None = None) -> "Vectors":
        """Load ``path`` if it exists (fully into memory, never ``view=True``: we add to it), else
        return an empty index that save() will write there.

        Raises ValueError if the file is not a USearch index or its dimensions, metric or scalar
        type differ from ``ndim``/cosine/f32.
        """
        self = cls(path, ndim, expansion_search=expansion_search)
        if self.path.exists():
            index, signature = self._read_file()
            with self._lock:
                self._swap(index, signature)
        return self

    def _new_index(self) -> Index:
        return Index(
            ndim=self.ndim,
            metric=_METRIC,
            dtype=_DTYPE,
            connectivity=CONNECTIVITY,
            expansion_add=EXPANSION_ADD,
            expansion_search=self._expansion_search,
        )

    def _read_file(self) -> tuple[Index, tuple[int, int, int, int]]:
        """Read and validate the file without touching this object (so the lock need not be held
        while a large file loads).  One descriptor serves both the bytes and the signature, so they
        agree even if a writer replaces the file meanwhile."""
        with open(self.path, "rb") as f:
            signature = _file_signature(os.fstat(f.fileno()))
            data = f.read()
        try:
            meta = Index.metadata(data)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a USearch index file ({e}); delete it to rebuild it from the catalog") from e
        if not meta:
            raise ValueError(f"{self.path} is not a USearch index file; delete it to rebuild it from the catalog")
        dims = int(meta["dimensions"])
        if dims != self.ndim:
            raise ValueError(
                f"{self.path} holds {dims}-d vectors but {self.ndim}-d were asked for: it belongs to a "
                f"different encoder; open it with ndim={dims} or delete it to rebuild from the catalog"
            )
        if meta["kind_metric"] != MetricKind.Cos:
            raise ValueError(
                f"{self.path} uses metric {meta['kind_metric'].name} but streamsim needs Cos "
                f"(both {dims}-d); delete it to rebuild it from the catalog"
            )
        if meta["kind_scalar"] != ScalarKind.F32:
            raise ValueError(
                f"{self.path} stores {meta['kind_scalar'].name} vectors but streamsim needs F32 "
                f"(both {dims}-d); delete it to rebuild it from the catalog"
            )
        index = self._new_index()
        index.load(data)
        # Neither expansion setting is stored in the file; connectivity is (when non-empty).
        index.expansion_add = EXPANSION_ADD
        index.expansion_search = self._expansion_search
        return index, signature

    def _swap(self, index: Index, signature) -> None:
        """Caller holds the lock."""
        self._index = index
        self._signature = signature
        self._generation += 1
        self.dirty = False

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        """Live vectors (removed ones excluded)."""
        with self._lock:
            return len(self._index)

    def __repr__(self) -> str:
        return f"Vectors({str(self.path)!r}, ndim={self.ndim}, len={len(self)}, dirty={self.dirty})"

    @property
    def tombstones(self) -> int:
        """Slots of removed vectors not yet reused by a later add (compact() clears them)."""
        with self._lock:
            return max(0, int(self._index.stats.nodes) - len(self._index))

    @property
    def expansion_search(self) -> int:
        return self._expansion_search

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        value = int(value)
        if value < 1:
            raise ValueError(f"expansion_search must be >= 1, got {value}")
        with self._lock:
            self._expansion_search = value
            self._index.expansion_search = value

    def keys(self) -> np.ndarray:
        """int64 array of the live keys (in USearch's order, not sorted)."""
        with self._lock:
            return self._live_keys_u64().astype(np.int64)

    def contains(self, keys) -> np.ndarray:
        """bool [N]: which keys are present.  Keys outside the valid range are simply absent."""
        keys, valid = _coerce_keys(keys, strict=False)
        out = np.zeros(len(keys), dtype=bool)
        if valid.any():
            with self._lock:
                out[valid] = np.asarray(self._index.contains(keys[valid].astype(np.uint64)), dtype=bool)
        return out

    def get(self, keys) -> np.ndarray:
        """float32 [N, ndim] of the stored vectors; KeyError naming the keys that are absent."""
        keys, valid = _coerce_keys(keys, strict=False)
        with self._lock:
            present = np.zeros(len(keys), dtype=bool)
            if valid.any():
                present[valid] = np.asarray(self._index.contains(keys[valid].astype(np.uint64)), dtype=bool)
            if not present.all():
                missing = keys[~present][:10].tolist()
                raise KeyError(f"{int((~present).sum())} keys not in {self.path.name}, e.g. {missing}")
            return self._get_rows(keys.astype(np.uint64))

    def _get_rows(self, keys_u64: np.ndarray) -> np.ndarray:
        if len(keys_u64) == 0:
            return np.zeros((0, self.ndim), dtype=np.float32)
        rows = self._index.get(keys_u64, dtype=_DTYPE)
        return np.asarray(np.vstack(rows), dtype=np.float32).reshape(len(keys_u64), self.ndim)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest live vectors by cosine distance (1 - cos).

        ``queries`` is float [N, ndim] or [ndim] (then N = 1).  Returns ``(keys int64 [N, k],
        distances float32 [N, k])``, best first, padded with key -1 and distance +inf where fewer
        than k live vectors exist.  Exact while len(self) <= EXACT_SEARCH_MAX, HNSW above; an HNSW
        row that came back short is redone exactly.
        """
        k = _check_k(k)
        q = _coerce_vectors(queries, self.ndim, what="queries")
        n = q.shape[0]
        out_keys = np.full((n, k), -1, dtype=np.int64)
        out_dist = np.full((n, k), np.inf, dtype=np.float32)
        if n == 0:
            return out_keys, out_dist
        with self._lock:
            live = len(self._index)
            if live == 0:
                return out_keys, out_dist
            want = min(k, live)
            exact = live <= EXACT_SEARCH_MAX
            got_keys, got_dist, counts = self._raw_search(q, want, exact)
            if not exact:
                short = np.flatnonzero(counts < want)
                if len(short):  # tombstone-heavy or disconnected graph: fall back to brute force
                    ek, ed, ec = self._raw_search(q[short], want, True)
                    got_keys[short], got_dist[short], counts[short] = ek, ed, ec
        filled = np.arange(want)[None, :] < counts[:, None]
        out_keys[:, :want] = np.where(filled, got_keys.astype(np.int64), -1)
        out_dist[:, :want] = np.where(filled, got_dist, np.inf)
        return out_keys, out_dist

    def _raw_search(self, q: np.ndarray, count: int, exact: bool):
        # a few queries: on the calling thread (starting USearch's threads costs more than they save)
        r = self._index.search(q, count, exact=exact, threads=1 if len(q) <= FEW_QUERIES else 0)
        if isinstance(r, BatchMatches):
            keys = np.asarray(r.keys, dtype=np.uint64).reshape(len(q), -1)[:, :count]
            dist = np.asarray(r.distances, dtype=np.float32).reshape(len(q), -1)[:, :count]
            counts = np.minimum(np.asarray(r.counts, dtype=np.int64).reshape(len(q)), count)
        else:  # one query: usearch returns Matches holding only the valid results
            m = len(r.keys)
            keys = np.zeros((1, count), dtype=np.uint64)
            dist = np.full((1, count), np.inf, dtype=np.float32)
            keys[0, :m] = r.keys[:count]
            dist[0, :m] = r.distances[:count]
            counts = np.array([min(m, count)], dtype=np.int64)
        return keys.copy(), dist.copy(), counts.copy()

    def measure_recall(self, k: int = 10, sample: int = 200, seed: int = 0) -> float:
        """recall@k of the HNSW graph against exact search, with ``sample`` stored vectors as
        queries.  For tuning ``expansion_search`` on the store's own data; 1.0 when empty."""
        k = _check_k(k)
        with self._lock:
            live = len(self._index)
            if live == 0:
                return 1.0
            rng = np.random.default_rng(seed)
            all_keys = self._live_keys_u64()
            pick = all_keys[rng.choice(live, size=min(sample, live), replace=False)]
            q = self._get_rows(pick)
            want = min(k, live)
            hk, _, hc = self._raw_search(q, want, False)
            ek, _, ec = self._raw_search(q, want, True)
        hits = 0
        for i in range(len(q)):
            hits += len(set(hk[i, : hc[i]].tolist()) & set(ek[i, : ec[i]].tolist()))
        return hits / max(1, int(ec.sum()))

    # ------------------------------------------------------------------ writing

    def add(self, keys, vectors) -> None:
        """Upsert: ``keys`` int [N], ``vectors`` float [N, ndim].  A key already present is
        replaced (remove, then add), so re-adding never duplicates; within one call the last
        occurrence of a key wins.  Validates everything before changing anything."""
        keys, _ = _coerce_keys(keys, strict=True)
        vecs = _coerce_vectors(vectors, self.ndim, what="vectors")
        if len(keys) != vecs.shape[0]:
            raise ValueError(
                f"got {len(keys)} keys but {vecs.shape[0]} vectors; pass one key per row of vectors"
            )
        if len(keys) == 0:
            return
        uniq, first_in_reversed = np.unique(keys[::-1], return_index=True)
        if len(uniq) != len(keys):  # keep the last occurrence of each key, in input order
            last = np.sort(len(keys) - 1 - first_in_reversed)
            keys, vecs = keys[last], vecs[last]
        k64 = keys.astype(np.uint64)
        with self._lock:
            self.dirty = True
            self._generation += 1
            present = np.asarray(self._index.contains(k64), dtype=bool)
            if present.any():
                self._index.remove(k64[present])
            self._index.add(k64, vecs)

    def remove(self, keys) -> int:
        """Remove the keys that are present; returns how many were removed."""
        keys, valid = _coerce_keys(keys, strict=False)
        keys = np.unique(keys[valid]).astype(np.uint64)
        if len(keys) == 0:
            return 0
        with self._lock:
            present = np.asarray(self._index.contains(keys), dtype=bool)
            if not present.any():
                return 0
            self.dirty = True
            self._generation += 1
            removed = self._index.remove(keys[present])
            return int(np.sum(removed))

    def compact(self) -> None:
        """Rebuild the index from the live vectors, dropping tombstones (marks dirty).

        The new graph is built without holding the lock, so searches (and adds) go on meanwhile;
        if the contents changed during the build, it is redone under the lock."""
        for attempt in range(2):
            with self._lock:
                generation = self._generation
                live_keys = self._live_keys_u64()
                vecs = self._get_rows(live_keys)
            if attempt == 0:
                index = self._build(live_keys, vecs)
                with self._lock:
                    if self._generation == generation:
                        self._install_compacted(index)
                        return
            else:  # a writer raced the unlocked build: rebuild holding the lock
                with self._lock:
                    live_keys = self._live_keys_u64()
                    self._install_compacted(self._build(live_keys, self._get_rows(live_keys)))
                    return

    def _live_keys_u64(self) -> np.ndarray:
        if len(self._index) == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.asarray(self._index.keys[:], dtype=np.uint64)

    def _build(self, keys_u64: np.ndarray, vecs: np.ndarray) -> Index:
        index = self._new_index()
        if len(keys_u64):
            index.add(keys_u64, vecs)
        return index

    def _install_compacted(self, index: Index) -> None:
        self._index = index
        self._generation += 1
        self.dirty = True

    def _needs_compaction(self) -> bool:
        with self._lock:
            nodes = int(self._index.stats.nodes)
            return nodes > 0 and (nodes - len(self._index)) > COMPACT_FRACTION * nodes

    def save(self) -> None:
        """Atomically write the index to ``path`` (temp file in the same folder, fsync, os.replace,
        fsync the folder; creates the folder).  No-op when not dirty and the file exists (a new,
        untouched index is written once, empty).  Compacts first when tombstones exceed
        COMPACT_FRACTION of all slots.  One writer per file: saves from two objects overwrite."""
        if self.dirty and self._needs_compaction():
            self.compact()
        with self._lock:
            if not self.dirty and self.path.exists():
                return
            folder = self.path.parent
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{self.path.name}.tmp-{os.getpid()}"
            try:
                self._index.save(os.fspath(tmp))
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass
                raise
            _fsync_dir(folder)
            self._signature = _file_signature(os.stat(self.path))
            self.dirty = False
            self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        """Delete temp files left by writers that crashed (their process no longer exists)."""
        prefix = f"{self.path.name}.tmp-"
        try:
            entries = list(self.path.parent.iterdir())
        except OSError:  # pragma: no cover
            return
        for p in entries:
            if not p.name.startswith(prefix):
                continue
            pid = p.name[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                try:
                    p.unlink()
                except OSError:  # pragma: no cover
                    pass

    def reload_if_changed(self) -> bool:
        """For readers in another process: if the file's inode/size/mtime differ from what this
        object last loaded or saved, load it again and return True.  The file is read without
        holding the lock (searches go on) and swapped in at the end.  An object with unsaved
        changes (dirty) is never reloaded — that would discard them — and returns False."""
        try:
            signature = _file_signature(os.stat(self.path))
        except FileNotFoundError:
            return False
        with self._lock:
            if signature == self._signature or self.dirty:
                return False
            generation = self._generation
        index, signature = self._read_file()
        with self._lock:
            if self.dirty or self._generation != generation:
                return False
            self._swap(index, signature)
            return True


# ---------------------------------------------------------------------- validation


def _check_ndim(ndim) -> int:
    if isinstance(ndim, bool) or not isinstance(ndim, (int, np.integer)) or int(ndim) < 1:
        raise ValueError(f"ndim must be a positive integer, got {ndim!r}")
    return int(ndim)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _coerce_keys(keys, *, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """Keys as an int64-valued array plus a mask of those in [0, MAX_KEY].

    strict: out-of-range keys raise ValueError; otherwise they are reported in the mask (such a
    key can never be present).  Values are returned as int64 where valid, 0 elsewhere.
    """
    if isinstance(keys, (int, np.integer)) and not isinstance(keys, bool):
        keys = [keys]
    try:
        arr = np.asarray(keys)
    except (OverflowError, ValueError) as e:
        raise ValueError(f"keys must be a 1-d array of integers in [0, 2**63-1]: {e}") from e
    if not isinstance(keys, np.ndarray) and arr.dtype.kind == "f":
        arr = np.asarray(keys, dtype=object)  # e.g. [-1, 2**64-1] mixes int64 and uint64 range
    if arr.ndim != 1:
        raise ValueError(f"keys must be a 1-d array of integers, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    if arr.dtype == object:  # Python ints beyond 64 bits, or mixed junk
        try:
            ints = [int(x) for x in arr]
        except (TypeError, ValueError) as e:
            raise ValueError(f"keys must be integers: {e}") from e
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in arr):
            raise ValueError("keys must be integers (image ids)")
        valid = np.array([0 <= x <= MAX_KEY for x in ints], dtype=bool)
        out = np.array([x if v else 0 for x, v in zip(ints, valid)], dtype=np.int64)
    elif arr.dtype.kind == "u":
        a = arr.astype(np.uint64)
        valid = a <= np.uint64(MAX_KEY)
        out = np.where(valid, a, 0).astype(np.int64)
    elif arr.dtype.kind == "i":
        a = arr.astype(np.int64)
        valid = a >= 0
        out = np.where(valid, a, 0)
    else:
        raise ValueError(f"keys must be integers (image ids), got dtype {arr.dtype}")
    if strict and not valid.all():
        bad = arr[~valid][:5].tolist()
        raise ValueError(
            f"keys must be image ids in [0, 2**63-1] (2**64-1 is reserved by USearch; negative ids "
            f"do not exist); got {bad}"
        )
    return out, valid


def _coerce_vectors(vectors, ndim: int, *, what: str) -> np.ndarray:
    try:
        arr = np.asarray(vectors)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a float array of shape [N, {ndim}]: {e}") from e
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be real numbers of shape [N, {ndim}], got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != ndim:
        raise ValueError(
            f"{what} must have shape [N, {ndim}] (or [{ndim}] for one), got {tuple(np.shape(vectors))}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        rows = np.flatnonzero(~np.isfinite(out).all(axis=1))[:5].tolist()
        raise ValueError(
            f"{what} contain NaN or infinite values (or values too large for float32) in rows {rows}; "
            "fix or drop those rows (the encoder's output should always be finite)"
        )
    return out
