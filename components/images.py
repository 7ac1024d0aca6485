"""Image decoding shared by the manifest, the training pipeline and the served ensemble.

Every consumer decodes through `to_rgb`, so a 16-bit PNG or a CMYK JPEG is normalised the same way at
training time and at serving time.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

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


def load_rgb(source: str | Path | bytes, size: int, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode, normalise and resize one image to a (size, size, 3) uint8 array."""
    image = to_rgb(open_image(source, max_pixels))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
