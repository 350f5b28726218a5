"""The three search modes and dedup, on real MNIST digits with the shipped encoder."""

import io

import numpy as np
import pytest
from PIL import Image

from streamsim import Index
from streamsim.perturb import normalise_all, perturb


def copy_of(raw):
    """A near-duplicate the way a re-scan makes one: shifted by a pixel, light noise, scanned at
    twice the size and saved as a JPEG."""
    f = np.roll(raw.astype(np.float32), (1, -1), axis=(0, 1))
    f += np.random.default_rng(0).normal(0, 6, f.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(f, 0, 255).astype(np.uint8)).resize((56, 56), Image.BILINEAR).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf))


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits):
    x, _ = digits
    with Index.open(tmp_path_factory.mktemp("modes") / "s") as index:
        ids = index.add_many(x[:120])
        yield index, ids


def test_duplicate_finds_a_copy_and_identical_pixels_first(store, digits):
    index, ids = store
    x, _ = digits
    query = copy_of(x[5])
    hits = index.search(query, k=5, mode="duplicate")
    assert [h.id for h in hits] == [ids[5]] and hits[0].distance > 0
    same = index.search(x[7], k=5, mode="duplicate")
    assert same[0].id == ids[7] and same[0].distance == 0.0


def test_duplicate_returns_nothing_for_distinct_images(store, digits):
    index, _ = store
    x, _ = digits
    # unseen digits whose classes are stored many times over: similar finds their class, duplicate nothing
    unseen = x[150:190]
    found = [bool(index.search(img, k=5, mode="duplicate")) for img in unseen]
    assert sum(found) <= 1
    similar = index.search(unseen[0], k=5)
    assert len(similar) == 5


def test_similar_ranks_by_the_query_expanded_by_its_neighbours(store, digits):
    """Unseen digits (no near-duplicate stored): similar's first hit is the nearest stored code,
    the rest are in the order of the stored codes' cosine to the query's unit code plus its three
    nearest stored codes; the distances reported are the query's own code's."""
    index, ids = store
    x, _ = digits
    enc = index.encoder()

    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    stored = unit(enc(np.stack([index.pixels(i) for i in ids])))
    queries = x[150:170]
    q = unit(enc(normalise_all(queries)))
    plain = q @ stored.T
    near = np.argsort(-plain, axis=1)[:, :3]
    expanded = unit(q + stored[near].sum(axis=1)) @ stored.T
    assert any((np.argsort(-expanded[i])[:10] != np.argsort(-plain[i])[:10]).any() for i in range(len(q)))
    pos = {key: n for n, key in enumerate(ids)}
    for i, row in enumerate(index.search_many(queries, k=10)):
        got = np.asarray([pos[m.id] for m in row])
        assert len(row) == 10 and got[0] == np.argmax(plain[i])
        rest = expanded[i].copy()
        rest[got[0]] = -np.inf
        scores = rest[got[1:]]
        assert (np.diff(scores) <= 1e-5).all()
        assert scores[-1] >= np.sort(rest)[-9] - 1e-5  # the nine best, ties aside
        assert np.allclose([m.distance for m in row], 1 - plain[i, got], atol=1e-4)


def test_similar_searches_a_copy_of_a_stored_image_as_the_two_codes_averaged(store, digits):
    """A re-scanned copy of a stored digit, found to be one: the original comes first, and the
    rest are ranked by the unit average of the copy's code and the original's, expanded by its
    three nearest stored codes — not by the copy's code alone (which ranks some differently)."""
    index, ids = store
    x, _ = digits
    enc = index.encoder()

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    stored = unit(enc(np.stack([index.pixels(i) for i in ids])))
    changed = checked = 0
    for n in range(0, 40, 2):
        hits = index.search(copy_of(x[n]), k=10)
        assert hits[0].id == ids[n]
        if ids[n] not in [h.id for h in index.search(copy_of(x[n]), k=3, mode="duplicate")]:
            continue  # not found to be a copy (the original is first as the nearest code): ranked as before
        checked += 1
        q = unit(enc(normalise_all(copy_of(x[n])[None])))[0]
        ranked = []
        for query in (unit(q + stored[n]), q):
            near = np.argsort(-(stored @ query))[:3]
            score = stored @ unit(query + stored[near].sum(axis=0))
            score[n] = -np.inf
            ranked.append(score)
        got = [ids.index(h.id) for h in hits[1:]]
        assert (np.diff(ranked[0][got]) <= 1e-5).all() and ranked[0][got[-1]] >= np.sort(ranked[0])[-9] - 1e-5
        changed += set(got) != set(np.argsort(-ranked[1])[:9].tolist())
    assert checked >= 15 and changed  # the copy's code alone would have ranked some lists differently


