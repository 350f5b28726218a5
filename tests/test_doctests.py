"""The examples in the installed modules' docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["streamsim.images", "streamsim.normalise", "streamsim.model", "streamsim.train", "streamsim.index", "streamsim.evaluate",
           "streamsim.perturb", "streamsim.calibrate", "streamsim.verify", "streamsim.stream", "streamsim.watch", "streamsim.adapt",
           "streamsim.drift", "streamsim.search", "streamsim.server", "streamsim.engines", "streamsim.infer"]


@pytest.mark.parametrize("name", [pytest.param(m, marks=[pytest.mark.slow] if m == "streamsim.train" else []) for m in MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
