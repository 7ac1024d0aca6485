"""Classification metrics and plots, shared by training, stacking, evaluation and promotion (scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

NO_TUMOR = "notumor"


def probability_columns(classes: list[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def basic_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall; labels are class indices."""
    predicted = probabilities.argmax(axis=1)
    recall = precision_recall_fscore_support(labels, predicted, labels=range(len(classes)), zero_division=0)[1]
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=range(len(classes)), average="macro", zero_division=0)),
        **{f"recall_{c}": float(r) for c, r in zip(classes, recall)},
    }


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def full_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Everything the evaluation report shows for one model on one test set."""
    predicted = probabilities.argmax(axis=1)
    k = len(classes)
    precision, sensitivity, _, _ = precision_recall_fscore_support(labels, predicted, labels=range(k),
                                                                   zero_division=0)
    matrix = confusion_matrix(labels, predicted, labels=range(k))
    out = basic_metrics(labels, probabilities, classes)
    for i, c in enumerate(classes):
        negatives = matrix.sum() - matrix[i].sum()
        out[f"precision_{c}"] = float(precision[i])
        out[f"sensitivity_{c}"] = float(sensitivity[i])
        out[f"specificity_{c}"] = float((negatives - (matrix[:, i].sum() - matrix[i, i])) / max(negatives, 1))
        present = (labels == i).any() and (labels != i).any()
        out[f"roc_auc_{c}"] = float(roc_auc_score(labels == i, probabilities[:, i])) if present else float("nan")
    if NO_TUMOR in classes:
        healthy = classes.index(NO_TUMOR)
        tumor_true, tumor_pred = labels != healthy, predicted != healthy
        out["tumor_sensitivity"] = float((tumor_pred & tumor_true).sum() / max(tumor_true.sum(), 1))
        out["tumor_specificity"] = float((~tumor_pred & ~tumor_true).sum() / max((~tumor_true).sum(), 1))
    out["ece"] = expected_calibration_error(labels, probabilities)
    onehot = np.eye(k)[labels]
    out["brier"] = float(np.mean([brier_score_loss(onehot[:, i], probabilities[:, i]) for i in range(k)]))
    return out


def plot_confusion(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], title: str,
                   out: Path) -> Path:
    matrix = confusion_matrix(labels, probabilities.argmax(axis=1), labels=range(len(classes)))
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(matrix, cmap="Blues")
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
             xlabel="predicted", ylabel="true", title=title)
    plt.setp(axis.get_xticklabels(), rotation=30, ha="right")
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, str(value), ha="center", va="center",
                  color="white" if value > matrix.max() / 2 else "black")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_history(history: pd.DataFrame, title: str, out: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for column in (metric, f"val_{metric}"):
            if column in history:
                axis.plot(history["epoch"] + 1, history[column], marker="o", label=column)
        axis.set(xlabel="epoch", title=f"{title}: {metric}")
        axis.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
