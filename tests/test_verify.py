"""The near-duplicate check: a query's frame (its ink with the noise kept), registration of a
candidate onto it, and the excess that tells a copy from another writer's same character."""

import json

import numpy as np
import pytest

from streamsim import Index, images, verify
from streamsim.perturb import normalise_all, perturb


def noisy(raw, sigma, seed):
    f = raw.astype(np.float32) / 255 + sigma * np.random.default_rng(seed).standard_normal(raw.shape)
    return np.round(np.clip(f, 0, 1) * 255).astype(np.uint8)


def test_frame_of_a_clean_image_is_its_pixels_and_noise_is_measured(digits):
    x, _ = digits
    px, fr = images.normalise(x[0], frame=True)
    assert np.array_equal(px, images.normalise(x[0]))  # asking for the frame changes nothing
    assert fr.sigma == 0.0 and fr.impulses == 0.0 and (fr.lo, fr.hi) == (0.0, 1.0)
    assert np.abs(np.clip(fr.ink, 0, 1) - px / 255).max() < 1e-6
    sigmas = [images.normalise(noisy(x[i], 0.3, i), frame=True)[1].sigma for i in range(10)]
    assert 0.2 < np.median(sigmas) < 0.4
    speckled = perturb(x[:10], "salt_pepper", seed=0)
    rates = [images.normalise(s, frame=True)[1].impulses for s in speckled]
    assert 0.01 < np.median(rates) < 0.05  # 5 % of pixels: 2.5 % of each kind
    dark = images.load(255 - x[0], frame=True)  # dark ink on white paper: the same frame
    assert np.abs(dark.frame.ink - fr.ink).max() < 1e-5 and np.array_equal(dark.pixels, px)


def test_a_heavily_noisy_copy_is_told_from_other_writers_same_digit(digits):
    x, y = digits
    ones = np.nonzero(y == 1)[0][:8]  # the hardest class: other writers' 1s look alike
    copies, frames = normalise_all(perturb(x[ones], "neardup", seed=3), frames=True)
    originals = normalise_all(x[ones])
    n = len(ones)
    # every copy against every original: its own explains it best, and passes the check
    q = [frames[i] for i in range(n) for _ in range(n)]
    c = np.concatenate([originals] * n)
    resid, excess = (a.reshape(n, n) for a in verify.scores(q, c))
    assert (resid.argmin(axis=1) == np.arange(n)).mean() >= 7 / 8
    assert (np.diag(excess) <= verify.DEFAULT_THRESHOLD).mean() >= 7 / 8
    # each original as the query (clean): every other writer's 1 fails the check
    q = [images.Frame.of_pixels(originals[i]) for i in range(n) for _ in range(n)]
    excess = verify.scores(q, c)[1].reshape(n, n)
    assert np.allclose(np.diag(excess), 0, atol=1e-3)
    assert (excess[~np.eye(n, dtype=bool)] > verify.DEFAULT_THRESHOLD).all()


def test_registration_recovers_a_shift_and_a_scale():
    c = np.zeros((1, 28, 28), np.float32)
    c[0, 6:22, 11:16] = 1.0
    c[0, 6:9, 11:20] = 1.0
    from scipy.ndimage import affine_transform

    moved = affine_transform(c[0], [1 / 1.1, 1.0], offset=[-1.5, 1.0], order=1)  # 10 % taller, shifted
    p, w, _turn = verify._register(moved[None], c)
    assert abs(p[0, 0] - 1 / 1.1) < 0.03 and abs(p[0, 3] - 1.0) < 0.3
    assert ((moved - w[0]) ** 2).sum() < 0.1 * ((moved - c[0]) ** 2).sum()


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits):
    x, _ = digits
    with Index.open(tmp_path_factory.mktemp("verify") / "s") as index:
        yield index, index.add_many(x[:120])


def test_similar_puts_a_noisy_copy_first_and_duplicate_finds_it(store, digits):
    index, ids = store
    x, _ = digits
    found_similar, found_dup = 0, 0
    for i in range(20):
        copy = perturb(x[i : i + 1], "neardup", seed=10 + i)[0]  # noise σ 0.3 + shift ±3 px
        found_similar += index.search(copy, k=5)[0].id == ids[i]
        found_dup += ids[i] in [h.id for h in index.search(copy, k=5, mode="duplicate")]
    assert found_similar >= 19 and found_dup >= 18


