"""The three search modes, dedup and query expansion, over an open :class:`~streamsim.store.Store`.

How each mode ranks is a :class:`SearchPolicy`, a frozen value passed in (``Index.open(...,
policy=...)``); the defaults are the product's. ``docs/search-modes.md`` explains each mode.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import verify
from .images import PIXELS_SHAPE, Frame

MODES = ("similar", "duplicate", "recall")
UNKNOWN_MODE_MSG = "unknown search mode {mode!r}; choose one of similar, duplicate, recall"
DEDUP_CHUNK = 4096  # stored images searched against the others at a time


@dataclass(frozen=True)
class SearchPolicy:
    """How the modes rank (the defaults are the product's; benchmarks pass others).

    Attributes:
        similar_margin: ``similar`` puts first the candidates within this × the duplicate threshold ...
        similar_candidates: ... among a clean query's this many nearest (a noisy query's
            :data:`streamsim.verify.NOISY_CANDIDATES`).
        similar_expand: ``similar`` ranks by the query's code plus its nearest neighbours' codes
            (average query expansion, in rounds of these sizes; ``()``: the query's code alone) ...
        similar_pool: ... among at least this many of the query's nearest stored images.
        similar_copies: a query found to be a copy of a stored image is ranked by the two codes averaged.
        recall_pool: ``recall`` searches ``k ×`` this many candidates per query variant.
        recall_expand: ``recall`` also searches with the query expanded in rounds by its neighbours.
    """

    similar_margin: float = 3.0
    similar_candidates: int = 8
    similar_expand: tuple[int, ...] = (3,)
    similar_pool: int = 64
    similar_copies: bool = True
    recall_pool: int = 4
    recall_expand: tuple[int, ...] = (3, 10, 20)

    def pool(self, k: int) -> int:
        """How many of the query's nearest stored images (by its own code) a ``similar`` search of
        ``k`` ranks by the expanded code: :attr:`similar_pool`, or ``2k`` for a longer list.

        >>> SearchPolicy().pool(10), SearchPolicy().pool(50), SearchPolicy(similar_pool=16).pool(5)
        (64, 100, 16)
        """
        return max(self.similar_pool, 2 * int(k))


DEFAULT_POLICY = SearchPolicy()


@dataclass(frozen=True)
class Match:
    """One search hit. ``distance`` is the cosine distance between codes (smaller is closer)."""

    id: int
    path: str | None
    distance: float
    encoder_version: int

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "path", "distance", "encoder_version"}``, as ``search --json`` prints it."""
        return dataclasses.asdict(self)


def unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)


def query_codes(enc, pixels: np.ndarray) -> np.ndarray:
    """Codes of a search's queries ``uint8 [N, 28, 28]``: in numpy however many there are
    (:meth:`streamsim.infer.NumpyEncoder.query_codes`), else by ``enc`` itself."""
    return enc.query_codes(pixels) if hasattr(enc, "query_codes") else enc(pixels)


def duplicate_rule(store, version: int | None = None) -> float:
    """The duplicate threshold of ``version`` (default: the active one): a stored image among a
    query's nearest by code is a near-duplicate when its pixels, registered onto the query, leave
    an excess (:func:`streamsim.verify.scores`) of at most this — calibrated on perturbed copies and
    distinct images when the version was made (:mod:`streamsim.calibrate`). Versions calibrated
    otherwise (by an older release: another ``method``, another scale) use
    :data:`streamsim.verify.DEFAULT_THRESHOLD`. A threshold calibrated on the store's own images
    (:func:`streamsim.calibrate.calibrate_store`) takes precedence."""
    version = store.active_version if version is None else int(version)
    own = store_calibration(store, version)
    return float(own["threshold"]) if own is not None else version_threshold(store, version)


