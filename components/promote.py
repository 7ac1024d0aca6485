"""Gated promotion of the `challenger` to `champion`, and rollback (`braintumor promote`, `braintumor rollback`).

Both versions are scored on the same, current test split, so the comparison never mixes test sets. The decision
and its reasons are recorded as tags on the challenger version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd

from components.config import Params, PromoteParams
from components.metrics import full_metrics
from components.register import ENSEMBLE, registered_name

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS_TAG = "promotion.previous_champion"


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def gate(challenger: dict[str, float], champion: dict[str, float] | None, classes: list[str],
         rules: PromoteParams) -> Decision:
    """Every rule is checked and reported; the challenger passes only if all hold."""
    failed, passed = [], []
    accuracy = challenger["accuracy"]
    (passed if accuracy >= rules.min_accuracy else failed).append(
        f"accuracy {accuracy:.4f} {'>=' if accuracy >= rules.min_accuracy else '<'} min {rules.min_accuracy}")
    for c in classes:
        value = challenger[f"sensitivity_{c}"]
        ok = value >= rules.min_class_sensitivity
        (passed if ok else failed).append(
            f"sensitivity {c} {value:.4f} {'>=' if ok else '<'} min {rules.min_class_sensitivity}")
    if champion is not None:
        needed = champion["accuracy"] + rules.min_margin
        ok = accuracy >= needed
        (passed if ok else failed).append(f"accuracy {accuracy:.4f} {'>=' if ok else '<'} champion "
                                          f"{champion['accuracy']:.4f} + margin {rules.min_margin}")
    else:
        passed.append("no champion yet")
    return Decision(promote=not failed, reasons=failed or passed)


def score_version(model_uri: str, ensemble: bool, test: pd.DataFrame, classes: list[str], test_set: str
                  ) -> dict[str, float]:
    """Metrics of one registered version on the current test split (or its clean subset)."""
    frame = test[test.clean] if test_set == "test_clean" else test
    if ensemble:
        from components.predict import predict_paths

        probabilities = predict_paths(frame.path.tolist(), model_uri)[[f"prob_{c}" for c in classes]].to_numpy()
    else:  # a base Keras model takes decoded images at its input size
        import mlflow.keras

        from components.dataset import load_images

        model = mlflow.keras.load_model(model_uri)
        probabilities = model.predict(load_images(frame, model.input_shape[1]), verbose=0)
    labels = frame.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    return full_metrics(labels, probabilities, classes)


def comparison_table(rows: dict[str, dict[str, float]], classes: list[str]) -> str:
    keys = ["accuracy", "macro_f1", *[f"sensitivity_{c}" for c in classes]]
    lines = ["| version | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for name, m in rows.items()]
    return "\n".join(lines)


def promote(params: Params, dry_run: bool = False, model: str | None = None) -> dict:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components import tracking
    from components.dataset import read_split

    tracking.configure(params.tracking)
    rules, classes = params.promote, params.data.classes
    name = registered_name(params, model or rules.model)
    client = MlflowClient()
    try:
        challenger = client.get_model_version_by_alias(name, CHALLENGER)
    except MlflowException:
        raise RuntimeError(f"{name} has no @{CHALLENGER} version: run `braintumor register` first") from None
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == challenger.version:
        return {"model": name, "decision": "nothing to do", "table": "", "reasons": [
            f"version {challenger.version} is already @{CHAMPION}"]}

    test = read_split(params.paths.splits, "test")
    ensemble = (model or rules.model) == ENSEMBLE
    rows = {f"challenger v{challenger.version}": score_version(f"models:/{name}/{challenger.version}", ensemble,
                                                                test, classes, rules.test_set)}
    champion_metrics = None
    if champion is not None:
        champion_metrics = score_version(f"models:/{name}/{champion.version}", ensemble, test, classes,
                                         rules.test_set)
        rows[f"champion v{champion.version}"] = champion_metrics
    decision = gate(rows[f"challenger v{challenger.version}"], champion_metrics, classes, rules)
    table = comparison_table(rows, classes)
    verdict = "promoted" if decision.promote else "refused"
    if not dry_run:
        tags = {"promotion.decision": verdict, "promotion.reasons": "; ".join(decision.reasons),
                "promotion.test_set": rules.test_set, "promotion.compared_with":
                    champion.version if champion else "none",
                "promotion.at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for key, value in tags.items():
            client.set_model_version_tag(name, challenger.version, key, value)
        if decision.promote:
            if champion is not None:
                client.set_model_version_tag(name, challenger.version, PREVIOUS_TAG, champion.version)
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
    return {"model": name, "decision": verdict if not dry_run else f"would be {verdict} (dry run)",
            "test_set": rules.test_set, "reasons": decision.reasons, "table": table}


def rollback(params: Params, model: str | None = None) -> dict:
    """Move @champion back to the version it replaced (recorded at promotion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components import tracking

    tracking.configure(params.tracking)
    name = registered_name(params, model or params.promote.model)
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise RuntimeError(f"{name} has no @{CHAMPION} to roll back") from None
    previous = current.tags.get(PREVIOUS_TAG)
    if not previous:
        raise RuntimeError(f"{name} v{current.version} replaced no earlier champion: nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current.version, "promotion.rolled_back_to", previous)
    return {"model": name, "champion": previous, "was": current.version}
