"""Incoming batches for the monitoring tests: scans drawn like the tiny training data (tests.conftest.class_image),
some of them contrast-inverted as a T2-weighted scan inverts a T1 scan's contrast (fluid and tissue bright where they
were dark), which leaves the head's shape and the file format as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageOps

from tests.conftest import CLASSES, class_image

# The tiny reference (about 20 training and 12 val images) makes every statistic of a batch noisy: its OOD threshold
# is about the largest of 12 val distances, the drift classifier trains on a few dozen rows, and the one-epoch models'
# class mix on 12 val images is a rough estimate. The tests widen the thresholds that noise reaches; an inverted
# batch clears them by far (params.yaml's defaults suit real data).
TINY_THRESHOLDS = ["monitor.max_ood_share=0.5", "monitor.embedding_drift_threshold=0.8",
                   "monitor.style_drift_share=0.4", "monitor.class_mix_alpha=0.001"]


def write_batch(folder: Path, count: int, seed: int, inverted: int = 0) -> tuple[list[str], list[str]]:
    """`count` scans of the training data's kind (classes in turn, grayscale and RGB JPEGs alternating, as
    write_tiny_dataset makes them) in `folder`, the first `inverted` of them contrast-inverted; returns the file
    names (normal, inverted)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    normal, flipped = [], []
    for n in range(count):
        label = n % len(CLASSES)
        image = class_image(label, rng, 32, "RGB" if (n // len(CLASSES)) % 2 else "L")
        name = f"{'inv' if n < inverted else 'scan'}-{n:03d}.jpg"
        (ImageOps.invert(image) if n < inverted else image).save(folder / name, quality=95)
        (flipped if n < inverted else normal).append(name)
    return normal, flipped
