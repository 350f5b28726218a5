"""Ingest: decoded images into the catalog and the active vectors, one path for ``add``,
``watch`` and the library, with one vocabulary of outcomes (:class:`FileOutcome`).

Each batch is one catalog transaction (images, their paths, drift scores and journal rows), then
one encode and one vector add; identity is by the input's bytes, so the same file stored twice is
one image with two paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import drift, images
from .store import file_stat


@dataclass(frozen=True)
class FileOutcome:
    """What ingesting one file did: ``stored``, ``duplicate`` (same bytes already stored; the path
    was recorded as another path of ``id``), ``failed`` (with ``reason``), ``busy`` (the file
    changed while it was read; offer it again) or ``gone`` (removed before it could be read).
    A ``stored`` image carries its drift ``score`` under ``version``, the encoder that scored it."""

    path: str | None
    outcome: str
    id: int | None
    reason: str | None
    score: float | None = None
    version: int | None = None


@dataclass(frozen=True)
class IngestReport:
    """What :meth:`Index.add_files` did: new images, files that were already stored, failures."""

    added: list[int]
    duplicates: list[int]
    failed: list[tuple[str, str]]  # (path, reason)

    @property
    def files(self) -> int:
        return len(self.added) + len(self.duplicates) + len(self.failed)


@dataclass(frozen=True)
class Stored:
    """A batch stored: the catalog's answer per image (``id``, ``new``), the version that encoded
    and scored it, and each image's drift score."""

    rows: list
    version: int | None
    scores: list[float]

    def outcome(self, j: int, path: str | None) -> FileOutcome:
        """The outcome of the batch's ``j``-th image, stored under ``path``."""
        s = self.rows[j]
        return FileOutcome(path, "stored" if s.new else "duplicate", s.id, None,
                           self.scores[j] if s.new else None, self.version if s.new else None)


@dataclass(frozen=True)
class Encoded:
    """Codes and reconstruction errors computed elsewhere (an engine's workers) by encoder
    ``version``, one row per image of a batch."""

    version: int
    codes: np.ndarray
    errors: np.ndarray

    def rows(self, at: Sequence[int]) -> "Encoded":
        return Encoded(self.version, self.codes[list(at)], self.errors[list(at)])


def store_images(store, loaded: Sequence[images.Loaded], journal: list[tuple[int, int] | None] | None = None,
                 encoded: Encoded | None = None) -> Stored:
    """Store loaded images in one catalog transaction (with ``journal``: each file's stat, journalled
    with it), then add the new ones' codes to the active vectors. ``encoded``: their codes and
    errors already computed, used if by the active version (else they are encoded here)."""
    if not loaded:
        return Stored([], None, [])
    with store.lock:
        v = store.active_version
        store.catch_up(v)  # images other processes stored since we looked
        px = np.stack([x.pixels for x in loaded])
        if encoded is not None and encoded.version == v:
            codes, errors = encoded.codes, encoded.errors
        else:
            codes, errors = store.encoder(v).encode_with_error(px)
        scores = store.normaliser(v).score(errors, drift.ink(px))
        rows = store.catalog.add_images([(x.digest, x.pixels, x.path) for x in loaded], journal,
                                        scores=[(v, float(e), float(z)) for e, z in zip(errors, scores)])
        new_ids, at, seen = [], [], set()
        for i, s in enumerate(rows):
            if s.new and s.id not in seen:
                seen.add(s.id)
                new_ids.append(s.id)
                at.append(i)
        if new_ids:
            store.vectors(v).add(np.asarray(new_ids, np.int64), codes[at])
            store.catch_up(v)  # only ids stored elsewhere meanwhile are encoded here
            store.autosave()
    if new_ids:  # the duplicate rule follows the store (in the background, once it is big enough)
        from .calibrate import auto_calibrate

        auto_calibrate(store)
    return Stored(rows, v, [float(z) for z in scores])


def ingest_results(store, results: Sequence[tuple[str, Any]], seen: dict[str, tuple[int, int]] | None,
                   encoded: Encoded | None = None) -> list[FileOutcome]:
    """Store or journal decoded files, ``(path, Loaded | ImageError)``. With ``seen`` (each path's
    stat before it was read) a file changed meanwhile is ``busy`` and a removed one ``gone``;
    without, what was read is stored (``add``: nobody waits for writers). ``encoded``: codes and
    errors computed elsewhere, one row per result."""
    out: list[FileOutcome] = []
    to_store: list[tuple[int, images.Loaded, tuple[int, int] | None]] = []
    failures: list[tuple[str, str, tuple[int, int] | None, None]] = []
    for path, result in results:
        path = str(path)
        now = file_stat(path)
        if seen is not None and now is None:
            out.append(FileOutcome(path, "gone", None, None))  # removed before we could read it
        elif seen is not None and now != seen[path]:
            out.append(FileOutcome(path, "busy", None, None))  # still being written
        elif isinstance(result, images.ImageError):
            failures.append((path, result.reason, now, None))
            out.append(FileOutcome(path, "failed", None, result.reason))
        else:
            # journal and first path under the name it was seen by (a symlink stays a symlink)
            to_store.append((len(out), result if result.path == path else dataclasses.replace(result, path=path), now))
            out.append(FileOutcome(path, "pending", None, None))
    if failures:
        store.catalog.record_failures(failures)  # the batch's failures in one transaction
    if to_store:
        done = store_images(store, [x for _, x, _ in to_store], journal=[st for _, _, st in to_store],
                            encoded=None if encoded is None else encoded.rows([i for i, _, _ in to_store]))
        for j, (i, _, _) in enumerate(to_store):
            out[i] = done.outcome(j, out[i].path)
    return out
