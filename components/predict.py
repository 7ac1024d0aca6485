"""The served ensemble: one MLflow pyfunc that takes image bytes and returns the stacked prediction, and the one
client-side scoring path on top of it: `load_scorer` (the workspace's trained ensemble, or a registered version) and
`score_files` (files sent as base64 rows in requests of at most `max_rows`, refused rows listed), which
`braintumor predict`, `braintumor evaluate-external` and the drift monitor all use.

The pyfunc's `predict` is the HTTP boundary of `mlflow models serve`. It takes base64 image bytes; it reads a file
by path only under the folder the operator names in BRAINTUMOR_SERVE_IMAGE_ROOT (unset: never). Its limits (rows per
request, bytes and pixels per image) are params `serve`, baked into each registered version. Bad input raises
`BadInput`, which the scoring server answers with HTTP 400 and the message alone."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from PIL import Image

from components.config import Params, Preprocess, ProjectError
from components.images import ImageError, fit_to, normalise, open_image, to_rgb
from components.progress import track

IMAGE_COLUMN = "image"
DEFAULT_MODEL_URI = "models:/brain-tumor-ensemble@champion"
IMAGE_ROOT_ENV = "BRAINTUMOR_SERVE_IMAGE_ROOT"
MAX_PATH_CHARS = 4096  # a longer string is never taken for a path
logger = logging.getLogger(__name__)


class BadInput(ProjectError, MlflowException, ValueError):
    """Rows that cannot be scored; the message names each row and why, `rows` maps row -> reason.

    An MlflowException with INVALID_PARAMETER_VALUE: the scoring server answers 400 with the message and no stack
    trace (it attaches a trace to any other exception). The CLI prints it as a user error (ProjectError)."""

    def __init__(self, message: str, rows: dict[int, str] | None = None):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)
        self.rows = rows or {}


@dataclass(frozen=True)
class Limits:
    max_rows: int  # rows per request
    max_image_bytes: int  # encoded bytes per image
    max_image_pixels: int  # width x height per image
    image_root: Path | None = None  # resolved folder whose files may be sent by path; None: bytes only


def image_root_from_env() -> Path | None:
    value = os.environ.get(IMAGE_ROOT_ENV, "").strip()
    if not value:
        return None
    root = Path(value).resolve()
    if not root.is_dir():
        raise ProjectError(f"{IMAGE_ROOT_ENV}={value} is not a folder")
    return root


def allowed_file(value: str, root: Path | None) -> Path | None:
    """The file `value` names (relative to `root`, or absolute) if it lies under `root` once symlinks and `..` are
    resolved; otherwise None. A path outside `root` on its face is not even looked up."""
    if root is None or len(value) > MAX_PATH_CHARS or not Path(os.path.normpath(root / value)).is_relative_to(root):
        return None
    try:
        path = (root / value).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None
    except (OSError, ValueError):  # too long a name, a NUL byte, a symlink loop
        return None


def image_bytes(value, limits: Limits) -> bytes:
    """One row's encoded image. A base64 string is measured before it is decoded. The answer for a string that is
    neither base64 nor an allowed file depends on the string alone, never on which files exist."""
    if isinstance(value, bytes | bytearray):
        blob = bytes(value)
    elif not isinstance(value, str):
        raise ImageError(f"expected base64 image bytes (a string), got {type(value).__name__}")
    elif path := allowed_file(value, limits.image_root):
        try:
            with path.open("rb") as handle:
                blob = handle.read(limits.max_image_bytes + 1)
        except OSError as exc:
            raise ImageError(f"the file cannot be read ({exc.strerror})") from None
    elif len(value) > 4 * -(-limits.max_image_bytes // 3):  # base64 of max_image_bytes is 4 * ceil(n / 3) chars
        raise ImageError(f"{len(value)} base64 characters encode more than the limit of {limits.max_image_bytes} "
                         "bytes per image")
    else:
        try:
            blob = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("not base64 image bytes" + (" (this server does not read file paths)"
                             if limits.image_root is None else ", nor a file under the allowed image root")) from None
    if len(blob) > limits.max_image_bytes:
        raise ImageError(f"more than the limit of {limits.max_image_bytes} bytes per image")
    return blob


def decode_rows(values: pd.Series, limits: Limits, sizes: set[int], preprocess: Preprocess
                ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """({size: float32 batch of every row at that size}, {row: why it cannot be scored}).

    Each row is checked and fully decoded once, before any model runs, normalised once (grayscale, head crop,
    standardisation), then fitted to every size at once, so at most one full-size image is in memory."""
    resized: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
    errors = {}
    for row, value in enumerate(values):
        try:
            image = normalise(to_rgb(open_image(image_bytes(value, limits), limits.max_image_pixels)), preprocess)
        except ImageError as exc:
            errors[row] = str(exc)
            continue
        for size, batches in resized.items():
            batches.append(batch_at([image], size, preprocess))
    return {size: np.concatenate(batches) for size, batches in resized.items() if batches}, errors


def batch_at(images: list[Image.Image], size: int, preprocess: Preprocess) -> np.ndarray:
    """Normalised images fitted to `size` as `components.images.load_rgb` fits them for training (a test pins
    this)."""
    return np.stack([fit_to(image, size, preprocess.keep_aspect) for image in images]).astype(np.float32)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """mlflow.pyfunc.PythonModel: four Keras CNNs + the FLAML stacker + the shared image decoding.

    Artifacts: one `<name>` .keras file per base model, `stacker` (pickle) and `meta` (classes, models, limits)."""

    batch_size = 64  # images per forward pass; predict_on_batch skips model.predict's per-call tf.data set-up

    def load_context(self, context) -> None:
        import keras

        from components.stack import Stacker

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.classes: list[str] = meta["classes"]
        # Versions registered before the serve limits existed carry only max_image_pixels: no row or byte limit.
        self.limits = Limits(meta.get("max_rows", sys.maxsize), meta.get("max_image_bytes", sys.maxsize),
                             meta["max_image_pixels"], image_root_from_env())
        # Versions registered before data.preprocess existed were trained on plainly resized images.
        self.preprocess = Preprocess(**meta["preprocess"]) if "preprocess" in meta else Preprocess.plain()
        self.models = {name: keras.models.load_model(context.artifacts[name]) for name in meta["models"]}
        self.stacker = Stacker.load(Path(context.artifacts["stacker"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return self._predict(model_input)
        except BadInput:
            raise
        except Exception as exc:  # a bug: the trace goes to the server log, not to the client
            logger.exception("scoring failed")
            raise MlflowException("internal error while scoring; the server log has the details",
                                  error_code=INTERNAL_ERROR) from exc

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        from components.stack import STACK

        stacked = self.component_probabilities(model_input)[STACK]
        out = pd.DataFrame(stacked, columns=[f"prob_{c}" for c in self.classes])
        out.insert(0, "predicted_class", np.array(self.classes)[stacked.argmax(axis=1)])
        return out

    def component_probabilities(self, model_input: pd.DataFrame) -> dict[str, np.ndarray]:
        """{base model name: its class probabilities, `soft_vote`: their mean, `stack`: the stacker's}, each
        (rows, classes) in `self.classes` order. The one scoring path: `predict` serves its `stack`, and
        `braintumor evaluate-external` reads all of them. Bad input raises `BadInput` before any model runs."""
        from components.stack import SOFT_VOTE, STACK, soft_vote

        if IMAGE_COLUMN not in model_input:
            raise BadInput(f"input needs a column {IMAGE_COLUMN!r} of base64 image bytes; "
                           f"got columns {list(model_input.columns)}")
        rows = len(model_input)
        if not 0 < rows <= self.limits.max_rows:
            raise BadInput(f"a request holds 1 to {self.limits.max_rows} rows; got {rows}")
        batches, errors = decode_rows(model_input[IMAGE_COLUMN], self.limits,
                                      {model.input_shape[1] for model in self.models.values()}, self.preprocess)
        if errors:
            raise BadInput(f"{len(errors)} of {rows} rows cannot be scored: "
                           + "; ".join(f"row {row}: {why}" for row, why in errors.items()), errors)
        probabilities = {}
        for name, model in self.models.items():
            batch = batches[model.input_shape[1]]
            probabilities[name] = np.concatenate([
                np.asarray(model.predict_on_batch(batch[start:start + self.batch_size]))
                for start in range(0, len(batch), self.batch_size)])
        return {**probabilities, SOFT_VOTE: soft_vote(probabilities),
                STACK: self.stacker.predict_proba(probabilities)}


def ensemble_artifacts(params: Params, meta_dir: Path | None = None) -> dict[str, str]:
    """The EnsembleModel's artifacts from the workspace's trained models: one `<name>` per base model
    (models/<name>/model.keras), `stacker` (models/stacker/stacker.pkl), `reference` (the folder paths.reference)
    and `meta` (classes, models, serve limits), which is written to `meta_dir` (default: a new temporary folder).
    What `register` logs, and what `evaluate-external` loads without a registry."""
    folder = params.paths.models / "stacker"
    # Written outside models/stacker/, which is the stack stage's DVC output; MLflow copies it into the model.
    meta_path = Path(meta_dir or tempfile.mkdtemp(prefix="ensemble-")) / "ensemble_meta.json"
    # The serve limits (rows per request, bytes and pixels per image) travel with the version (EnsembleModel).
    # So does the decode path the models were trained on (data.preprocess).
    meta_path.write_text(json.dumps({"classes": params.data.classes, "models": params.stack.models,
                                     "preprocess": params.data.preprocess.model_dump(mode="json"),
                                     **params.serve.model_dump()}) + "\n")
    artifacts = {name: str(params.paths.models / name / "model.keras") for name in params.stack.models}
    # The reference profile of the training data (components.reference) travels with the version too: monitoring
    # a registered version compares incoming scans with the data it was trained on.
    return artifacts | {"stacker": str(folder / "stacker.pkl"), "meta": str(meta_path),
                        "reference": str(params.paths.reference)}


def load_scorer(params: Params, model_uri: str | None):
    """(scorer, what it is): the EnsembleModel of the workspace's trained models (models/<name>/model.keras and
    models/stacker/stacker.pkl, as `dvc repro` left them; no registry needed), or any pyfunc URI's python model."""
    if model_uri is None:
        with tempfile.TemporaryDirectory(prefix="ensemble-") as meta_dir:
            artifacts = ensemble_artifacts(params, Path(meta_dir))
            missing = [path for name, path in artifacts.items() if name != "meta" and not Path(path).exists()]
            if missing:
                raise ProjectError(f"{', '.join(missing)} not found: the workspace has no trained ensemble; run "
                                   "`dvc repro` (or `dvc pull`), or pass --model-uri")
            model = EnsembleModel()
            model.load_context(SimpleNamespace(artifacts=artifacts))
        folders = ",".join(params.stack.models)
        return model, f"workspace models ({params.paths.models}/{{{folders}}}/model.keras + " \
                      f"{params.paths.models}/stacker/stacker.pkl)"
    from components import tracking

    tracking.configure(params.tracking)  # models:/ URIs resolve in the project's registry
    model = load_pyfunc(model_uri).unwrap_python_model()
    if not callable(getattr(model, "component_probabilities", None)):
        raise ProjectError(f"{model_uri} is not the ensemble pyfunc ({type(model).__name__} has no "
                           "component_probabilities); pass an ensemble version, e.g. "
                           "models:/brain-tumor-ensemble@champion")
    return model, model_uri