def test_search_pixels_without_frames_still_checks_against_the_pixels(store, digits):
    index, ids = store
    x, _ = digits
    px = normalise_all(np.roll(x[:5], 1, axis=2))  # shifted by a pixel, no noise
    assert [r[0].id for r in index.search_pixels(px, 3, mode="duplicate")] == ids[:5]


def test_versions_without_the_check_use_the_default_threshold(tmp_path, digits):
    x, _ = digits
    with Index.open(tmp_path / "s") as index:
        index.add_many(x[:10])
        meta_path = index.root / "encoders" / "v0001" / "meta.json"
        meta = json.loads(meta_path.read_text())
        assert meta["duplicate_calibration"]["method"] == verify.METHOD
        assert index.duplicate_rule() == meta["duplicate_threshold"] != verify.DEFAULT_THRESHOLD
    for older in ({"rank": 5, "scale_typical": 0.1}, {"method": "verify"}):  # as older releases wrote it
        meta["duplicate_calibration"] = older
        meta_path.write_text(json.dumps(meta))
        with Index.open(tmp_path / "s") as index:
            assert index.duplicate_rule() == verify.DEFAULT_THRESHOLD
    with Index.open(tmp_path / "s") as index:
        assert index.search(x[3], k=2, mode="duplicate")[0].distance == 0.0


def test_calibration_separates_copies_from_distinct_digits(digits):
    from streamsim import encoders
    from streamsim.calibrate import calibrate
    from streamsim.model import Encoder

    x, _ = digits
    model, _ = encoders.load(encoders.shipped_dir())
    cal = calibrate(Encoder(model), normalise_all(x), seed=1, sample=200)
    c = cal["duplicate_calibration"]
    assert c["method"] == verify.METHOD and c["candidates"] == verify.CANDIDATES and c["sample"] == 200
    assert 0.0 < cal["duplicate_threshold"] < 0.2
    assert c["copy_recall"] >= 0.8 and c["distinct_within"] <= 0.05
    assert 0.0 <= c["noisy_distinct_within"] <= 1.0


def test_an_image_removed_by_another_process_does_not_break_the_check(tmp_path, digits):
    x, _ = digits
    with Index.open(tmp_path / "s") as index:
        ids = index.add_many(x[:30])
        with Index.open(tmp_path / "s") as other:
            assert other.remove(ids[4])
        # this process still holds the removed image's vector: the search goes on without it
        for mode in ("similar", "duplicate"):
            hits = index.search(x[4], k=3, mode=mode)
            assert ids[4] not in [h.id for h in hits]


