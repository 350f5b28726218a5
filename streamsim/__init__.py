"""streamsim: search, de-duplicate and continuously re-index character images.

Images are normalised (ink centred by centre of mass in 28×28), encoded by a Flax denoising
autoencoder and kept in a USearch index behind a SQLite catalog::

    from streamsim import Index
    with Index.open("my-store") as index:
        ids = index.add_many(["a.png", "b.png"])
        for m in index.search("query.png", k=5):
            print(m.id, m.path, m.distance, m.encoder_version)

Heavy modules (JAX, Flax, orbax) load only when first needed.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Index", "Match", "ImageError", "StoreError", "SearchPolicy", "__version__"]


def __getattr__(name: str):
    if name in ("Index", "Match", "StoreError", "IngestReport", "SearchPolicy"):
        from . import index

        return getattr(index, name)
    if name == "ImageError":
        from .images import ImageError

        return ImageError
    raise AttributeError(f"module 'streamsim' has no attribute {name!r}")
