"""Classification metrics and plots, shared by training, stacking, evaluation and promotion (scikit-learn).

Hand-written code is kept only where scikit-learn has no equivalent; each such place says so."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.exceptions import UndefinedMetricWarning  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    brier_score_loss,
    classification_report,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)

NO_TUMOR = "notumor"
OTHER_TUMOR = "other_tumor"  # a tumor of none of the classes (external labels): a tumor, but in no class's accuracy


def tumor_score(probabilities: np.ndarray, classes: list[str]) -> np.ndarray:
    """1 - P(notumor): the model's belief that a scan shows a tumor, of any class."""
    return 1.0 - np.asarray(probabilities, dtype=float)[:, classes.index(NO_TUMOR)]


def tumor_call(probabilities: np.ndarray, classes: list[str], threshold: float) -> np.ndarray:
    """The one definition of a tumor call, used by every report: tumor_score >= threshold (params
    evaluate.tumor_threshold)."""
    return tumor_score(probabilities, classes) >= threshold


def labelled_figures(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], threshold: float,
                     interval_below: int, confidence: float) -> dict[str, dict]:
    """The figures of one group of scans, each a proportion() with its count: `accuracy` (argmax, over the scans
    whose label is one of `classes`), `tumor_sensitivity` (share of scans not labelled notumor, other_tumor
    included, that are called tumor) and `tumor_specificity` (share of notumor scans not called tumor). A figure
    with no scan to rest on is left out. `labels` are class names."""
    labels = np.asarray(labels, dtype=object)
    probabilities = np.asarray(probabilities, dtype=float)
    called = tumor_call(probabilities, classes, threshold) if len(labels) else np.zeros(0, dtype=bool)
    out = {}
    in_classes = np.isin(labels, classes)
    if in_classes.any():
        right = np.asarray(classes, dtype=object)[probabilities[in_classes].argmax(axis=1)] == labels[in_classes]
        out["accuracy"] = proportion(right.mean(), int(right.sum()), int(in_classes.sum()), interval_below,
                                     confidence)
    tumor, healthy = labels != NO_TUMOR, labels == NO_TUMOR
    if tumor.any():
        hits = int(called[tumor].sum())
        out["tumor_sensitivity"] = proportion(hits / tumor.sum(), hits, int(tumor.sum()), interval_below, confidence)
    if healthy.any():
        passes = int((~called[healthy]).sum())
        out["tumor_specificity"] = proportion(passes / healthy.sum(), passes, int(healthy.sum()), interval_below,
                                              confidence)
    return out


def proportion(value: float, k: int, n: int, interval_below: int, confidence: float) -> dict:
    """A proportion k/n (`value`, from scikit-learn where it has it) with its count, and a Wilson interval when
    it rests on fewer than `interval_below` cases (scipy's binomtest)."""
    from scipy.stats import binomtest

    figure = {"value": float(value), "k": int(k), "n": int(n)}
    if 0 < n < interval_below:
        interval = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
        figure |= {"ci_low": float(interval.low), "ci_high": float(interval.high), "confidence": confidence}
    return figure


def proportion_text(figure: dict | None) -> str:
    """A proportion() as `93.9% (851/906)`, with `; CI 41–64%` inside the brackets when it has an interval."""
    if not figure:
        return "–"
    text = f"{100 * figure['value']:.1f}% ({figure['k']}/{figure['n']}"
    if "ci_low" in figure:
        text += f"; CI {100 * figure['ci_low']:.0f}–{100 * figure['ci_high']:.0f}%"
    return text + ")"


