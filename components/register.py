"""Register every base model and the ensemble in the MLflow registry (`braintumor register`).

Each new version gets the `challenger` alias, provenance tags (git commit, DVC data hash, params hash, flow run
id) and a model card as its description. Promotion to `champion` is a separate, gated step (components.promote).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
from pathlib import Path

import pandas as pd

from components.config import Params, ProjectError
from components.predict import IMAGE_COLUMN, ensemble_artifacts
from components.stack import STACK
from components import tracking

ENSEMBLE = "ensemble"
log = logging.getLogger(__name__)


class ArtifactStoreFull(ProjectError):
    """The artifact store ran out of space (or quota) while `register` wrote a model: nothing was registered."""


def registered_name(params: Params, model: str) -> str:
    return f"{params.register_params.model_prefix}-{model}"


def model_card(params: Params, model: str, metrics: dict, tags: dict[str, str]) -> str:
    """Markdown card in the MONAI-bundle spirit: data, input format, class map, metrics, intended use, limits."""
    split_report = json.loads(params.paths.split_report.read_text()) if params.paths.split_report.exists() else {}
    counts = split_report.get("counts", {})
    lines = [
        f"# {registered_name(params, model)}", "",
        *(["**SMOKE RUN** (the quick profile, `tracking.smoke: true`): a small sample at a small size, to see every "
           "stage run once. It measures nothing and can never become champion.", ""]
          if tags.get(tracking.SMOKE_TAG) == "true" else []),
        f"**Data version:** DVC `{tags['dvc_data_hash']}` · **git** `{tags['git_commit'][:12]}` · "
        f"**params** `{tags['params_hash']}`", "",
        "**Splits:** " + ", ".join(f"{s}: {sum(c.values())}" for s, c in counts.items())
        + f" (clean test: {split_report.get('clean_test', 'n/a')}; training images removed as duplicates of test: "
        f"{split_report.get('removed_from_training', {}).get('total', 'n/a')})", "",
        "**Input:** " + ("a DataFrame column `image` of base64-encoded image bytes, grayscale or colour, at most "
                         f"{params.serve.max_image_bytes} bytes and {params.serve.max_image_pixels} pixels per image "
                         f"and {params.serve.max_rows} images per request" if model == ENSEMBLE else
                         "float32 RGB images 0-255, shape (n, size, size, 3)"),
        f"**Output:** class probabilities; class map {dict(enumerate(params.data.classes))}", "",
        "| test set | accuracy | macro-F1 | " + " | ".join(f"sens. {c}" for c in params.data.classes) + " |",
        "|---|---|---|" + "---|" * len(params.data.classes),
    ]
    for test_set in ("test", "test_clean"):
        values = metrics.get(test_set, {})
        lines.append(f"| {test_set} | {values.get('accuracy', float('nan')):.4f} | "
                     f"{values.get('macro_f1', float('nan')):.4f} | "
                     + " | ".join(f"{values.get(f'sensitivity_{c}', values.get(f'recall_{c}', float('nan'))):.4f}"
                                  for c in params.data.classes) + " |")
    lines += ["", "**Intended use:** research and decision support on axial brain MRI slices like those of the "
              "Kaggle Brain Tumor MRI Dataset; a radiologist reviews every result.",
              "**Limits:** not a medical device. Trained on one public data set (no patient ids: patient-level "
              "leakage cannot be ruled out; the clean test subset is the honest estimate). Not validated on other "
              "scanners, sequences, ages or tumour types; out-of-distribution images still get one of four labels."]
    return "\n".join(lines)


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:  # no such model or alias yet
        return None


def _version_for(client, name: str, model_uri: str, run_id: str | None, tags: dict[str, str], card: str,
                 alias: str, created: list[tuple[str, str, str | None]]):
    """Register `model_uri` as a new version of `name` with its card and `alias`; the version (and the version
    the alias pointed to before) is appended to `created`, so that a failed `register` can take it back."""
    import mlflow

    previous = _alias_version(client, name, alias)
    version = mlflow.register_model(model_uri, name, tags=tags)
    created.append((name, version.version, previous))
    client.update_registered_model(name, description=f"Brain tumor MRI classifier ({name}).")
    client.update_model_version(name, version.version, description=card)
    client.set_registered_model_alias(name, alias, version.version)
    return version


def _take_back(client, created: list[tuple[str, str, str | None]], alias: str) -> None:
    """Delete the versions a failed `register` created and move `alias` back where it was: the registry is left
    as it was before the command."""
    for name, version, previous in reversed(created):
        try:
            client.delete_model_version(name, version)
            if previous is not None:
                client.set_registered_model_alias(name, alias, previous)
            log.warning("register failed: deleted %s version %s%s", name, version,
                        f", @{alias} back on version {previous}" if previous is not None else "")
        except Exception as exc:  # noqa: BLE001 - the original error is the one to report
            log.error("register failed and could not delete %s version %s (%s): delete it by hand", name,
                      version, exc)


def _no_space(exc: BaseException) -> OSError | None:
    """The OSError ENOSPC (or EDQUOT) that `exc` is or was raised from, if any."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def example_frame(params: Params) -> pd.DataFrame:
    """An input example in the served format: one real test image as base64 bytes."""
    first = pd.read_csv(params.paths.splits / "test.csv").path.iloc[0]
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(Path(first).read_bytes()).decode()]})