def score_files(scorer, paths: list[str]) -> tuple[dict[str, np.ndarray], list[int], dict[int, str]]:
    """({model: probabilities of the scored files}, indices of the scored files, {index: why refused}).

    Bytes are sent base64-encoded, at most the scorer's `max_rows` per call, as to the served model; a file the
    model refuses is listed, and the rest of its chunk is scored."""
    limits = getattr(scorer, "limits", None)
    step = max(1, min(limits.max_rows, len(paths))) if limits else max(1, len(paths))
    parts: dict[str, list[np.ndarray]] = {}
    scored: list[int] = []
    refused: dict[int, str] = {}
    for start in track(range(0, len(paths), step), -(-len(paths) // step), f"scoring {len(paths)} files", logger,
                       unit=f"requests of {step}"):
        indices, values = [], []
        for index in range(start, min(start + step, len(paths))):
            try:
                values.append(base64.b64encode(Path(paths[index]).read_bytes()).decode())
                indices.append(index)
            except OSError as exc:
                refused[index] = f"cannot be read ({exc.strerror})"
        while indices:
            try:
                out = scorer.component_probabilities(pd.DataFrame({IMAGE_COLUMN: values}))
                break
            except BadInput as exc:
                if not exc.rows:
                    raise
                refused |= {indices[row]: why for row, why in exc.rows.items()}
                indices = [i for row, i in enumerate(indices) if row not in exc.rows]
                values = [v for row, v in enumerate(values) if row not in exc.rows]
        if not indices:
            continue
        scored += indices
        for name, probabilities in out.items():
            parts.setdefault(name, []).append(np.asarray(probabilities, dtype=float))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}, scored, refused


REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
LOADED_VERSIONS = 2  # registry versions kept loaded per process: a champion and a challenger


def load_pyfunc(model_uri: str = DEFAULT_MODEL_URI):
    """mlflow.pyfunc.load_model, with an unset alias (e.g. @champion before any promotion) reworded as a user error
    that says what to run. A registry version (models:/NAME/N, or an alias, resolved now to the version it names) is
    loaded once per process: its artifacts never change, and batch_predict then its monitoring, or the gate's
    champion and challenger on every promotion, would each load all four networks again."""
    try:
        match = REGISTRY_URI.match(model_uri)
        if match is None:
            return mlflow.pyfunc.load_model(model_uri)
        client = mlflow.MlflowClient()
        version = (client.get_model_version(match["name"], match["version"]) if match["version"]
                   else client.get_model_version_by_alias(match["name"], match["alias"]))
        # The registry and the version's creation time key the cache: a model deleted and registered again
        # numbers its versions from 1 anew.
        return _load_version(f"models:/{version.name}/{version.version}", mlflow.get_registry_uri(),
                             version.creation_timestamp)
    except MlflowException as exc:  # only an unset alias (e.g. @champion before any promotion) is reworded
        name, at, alias = model_uri.removeprefix("models:/").partition("@")
        if not (model_uri.startswith("models:/") and at and re.search(r"alias .*not found", str(exc), re.I)):
            raise
        raise ProjectError(
            f"{model_uri}: {name} has no @{alias} version yet. Run `braintumor promote` first (after "
            f"`braintumor register`), or pass --model-uri, e.g. models:/{name}@challenger or models:/{name}/1"
        ) from exc


