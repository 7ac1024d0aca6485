"""Acquisition style of a scan, read from its pixels and its file alone, never from its label.

Two kinds of feature, shared by the shortcut audit (components.audit) and the drift monitor (components.monitor):
- MRI weighting: intensity statistics of the head, inside versus its rim. In a T2-weighted (or FLAIR) scan the
  cerebrospinal fluid and parenchyma are bright relative to the scalp; in a contrast-enhanced T1 scan the scalp fat
  is the brightest tissue and the ventricles are dark. No single statistic separates the two well (measured on a
  hand-labelled sample: docs/audit.md), so the audit combines them in a small classifier fitted on hand labels.
- Source cues: colour mode as stored, residual colour, JPEG quality, image size and aspect, framing (how much of
  the image the head fills, how wide the black border is) and file size.

The head is found as in components.images (Otsu threshold, largest component, holes filled), so the audit's idea
of the head is the one the models' crop uses.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from components.images import ImageError, head_mask, open_image

# Inside the head: pixels deeper than this share of the head's largest inscribed radius; rim: within this share.
INNER_DEPTH, RIM_DEPTH = 0.30, 0.15

WEIGHTING_FEATURES = ["inner_skew", "inner_dark_share", "inner_bright_share", "inner_to_rim", "inner_p99_to_rim_p95",
                      "inner_median", "rim_p95", "inner_cv", "inner_p99_to_median"]
SOURCE_FEATURES = ["stored_rgb", "residual_colour", "jpeg_quality", "width", "height", "aspect", "head_fill",
                   "border_share", "file_kib"]
STYLE_FEATURES = WEIGHTING_FEATURES + SOURCE_FEATURES


def jpeg_quality(image) -> float:
    """An estimate of the encoder's quality setting from the luminance quantisation table (IJG scaling of the
    standard table, whose mean is 57.6 at quality 50); NaN for a file that is not a JPEG."""
    tables = getattr(image, "quantization", None)
    if not tables:
        return float("nan")
    mean = float(np.mean(tables[min(tables)]))
    scale = 100.0 * mean / 57.625  # percent of the quality-50 table
    quality = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
    return float(np.clip(quality, 1, 100))


def weighting_statistics(gray: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Intensity statistics of the head's inside against its rim (gray in 0..1); see the module docstring."""
    depth = ndimage.distance_transform_edt(mask)
    radius = float(depth.max()) or 1.0
    inner, rim = gray[depth > INNER_DEPTH * radius], gray[mask & (depth <= RIM_DEPTH * radius)]
    if inner.size < 16 or rim.size < 16:  # no head found: a blank or a tiny image
        inner = rim = gray.ravel()
    median = float(np.median(inner)) + 1e-3
    rim_p95 = float(np.percentile(rim, 95)) + 1e-3
    return {
        "inner_skew": float(stats.skew(inner)) if inner.std() > 0 else 0.0,
        "inner_dark_share": float(np.mean(inner < 0.6 * median)),
        "inner_bright_share": float(np.mean(inner > 1.4 * median)),
        "inner_to_rim": median / (float(np.median(rim)) + 1e-3),
        "inner_p99_to_rim_p95": float(np.percentile(inner, 99)) / rim_p95,
        "inner_median": median,
        "rim_p95": rim_p95,
        "inner_cv": float(inner.std()) / median,
        "inner_p99_to_median": float(np.percentile(inner, 99)) / median,
    }


def style_features(data: bytes, max_pixels: int = 50_000_000) -> dict[str, float]:
    """Every STYLE_FEATURES value of one encoded image; ImageError if it cannot be decoded."""
    image = open_image(data, max_pixels)
    stored = image.mode
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    gray = rgb.mean(axis=2)
    mask = head_mask(gray)
    rows, cols = np.nonzero(mask)
    if rows.size:
        head_box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        border = 1.0 - head_box / gray.size
    else:
        border = 1.0
    return {
        **weighting_statistics(gray, mask),
        "stored_rgb": float(stored not in ("L", "I", "I;16", "F", "1")),
        "residual_colour": float(np.abs(rgb - gray[..., None]).mean()),
        "jpeg_quality": jpeg_quality(image),
        "width": float(image.width),
        "height": float(image.height),
        "aspect": image.width / image.height,
        "head_fill": float(mask.mean()),
        "border_share": float(border),
        "file_kib": len(data) / 1024.0,
    }


def _row(path: str) -> dict:
    try:
        return {"path": path, **style_features(Path(path).read_bytes())}
    except (ImageError, OSError) as exc:
        return {"path": path, "error": str(exc)}


def style_frame(paths: list[str], workers: int = 1) -> pd.DataFrame:
    """One row per path: STYLE_FEATURES, and `error` (None when the file decoded)."""
    paths = [str(p) for p in paths]
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_row, paths, chunksize=64))
    else:
        rows = [_row(p) for p in paths]
    frame = pd.DataFrame(rows, columns=["path", *STYLE_FEATURES, "error"])
    return frame.astype({name: float for name in STYLE_FEATURES})