def version_threshold(store, version: int) -> float:
    """The threshold calibrated when ``version`` was made."""
    meta = store.meta(version)
    if meta.get("duplicate_calibration", {}).get("method") != verify.METHOD:
        return verify.DEFAULT_THRESHOLD
    return float(meta["duplicate_threshold"])


def store_calibration(store, version: int) -> dict[str, Any] | None:
    """What calibrating ``version`` on the store's own images recorded, if that was done."""
    row = store.catalog.version(version)
    own = (row or {}).get("meta", {}).get("store_calibration")
    return own if own and own.get("method") == verify.METHOD else None


class Searcher:
    """Answers searches and dedup on a store's active version, under a :class:`SearchPolicy`."""

    def __init__(self, store, policy: SearchPolicy = DEFAULT_POLICY):
        self.store = store
        self.policy = policy
        # query frame -> pixel-check scores by image id (verify.check): with turns (duplicate mode, dedup) and without
        self._checks = weakref.WeakKeyDictionary()
        self._flat_checks = weakref.WeakKeyDictionary()

    def search(self, pixels: np.ndarray, k: int, mode: str, frames: list[Frame] | None) -> list[list[Match]]:
        """``Match`` lists for normalised ``pixels`` ``uint8 [N, 28, 28]``; ``frames``: the queries'
        frames for the near-duplicate check (else each query's pixels)."""
        if mode not in MODES:
            raise ValueError(UNKNOWN_MODE_MSG.format(mode=mode))
        if len(pixels) == 0:
            return []
        if frames is None and mode != "recall":
            frames = [Frame.of_pixels(p) for p in pixels]
        store = self.store
        with store.lock:
            v = store.active_version
            enc = store.encoder(v)
            vectors = store.vectors(v)
            store.catch_up(v)
            if mode == "similar":
                hits = self._similar(pixels, frames, k, enc, vectors, v)
            elif mode == "duplicate":
                hits = self._duplicate(pixels, frames, k, enc, vectors, v)
            else:
                hits = self._recall(pixels, k, enc, vectors)
        return self._matches(hits, v)

    def _checked(self, frames, keys, dist, version, width: int = verify.CANDIDATES, margin: float = 1.0,
                 promise: bool = True):
        """Per query, its candidates that pass the version's duplicate check (its threshold times
        ``margin``), ``(key, distance)`` ordered by how well they explain the query
        (:mod:`streamsim.verify`). ``promise``: the check ``duplicate`` mode promises — turned
        copies tried, the threshold calibrated on the store's own images where there is one
        (:func:`duplicate_rule`); else (a ranking) the version's own threshold, no turns."""
        rule = duplicate_rule(self.store, version) if promise else version_threshold(self.store, version)
        threshold = rule * margin
        rows = verify.check(frames, keys, dist, self._candidate_pixels, width,
                            memo=self._checks if promise else self._flat_checks, turns=promise)
        return [[(key, d) for key, d, _r, _e in verify.accepted(row, f, threshold)] for row, f in zip(rows, frames)]

    def _candidate_pixels(self, ids: list[int]) -> np.ndarray:
        """Stored pixels of ``ids``, in order; blank for an image removed (by another process) whose
        vector this one still holds — a blank explains nothing, and the match is dropped anyway."""
        catalog = self.store.catalog
        try:
            return catalog.pixels(ids)
        except KeyError:
            have = set(catalog.existing_ids(ids))
            out = np.zeros((len(ids), *PIXELS_SHAPE), np.uint8)
            kept = [n for n, i in enumerate(ids) if int(i) in have]
            if kept:
                out[kept] = catalog.pixels([ids[n] for n in kept])
            return out

    def _similar(self, pixels, frames, k, enc, vectors, version):
        """Stored near-duplicates of the query first (among the candidates :func:`verify.checked`
        picks: the most similar image is a copy), then the nearest stored image by code, then the
        rest of the query's nearest :meth:`SearchPolicy.pool` stored images ranked by the query's
        code expanded by its nearest (average query expansion: the neighbourhood pulls a deformed
        or noisy query back towards its class). A query that is a copy of a stored image is ranked
        as the average of the two (:func:`with_copies`). One code search; distances are between the
        query's own code and the match's."""
        p = self.policy
        codes = query_codes(enc, pixels)
        keys, dist = vectors.search(codes, max(verify.search_width(frames, max(k, verify.CANDIDATES)), p.pool(k)))
        # (a ranking, not a promise: the version's own threshold, which a store's calibration only
        # tightens, and no turns, which cost time and do not change what comes first)
        firsts = self._checked(frames, keys, dist, version, p.similar_candidates, margin=p.similar_margin, promise=False)
        found = keys >= 0
        pooled = np.zeros((*keys.shape, codes.shape[1]), np.float32)  # the pool's unit codes (0 where absent)
        if found.any():
            pooled[found] = unit(vectors.get(keys[found]))
        query = with_copies(codes, firsts if p.similar_copies else [], keys, pooled)
        near = np.argsort(np.where(found, -np.einsum("nkd,nd->nk", pooled, query), np.inf), axis=1, kind="stable")
        expanded = expand(query, vectors, p.similar_expand, np.take_along_axis(pooled, near[:, :, None], axis=1))
        score = np.where(found, np.einsum("nkd,nd->nk", pooled, expanded), -np.inf)  # the expanded code's cosine
        out = []
        for dups, row_k, row_d, row_s in zip(firsts, keys.tolist(), dist.tolist(), score):
            first = [key for key, _ in dups]
            at = {key: d for key, d in zip(row_k, row_d) if key >= 0}
            rest = [row_k[0]] if row_k[0] >= 0 and row_k[0] not in first else []
            skip = set(first) | set(rest)
            rest += [row_k[j] for j in np.argsort(-row_s, kind="stable").tolist() if row_k[j] >= 0 and row_k[j] not in skip]
            out.append(dups[:k] + [(key, max(float(at[key]), 0.0)) for key in rest[: max(0, k - len(dups))]])
        return out

    def _duplicate(self, pixels, frames, k, enc, vectors, version):
        """Identical pixels first (distance 0), then stored images that pass the version's
        duplicate check (:func:`duplicate_rule`), best explained first."""
        width = max(k, verify.CANDIDATES)
        keys, dist = vectors.search(query_codes(enc, pixels), verify.search_width(frames, width))
        out = []
        for px, row in zip(pixels, self._checked(frames, keys, dist, version, width)):
            exact = self.store.catalog.find_pixels(px)
            seen = set(exact)
            out.append(([(key, 0.0) for key in exact] + [(key, d) for key, d in row if key not in seen])[:k])
        return out

    def _recall(self, pixels, k, enc, vectors):
        """Every plausible match: the query, corrected variants of it (±1 px shifts, thicker and
        thinner strokes) and the query expanded in rounds by its nearest stored neighbours
        (:attr:`SearchPolicy.recall_expand`: pseudo-relevance feedback, reaching further into the
        query's class than similar search's one round) are each searched with a wider pool; a
        candidate's distance is the smallest any of them gives it."""
        variants = query_variants(pixels)  # [V, N, 28, 28]
        n_var, n = variants.shape[0], len(pixels)
        codes = query_codes(enc, variants.reshape(-1, *PIXELS_SHAPE)).reshape(n_var, n, -1)
        if len(vectors):
            codes = np.concatenate([codes, expand(codes[0], vectors, self.policy.recall_expand)[None]])
        keys, dist = vectors.search(codes.reshape(-1, codes.shape[-1]), k * self.policy.recall_pool)
        keys = keys.reshape(len(codes), n, -1).transpose(1, 0, 2).reshape(n, -1)
        dist = dist.reshape(len(codes), n, -1).transpose(1, 0, 2).reshape(n, -1)
        out = []
        for row_k, row_d in zip(keys, dist):
            ok = row_k >= 0
            row_k, row_d = row_k[ok], row_d[ok]
            order = np.lexsort((row_d, row_k))  # by key, then distance: each key's smallest first
            row_k, row_d = row_k[order], row_d[order]
            first = np.ones(len(row_k), bool)
            first[1:] = row_k[1:] != row_k[:-1]
            row_k, row_d = row_k[first], row_d[first]
            top = np.argsort(row_d, kind="stable")[:k]
            out.append([(int(a), float(b)) for a, b in zip(row_k[top], row_d[top])])
        return out

    def _matches(self, hits, version) -> list[list[Match]]:
        """``Match`` lists for ``(key, distance)`` rows; keys the catalog no longer has (removed
        by another process) and -1 padding are dropped."""
        hits = [[(int(key), float(d)) for key, d in row] for row in hits]
        paths = self.store.catalog.first_paths({key for row in hits for key, _ in row if key >= 0})
        return [[Match(key, paths[key], d, version) for key, d in row if key in paths] for row in hits]

    def dedup(self, k: int = 16, *, decided: bool = False) -> list[dict[str, Any]]:
        """Groups of duplicates across the store, smallest id first: images stored under several
        paths, images with identical pixels, and near-duplicates — each stored image searched
        against the others and its nearest checked as a ``duplicate`` search checks a query's (a
        stored image is known by its pixels, so its frame is theirs), links joined transitively.
        Each group: ``{"ids", "paths", "max_distance"}``, where ``max_distance`` is the largest
        cosine distance of a link that joined the group (0 for identical pixels); each image's
        ``k`` nearest neighbours are examined.

        Recorded decisions (:meth:`~streamsim.catalog.Catalog.add_decision`) are respected: images
        decided ``not_duplicates`` are never linked to each other, and a group whose images all lie
        within one decision (``keep_all`` or ``not_duplicates``) is left out — or, with ``decided``,
        listed with ``"decision"`` (``None`` for a group still to review)."""
        store, catalog = self.store, self.store.catalog
        decisions = catalog.decisions()
        apart = _Apart(d["ids"] for d in decisions if d["decision"] == "not_duplicates")
        links = _Links()
        with store.lock:
            v = store.active_version
            vectors = store.vectors(v)
            store.catch_up(v)
            for g in catalog.identical_file_groups():
                for i in g["ids"]:
                    if not apart(g["ids"][0], i):
                        links.join(g["ids"][0], i, 0.0)
            ids = catalog.ids()
            width = k + 1
            for start in range(0, len(ids), DEDUP_CHUNK):
                chunk = ids[start : start + DEDUP_CHUNK]
                keys, dist = vectors.search(vectors.get(chunk), width)
                # each image is a query against the others: drop itself from its own row
                others = keys != chunk[:, None]
                keys = np.stack([np.concatenate([r[m], [-1] * (width - m.sum())]) for r, m in zip(keys, others)])
                dist = np.stack([np.concatenate([r[m], [np.inf] * (width - m.sum())]) for r, m in zip(dist, others)])
                frames = [Frame.of_pixels(p) for p in catalog.pixels(chunk)]
                for a, row in zip(chunk, self._checked(frames, keys[:, :-1], dist[:, :-1], v, k)):
                    for b, d in row:
                        if not apart(int(a), b):
                            links.join(int(a), b, d)
        out = []
        for members, worst in links.groups():
            paths = [p for i in members for p in (catalog.get(i) or {}).get("paths", [])]
            if len(members) > 1 or len(paths) > 1:
                within = set(members)
                decision = next((d["decision"] for d in reversed(decisions) if within <= set(d["ids"])), None)
                if decision is None or decided:
                    group = {"ids": members, "paths": paths, "max_distance": round(worst, 6)}
                    out.append(group | {"decision": decision} if decided else group)
        return sorted(out, key=lambda g: g["ids"][0])