def save_figure(figure, out: Path) -> Path:
    """Lay out, write (making the folder) and close a matplotlib figure."""
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def probability_columns(classes: list[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def scores(predictions: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    labels = predictions.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    return labels, predictions[probability_columns(classes)].to_numpy()


def split_metrics(predictions: dict[str, pd.DataFrame], classes: list[str]) -> dict[str, dict[str, float]]:
    """Metrics on val, the official test set and its clean (leakage-free) subset."""
    out = {}
    for split, frame in predictions.items():
        out[split] = basic_metrics(*scores(frame, classes), classes)
        if "clean" in frame:
            out[f"{split}_clean"] = basic_metrics(*scores(frame[frame.clean], classes), classes)
    return out


def _per_class_report(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """classification_report over every class of the label set, present in `labels` or not (0 when undefined)."""
    return classification_report(labels, predicted, labels=range(len(classes)), target_names=classes,
                                 output_dict=True, zero_division=0)


def basic_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall; labels are class indices."""
    report = _per_class_report(labels, np.asarray(probabilities).argmax(axis=1), classes)
    return {
        # With labels=range(K) covering every label and prediction, the report's micro average is the accuracy.
        "accuracy": float(report["accuracy"]),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        **{f"recall_{c}": float(report[c]["recall"]) for c in classes},
    }


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability diagram: for each non-empty one of `bins` equal-width confidence bins, the accuracy,
    the mean confidence and the number of samples. The first two come from sklearn's calibration_curve (its bins
    are right-closed, (a, b], as in Guo et al. 2017); it returns no counts, so they are recounted here with the
    same edges and the same np.searchsorted rule."""
    probabilities = np.asarray(probabilities, dtype=float)
    # float32 softmax outputs can exceed 1 by an ulp, which calibration_curve refuses.
    confidence = np.clip(probabilities.max(axis=1), 0.0, 1.0)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], confidence), minlength=bins)
    counts = counts[counts > 0]
    if len(counts) != len(accuracy):  # guards the recount against a change of calibration_curve's binning
        raise RuntimeError(f"reliability bins disagree with sklearn's calibration_curve: {len(counts)} non-empty "
                           f"bins counted, {len(accuracy)} returned")
    return accuracy, mean_confidence, counts


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> float:
    """Top-label ECE: sum over the bins of reliability() of (share of samples) x |accuracy - mean confidence|.

    Hand-written: scikit-learn has no ECE. `bins` is params evaluate.calibration_bins."""
    accuracy, mean_confidence, counts = reliability(labels, probabilities, bins)
    return float(np.sum(counts / counts.sum() * np.abs(accuracy - mean_confidence)))


def brier_score(labels: np.ndarray, probabilities: np.ndarray, num_classes: int) -> float:
    """Multiclass Brier score: mean over samples of sum over classes of (p - onehot)^2, in [0, 2].

    scale_by_half=False: sklearn's "auto" would halve it when there are two columns; this keeps one definition
    whatever the number of classes."""
    return float(brier_score_loss(labels, np.asarray(probabilities, dtype=float), labels=range(num_classes),
                                  scale_by_half=False))


def per_class_roc_auc(labels: np.ndarray, probabilities: np.ndarray, num_classes: int) -> np.ndarray:
    """One-vs-rest ROC-AUC of each class; NaN for a class that is absent from `labels` (or the only one)."""
    with warnings.catch_warnings():
        # sklearn warns, then returns NaN, for a class with no positive (or no negative) sample: the NaN is the
        # documented answer here, and evaluate drops it from the DVC metrics.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        if num_classes == 2:  # roc_auc_score takes two columns as the binary case, which wants one score column
            return np.array([roc_auc_score(labels == k, probabilities[:, k]) for k in range(2)], dtype=float)
        return np.asarray(roc_auc_score(labels, np.asarray(probabilities, dtype=float), multi_class="ovr",
                                        average=None, labels=range(num_classes)), dtype=float)


def full_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], *, bins: int,
                 tumor_threshold: float) -> dict[str, float]:
    """Everything the evaluation report shows for one model on one test set. `bins`: ECE bins, pass params
    evaluate.calibration_bins; `tumor_threshold`: evaluate.tumor_threshold (tumor_call)."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = probabilities.argmax(axis=1)
    k = len(classes)
    report = _per_class_report(labels, predicted, classes)
    # Per class [[tn, fp], [fn, tp]]; sklearn has no specificity score, so tn / (tn + fp) is computed here
    # (0 when a class has no negatives, like zero_division=0 for precision and recall).
    matrices = multilabel_confusion_matrix(labels, predicted, labels=range(k))
    roc_auc = per_class_roc_auc(labels, probabilities, k)
    out = basic_metrics(labels, probabilities, classes)
    for i, c in enumerate(classes):
        (tn, fp), _ = matrices[i]
        out[f"precision_{c}"] = float(report[c]["precision"])
        out[f"sensitivity_{c}"] = float(report[c]["recall"])
        out[f"specificity_{c}"] = float(tn / (tn + fp)) if tn + fp else 0.0
        out[f"roc_auc_{c}"] = float(roc_auc[i])
    if NO_TUMOR in classes:
        # Tumor vs no tumor: every class but notumor pooled as the positive class, called by tumor_call.
        tumor_true = labels != classes.index(NO_TUMOR)
        tumor_pred = tumor_call(probabilities, classes, tumor_threshold)
        out["tumor_sensitivity"] = float(recall_score(tumor_true, tumor_pred, labels=[False, True], pos_label=True,
                                                      zero_division=0))
        out["tumor_specificity"] = float(recall_score(tumor_true, tumor_pred, labels=[False, True],
                                                      pos_label=False, zero_division=0))
    out["ece"] = expected_calibration_error(labels, probabilities, bins)
    out["brier"] = brier_score(labels, probabilities, k)
    return out


def plot_confusion(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], title: str,
                   out: Path) -> Path:
    figure, axis = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(labels, np.asarray(probabilities).argmax(axis=1),
                                            labels=range(len(classes)), display_labels=classes, cmap="Blues",
                                            colorbar=False, xticks_rotation=30, ax=axis)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    plt.setp(axis.get_xticklabels(), ha="right")
    return save_figure(figure, out)


def plot_history(history: pd.DataFrame, title: str, out: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for column in (metric, f"val_{metric}"):
            if column in history:
                axis.plot(history["epoch"] + 1, history[column], marker="o", label=column)
        axis.set(xlabel="epoch", title=f"{title}: {metric}")
        axis.legend()
    return save_figure(figure, out)


def plot_learning_curves(curves: dict[str, pd.DataFrame], metric: str, out: Path) -> Path:
    """One line per model: `metric` at the end of each epoch against the minutes since its training started."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        axis.plot(curve["minutes"], curve[metric], marker="o", markersize=3, label=name)
    axis.set(xlabel="minutes of training", ylabel=metric, title=f"{metric} against training time")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(figure, out)