def test_similar_checks_a_clean_querys_nearest_few_and_a_noisy_querys_more(tmp_path, digits, monkeypatch):
    """The near-duplicates-first check of a similar search registers a clean query against its
    policy's similar_candidates nearest stored images at most (the check costs most of a search), a query
    with paper noise against up to NOISY_CANDIDATES (its code is less exact). Store: 40 copies of
    one digit, each with a few stray pixels, so that many candidates pass the code gate."""
    from streamsim import verify
    from streamsim.search import DEFAULT_POLICY

    x, _ = digits
    rng = np.random.default_rng(2)
    copies = np.repeat(x[9][None], 40, axis=0)
    for c in copies:
        c[rng.integers(4, 24, 3), rng.integers(4, 24, 3)] = 255
    pairs = []
    real = verify.scores
    monkeypatch.setattr(verify, "scores", lambda frames, cand, *a: pairs.append(len(frames)) or real(frames, cand, *a))
    with Index.open(tmp_path / "s") as index:
        index.add_many(copies)
        pairs.clear()
        assert len(index.search(x[9], k=5)) == 5
        assert sum(pairs) == DEFAULT_POLICY.similar_candidates
        pairs.clear()
        noisy = np.clip(x[9] + rng.normal(0, 50, (28, 28)), 0, 255).astype(np.uint8)
        assert len(index.search(noisy, k=5)) == 5
        assert DEFAULT_POLICY.similar_candidates < sum(pairs) <= verify.NOISY_CANDIDATES


def test_similar_returns_k_even_when_more_near_duplicates_are_stored(tmp_path, digits):
    x, _ = digits
    with Index.open(tmp_path / "s") as index:
        index.add_many(x[:20])
        twins = [index.add(np.roll(x[3], shift, axis=1)) for shift in (1, -1, 2)]
        for k in (1, 2, 5):
            hits = index.search(x[3], k=k)
            assert len(hits) == k
        assert {h.id for h in index.search(x[3], k=4)} >= set(twins)


def test_duplicate_finds_a_noisy_rescan_of_a_big_page(tmp_path, digits):
    """A 1000-px page stored clean, queried as a scan with paper noise: a duplicate (its ink,
    scaled down, is as strong as the clean page's)."""
    x, _ = digits
    page = np.zeros((1000, 700), np.float32)
    page[150:850, 300:380] = 1.0  # a "1" with a foot and a flag
    page[780:850, 180:520] = 1.0
    page[150:260, 200:300] = 1.0
    clean = np.round((0.86 - 0.7 * page) * 255).astype(np.uint8)
    with Index.open(tmp_path / "s") as index:
        index.add_many(x[:40])
        original = index.add(clean)
        for seed, sigma in ((0, 0.08), (1, 0.2)):
            noisy = np.clip(clean + np.random.default_rng(seed).normal(0, 255 * sigma, page.shape), 0, 255).astype(np.uint8)
            assert original in [h.id for h in index.search(noisy, k=3, mode="duplicate")]


def test_recall_mode_covers_what_similar_finds(store, digits):
    index, _ = store
    x, _ = digits
    queries = x[130:150]
    sim = index.search_many(queries, k=10)
    rec = index.search_many(queries, k=20, mode="recall")
    covered = np.mean([len({m.id for m in s} & {m.id for m in r}) / len(s) for s, r in zip(sim, rec)])
    assert covered >= 0.8
    assert all(len(r) == 20 for r in rec)
    assert all([m.distance for m in r] == sorted(m.distance for m in r) for r in rec)


def test_dedup_groups_near_duplicates_and_identical_files(tmp_path, digits, digit_files):
    x, _ = digits
    twin = tmp_path / "twin.png"
    twin.write_bytes(digit_files[2].read_bytes())
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many(digit_files[:20])
        twin_id = index.add(twin)
        copy_id = index.add(copy_of(x[3]))
        groups = index.dedup()
    by_id = {i: g for g in groups for i in g["ids"]}
    assert twin_id == ids[2] and len(by_id[ids[2]]["paths"]) == 2
    assert copy_id in by_id[ids[3]]["ids"]
    assert all(len(g["ids"]) <= 2 for g in groups)  # distinct digits are never joined


def test_perturbations_are_seeded_and_keep_polarity(digits):
    x, _ = digits
    for kind in ("noise", "salt_pepper", "shift", "rotation", "elastic", "stroke", "neardup"):
        a, b = perturb(x[:4], kind, seed=1), perturb(x[:4], kind, seed=1)
        assert a.dtype == np.uint8 and a.shape == (4, 28, 28) and np.array_equal(a, b)
    dark = 255 - x[:4]  # dark ink on white paper stays that way
    shifted = perturb(dark, "shift", seed=0)
    assert np.median(shifted[:, 0]) == 255
    assert normalise_all(shifted).shape == (4, 28, 28)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(x[:1], "smudge")


@pytest.mark.parametrize("mode", ["similar", "duplicate", "recall"])
def test_search_many_answers_as_searches_one_at_a_time(store, digits, mode):
    index, _ = store
    x, _ = digits
    queries = [x[3], copy_of(x[5]), perturb(x[7:8], "noise", seed=1)[0], x[150], x[199]]
    many = index.search_many(queries, k=10, mode=mode)
    for q, got in zip(queries, many):
        alone = index.search(q, k=10, mode=mode)
        assert [m.id for m in got] == [m.id for m in alone]
        np.testing.assert_allclose([m.distance for m in got], [m.distance for m in alone], rtol=0, atol=1e-5)