class _Apart:
    """Pairs of images decided ``not_duplicates``: ``apart(a, b)`` is true when one decision holds both."""

    def __init__(self, groups):
        self.of: dict[int, list[int]] = {}  # image id -> the decisions (by number) that name it
        for n, ids in enumerate(groups):
            for i in ids:
                self.of.setdefault(int(i), []).append(n)

    def __call__(self, a: int, b: int) -> bool:
        return a != b and bool(self.of) and not set(self.of.get(a, ())).isdisjoint(self.of.get(b, ()))


class _Links:
    """Union-find over image ids, remembering each group's largest link distance."""

    def __init__(self):
        self.parent: dict[int, int] = {}
        self.worst: dict[int, float] = {}

    def root(self, a: int) -> int:
        parent = self.parent
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def join(self, a: int, b: int, d: float) -> None:
        ra, rb = self.root(a), self.root(b)
        top = max(self.worst.pop(ra, 0.0), self.worst.pop(rb, 0.0), d)
        self.parent[max(ra, rb)] = min(ra, rb)
        self.worst[min(ra, rb)] = top

    def groups(self) -> list[tuple[list[int], float]]:
        """Each group's members (sorted) and largest link distance."""
        members: dict[int, list[int]] = {}
        for a in list(self.parent):
            members.setdefault(self.root(a), []).append(a)
        return [(sorted(m), self.worst.get(r, 0.0)) for r, m in members.items()]


