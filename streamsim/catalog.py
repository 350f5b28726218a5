"""The store's SQLite catalog: the source of truth.

It holds every image's normalised pixels (so any index can be rebuilt without the original
files), the paths each image was stored under, files that could not be stored and why, encoder
versions and their state, and an event log. It runs in WAL mode so that readers in other
processes never block the writer, and every multi-row change is one transaction.

This module imports neither JAX nor the encoder: ``streamsim status`` answers from it alone.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .defaults import PIXELS_SHAPE

if TYPE_CHECKING:  # numpy is imported where it is used: `events` and `versions` need none of it
    import numpy as np

CATALOG_FILE = "catalog.sqlite"  # inside the store folder
IN_CHUNK = 500  # ids per "IN (...)" query (SQLite binds at most 999 parameters in older builds)
SCHEMA_VERSION = 1
# building: being trained or indexed; ready: complete, not active; active: serving searches;
# retired: its index file was pruned (the checkpoint stays; rollback rebuilds the index);
# rejected: failed the validation gate; failed: the build stopped (error, crash, cancel).
VERSION_STATES = ("building", "ready", "active", "retired", "rejected", "failed")
# not_duplicates: the images are distinct (dedup never links them to each other again);
# keep_all: they are duplicates, all kept (dedup no longer lists the group unless an image joins it).
DECISIONS = ("not_duplicates", "keep_all")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images(
    id INTEGER PRIMARY KEY AUTOINCREMENT,      -- never reused: ids are vector keys
    digest TEXT NOT NULL UNIQUE,               -- sha256 of the input's own bytes
    pixel_digest TEXT NOT NULL,                -- sha256 of the normalised pixels
    pixels BLOB NOT NULL,                      -- uint8 [28, 28]
    path TEXT,                                 -- first path stored under (NULL: in-memory)
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_pixel_digest ON images(pixel_digest);
CREATE TABLE IF NOT EXISTS paths(
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    added REAL NOT NULL,
    PRIMARY KEY(path, image_id)
);
CREATE INDEX IF NOT EXISTS paths_image ON paths(image_id);
CREATE TABLE IF NOT EXISTS failures(
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS journal(            -- one row per file seen by ingest: at most once
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest TEXT,                               -- sha256 of the bytes read (NULL if unreadable)
    outcome TEXT NOT NULL,                     -- stored | duplicate | failed
    image_id INTEGER,
    reason TEXT,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions(
    version INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    parent INTEGER,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS scores(            -- reconstruction error of each image as it arrived
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,                  -- the encoder version active when it was stored
    error REAL NOT NULL,                       -- mean binary cross-entropy of its reconstruction
    score REAL NOT NULL                        -- normalised drift score (streamsim.drift)
);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER,
    image_id INTEGER,
    path TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS decisions(         -- a person's verdict on a group of duplicates
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    decision TEXT NOT NULL,                    -- not_duplicates | keep_all
    ids TEXT NOT NULL,                         -- JSON list of the group's image ids, sorted
    time REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Stored:
    """Outcome of storing one image: its id and whether it was new (False: same bytes existed)."""

    id: int
    new: bool


def pixel_digest(pixels: np.ndarray) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(pixels, np.uint8).tobytes()).hexdigest()


class Catalog:
    """A connection to one store's catalog. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self._lock = threading.RLock()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no catalog here")
            uri = self.path.absolute().as_uri() + "?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=60000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.row_factory = sqlite3.Row
        if not readonly:
            with self.transaction() as db:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),)
                )

    @classmethod
    def of_store(cls, store: str | Path, *, readonly: bool = True) -> "Catalog":
        """The catalog of the store folder ``store``; FileNotFoundError if there is no store."""
        db = Path(store) / CATALOG_FILE
        if not db.exists():
            raise FileNotFoundError(f"{store}: no streamsim store here (create one with `streamsim add`)")
        return cls(db, readonly=readonly)

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def transaction(self):
        return _Transaction(self)

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # -- images -------------------------------------------------------------------------------

    def add_images(self, records: list[tuple[str, np.ndarray, str | None]],
                   journal: list[tuple[int, int] | None] | None = None,
                   scores: list[tuple[int, float, float]] | None = None) -> list[Stored]:
        """Store ``(digest, pixels, path)`` records in one transaction.

        A digest already stored (or repeated within the batch) returns the existing id with
        ``new=False`` and records ``path`` as another path of that image. ``journal`` (aligned with
        ``records``) gives each file's ``(size, mtime_ns)`` to journal in the same transaction;
        ``scores`` each record's ``(encoder version, reconstruction error, drift score)``, kept for
        the new images.
        """
        import numpy as np

        now = time.time()
        journal = journal or [None] * len(records)
        scores = scores or [None] * len(records)
        pixels = []
        for _, px, _ in records:
            px = np.ascontiguousarray(px, np.uint8)
            if px.shape != PIXELS_SHAPE:
                raise ValueError(f"pixels must be uint8 [28, 28], got {px.shape}")
            pixels.append(px)
        out: list[Stored] = []
        score_rows, path_rows, journal_rows = [], [], []
        with self.transaction() as db:
            # the batch's digests already stored: one query per chunk, not one per image
            digests = list({r[0] for r in records})
            known = {}
            for start in range(0, len(digests), IN_CHUNK):
                chunk = digests[start : start + IN_CHUNK]
                known.update(db.execute(f"SELECT digest, id FROM images WHERE digest IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall())
            for (digest, _, path), px, stat, score in zip(records, pixels, journal, scores):
                image_id = known.get(digest)
                new = image_id is None
                if new:
                    image_id = known[digest] = int(db.execute(
                        "INSERT INTO images(digest, pixel_digest, pixels, path, added) VALUES(?, ?, ?, ?, ?)",
                        (digest, pixel_digest(px), px.tobytes(), path, now)).lastrowid)
                    if score is not None:
                        score_rows.append((image_id, int(score[0]), float(score[1]), float(score[2])))
                if path is not None:
                    path_rows.append((image_id, path, now))
                    if stat is not None:
                        journal_rows.append((path, int(stat[0]), int(stat[1]), digest,
                                             "stored" if new else "duplicate", image_id, now))
                out.append(Stored(int(image_id), new))
            db.executemany("INSERT INTO scores(image_id, version, error, score) VALUES(?, ?, ?, ?)", score_rows)
            db.executemany("INSERT OR IGNORE INTO paths(image_id, path, added) VALUES(?, ?, ?)", path_rows)
            db.executemany("DELETE FROM failures WHERE path = ?", [(r[1],) for r in path_rows])
            db.executemany("INSERT OR REPLACE INTO journal(path, size, mtime_ns, digest, outcome, image_id, reason, time) "
                           "VALUES(?, ?, ?, ?, ?, ?, NULL, ?)", journal_rows)
        return out

    def journal(self) -> dict[str, tuple[int, int]]:
        """Every journalled file: ``path -> (size, mtime_ns)`` as it was when it was ingested."""
        return {r[0]: (int(r[1]), int(r[2])) for r in self._query("SELECT path, size, mtime_ns FROM journal")}

    def journal_stats(self, paths: Iterable[str]) -> dict[str, tuple[int, int]]:
        """``path -> (size, mtime_ns)`` as journalled, for those of ``paths`` the journal has."""
        return {r[0]: (int(r[1]), int(r[2])) for r in self._by_ids(
            "SELECT path, size, mtime_ns FROM journal WHERE path IN ({marks})", [str(p) for p in paths])}

    def dangling_journal(self) -> list[dict[str, Any]]:
        """Journal rows that say a file was stored, or stored as a duplicate, under an image id the
        catalog never handed out (a catalog restored from an older copy, say): ``path``,
        ``outcome``, ``image_id``. (An image removed since keeps its journal row on purpose: the
        watcher must not take the file again.)"""
        return [dict(r) for r in self._query(
            "SELECT path, outcome, image_id FROM journal WHERE outcome IN ('stored', 'duplicate') AND "
            "(image_id IS NULL OR image_id > COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'images'), 0)) "
            "ORDER BY path")]

    def forget_journal(self, paths: Iterable[str]) -> int:
        """Drop these files' journal rows, so that a watcher takes them again; returns how many."""
        paths = [str(p) for p in paths]
        with self.transaction() as db:
            return sum(db.execute("DELETE FROM journal WHERE path = ?", (p,)).rowcount for p in paths)

    def integrity(self) -> list[str]:
        """SQLite's own check of the database file: an empty list when it is sound."""
        rows = [str(r[0]) for r in self._query("PRAGMA quick_check")]
        return [] if rows == ["ok"] else rows

    def max_image_id(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(id), 0) FROM images")[0][0])

    def find_pixels(self, pixels: np.ndarray) -> list[int]:
        """Ids of stored images whose normalised pixels are exactly these."""
        rows = self._query("SELECT id FROM images WHERE pixel_digest = ? ORDER BY id", (pixel_digest(pixels),))
        return [int(r[0]) for r in rows]

    def remove(self, image_id: int) -> bool:
        with self.transaction() as db:
            cur = db.execute("DELETE FROM images WHERE id = ?", (int(image_id),))
            return cur.rowcount > 0

    def get(self, image_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT id, path, added, digest FROM images WHERE id = ?", (int(image_id),))
        if not rows:
            return None
        r = rows[0]
        paths = [p[0] for p in self._query("SELECT path FROM paths WHERE image_id = ? ORDER BY added, path", (r["id"],))]
        return {"id": int(r["id"]), "path": r["path"], "paths": paths, "added": r["added"], "digest": r["digest"]}

    def _by_ids(self, sql: str, ids: list[Any]) -> Iterator[sqlite3.Row]:
        """Rows of ``sql`` (with one ``IN ({marks})`` placeholder) for ``ids``, queried in chunks
        that stay under SQLite's limit on bound parameters."""
        for start in range(0, len(ids), IN_CHUNK):
            chunk = ids[start : start + IN_CHUNK]
            yield from self._query(sql.format(marks=",".join("?" * len(chunk))), chunk)

    def first_paths(self, ids: Iterable[int]) -> dict[int, str | None]:
        """``id -> the first path it was stored under`` for the stored ones of ``ids``."""
        return {int(r[0]): r[1] for r in self._by_ids("SELECT id, path FROM images WHERE id IN ({marks})",
                                                         [int(i) for i in ids])}

    def pixels(self, ids: Iterable[int]) -> np.ndarray:
        """Pixels ``uint8 [N, 28, 28]`` for the given ids, in that order (KeyError for a missing id)."""
        import numpy as np

        ids = [int(i) for i in ids]
        found = {int(r[0]): r[1] for r in self._by_ids("SELECT id, pixels FROM images WHERE id IN ({marks})", ids)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no stored image with id {missing[0]}")
        buf = b"".join(found[i] for i in ids)
        return np.frombuffer(buf, np.uint8).reshape(len(ids), *PIXELS_SHAPE).copy()

    def iter_pixels(self, *, batch: int = 4096, after: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored image as ``(ids int64 [n], pixels uint8 [n, 28, 28])`` batches, by id."""
        import numpy as np

        last = after
        while True:
            rows = self._query("SELECT id, pixels FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, batch))
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            px = np.frombuffer(b"".join(r[1] for r in rows), np.uint8).reshape(len(rows), *PIXELS_SHAPE).copy()
            yield ids, px
            last = int(ids[-1])

    def ids_after(self, after: int) -> list[int]:
        return [int(r[0]) for r in self._query("SELECT id FROM images WHERE id > ? ORDER BY id", (int(after),))]

    def existing_ids(self, ids: Iterable[int]) -> list[int]:
        """Which of ``ids`` are stored."""
        return [int(r[0]) for r in self._by_ids("SELECT id FROM images WHERE id IN ({marks})", [int(i) for i in ids])]

    def ids(self) -> np.ndarray:
        import numpy as np

        rows = self._query("SELECT id FROM images ORDER BY id")
        return np.fromiter((r[0] for r in rows), np.int64, len(rows))

    def count_images_from(self, first_id: int) -> int:
        """How many images have an id of at least ``first_id``."""
        return int(self._query("SELECT COUNT(*) FROM images WHERE id >= ?", (int(first_id),))[0][0])

    def count_images(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM images")[0][0])

    def count_paths(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM paths")[0][0])

    def identical_groups(self) -> list[list[int]]:
        """Groups (size ≥ 2) of images whose normalised pixels are identical."""
        rows = self._query(
            "SELECT group_concat(id) FROM images GROUP BY pixel_digest HAVING COUNT(*) > 1 ORDER BY MIN(id)"
        )
        return [sorted(int(x) for x in r[0].split(",")) for r in rows]

    def identical_file_groups(self) -> list[dict[str, Any]]:
        """Groups of identical files: one image stored under several paths, or several images whose
        normalised pixels are identical. Each group: ``{"ids": [...], "paths": [...]}``."""
        groups: dict[str, set[int]] = {}
        for r in self._query(
            "SELECT pixel_digest, group_concat(id) FROM images GROUP BY pixel_digest "
            "HAVING COUNT(*) > 1 OR (SELECT COUNT(*) FROM paths WHERE image_id = MIN(images.id)) > 1"
        ):
            groups[r[0]] = {int(x) for x in r[1].split(",")}
        for r in self._query("SELECT i.pixel_digest, p.image_id FROM paths p JOIN images i ON i.id = p.image_id "
                             "GROUP BY p.image_id HAVING COUNT(*) > 1"):
            groups.setdefault(r[0], set()).add(int(r[1]))
        out = []
        for ids in groups.values():
            ids_sorted = sorted(ids)
            marks = ",".join("?" * len(ids_sorted))
            paths = [p[0] for p in self._query(f"SELECT path FROM paths WHERE image_id IN ({marks}) ORDER BY image_id, path", ids_sorted)]
            if len(ids_sorted) > 1 or len(paths) > 1:
                out.append({"ids": ids_sorted, "paths": paths})
        return sorted(out, key=lambda g: g["ids"][0])

    # -- failures ----------------------------------------------------------------------------

    def record_failure(self, path: str, reason: str, *, stat: tuple[int, int] | None = None,
                       digest: str | None = None) -> None:
        """Record that ``path`` could not be stored; with ``stat`` (size, mtime_ns) journal it too."""
        self.record_failures([(path, reason, stat, digest)])

    def record_failures(self, failures: list[tuple[str, str, tuple[int, int] | None, str | None]]) -> None:
        """:meth:`record_failure` for many files, ``(path, reason, stat, digest)``, in one transaction."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO failures(path, reason, time) VALUES(?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET reason = excluded.reason, time = excluded.time",
                [(path, reason, now) for path, reason, _, _ in failures],
            )
            db.executemany(
                "INSERT OR REPLACE INTO journal(path, size, mtime_ns, digest, outcome, image_id, reason, time) "
                "VALUES(?, ?, ?, ?, 'failed', NULL, ?, ?)",
                [(path, int(stat[0]), int(stat[1]), digest, reason, now)
                 for path, reason, stat, digest in failures if stat is not None],
            )

    def failures(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT path, reason, time FROM failures ORDER BY time, path")]

    def count_failures(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM failures")[0][0])

    # -- drift scores ------------------------------------------------------------------------

    def score_stream(self, *, after: int = 0, last: int | None = None) -> dict[str, np.ndarray]:
        """The recorded scores in arrival order: ``id``, ``version``, ``error``, ``score`` arrays
        (images after id ``after``; only the ``last`` n with ``last``)."""
        import numpy as np

        if not self._query("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'scores'"):
            rows = []  # a store made before scores were recorded, opened read-only
        elif last is not None:
            sql = ("SELECT * FROM (SELECT image_id, version, error, score FROM scores WHERE image_id > ? "
                   "ORDER BY image_id DESC LIMIT ?) ORDER BY image_id")
            rows = self._query(sql, (int(after), int(last)))
        else:
            rows = self._query("SELECT image_id, version, error, score FROM scores WHERE image_id > ? ORDER BY image_id",
                               (int(after),))
        cols = list(zip(*rows)) if rows else [[], [], [], []]
        return {"id": np.asarray(cols[0], np.int64), "version": np.asarray(cols[1], np.int64),
                "error": np.asarray(cols[2], np.float64), "score": np.asarray(cols[3], np.float64)}

    def scores_of(self, ids: Iterable[int]) -> dict[int, tuple[int, float]]:
        """``id -> (version, score)`` for the given images (those with a recorded score)."""
        rows = self._by_ids("SELECT image_id, version, score FROM scores WHERE image_id IN ({marks})", [int(i) for i in ids])
        return {int(r[0]): (int(r[1]), float(r[2])) for r in rows}

    # -- versions ----------------------------------------------------------------------------

    def _json_rows(self, sql: str, field: str) -> list[dict[str, Any]]:
        return [{**dict(r), field: json.loads(r[field])} for r in self._query(sql)]

    def versions(self) -> list[dict[str, Any]]:
        return self._json_rows("SELECT version, state, parent, reason, created, meta FROM versions ORDER BY version", "meta")

    def version_rows(self) -> list[dict[str, Any]]:
        """Versions flattened for people and JSON: ``version``, ``state``, ``parent``, ``reason``,
        ``created`` and the summary recorded with the version (architecture, training, thresholds)."""
        out = []
        for v in self.versions():
            meta = v.pop("meta")
            out.append({**meta, **v})
        return out

    def version(self, version: int) -> dict[str, Any] | None:
        for v in self.versions():
            if v["version"] == int(version):
                return v
        return None

    def next_version(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(version), 0) + 1 FROM versions")[0][0])

    def new_version(self, *, state: str, parent: int | None, reason: str, meta: dict | None = None) -> int:
        """Take the next version number and record it, in one transaction (numbers never repeat,
        even with several processes training at once)."""
        if state not in VERSION_STATES:
            raise ValueError(f"unknown version state {state!r}")
        with self.transaction() as db:
            version = int(db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions").fetchone()[0])
            self._insert_version(db, version, state, parent, reason, meta or {})
        return version

    def add_version(self, version: int, *, state: str, parent: int | None, reason: str, meta: dict,
                    if_missing: bool = False) -> None:
        if state not in VERSION_STATES:
            raise ValueError(f"unknown version state {state!r}")
        with self.transaction() as db:
            if if_missing and db.execute("SELECT 1 FROM versions WHERE version = ?", (int(version),)).fetchone():
                return
            self._insert_version(db, int(version), state, parent, reason, meta)

    @staticmethod
    def _insert_version(db, version: int, state: str, parent, reason: str, meta: dict) -> None:
        db.execute(
            "INSERT INTO versions(version, state, parent, reason, created, meta) VALUES(?, ?, ?, ?, ?, ?)",
            (int(version), state, parent, reason, time.time(), json.dumps(meta, sort_keys=True)),
        )
        db.execute(
            "INSERT INTO events(time, kind, version, detail) VALUES(?, 'version_created', ?, ?)",
            (time.time(), int(version), json.dumps({"reason": reason, "parent": parent})),
        )

    def set_version_state(self, version: int, state: str) -> None:
        if state not in VERSION_STATES:
            raise ValueError(f"unknown version state {state!r}")
        with self.transaction() as db:
            db.execute("UPDATE versions SET state = ? WHERE version = ?", (state, int(version)))

    def update_version_meta(self, version: int, **fields: Any) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT meta FROM versions WHERE version = ?", (int(version),)).fetchone()
            meta = json.loads(row[0]) if row else {}
            meta.update(fields)
            db.execute("UPDATE versions SET meta = ? WHERE version = ?", (json.dumps(meta, sort_keys=True), int(version)))

    def active_version(self) -> int | None:
        rows = self._query("SELECT version FROM versions WHERE state = 'active'")
        return int(rows[0][0]) if rows else None

    def activate(self, version: int, *, kind: str = "activated", detail: dict | None = None) -> None:
        """Make ``version`` the active one, in one transaction (the previous one becomes ``ready``)."""
        with self.transaction() as db:
            row = db.execute("SELECT state FROM versions WHERE version = ?", (int(version),)).fetchone()
            if row is None:
                raise ValueError(f"no encoder version {version}; see `streamsim versions`")
            db.execute("UPDATE versions SET state = 'ready' WHERE state = 'active'")
            db.execute("UPDATE versions SET state = 'active' WHERE version = ?", (int(version),))
            # image_id: the newest image when it happened (where the switch falls in the stream)
            db.execute(
                "INSERT INTO events(time, kind, version, image_id, detail) "
                "VALUES(?, ?, ?, (SELECT MAX(id) FROM images), ?)",
                (time.time(), kind, int(version), json.dumps(detail or {})),
            )

    # -- events ------------------------------------------------------------------------------

    def add_event(self, kind: str, *, version: int | None = None, image_id: int | None = None,
                  path: str | None = None, detail: dict | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events(time, kind, version, image_id, path, detail) VALUES(?, ?, ?, ?, ?, ?)",
                (time.time(), kind, version, image_id, path, json.dumps(detail or {})),
            )

    def events(self) -> list[dict[str, Any]]:
        return self._json_rows("SELECT time, kind, version, image_id, path, detail FROM events ORDER BY id", "detail")

    # -- duplicate decisions -----------------------------------------------------------------

    def add_decision(self, ids: Iterable[int], decision: str) -> dict[str, Any]:
        """Record a verdict on a group of duplicates (one of :data:`DECISIONS`) with a
        ``duplicates_decided`` event, in one transaction; ``ids`` must all be stored images.
        Returns ``{"ids", "decision", "time"}``."""
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; choose one of {', '.join(DECISIONS)}")
        ids = sorted({int(i) for i in ids})
        if not ids:
            raise ValueError("a decision needs the ids of the group's images")
        missing = sorted(set(ids) - set(self.existing_ids(ids)))
        if missing:
            raise KeyError(f"no stored image {missing[0]}")
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT INTO decisions(decision, ids, time) VALUES(?, ?, ?)", (decision, json.dumps(ids), now))
            db.execute("INSERT INTO events(time, kind, detail) VALUES(?, 'duplicates_decided', ?)",
                       (now, json.dumps({"decision": decision, "ids": ids})))
        return {"ids": ids, "decision": decision, "time": now}

    def decisions(self) -> list[dict[str, Any]]:
        """Every recorded verdict on a group of duplicates, oldest first: ``{"ids", "decision", "time"}``."""
        return [{"ids": json.loads(r["ids"]), "decision": r["decision"], "time": r["time"]}
                for r in self._query("SELECT decision, ids, time FROM decisions ORDER BY id")]


class _Transaction:
    """``with catalog.transaction() as db:`` — BEGIN IMMEDIATE … COMMIT, ROLLBACK on error."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def __enter__(self) -> sqlite3.Connection:
        self.catalog._lock.acquire()
        try:
            self.catalog._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.catalog._lock.release()
            raise
        return self.catalog._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.catalog._db.execute("COMMIT")
            else:
                self.catalog._db.execute("ROLLBACK")
        finally:
            self.catalog._lock.release()
