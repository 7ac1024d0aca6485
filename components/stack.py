"""Stack the base models with a FLAML-searched meta-learner (`braintumor stack`).

Leakage rules: the meta-learner is fitted on the `stack` split's predictions only (FLAML cross-validates within
it). That split is held out from training like val, but no base model's early stopping or schedule chose on it,
so its predictions are as honest as test's. Test predictions are only scored after the fit.

Calibration: with stack.calibration = temperature, one temperature is fitted on out-of-fold predictions of the
chosen meta-learner (its configuration refitted on stack.folds folds of the stack split), and divides the log
probabilities of every later prediction. Tree meta-learners otherwise give coarse leaf fractions.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Params, StackParams
from components.metrics import basic_metrics, probability_columns, scores, split_metrics
from components.progress import ticking

SOFT_VOTE, STACK = "soft_vote", "stack"
log = logging.getLogger(__name__)
FIT_SPLIT = "stack"  # the split the meta-learner and its temperature are fitted on


def load_predictions(params: Params, split: str, models: list[str]) -> dict[str, pd.DataFrame]:
    """Each model's predictions for one split, rows aligned on path."""
    frames = {}
    for name in models:
        path = params.paths.predictions / name / f"{split}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: train {name} first (dvc repro train@{name})")
        frames[name] = pd.read_parquet(path).sort_values("path").reset_index(drop=True)
    reference = next(iter(frames.values())).path.tolist()
    for name, frame in frames.items():
        if frame.path.tolist() != reference:
            raise ValueError(f"predictions of {name} for {split} cover other images than {models[0]}'s: "
                             "re-run its training on the current splits")
    return frames


def stack_features(probabilities: dict[str, np.ndarray], stack: StackParams) -> pd.DataFrame:
    """Per-model class probabilities, plus prediction entropy and top-2 margin when asked."""
    columns = {}
    for name, probs in probabilities.items():
        for k in range(probs.shape[1]):
            columns[f"{name}_p{k}"] = probs[:, k]
        if stack.entropy_and_margin:
            columns[f"{name}_entropy"] = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(axis=1)
            top2 = np.sort(probs, axis=1)[:, -2:]
            columns[f"{name}_margin"] = top2[:, 1] - top2[:, 0]
    return pd.DataFrame(columns)


@dataclass
class Stacker:
    """The fitted meta-learner plus what it needs to turn base-model probabilities into a prediction."""
    automl: object
    models: list[str]
    classes: list[str]
    stack: StackParams
    temperature: float = 1.0

    def predict_proba(self, probabilities: dict[str, np.ndarray]) -> np.ndarray:
        features = stack_features({name: probabilities[name] for name in self.models}, self.stack)
        raw = np.asarray(self.automl.predict_proba(features))
        # FLAML reports probabilities over the labels it saw; put them back in class order.
        out = np.zeros((len(features), len(self.classes)))
        out[:, list(self.automl.classes_)] = raw
        return with_temperature(out, self.temperature)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "stacker.pkl", "wb") as handle:
            pickle.dump(self, handle)
        return folder / "stacker.pkl"

    @staticmethod
    def load(path: Path) -> Stacker:
        with open(path, "rb") as handle:
            return pickle.load(handle)


