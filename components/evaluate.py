"""Evaluation report (`braintumor evaluate`): every base model, soft voting and the stack, on the official
test set and on its clean subset. Writes paths.evaluation_report (reports/evaluation.md) with plots, metrics/evaluation.json (DVC metrics)
and plots/evaluation/ (DVC plots)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import RocCurveDisplay  # noqa: E402

from components.config import EvaluateParams, Params  # noqa: E402
from components.metrics import full_metrics, plot_confusion, reliability, save_figure, scores  # noqa: E402
from components.stack import SOFT_VOTE, STACK, load_predictions  # noqa: E402

TEST_SETS = {"test": "official test", "test_clean": "clean test"}
TABLE_COLUMNS = ["accuracy", "macro_f1", "tumor_sensitivity", "tumor_specificity", "ece", "brier"]


def evaluate_frames(frames: dict[str, pd.DataFrame], classes: list[str], settings: EvaluateParams
                    ) -> dict[str, dict[str, dict]]:
    """{model: {test set: metrics}} for every prediction frame (ECE bins and the tumor call from params
    evaluate)."""
    out = {}
    for name, frame in frames.items():
        out[name] = {test_set: full_metrics(*scores(rows, classes), classes, bins=settings.calibration_bins,
                                            tumor_threshold=settings.tumor_threshold)
                     for test_set, rows in (("test", frame), ("test_clean", frame[frame.clean]))}
    return out


def plot_roc(frame: pd.DataFrame, classes: list[str], title: str, out: Path) -> Path:
    labels, probabilities = scores(frame, classes)
    figure, axis = plt.subplots(figsize=(4.5, 4))
    # One-vs-rest ROC is undefined for a class with no positive or no negative image.
    drawable = [k for k in range(len(classes)) if (labels == k).any() and (labels != k).any()]
    for k in drawable:
        RocCurveDisplay.from_predictions(labels == k, probabilities[:, k], pos_label=True, name=classes[k], ax=axis,
                                         plot_chance_level=k == drawable[-1])
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    axis.legend(fontsize=8)
    return save_figure(figure, out)


def plot_reliability(frames: dict[str, pd.DataFrame], classes: list[str], bins: int, out: Path) -> Path:
    """Top-label reliability diagram of every model, one line each, from the bins of the ECE column
    (metrics.reliability: sklearn's calibration_curve on correctness vs top-label confidence)."""
    figure, axis = plt.subplots(figsize=(4.5, 4))
    for name, frame in frames.items():
        accuracy, mean_confidence, _ = reliability(*scores(frame, classes), bins)
        axis.plot(mean_confidence, accuracy, marker="o", label=name)
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    axis.set(xlabel="confidence", ylabel="accuracy", title="reliability (official test)")
    axis.legend(fontsize=7)
    return save_figure(figure, out)


def gradcam_examples(params: Params, name: str, frame: pd.DataFrame, out: Path) -> list[Path]:
    """Overlays for a few correct and a few wrong test images (first ones by path, so runs are comparable)."""
    import keras

    from components.explain import gradcam, overlay
    from components.images import load_rgb

    count = params.evaluate.gradcam_examples
    if count == 0:
        return []
    model = keras.models.load_model(params.paths.models / name / "model.keras")
    size = model.input_shape[1]
    labels, probabilities = scores(frame, params.data.classes)
    right = np.flatnonzero(probabilities.argmax(axis=1) == labels)[:count]
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)[:count]
    written = []
    for kind, rows in (("correct", right), ("wrong", wrong)):
        for row in rows:
            image = load_rgb(frame.path.iloc[row], size, params.data.preprocess).astype(np.float32)
            heatmap, target, _ = gradcam(model, image)
            path = out / f"gradcam_{name}_{kind}_{row}.png"
            overlay(image, heatmap).resize((128, 128)).save(path)
            written.append((kind, frame.label.iloc[row], params.data.classes[target], path))
    keras.backend.clear_session()
    return written