@functools.lru_cache(maxsize=LOADED_VERSIONS)
def _load_version(version_uri: str, registry_uri: str, created: int):
    """The pyfunc of one registry version; `registry_uri` and `created` key the cache only."""
    return mlflow.pyfunc.load_model(version_uri)


def predict_paths(paths: list[str], model_uri: str = DEFAULT_MODEL_URI) -> pd.DataFrame:
    """Score local image files as a client of the served model would (score_files: this process reads them and sends
    their bytes, base64-encoded, at most the model's `max_rows` per call; the model never reads a path): the stack's
    predicted class and probabilities per file. A file the model refuses is named, with why, in BadInput."""
    from components.stack import STACK

    if not paths:
        raise ProjectError("no image files to score")
    model = load_pyfunc(model_uri).unwrap_python_model()
    paths = [str(p) for p in paths]
    probabilities, scored, refused = score_files(model, paths)
    if refused:
        raise BadInput(f"{len(refused)} of {len(paths)} files cannot be scored: "
                       + "; ".join(f"{paths[row]}: {why}" for row, why in sorted(refused.items())))
    stacked = probabilities[STACK]
    out = pd.DataFrame(stacked, columns=[f"prob_{c}" for c in model.classes])
    out.insert(0, "predicted_class", np.array(model.classes)[stacked.argmax(axis=1)])
    out.insert(0, "path", [paths[i] for i in scored])
    return out