def with_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens, T < 1 sharpens, T = 1 leaves p as it is."""
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray, num_classes: int) -> float:
    """The temperature that minimises the log loss of `probabilities` (scipy's bounded scalar search on log T)."""
    from scipy.optimize import minimize_scalar
    from sklearn.metrics import log_loss

    def loss(log_t: float) -> float:
        return log_loss(labels, with_temperature(probabilities, float(np.exp(log_t))), labels=range(num_classes))

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def out_of_fold(automl, features: pd.DataFrame, labels: np.ndarray, folds: int, seed: int,
                num_classes: int) -> np.ndarray:
    """Out-of-fold class probabilities of the chosen meta-learner's configuration (scikit-learn's
    cross_val_predict on a clone of FLAML's fitted estimator)."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(n_splits=min(folds, int(np.bincount(labels).min())), shuffle=True, random_state=seed)
    raw = cross_val_predict(clone(automl.model.estimator), automl.model._preprocess(features), labels, cv=cv,
                            method="predict_proba")
    out = np.zeros((len(labels), num_classes))
    out[:, np.unique(labels)] = raw
    return out


def fit_stacker(fit_rows: dict[str, pd.DataFrame], classes: list[str], stack: StackParams, seed: int,
                log_file: Path | None = None) -> Stacker:
    """FLAML's meta-learner on `fit_rows` (each base model's predictions for the stack split), then its
    temperature (stack.calibration)."""
    from flaml import AutoML

    labels, _ = scores(next(iter(fit_rows.values())), classes)
    features = stack_features({name: scores(frame, classes)[1] for name, frame in fit_rows.items()}, stack)
    automl = AutoML()
    log.info("FLAML searches the meta-learner for %g s over %s, %d-fold CV on %d rows", stack.time_budget,
             ", ".join(stack.estimators), stack.folds, len(labels))
    with ticking("FLAML search", stack.time_budget, log):
        automl.fit(features, labels, task="classification", time_budget=stack.time_budget, metric=stack.metric,
                   estimator_list=list(stack.estimators), eval_method="cv", n_splits=stack.folds, seed=seed,
                   log_file_name=str(log_file) if log_file else "", mlflow_logging=False, verbose=0)
    log.info("FLAML chose %s (cross-validated %s %.4f)", automl.best_estimator, stack.metric, automl.best_loss)
    temperature = 1.0
    if stack.calibration == "temperature" and np.bincount(labels)[np.unique(labels)].min() < 2:
        log.warning("stack.calibration: a class has a single stack-split row, too few to fit a temperature out "
                    "of fold; the stacker stays uncalibrated (raise split.stack_fraction)")
    elif stack.calibration == "temperature":
        temperature = fit_temperature(labels, out_of_fold(automl, features, labels, stack.folds, seed,
                                                          len(classes)), len(classes))
    return Stacker(automl, list(fit_rows), classes, stack, temperature)


def soft_vote(probabilities: dict[str, np.ndarray]) -> np.ndarray:
    return np.mean(list(probabilities.values()), axis=0)


def ensemble_predictions(stacker: Stacker, frames: dict[str, pd.DataFrame], classes: list[str]
                         ) -> dict[str, pd.DataFrame]:
    """Soft-vote and stack predictions for one split, in the same layout as a base model's."""
    probabilities = {name: scores(frame, classes)[1] for name, frame in frames.items()}
    keep = [c for c in ("path", "label", "clean") if c in next(iter(frames.values()))]
    base = next(iter(frames.values()))[keep]
    columns = probability_columns(classes)
    return {SOFT_VOTE: pd.concat([base, pd.DataFrame(soft_vote(probabilities), columns=columns)], axis=1),
            STACK: pd.concat([base, pd.DataFrame(stacker.predict_proba(probabilities), columns=columns)], axis=1)}


def run_stack(params: Params) -> dict:
    """Fit on the stack split, score val and test, write models/stacker/, predictions/{soft_vote,stack}/ and
    metrics/ensemble.json."""
    import mlflow

    from components import tracking

    classes, stack = params.data.classes, params.stack
    out = params.paths.models / "stacker"
    out.mkdir(parents=True, exist_ok=True)
    fit_rows = load_predictions(params, FIT_SPLIT, stack.models)
    val = load_predictions(params, "val", stack.models)
    test = load_predictions(params, "test", stack.models)
    with tracking.stage_run(params, "stack", "stack") as run:
        stacker = fit_stacker(fit_rows, classes, stack, params.seed, out / "flaml_search.log")
        stacker.save(out)
        table = {}
        for name in stack.models:
            table[name] = split_metrics({"test": test[name]}, classes)
        for name in (SOFT_VOTE, STACK):
            table[name] = {}
        for split, frames in (("val", val), ("test", test)):
            for name, frame in ensemble_predictions(stacker, frames, classes).items():
                folder = params.paths.predictions / name
                folder.mkdir(parents=True, exist_ok=True)
                frame.to_parquet(folder / f"{split}.parquet", index=False)
                if split == "test":
                    table[name].update(split_metrics({"test": frame}, classes))
        # The stack split's own score would be in-sample; FLAML's cross-validated score is the honest one.
        table[STACK]["stack_cv"] = {f"best_{stack.metric}_loss": float(stacker.automl.best_loss),
                                    "best_estimator": stacker.automl.best_estimator,
                                    "temperature": stacker.temperature}
        for name, frame in ensemble_predictions(stacker, val, classes).items():
            table[name]["val"] = basic_metrics(*scores(frame, classes), classes)
        summary = {"models": stack.models, "fit_split": FIT_SPLIT, "fit_rows": len(next(iter(fit_rows.values()))),
                   "fit_paths_sha": _paths_digest(next(iter(fit_rows.values())).path),
                   "temperature": stacker.temperature,
                   "best_estimator": stacker.automl.best_estimator,
                   "best_config": stacker.automl.best_config, "table": table}
        (out / "meta.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        params.paths.metrics.mkdir(parents=True, exist_ok=True)
        (params.paths.metrics / "ensemble.json").write_text(json.dumps(table, indent=2, default=str) + "\n")
        mlflow.log_params({"stack.models": ",".join(stack.models), "stack.metric": stack.metric,
                           "stack.time_budget": stack.time_budget, "stack.folds": stack.folds,
                           "stack.estimators": ",".join(stack.estimators), "best_estimator":
                           stacker.automl.best_estimator, "stack.calibration": stack.calibration,
                           "temperature": stacker.temperature})
        mlflow.log_metrics({f"{name}.{split}.{key}": value for name, splits in table.items()
                            for split, values in splits.items() for key, value in values.items()
                            if isinstance(value, float)})
        mlflow.log_artifacts(str(out), "stacker")
        summary["run_id"] = run.info.run_id
    return summary


def _paths_digest(paths: pd.Series) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:16]