def with_copies(codes: np.ndarray, copies: list[list[tuple[int, float]]], keys: np.ndarray,
                pooled: np.ndarray) -> np.ndarray:
    """Unit query codes; where the check found the query to be a copy of a stored image (its
    best-explained candidate, ``copies[i][0]``), the unit average of the query's code and that
    image's: a noisy, shifted or re-scanned copy is searched much as its stored original would be,
    and a clean query (its own copy is itself) as before. ``keys``/``pooled``: the query's nearest
    stored images and their unit codes, among which the copies are."""
    q = unit(np.asarray(codes, np.float32)).copy()
    for i, row in enumerate(copies):
        if row:
            at = np.flatnonzero(keys[i] == row[0][0])
            if len(at):
                q[i] = unit(q[i] + pooled[i, at[0]])
    return q


def expand(codes: np.ndarray, vectors, sizes: tuple[int, ...], nearest: np.ndarray | None = None) -> np.ndarray:
    """Average query expansion, in rounds: each unit query code plus the unit codes of its
    ``sizes[0]`` nearest stored neighbours; each later round adds, to the query's own code, the
    ``sizes[i]`` nearest neighbours of the previous round's expanded code (fewer where the store
    holds fewer). ``nearest``: the queries' nearest stored codes, unit length, best first
    (``[N, M, d]``, zero where the store holds fewer), if already fetched."""
    q = unit(np.asarray(codes, np.float32))
    out = q
    for r, n in enumerate(sizes if len(vectors) else ()):
        if r == 0 and nearest is not None and nearest.shape[1] >= n:
            neigh = nearest[:, :n]
        else:
            near, _ = vectors.search(out, n)
            ok = near >= 0
            neigh = np.zeros((*near.shape, q.shape[-1]), np.float32)
            if ok.any():
                neigh[ok] = unit(vectors.get(near[ok]))
        out = unit(q + neigh.sum(axis=1))
    return out


def query_variants(pixels: np.ndarray) -> np.ndarray:
    """The query plus small corrected variants: ±1 px shifts, thickened and thinned strokes."""
    x = pixels.astype(np.int16)
    side = PIXELS_SHAPE[0]
    out = [x]
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        out.append(np.roll(x, (dy, dx), axis=(1, 2)))
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    stack = np.stack([pad[:, 1 + dy : 1 + side + dy, 1 + dx : 1 + side + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    out.append((x + stack.max(axis=0)) // 2)
    out.append((x + stack.min(axis=0)) // 2)
    return np.stack(out).clip(0, 255).astype(np.uint8)