def test_scores_split_across_threads_equal_scores_in_one_batch(digits):
    x, _ = digits
    px = normalise_all(x[:40])
    copies, frames = normalise_all(perturb(x[:40], "neardup", seed=5), frames=True)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, 40, 3 * verify.MIN_SPLIT)  # large enough to be split
    q = [frames[i] for i in pick]
    c = px[rng.integers(0, 40, len(pick))]
    whole = verify.scores(q, c)
    step = verify.MIN_SPLIT // 2  # each below the split size: one thread each
    parts = [verify.scores(q[s : s + step], c[s : s + step]) for s in range(0, len(q), step)]
    for a, b in zip(whole, (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_frame_checked_again_is_not_scored_again(digits):
    import weakref

    x, _ = digits
    px = normalise_all(x[:20])
    frames = [images.Frame.of_pixels(p) for p in normalise_all(perturb(x[:3], "shift", seed=2))]  # clean queries
    keys = np.tile(np.arange(20), (3, 1))
    dist = np.tile(np.linspace(0.01, 0.02, 20), (3, 1))
    asked = []

    def pixels_of(ids):
        asked.append(list(ids))
        return px[ids]

    memo = weakref.WeakKeyDictionary()
    first = verify.check(frames, keys, dist, pixels_of, memo=memo)
    assert verify.check(frames, keys, dist, pixels_of, memo=memo) == first and len(asked) == 1
    wider = verify.check(frames, keys, dist, pixels_of, width=20, memo=memo)  # only the new candidates are scored
    assert len(asked) == 2 and asked[1] == list(range(verify.CANDIDATES, 20))
    assert [row[: len(f)] for row, f in zip(wider, first)] == first
    assert first == verify.check(frames, keys, dist, lambda ids: px[ids])  # the same scores without a memo
    del frames
    import gc

    gc.collect()
    assert len(memo) == 0  # forgotten with the query


def test_a_noisy_query_looks_further_down_its_code_neighbours():
    keys = np.arange(40)[None].repeat(2, axis=0)
    dist = np.linspace(0.05, 0.25, 40)[None].repeat(2, axis=0)  # the 40th is 5x as far as the 1st
    clean, noisy = verify.checked(keys, dist, noisy=[False, True])
    assert clean == list(range(verify.CANDIDATES))
    limit = verify.NOISY_GATE * 0.05
    assert noisy == [j for j in range(verify.NOISY_CANDIDATES) if dist[1, j] <= limit + 1e-9] and len(noisy) > len(clean)
    frames = [images.Frame.of_pixels(np.zeros((28, 28), np.uint8)), images.Frame(np.zeros((28, 28), np.float32), 0.3, 0.0, 1.0)]
    assert verify.search_width(frames[:1]) == verify.CANDIDATES and verify.search_width(frames) == verify.NOISY_CANDIDATES


def test_a_store_tightens_its_duplicate_threshold_on_its_own_images(tmp_path, digits):
    from streamsim.calibrate import MIN_STORE_CALIBRATION, STORE_CALIBRATION_FLOOR
    from streamsim.store import StoreError

    x, _ = digits
    with Index.open(tmp_path / "few") as index:
        index.add_many(x[: MIN_STORE_CALIBRATION - 1])
        with pytest.raises(StoreError, match="at least"):
            index.calibrate_duplicates()
    # distinct digits: the version's own rule already fits them (never loosened)
    with Index.open(tmp_path / "s") as index:
        index.add_many(x[:150])
        base = index.duplicate_rule()
        got = index.calibrate_duplicates()
        assert got["version_threshold"] == base and got["images"] == 150 and got["version"] == 1
        assert STORE_CALIBRATION_FLOOR * base <= got["threshold"] <= base
        assert got["threshold"] == min(max(got["measured"], STORE_CALIBRATION_FLOOR * base), base)
        assert index.duplicate_rule() == got["threshold"]
    with Index.open(tmp_path / "s") as again:  # recorded in the catalog: another process sees it
        assert again.duplicate_rule() == got["threshold"]
        assert again.versions()[0]["duplicate_threshold"] == got["threshold"]
        assert [e["kind"] for e in again.catalog.events()].count("calibrated") == 1
    # a store full of its own near-duplicates (each digit and a copy turned by 2°): what it
    # measures collapses, and the floor holds
    from scipy.ndimage import rotate

    turned = np.stack([rotate(a, 2.0, reshape=False, order=1) for a in x[:60]])
    with Index.open(tmp_path / "copies") as index:
        ids = index.add_many(np.concatenate([x[:60], turned]))
        got = index.calibrate_duplicates()
        assert got["measured"] < STORE_CALIBRATION_FLOOR * got["version_threshold"]
        assert got["threshold"] == STORE_CALIBRATION_FLOOR * got["version_threshold"]
        px, frames = normalise_all(noisy(x[:20], 0.15, 4), frames=True)  # copies under paper noise
        hits = index.search_pixels(px, 3, mode="duplicate", frames=frames)
        assert np.mean([ids[i] in [h.id for h in row] for i, row in enumerate(hits)]) >= 0.8  # still found


def test_both_axes_warped_at_once_are_the_warps_of_each_axis():
    p = np.random.default_rng(0).uniform([0.7, 0.7, -6, -6], [1.4, 1.4, 6, 6], (9, 4)).astype(np.float32)
    ry, rxt = verify._warps(p)
    np.testing.assert_array_equal(ry, verify._interp(p[:, 0], p[:, 2]))
    np.testing.assert_array_equal(rxt, verify._interp(p[:, 1], p[:, 3]).transpose(0, 2, 1))
