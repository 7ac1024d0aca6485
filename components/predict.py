"""The served ensemble: one MLflow pyfunc that takes raw images and returns the stacked prediction, and
`braintumor predict` on top of it."""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from components.config import ProjectError
from components.images import ImageError, open_image, to_rgb

IMAGE_COLUMN = "image"
DEFAULT_MODEL_URI = "models:/brain-tumor-ensemble@champion"


class BadInput(ProjectError, ValueError):
    """Rows that cannot be scored; the message names each row and why."""


def decode_rows(values: pd.Series, max_pixels: int) -> tuple[list[Image.Image | None], list[str]]:
    """Each value is a file path or base64-encoded image bytes; returns (RGB image per row, errors).

    Each row is decoded once, fully, so corrupt and non-image bytes are caught here, before any model runs."""
    images, errors = [], []
    for row, value in enumerate(values):
        try:
            if isinstance(value, bytes | bytearray):
                blob = bytes(value)
            elif isinstance(value, str) and len(value) < 4096 and Path(value).is_file():
                blob = Path(value).read_bytes()
            elif isinstance(value, str):
                try:
                    blob = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise ImageError("neither an existing file path nor base64 image bytes") from None
            else:
                raise ImageError(f"expected a path or base64 string, got {type(value).__name__}")
            images.append(to_rgb(open_image(blob, max_pixels)))
        except (ImageError, OSError) as exc:
            errors.append(f"row {row}: {exc}")
            images.append(None)
    return images, errors


def batch_at(images: list[Image.Image], size: int) -> np.ndarray:
    """Images decoded once, resized as `components.images.load_rgb` resizes for training (a test pins this)."""
    resized = [image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BILINEAR)
               for image in images]
    return np.stack([np.asarray(image, dtype=np.uint8) for image in resized]).astype(np.float32)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """mlflow.pyfunc.PythonModel: four Keras CNNs + the FLAML stacker + the shared image decoding.

    Artifacts: one `<name>` .keras file per base model, `stacker` (pickle) and `meta` (classes, models)."""

    batch_size = 64  # images per forward pass; predict_on_batch skips model.predict's per-call tf.data set-up

    def load_context(self, context) -> None:
        import keras

        from components.stack import Stacker

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.classes: list[str] = meta["classes"]
        self.max_pixels: int = meta["max_image_pixels"]
        self.models = {name: keras.models.load_model(context.artifacts[name]) for name in meta["models"]}
        self.stacker = Stacker.load(Path(context.artifacts["stacker"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input:
            raise BadInput(f"input needs a column {IMAGE_COLUMN!r} of file paths or base64 image bytes; "
                           f"got columns {list(model_input.columns)}")
        images, errors = decode_rows(model_input[IMAGE_COLUMN], self.max_pixels)
        if errors:
            raise BadInput(f"{len(errors)} of {len(images)} rows cannot be scored: " + "; ".join(errors))
        batches: dict[int, np.ndarray] = {}  # one resize per input size, shared by models of that size
        probabilities = {}
        for name, model in self.models.items():
            size = model.input_shape[1]
            batch = batches.setdefault(size, batch_at(images, size))
            probabilities[name] = np.concatenate([
                np.asarray(model.predict_on_batch(batch[start:start + self.batch_size]))
                for start in range(0, len(batch), self.batch_size)])
        stacked = self.stacker.predict_proba(probabilities)
        out = pd.DataFrame(stacked, columns=[f"prob_{c}" for c in self.classes])
        out.insert(0, "predicted_class", np.array(self.classes)[stacked.argmax(axis=1)])
        return out


def predict_paths(paths: list[str], model_uri: str = DEFAULT_MODEL_URI) -> pd.DataFrame:
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:  # only an unset alias (e.g. @champion before any promotion) is reworded
        name, at, alias = model_uri.removeprefix("models:/").partition("@")
        if not (model_uri.startswith("models:/") and at and re.search(r"alias .*not found", str(exc), re.I)):
            raise
        raise ProjectError(
            f"{model_uri}: {name} has no @{alias} version yet. Run `braintumor promote` first (after "
            f"`braintumor register`), or pass --model-uri, e.g. models:/{name}@challenger or models:/{name}/1"
        ) from exc
    out = model.predict(pd.DataFrame({IMAGE_COLUMN: [str(p) for p in paths]}))
    out.insert(0, "path", [str(p) for p in paths])
    return out
