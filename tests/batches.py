"""Incoming batches for the monitoring tests: scans drawn like the tiny training data (tests.conftest.class_image),
some of them contrast-inverted as a T2-weighted scan inverts a T1 scan's contrast (fluid and tissue bright where they
were dark), which leaves the head's shape and the file format as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ImageOps

from tests.conftest import CLASSES, class_image



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


def write_val_batch(folder: Path, val_paths: list[str], count: int, seed: int, inverted: int = 0
                    ) -> tuple[list[str], list[str]]:
    """`count` copies of val scans drawn with `seed` (with replacement when val holds fewer), the first `inverted` of
    them contrast-inverted: a batch from the data the drift thresholds were calibrated on. Returns (normal,
    inverted) file names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(val_paths), count, replace=count > len(val_paths))
    normal, flipped = [], []
    for n, index in enumerate(chosen):
        image = Image.open(val_paths[index])
        name = f"{'inv' if n < inverted else 'val'}-{n:03d}.jpg"
        (ImageOps.invert(image.convert("RGB")) if n < inverted else image).save(folder / name, quality=95)
        (flipped if n < inverted else normal).append(name)
    return normal, flipped
