"""Image decoding shared by the manifest, the training pipeline, evaluation, Grad-CAM and the served ensemble.

Every consumer decodes through `to_rgb`, so a 16-bit PNG or a CMYK JPEG is normalised the same way at
training time and at serving time; then `normalise` (params data.preprocess: grayscale, crop to the head, per-image
intensity standardisation) and `fit_to` (aspect-preserving resize) make the model input. `load_rgb` is those steps
for a file, and the served ensemble calls the same two functions on request bytes, so both feed identical pixels
(tests/components/test_serving.py pins this).

Why: the scans of one class in this data set come mostly from one collection, framed and exposed its own way; a
model fed raw pixels learns the framing and the exposure (docs/audit.md). Cropping to the head and standardising
the head's intensities take those cues away before the model sees the image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from components.config import Preprocess

# Modes that need no conversion besides grayscale -> 3 channels; anything else counts as "normalised".
PLAIN_MODES = ("L", "RGB")


class ImageError(ValueError):
    """A file that is not a usable image; the message says why."""


def open_image(source: str | Path | bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing truncated files and decompression bombs.

    The pixel count is read from the header and checked before any pixel is decoded. No process-wide state is
    changed (PIL's MAX_IMAGE_PIXELS, warning filters): the scoring server decodes in several threads at once.
    """
    data = source if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))  # parses the header only
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise ImageError(f"decompression bomb refused: {image.width}x{image.height} = {pixels} pixels, over "
                             f"the limit of {max_pixels}")
        image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own, looser guard
        raise ImageError(f"decompression bomb refused: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (PIL cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt image: {exc}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Normalise any PIL mode to 8-bit RGB: alpha is flattened on black, 16-bit is rescaled, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in 0..1 (256 bins): the cut that maximises the between-class variance.
    (scikit-image has it, but is not otherwise a dependency; this is its textbook form.)"""
    counts, _ = np.histogram(values, bins=256, range=(0.0, 1.0))
    share = counts / max(counts.sum(), 1)
    below = np.cumsum(share)
    mean_below = np.cumsum(share * np.arange(256))
    between = (mean_below[-1] * below - mean_below) ** 2 / (below * (1.0 - below) + 1e-12)
    return float(np.argmax(between)) / 255.0


def head_mask(gray: np.ndarray) -> np.ndarray:
    """The head: pixels above half the Otsu threshold, holes filled, largest connected component (gray in 0..1).
    Half the threshold keeps the dark parts of the head (a T1 scan's ventricles) inside it. Empty for a blank
    image."""
    if gray.max() <= gray.min():
        return np.zeros(gray.shape, dtype=bool)
    mask = ndimage.binary_fill_holes(gray > 0.5 * otsu_threshold(gray))
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    return components == (np.bincount(components.ravel())[1:].argmax() + 1)


def normalise(image: Image.Image, preprocess: Preprocess) -> Image.Image:
    """The size-independent part of the model input, from a `to_rgb` image: grayscale, crop to the head (with
    `head_margin`), and the head's `percentiles` stretched to 0..255. Returns an RGB image."""
    if preprocess.grayscale:
        image = image.convert("L")
    if not (preprocess.crop_to_head or preprocess.standardise):
        return image.convert("RGB")
    array = np.asarray(image, dtype=np.float32)
    gray = (array if array.ndim == 2 else array.mean(axis=2)) / 255.0
    mask = head_mask(gray)
    if mask.any() and preprocess.crop_to_head:
        rows, cols = np.nonzero(mask)
        margin = int(round(preprocess.head_margin * max(rows.max() - rows.min(), cols.max() - cols.min())))
        top, bottom = max(rows.min() - margin, 0), min(rows.max() + margin + 1, gray.shape[0])
        left, right = max(cols.min() - margin, 0), min(cols.max() + margin + 1, gray.shape[1])
        array, mask = array[top:bottom, left:right], mask[top:bottom, left:right]
    if preprocess.standardise:
        head = array[mask] if mask.any() else array.reshape(-1, *array.shape[2:])
        low, high = np.percentile(head, preprocess.percentiles)  # per channel collapses to one pair: same bounds
        scale = 255.0 / (high - low) if high > low else 0.0
        array = np.clip((array - low) * scale, 0, 255)
    return Image.fromarray(np.round(array).astype(np.uint8)).convert("RGB")


def fit_to(image: Image.Image, size: int, keep_aspect: bool) -> np.ndarray:
    """A (size, size, 3) uint8 array: the image padded with black to a centred square, then resized
    (`keep_aspect`), or stretched to the square."""
    if keep_aspect and image.width != image.height:
        image = ImageOps.pad(image, (size, size), method=Image.Resampling.BILINEAR, color=(0, 0, 0))
    elif image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_rgb(source: str | Path | bytes, size: int, preprocess: Preprocess,
             max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode one image and make it the model input: a (size, size, 3) uint8 array (see the module docstring)."""
    return fit_to(normalise(to_rgb(open_image(source, max_pixels)), preprocess), size, preprocess.keep_aspect)