def markdown_table(results: dict[str, dict[str, dict]], classes: list[str]) -> str:
    lines = []
    for test_set, title in TEST_SETS.items():
        header = ["model", *TABLE_COLUMNS, *[f"sens. {c}" for c in classes]]
        lines += [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, by_set in results.items():
            values = by_set[test_set]
            cells = [values[c] for c in TABLE_COLUMNS] + [values[f"sensitivity_{c}"] for c in classes]
            lines.append(f"| {name} | " + " | ".join("n/a" if math.isnan(v) else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def run_evaluate(params: Params) -> dict:
    import mlflow

    from components import tracking

    classes = params.data.classes
    reports = params.paths.plots / "evaluation"
    reports.mkdir(parents=True, exist_ok=True)
    frames = load_predictions(params, "test", [*params.stack.models, SOFT_VOTE, STACK])
    bins = params.evaluate.calibration_bins
    results = evaluate_frames(frames, classes, params.evaluate)
    out_md = params.paths.evaluation_report

    def link(path: Path) -> str:  # images are linked relative to the report, wherever paths put it
        return Path(os.path.relpath(path, out_md.parent)).as_posix()

    with tracking.stage_run(params, "evaluate", "evaluate") as run:
        images = []
        for name, frame in frames.items():
            images.append(plot_confusion(*scores(frame, classes), classes, f"{name} (official test)",
                                         reports / f"confusion_{name}.png"))
            images.append(plot_roc(frame, classes, f"{name}: one-vs-rest ROC", reports / f"roc_{name}.png"))
            # For `dvc plots show` with the confusion template.
            labels, probabilities = scores(frame, classes)
            pd.DataFrame({"actual": np.array(classes)[labels],
                          "predicted": np.array(classes)[probabilities.argmax(axis=1)]}).to_csv(
                reports / f"confusion_{name}.csv", index=False)
        images.append(plot_reliability(frames, classes, bins, reports / "reliability.png"))
        cams = []
        for name in params.stack.models:
            cams += [(name, *c) for c in gradcam_examples(params, name, frames[name], reports)]

        report = ["# Evaluation", "",
                  f"Test sets: official ({len(frames[STACK])} images) and clean ({int(frames[STACK].clean.sum())} "
                  "images with no near duplicate in official Training). The stack's meta-learner was fitted on the "
                  "`stack` split's predictions only, rows no base model was selected on.", markdown_table(results, classes), "## Confusion matrices (official test)", ""]
        report += [f"![{n}]({link(reports / f'confusion_{n}.png')})" for n in frames]
        report += ["", "## ROC curves", ""] + [f"![{n}]({link(reports / f'roc_{n}.png')})" for n in frames]
        report += ["", "## Reliability", "", f"Top-label confidence in {bins} equal-width bins, the bins of the ECE "
                   "column; Brier: mean over images of the sum over classes of (p - one-hot)^2, from 0 to 2.", "",
                   f"![reliability]({link(reports / 'reliability.png')})", "",
                   "## Grad-CAM (official test)", "", "| model | kind | true | predicted | overlay |",
                   "|---|---|---|---|---|"]
        report += [f"| {m} | {k} | {t} | {p} | ![]({link(path)}) |" for m, k, t, p, path in cams]
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text("\n".join(report) + "\n")
        metrics = {name: {s: {k: v for k, v in values.items() if not math.isnan(v)} for s, values in by_set.items()}
                   for name, by_set in results.items()}
        (params.paths.metrics / "evaluation.json").write_text(json.dumps(metrics, indent=2) + "\n")
        mlflow.log_metrics({f"{name}.{s}.{k}": v for name, by_set in metrics.items() for s, values in by_set.items()
                            for k, v in values.items()})
        mlflow.log_artifact(str(out_md))
        mlflow.log_artifacts(str(reports), "plots")
        return {"run_id": run.info.run_id, "report": str(out_md),
                "accuracy": {n: {s: v["accuracy"] for s, v in r.items()} for n, r in results.items()}}