def log_ensemble(params: Params):
    """Log the pyfunc ensemble in the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    from components import tracking
    from components.predict import EnsembleModel

    artifacts = ensemble_artifacts(params)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, "predicted_class")]
                       + [ColSpec(DataType.double, f"prob_{c}") for c in params.data.classes]))
    components_dir = Path(__file__).resolve().parent
    # MLflow validates the input example by loading the logged model and predicting it.
    return mlflow.pyfunc.log_model(
        name="ensemble", python_model=EnsembleModel(), artifacts=artifacts, input_example=example_frame(params),
        signature=signature, code_paths=[str(components_dir)],
        pip_requirements=tracking.requirements("scikit-learn", "flaml", "lightgbm", "xgboost", "mlflow"))


def run_register(params: Params) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from components import tracking

    alias = params.register_params.new_version_alias
    evaluation_path = params.paths.metrics / "evaluation.json"
    if not evaluation_path.exists():
        raise FileNotFoundError(f"{evaluation_path} not found: run `braintumor evaluate` first")
    evaluation = json.loads(evaluation_path.read_text())
    registered = {}
    created: list[tuple[str, str, str | None]] = []
    with tracking.stage_run(params, "register", "register") as run:
        client = MlflowClient()  # after stage_run has pointed MLflow at the store
        tags = tracking.provenance(params)
        try:
            # The ensemble is the one model `register` writes: written first, so that a failed write (a full
            # artifact store) happens before any version exists. MLflow marks the half-written model FAILED.
            info = log_ensemble(params)
            for name in params.stack.models:
                logged = json.loads((params.paths.models / name / "mlflow.json").read_text())
                version = _version_for(client, registered_name(params, name), logged["model_uri"],
                                       logged["run_id"], tags, model_card(params, name, evaluation.get(name, {}),
                                                                          tags), alias, created)
                registered[name] = version.version
            ensemble_tags = {**tags, "stacker_best_estimator": json.loads(
                (params.paths.models / "stacker" / "meta.json").read_text())["best_estimator"]}
            version = _version_for(client, registered_name(params, ENSEMBLE), info.model_uri, run.info.run_id,
                                   ensemble_tags, model_card(params, ENSEMBLE, evaluation.get(STACK, {}), tags),
                                   alias, created)
            registered[ENSEMBLE] = version.version
            mlflow.log_dict(registered, "registered_versions.json")
        except Exception as exc:
            _take_back(client, created, alias)
            if (full := _no_space(exc)) is not None:
                where = full.filename or run.info.artifact_uri
                raise ArtifactStoreFull(
                    f"the artifact store is full: {full.strerror or 'no space left'} writing {where}. Nothing was "
                    "registered (every version this run created was deleted; a half-written model stays in the "
                    "store marked FAILED, and no version points to it). Free space there (or raise the quota), then "
                    "run `braintumor register` again") from exc
            raise
    summary = {registered_name(params, n): v for n, v in registered.items()}
    out = params.paths.registered
    out.parent.mkdir(parents=True, exist_ok=True)
    # The versions and the run exist in one MLflow store: the record names it (never with credentials).
    record = {"tracking_uri": tracking.public_uri(mlflow.get_tracking_uri()), "alias": alias, "versions": summary,
              "run_id": run.info.run_id}
    out.write_text(json.dumps(record, indent=2) + "\n")
    return {"alias": alias, "versions": summary}
