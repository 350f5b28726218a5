"""Fuzzing the image loader: whatever the bytes or the array, :func:`streamsim.images.load` and
:func:`streamsim.images.normalise` give pixels or an :class:`ImageError` — no other exception, no
warning printed, no hang.

The mutated files come from ``tests/fuzz.py`` (seeded, so a failure names an input that can be
rebuilt: ``dict(mutated_inputs(N_INPUTS, SEED))[name]``); inputs that once broke the loader are
kept in ``tests/data/fuzz/`` (see its README) and replayed by :func:`test_fuzz_regressions`.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fuzz import error_site, mutated_inputs
from streamsim import images
from streamsim.images import PIXELS_SHAPE, Frame, ImageError, Loaded

SEED = 20240611
N_INPUTS = 5000
FRAME_EVERY = 4  # every 4th input is also loaded with frame=True
MAX_SECONDS = 5.0  # per call: a 28×28 image takes about a millisecond
FIXTURES = Path(__file__).parent / "data" / "fuzz"
REGRESSIONS = sorted(p for p in FIXTURES.glob("*") if p.is_file() and p.suffix != ".md")
SLOW_FIXTURES: set[str] = set()  # fixtures too slow for the quick loop (none since strips over 500:1 are refused)


# ------------------------------------------------------------------------------------ helpers


def _check_loaded(out, frame: bool) -> str | None:
    """What is wrong with a returned value, or None."""
    if not isinstance(out, Loaded):
        return f"returned {type(out).__name__}, not Loaded"
    px = out.pixels
    if not isinstance(px, np.ndarray) or px.dtype != np.uint8 or px.shape != PIXELS_SHAPE:
        return f"pixels {getattr(px, 'dtype', type(px).__name__)} {getattr(px, 'shape', '')}, not uint8 {PIXELS_SHAPE}"
    if frame and not isinstance(out.frame, Frame):
        return f"frame=True but frame is {out.frame!r}"
    if frame and (out.frame.ink.shape != PIXELS_SHAPE or not np.isfinite(out.frame.ink).all()):
        return f"frame.ink {out.frame.ink.dtype} {out.frame.ink.shape} not finite [28, 28]"
    return None


def _warning_key(w: warnings.WarningMessage) -> str:
    msg = re.sub(r"\d+", "N", str(w.message))  # "Skipping tag 284" and "tag 320" are one kind
    return f"{w.category.__name__} ({Path(w.filename).name}:{w.lineno}): {msg}"


# ------------------------------------------------------------------------------------ mutated files


def test_load_raises_only_image_error_on_mutated_files():
    offenders: list[str] = []  # other exceptions, or bad return values
    warned: dict[str, list[str]] = {}  # warning kind -> input names
    slowest, slowest_name = 0.0, ""
    calls = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (name, data) in enumerate(mutated_inputs(N_INPUTS, SEED)):
            for frame in (False, True) if i % FRAME_EVERY == 0 else (False,):
                label = f"{name} (frame={frame})"
                seen = len(caught)
                start = time.perf_counter()
                try:
                    out = images.load(data, frame=frame)
                except ImageError as err:
                    if not err.reason or err.source != "<bytes>":
                        offenders.append(f"{label}: ImageError with source={err.source!r} reason={err.reason!r}")
                except Exception as err:  # noqa: BLE001 - collected and reported below
                    offenders.append(f"{label}: {type(err).__name__}: {err!r:.200} at {error_site(err)}")
                else:
                    wrong = _check_loaded(out, frame)
                    if wrong:
                        offenders.append(f"{label}: {wrong}")
                elapsed = time.perf_counter() - start
                calls += 1
                if elapsed > slowest:
                    slowest, slowest_name = elapsed, label
                for w in caught[seen:]:
                    warned.setdefault(_warning_key(w), []).append(label)
    assert calls >= N_INPUTS
    assert not offenders, (
        f"{len(offenders)} of {calls} loads of mutated files raised something other than ImageError "
        f"(or returned bad pixels); rebuild one with dict(fuzz.mutated_inputs({N_INPUTS}, {SEED}))[name]. "
        "First ones:\n  " + "\n  ".join(offenders[:8])
    )
    assert not warned, (
        f"{len(warned)} kinds of warnings escaped load() (each is printed once per file in a batch):\n  "
        + "\n  ".join(f"{k}  [{len(v)}x, e.g. {v[0]}]" for k, v in sorted(warned.items(), key=lambda kv: -len(kv[1]))[:12])
    )
    assert slowest < MAX_SECONDS, f"slowest load took {slowest:.2f} s (limit {MAX_SECONDS} s): {slowest_name}"


# ------------------------------------------------------------------------------------ regressions


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW_FIXTURES else []) for p in REGRESSIONS]
)
def test_fuzz_regressions(path):
    """Inputs the fuzzer once broke the loader with: pixels or ImageError, by path and by bytes,
    with and without a frame, no warning, no hang."""
    data = path.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for image, source in ((path, str(path)), (data, "<bytes>")):
            for frame in (False, True):
                start = time.perf_counter()
                try:
                    out = images.load(image, frame=frame)
                except ImageError as err:
                    assert err.reason, f"{path.name}: ImageError without a reason"
                    assert err.source == source
                else:
                    wrong = _check_loaded(out, frame)
                    assert wrong is None, f"{path.name}: {wrong}"
                elapsed = time.perf_counter() - start
                assert elapsed < MAX_SECONDS, f"{path.name} (frame={frame}) took {elapsed:.2f} s"
    assert not caught, f"{path.name}: warnings escaped: " + "; ".join(_warning_key(w) for w in caught)


def test_fuzz_fixtures_present():
    assert REGRESSIONS, f"no regression inputs in {FIXTURES}"


# ------------------------------------------------------------------------------------ arrays

_DTYPES = ["uint8", "float32", "bool", "uint16", "int32"]


def _elements(dtype: str):
    if dtype == "float32":  # 0..1, 0..255, and anything else a float32 holds: NaN, ±inf, 3e38, -0.0
        return st.one_of(
            st.floats(0, 1, width=32),
            st.floats(0, 255, width=32),
            hnp.from_dtype(np.dtype("float32"), allow_nan=True, allow_infinity=True),
        )
    return hnp.from_dtype(np.dtype(dtype))


@st.composite
def image_arrays(draw):
    """Arrays ``[H, W]`` or ``[H, W, C]`` (1..80 px a side, C in 1, 3, 4) of one of
    :data:`_DTYPES`: hypothesis' sparse arrays, constants, a single ink pixel, ink along the
    border or in a corner, a bar, or dense noise."""
    dtype = draw(st.sampled_from(_DTYPES))
    h, w = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    shape = (h, w) if channels is None else (h, w, channels)
    elements = _elements(dtype)
    kind = draw(st.sampled_from(["sparse", "constant", "pixel", "border", "corner", "bar", "noise"]))
    if kind == "sparse":
        return draw(hnp.arrays(dtype, shape, elements=elements))
    if kind == "noise":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if dtype == "bool":
            return rng.random(shape) < draw(st.floats(0, 1))
        if dtype == "float32":
            centre, spread = draw(st.floats(0, 1)), draw(st.sampled_from([0.01, 0.1, 0.5, 300.0]))
            return (centre + spread * rng.standard_normal(shape)).astype(np.float32)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    a = np.full(shape, draw(elements), dtype=dtype)
    ink = draw(elements)
    if kind == "pixel":
        a[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = ink
    elif kind == "border":
        side = draw(st.sampled_from(["top", "bottom", "left", "right"]))
        a[{"top": np.s_[0], "bottom": np.s_[-1], "left": np.s_[:, 0], "right": np.s_[:, -1]}[side]] = ink
    elif kind == "corner":
        a[draw(st.sampled_from([0, -1])), draw(st.sampled_from([0, -1]))] = ink
    elif kind == "bar":
        r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        a[r0 : draw(st.integers(r0 + 1, h)), c0 : draw(st.integers(c0 + 1, w))] = ink
    return a


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(array=image_arrays(), frame=st.booleans())
def test_normalise_arrays_give_pixels_or_image_error(array, frame):
    # uint8, float32, bool, uint16 and int32 are all supported dtypes: no TypeError either.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = images.normalise(array, frame=frame)
        except ImageError as err:
            out = err
    assert not caught, "warnings escaped: " + "; ".join(_warning_key(w) for w in caught)
    if isinstance(out, ImageError):
        assert out.reason and out.source == "<array>"
        return
    px, fr = out if frame else (out, None)
    assert isinstance(px, np.ndarray) and px.dtype == np.uint8 and px.shape == PIXELS_SHAPE
    assert px.any(), "pixels with no ink: should have been an ImageError"
    if frame:
        assert isinstance(fr, Frame) and fr.ink.shape == PIXELS_SHAPE and np.isfinite(fr.ink).all()
        assert np.isfinite([fr.sigma, fr.lo, fr.hi, fr.impulses]).all()


@pytest.mark.parametrize("dtype", ["complex64", "object", "<U1", "datetime64[s]", "timedelta64[s]"])
def test_normalise_unsupported_dtypes_raise_type_error(dtype):
    array = np.zeros((28, 28), dtype=dtype)
    with pytest.raises(TypeError, match="unsupported array dtype"):
        images.normalise(array)
