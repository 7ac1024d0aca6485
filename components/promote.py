"""Gated promotion of the `challenger` to `champion`, and rollback (`braintumor promote`, `braintumor rollback`).

Both versions are scored on the same images of the `gate` split, which the split stage holds out for this gate
alone (no training, early stopping, stacking or report reads it). The gate:

- floors: the challenger's accuracy and every class's sensitivity on the gate split must reach
  `promote.min_accuracy` and `promote.min_class_sensitivity` (with no champion yet, the floors alone decide);
- against the champion, an exact McNemar test on the same images: with b = images the challenger gets right and
  the champion wrong and c = the reverse, the one-sided p-value of the gain is P(X >= b) for X ~ Binomial(b + c,
  1/2). The challenger is promoted when that p-value is at most `promote.alpha`; otherwise `promote.tie_rule`
  decides: `keep_champion` refuses, `challenger_if_not_worse` promotes unless the champion is significantly better
  (the reverse one-sided p-value, P(X >= c), at most `promote.alpha`).

The decision, the test and its reasons are recorded as tags on the challenger version. A version that
`braintumor rollback` demoted is tagged so, and is never promoted again: register a new version instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from components.config import DataParams, EvaluateParams, Params, ProjectError, PromoteParams
from components.metrics import full_metrics
from components.register import ENSEMBLE, registered_name
from components.tracking import SMOKE_TAG

CHAMPION, CHALLENGER = "champion", "challenger"
GATE_SPLIT = "gate"
PREVIOUS_TAG = "promotion.previous_champion"
ROLLED_BACK_TAG = "promotion.rolled_back"  # set on the version `rollback` demoted; promote refuses it afterwards
TEST_NAME = "exact McNemar (one-sided binomial test on discordant pairs)"


class PromotionError(ProjectError):
    """Promotion or rollback cannot be attempted (missing alias, rolled-back challenger, empty gate split)."""


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of challenger vs champion on the same images."""

    n: int  # images both versions were scored on
    b: int  # challenger right, champion wrong
    c: int  # challenger wrong, champion right
    p_better: float  # one-sided p-value that the challenger is better: P(X >= b), X ~ Binomial(b + c, 1/2)
    p_worse: float  # one-sided p-value that the challenger is worse: P(X >= c)


def mcnemar(challenger_correct, champion_correct) -> McNemar:
    """Exact McNemar on two per-image correctness vectors (same images, same order)."""
    from scipy.stats import binomtest

    challenger_correct = np.asarray(challenger_correct, dtype=bool)
    champion_correct = np.asarray(champion_correct, dtype=bool)
    if challenger_correct.shape != champion_correct.shape:
        raise ValueError(f"correctness vectors differ in shape: {challenger_correct.shape} vs "
                         f"{champion_correct.shape}; both versions must be scored on the same images")
    b = int((challenger_correct & ~champion_correct).sum())
    c = int((~challenger_correct & champion_correct).sum())
    if b + c == 0:  # the two versions agree on every image: no evidence either way
        return McNemar(len(challenger_correct), b, c, 1.0, 1.0)
    return McNemar(len(challenger_correct), b, c,
                   float(binomtest(b, b + c, 0.5, alternative="greater").pvalue),
                   float(binomtest(c, b + c, 0.5, alternative="greater").pvalue))


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    test: McNemar | None = None


def gate(challenger: dict[str, float], classes: list[str], rules: PromoteParams, test: McNemar | None
         ) -> Decision:
    """Every rule is checked; the challenger passes only if all hold. `test` is None when there is no champion.

    The reasons list the failed rules, or every rule when all passed."""
    failed, passed = [], []
    accuracy = challenger["accuracy"]
    (passed if accuracy >= rules.min_accuracy else failed).append(
        f"accuracy {accuracy:.4f} {'>=' if accuracy >= rules.min_accuracy else '<'} min {rules.min_accuracy}")
    for c in classes:
        value = challenger[f"sensitivity_{c}"]
        ok = value >= rules.min_class_sensitivity
        (passed if ok else failed).append(
            f"sensitivity {c} {value:.4f} {'>=' if ok else '<'} min {rules.min_class_sensitivity}")
    if test is None:
        passed.append("no champion yet: the floors alone decide")
    else:
        counts = f"b={test.b} (challenger only right), c={test.c} (champion only right) of {test.n} images"
        if test.p_better <= rules.alpha:
            passed.append(f"significant gain over the champion: {counts}, p={test.p_better:.4g} <= alpha "
                          f"{rules.alpha}")
        elif rules.tie_rule == "keep_champion":
            failed.append(f"no significant gain over the champion: {counts}, p={test.p_better:.4g} > alpha "
                          f"{rules.alpha}; tie rule keep_champion keeps the champion")
        elif test.p_worse <= rules.alpha:
            failed.append(f"significantly worse than the champion: {counts}, p(worse)={test.p_worse:.4g} <= "
                          f"alpha {rules.alpha}")
        else:
            passed.append(f"no significant gain (p={test.p_better:.4g} > alpha {rules.alpha}) and not "
                          f"significantly worse (p(worse)={test.p_worse:.4g}): {counts}; tie rule "
                          "challenger_if_not_worse promotes")
    return Decision(promote=not failed, reasons=failed or passed, test=test)


def score_version(model_uri: str, ensemble: bool, frame: pd.DataFrame, data: DataParams, settings: EvaluateParams
                  ) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one registered version on `frame` (the gate split), and whether each image was right. A base
    model is fed images prepared by today's data.preprocess; the ensemble carries its own in its version."""
    classes = data.classes
    if ensemble:
        from components.predict import predict_paths

        probabilities = predict_paths(frame.path.tolist(), model_uri)[[f"prob_{c}" for c in classes]].to_numpy()
    else:  # a base Keras model takes decoded images at its input size
        import mlflow.keras

        from components.dataset import load_images

        model = mlflow.keras.load_model(model_uri)
        probabilities = model.predict(load_images(frame, model.input_shape[1], data.preprocess), verbose=0)
    labels = frame.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    return (full_metrics(labels, probabilities, classes, bins=settings.calibration_bins,
                         tumor_threshold=settings.tumor_threshold),
            np.asarray(probabilities).argmax(axis=1) == labels)


