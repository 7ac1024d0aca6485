"""MLflow plumbing shared by every stage: the store, nesting under a parent run, and provenance tags."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.exceptions import MlflowException

from components.config import Params, ProjectError, TrackingParams
from components.data_import import data_hash

# Set by a Prefect flow so that stage runs nest under its parent run.
PARENT_RUN_ENV = "BRAINTUMOR_PARENT_RUN_ID"
FLOW_RUN_ENV = "BRAINTUMOR_FLOW_RUN_ID"


def same_store(uri: str, default: str) -> bool:
    """Whether `uri` names the project's default store (a sqlite URI may spell the same file another way)."""
    if uri == default:
        return True
    sqlite = "sqlite:///"
    if uri.startswith(sqlite) and default.startswith(sqlite):
        return Path(uri.removeprefix(sqlite)).resolve() == Path(default.removeprefix(sqlite)).resolve()
    return False


def public_uri(uri: str) -> str:
    """The tracking URI without any user:password part, fit for files, tags and logs."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


class TrackingUnavailable(ProjectError):
    """The MLflow tracking server MLFLOW_TRACKING_URI names did not answer after MLflow's own retries: it is down,
    unreachable, or up without its database."""


def _unreachable(exc: BaseException) -> str | None:
    """Why an MLflow server could not be used, when `exc` (an MlflowException raised by MLflow's REST client, which
    keeps the requests error as its cause or context) is a connection failure, a timeout or a 5xx answered to every
    retry; None for any other error (a 403, a missing run, a bug)."""
    import requests

    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for error in chain:
        if isinstance(error, requests.exceptions.RetryError):
            status = re.search(r"too many (\d{3}) error responses", str(error))
            return (f"answered HTTP {status.group(1) if status else '5xx'} to every attempt: it runs but cannot "
                    "serve requests, most likely because its database (PostgreSQL) is down")
        if isinstance(error, requests.exceptions.Timeout):
            return "did not answer in time (MLFLOW_HTTP_REQUEST_TIMEOUT)"
        if isinstance(error, requests.exceptions.ConnectionError):
            return "cannot be reached: nothing answers at that address (the server is not running)"
    return None


def unavailable_error(uri: str, exc: BaseException) -> TrackingUnavailable | None:
    """A TrackingUnavailable naming the server and how to start it, or None when `exc` is another kind of error."""
    why = _unreachable(exc)
    if why is None:
        return None
    cause = " ".join(str(exc).split())
    return TrackingUnavailable(
        f"MLflow tracking server {public_uri(uri)} (MLFLOW_TRACKING_URI) {why}. For the project's team services, "
        "`braintumor services status` says what runs and `braintumor services up` starts what does not; otherwise "
        "start that server, or unset MLFLOW_TRACKING_URI to use the local store. Then run the command again: a "
        "training resumes from its last finished epoch. (MLflow's last error: "
        f"{cause[:300]}{'...' if len(cause) > 300 else ''})")


def configure(tracking: TrackingParams) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, or at the project's sqlite store; create the experiment. A tracking
    server that does not answer (after MLflow's retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR,
    _TIMEOUT) is a TrackingUnavailable naming it and how to start it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.tracking_uri
    if uri.startswith("sqlite:///"):
        # Absolute: MLflow keeps one store per URI string in a process, so a relative URI set again from another
        # working directory would still reach the first directory's database.
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{database}"
    mlflow.set_tracking_uri(uri)  # note: MLflow also exports it as MLFLOW_TRACKING_URI for subprocesses
    try:
        if mlflow.get_experiment_by_name(tracking.experiment) is None:
            # On the project's own store, artifacts live beside it; any other server picks its own location.
            location = (Path(tracking.artifact_root).resolve().as_uri() if same_store(uri, tracking.tracking_uri)
                        else None)
            mlflow.create_experiment(tracking.experiment, artifact_location=location)
        mlflow.set_experiment(tracking.experiment)
    except MlflowException as exc:
        if (error := unavailable_error(uri, exc)) is not None:
            raise error from exc
        raise
    return uri


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


SMOKE_TAG = "smoke"


def provenance(params: Params) -> dict[str, str]:
    """Tags every run and registered version carries."""
    tags = {
        "git_commit": git_commit(),
        "dvc_data_hash": data_hash(params.paths.raw.with_name(params.paths.raw.name + ".dvc")) or "untracked",
        "params_hash": params.digest(),
        SMOKE_TAG: str(params.tracking.smoke).lower(),  # the quick profile: promote refuses such a version
    }
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags


def system_info() -> dict[str, str]:
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return {
        "device": "GPU" if gpus else "CPU",
        "gpu_name": ", ".join(names) or "none",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
        "host": platform.node(),
    }


@contextmanager
def stage_run(params: Params, run_name: str, stage: str):
    """An MLflow run for one stage, nested under the flow's parent run when BRAINTUMOR_PARENT_RUN_ID is set."""
    configure(params.tracking)
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {**provenance(params), "stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    try:
        with mlflow.start_run(run_name=run_name, tags=tags) as run:
            yield run
    except MlflowException as exc:  # the server went away during the stage: say which, and how to start it
        if (error := unavailable_error(mlflow.get_tracking_uri(), exc)) is not None:
            raise error from exc
        raise


def flatten(prefix: str, value: dict) -> dict[str, object]:
    """Nested params -> {'prefix.a.b': value} for mlflow.log_params."""
    import pandas as pd

    flat = pd.json_normalize(value, sep=".").iloc[0].to_dict()
    return {f"{prefix}.{key}" if prefix else key: inner for key, inner in flat.items()}


def requirements(*extra: str) -> list[str]:
    """Pinned serving requirements; MLflow's inference would re-import TensorFlow in a subprocess (~20 s)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("tensorflow-cpu", "tensorflow", "keras", "pillow", "numpy", "pandas", *extra):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_keras_model(model, example, name: str = "model"):
    """mlflow.keras.log_model with signature and input example.

    mlflow.keras writes the input example before creating the model folder (mlflow/mlflow#16183, open), so
    the folder is created first; without an input example the same call works unchanged."""
    import mlflow.keras.save as keras_save
    from mlflow.models import infer_signature

    original = keras_save._save_example

    def save_example_into_new_folder(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = save_example_into_new_folder
    try:
        return mlflow.keras.log_model(model, name=name, input_example=example, pip_requirements=requirements(),
                                      signature=infer_signature(example, model.predict(example, verbose=0)))
    finally:
        keras_save._save_example = original
