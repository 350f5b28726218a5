"""Defaults that the library and the ``streamsim`` command share (no imports: the command reads
them before it loads anything heavy)."""

SIDE = 28  # pixels are SIDE × SIDE: the one home of the number (MNIST's convention)
PIXELS_SHAPE = (SIDE, SIDE)
DRIFT_WINDOW = 200  # images: the current drift score is the mean normalised score of the latest ones
GATE_MARGIN = 0.25  # a new version may raise the error on older (reference) images by this much, relative
RETRIEVAL_MARGIN = 0.02  # ... and lower their self-retrieval top-1 by this much, absolute (streamsim.gate)
FINETUNE_STEPS = 800  # a fine-tune after drift: about this many optimiser steps over (recent + replay)
WATCH_SETTLE = 1.0  # seconds a file found only by a rescan must stay unchanged before it is taken
WATCH_RESCAN = 5.0  # seconds between the watcher's rescans of its folder
DECODE_TIMEOUT = 5.0  # seconds one file may take to decode and normalise before it is failed