def comparison_table(rows: dict[str, dict[str, float]], classes: list[str], test: McNemar | None = None) -> str:
    keys = ["accuracy", "macro_f1", *[f"sensitivity_{c}" for c in classes]]
    lines = ["| version | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for name, m in rows.items()]
    if test is not None:
        lines += ["", f"{TEST_NAME} on {test.n} {GATE_SPLIT} images: b={test.b} (challenger only right), "
                      f"c={test.c} (champion only right), p={test.p_better:.4g}, p(worse)={test.p_worse:.4g}"]
    return "\n".join(lines)


def decision_tags(decision: Decision, rules: PromoteParams, images: int, champion_version: str | None
                  ) -> dict[str, str]:
    """What the challenger version records about its gate."""
    test = decision.test
    return {
        "promotion.decision": "promoted" if decision.promote else "refused",
        "promotion.reasons": "; ".join(decision.reasons),
        "promotion.split": GATE_SPLIT,
        "promotion.images": str(images),
        "promotion.compared_with": champion_version or "none",
        "promotion.test": TEST_NAME if test else "none (no champion: the floors alone decide)",
        "promotion.b": str(test.b) if test else "none",
        "promotion.c": str(test.c) if test else "none",
        "promotion.p_value": f"{test.p_better:.6g}" if test else "none",
        "promotion.p_value_worse": f"{test.p_worse:.6g}" if test else "none",
        "promotion.alpha": str(rules.alpha),
        "promotion.tie_rule": rules.tie_rule,
        "promotion.at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


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
        raise PromotionError(f"{name} has no @{CHALLENGER} version: run `braintumor register` first") from None
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == challenger.version:
        return {"model": name, "decision": "nothing to do", "table": "", "reasons": [
            f"version {challenger.version} is already @{CHAMPION}"]}
    if challenger.tags.get(SMOKE_TAG) == "true":
        raise PromotionError(
            f"{name} v{challenger.version} (@{CHALLENGER}) comes from a smoke run (the quick profile, tag "
            f"{SMOKE_TAG}=true) and can never become @{CHAMPION}: run the main job (`dvc repro` with "
            "tracking.smoke: false), which registers a new challenger, then `braintumor promote`")
    if challenger.tags.get(ROLLED_BACK_TAG):
        raise PromotionError(
            f"{name} v{challenger.version} (@{CHALLENGER}) was rolled back from @{CHAMPION} "
            f"(back to v{challenger.tags.get('promotion.rolled_back_to', '?')}) and is not promoted again: "
            "register a new version (`braintumor register`, after retraining) and run `braintumor promote` on it")

    frame = read_split(params.paths.splits, GATE_SPLIT)
    if frame.empty:
        raise PromotionError(f"{params.paths.splits / (GATE_SPLIT + '.csv')} is empty: raise split.gate_fraction "
                             "and re-run `dvc repro split`")
    ensemble = (model or rules.model) == ENSEMBLE
    challenger_metrics, challenger_correct = score_version(f"models:/{name}/{challenger.version}", ensemble,
                                                           frame, params.data, params.evaluate)
    rows = {f"challenger v{challenger.version}": challenger_metrics}
    test = None
    if champion is not None:
        champion_metrics, champion_correct = score_version(f"models:/{name}/{champion.version}", ensemble, frame,
                                                           params.data, params.evaluate)
        rows[f"champion v{champion.version}"] = champion_metrics
        test = mcnemar(challenger_correct, champion_correct)
    decision = gate(challenger_metrics, classes, rules, test)
    table = comparison_table(rows, classes, test)
    tags = decision_tags(decision, rules, len(frame), champion.version if champion else None)
    verdict = tags["promotion.decision"]
    if not dry_run:
        for key, value in tags.items():
            client.set_model_version_tag(name, challenger.version, key, value)
        if decision.promote:
            if champion is not None:
                client.set_model_version_tag(name, challenger.version, PREVIOUS_TAG, champion.version)
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
    return {"model": name, "decision": verdict if not dry_run else f"would be {verdict} (dry run)",
            "split": GATE_SPLIT, "images": len(frame),
            "test": {key.removeprefix("promotion."): value for key, value in tags.items()
                     if key in ("promotion.test", "promotion.b", "promotion.c", "promotion.p_value",
                                "promotion.p_value_worse", "promotion.alpha", "promotion.tie_rule")},
            "reasons": decision.reasons, "table": table}


def rollback(params: Params, model: str | None = None) -> dict:
    """Move @champion back to the version it replaced (recorded at promotion), and mark the demoted version so
    that `promote` never promotes it again (it usually still holds @challenger)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components import tracking

    tracking.configure(params.tracking)
    name = registered_name(params, model or params.promote.model)
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise PromotionError(f"{name} has no @{CHAMPION} to roll back") from None
    previous = current.tags.get(PREVIOUS_TAG)
    if not previous:
        raise PromotionError(f"{name} v{current.version} replaced no earlier champion: nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current.version, "promotion.rolled_back_to", previous)
    client.set_model_version_tag(name, current.version, "promotion.rolled_back_at",
                                 datetime.now(timezone.utc).isoformat(timespec="seconds"))
    client.set_model_version_tag(name, current.version, ROLLED_BACK_TAG, "true")
    return {"model": name, "champion": previous, "was": current.version}
