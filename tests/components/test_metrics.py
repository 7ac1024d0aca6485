"""Fast checks of components/metrics.py, the evaluation plots and the report's hardware lines (no training)."""

import numpy as np
import pandas as pd
import pytest

from components.config import NO_BACKBONE
from components.metrics import brier_score, expected_calibration_error, full_metrics, reliability

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
# Predictions 0, 1, 1, 2, 3, 2 for labels 0, 0, 1, 2, 3, 3; every row sums to 0.7 + 4 * 0.075 = 1.
LABELS = np.array([0, 0, 1, 2, 3, 3])
PROBABILITIES = np.eye(4)[[0, 1, 1, 2, 3, 2]] * 0.7 + 0.075


# --- Brier: mean over samples of the sum over classes of (p - onehot)^2 -------------------------------------

def test_brier_of_a_perfect_prediction_is_zero():
    assert brier_score(np.arange(4), np.eye(4), 4) == pytest.approx(0.0)


def test_brier_of_a_uniform_four_class_prediction_is_three_quarters():
    # Per sample: (1 - 1/4)^2 + 3 * (1/4)^2 = 9/16 + 3/16 = 0.75 (the per-class mean would give 0.1875).
    assert brier_score(np.array([0, 1, 2, 3, 0]), np.full((5, 4), 0.25), 4) == pytest.approx(0.75)


def test_brier_of_a_confidently_wrong_prediction_is_two():
    assert brier_score(np.array([0, 1]), np.eye(4)[[1, 0]], 4) == pytest.approx(2.0)


def test_brier_of_two_classes_is_not_halved():
    # sklearn's default halves the Brier score when there are two columns; the multiclass definition does not.
    assert brier_score(np.array([0]), np.array([[0.5, 0.5]]), 2) == pytest.approx(0.5)


def test_full_metrics_brier_matches_the_definition_on_random_probabilities():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), size=50)
    labels = rng.integers(0, 4, size=50)
    expected = np.mean(np.sum((probabilities - np.eye(4)[labels]) ** 2, axis=1))
    assert full_metrics(labels, probabilities, CLASSES, bins=10, tumor_threshold=0.5)["brier"] == pytest.approx(expected)


def test_brier_counts_a_class_absent_from_the_labels():
    # Label 0 only, but probability on class 3 still costs: (1 - 0.5)^2 + 0.5^2 = 0.5.
    assert brier_score(np.array([0]), np.array([[0.5, 0, 0, 0.5]]), 4) == pytest.approx(0.5)


# --- ECE: top-label, bins from the caller ----------------------------------------------------------------------

# Two classes; top-label confidence and correctness: 0.85 right, 0.85 wrong, 0.75 right, 0.65 right.
ECE_LABELS = np.array([0, 1, 1, 1])
ECE_PROBABILITIES = np.array([[0.85, 0.15], [0.85, 0.15], [0.25, 0.75], [0.35, 0.65]])


def test_ece_with_one_bin_is_the_gap_between_accuracy_and_mean_confidence():
    # accuracy 3/4, mean confidence (0.85 + 0.85 + 0.75 + 0.65) / 4 = 0.775
    assert expected_calibration_error(ECE_LABELS, ECE_PROBABILITIES, 1) == pytest.approx(0.025)


def test_ece_with_ten_bins_equals_the_hand_computed_value():
    # (0.8, 0.9]: 2 images, accuracy 1/2, confidence 0.85 -> 0.35 * 2/4
    # (0.7, 0.8]: 1 image, accuracy 1, confidence 0.75 -> 0.25 * 1/4
    # (0.6, 0.7]: 1 image, accuracy 1, confidence 0.65 -> 0.35 * 1/4
    assert expected_calibration_error(ECE_LABELS, ECE_PROBABILITIES, 10) == pytest.approx(0.175 + 0.0625 + 0.0875)


def test_full_metrics_ece_follows_the_bins_argument():
    few = full_metrics(ECE_LABELS, ECE_PROBABILITIES, ["a", "b"], bins=1, tumor_threshold=0.5)["ece"]
    many = full_metrics(ECE_LABELS, ECE_PROBABILITIES, ["a", "b"], bins=10, tumor_threshold=0.5)["ece"]
    assert few == pytest.approx(0.025) and many == pytest.approx(0.325)


def test_two_class_roc_auc_is_one_vs_rest_too():
    metrics = full_metrics(ECE_LABELS, ECE_PROBABILITIES, ["a", "b"], bins=1, tumor_threshold=0.5)
    # class b: positives score 0.15, 0.75, 0.65; the negative 0.15: (1 tie / 2 + 2 wins) / 3 pairs
    assert metrics["roc_auc_b"] == pytest.approx(2.5 / 3) and metrics["roc_auc_a"] == pytest.approx(2.5 / 3)


def test_full_metrics_needs_the_bins():
    with pytest.raises(TypeError):
        full_metrics(LABELS, PROBABILITIES, CLASSES)


def test_ece_bins_are_right_closed_like_calibration_curve():
    # Confidence exactly 0.5 falls in (0, 0.5] with 2 bins: |1 - 0.5| * 1/2 + |0 - 0.9| * 1/2 = 0.7.
    # (Left-closed bins would put both images in one bin: |0.5 - 0.7| = 0.2.)
    labels = np.array([0, 1])
    probabilities = np.array([[0.5, 0.5], [0.9, 0.1]])
    assert expected_calibration_error(labels, probabilities, 2) == pytest.approx(0.7)


def test_reliability_counts_every_image_once():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(4), size=200).astype(np.float32)
    labels = rng.integers(0, 4, size=200)
    accuracy, confidence, counts = reliability(labels, probabilities, 7)
    assert counts.sum() == 200 and len(accuracy) == len(confidence) == len(counts) <= 7
    correct = probabilities.argmax(axis=1) == labels
    assert np.sum(accuracy * counts) == pytest.approx(correct.sum())


# --- per-class metrics on a hand-checkable case --------------------------------------------------------------

def test_per_class_roc_auc_one_vs_rest():
    metrics = full_metrics(LABELS, PROBABILITIES, CLASSES, bins=10, tumor_threshold=0.5)
    # glioma: positives score 0.775 and 0.075, the 4 negatives 0.075: (4 wins + 4 ties / 2) / 8 pairs
    assert metrics["roc_auc_glioma"] == pytest.approx(6 / 8)
    # meningioma: the positive scores 0.775; negatives 0.775 once and 0.075 four times: (4 + 1/2) / 5
    assert metrics["roc_auc_meningioma"] == pytest.approx(4.5 / 5)
    assert metrics["roc_auc_notumor"] == pytest.approx(4.5 / 5)
    assert metrics["roc_auc_pituitary"] == pytest.approx(6 / 8)


def test_roc_auc_is_nan_for_a_class_absent_from_the_labels():
    labels = np.array([0, 0, 1, 2, 2, 2])  # no pituitary
    metrics = full_metrics(labels, PROBABILITIES, CLASSES, bins=10, tumor_threshold=0.5)
    assert np.isnan(metrics["roc_auc_pituitary"])
    assert metrics["roc_auc_glioma"] == pytest.approx(6 / 8)


def test_specificity_precision_sensitivity_per_class():
    metrics = full_metrics(LABELS, PROBABILITIES, CLASSES, bins=10, tumor_threshold=0.5)
    # meningioma: 5 non-meningioma images, one (row 1, a glioma) called meningioma
    assert metrics["specificity_meningioma"] == pytest.approx(4 / 5)
    # notumor: 5 non-notumor images, one (row 5, a pituitary) called notumor
    assert metrics["specificity_notumor"] == pytest.approx(4 / 5)
    assert metrics["specificity_glioma"] == pytest.approx(1.0)
    assert metrics["precision_meningioma"] == pytest.approx(1 / 2)
    assert metrics["sensitivity_pituitary"] == pytest.approx(1 / 2)
    assert metrics["recall_pituitary"] == metrics["sensitivity_pituitary"]
    assert metrics["macro_f1"] == pytest.approx(2 / 3)  # every class has F1 2/3 here
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["tumor_sensitivity"] == pytest.approx(4 / 5)
    assert metrics["tumor_specificity"] == pytest.approx(1.0)


def test_a_class_never_seen_nor_predicted_scores_zero_not_an_error():
    labels = np.array([0, 1, 2])
    probabilities = np.eye(4)[[0, 1, 2]] * 0.7 + 0.075
    metrics = full_metrics(labels, probabilities, CLASSES, bins=5, tumor_threshold=0.5)
    assert metrics["sensitivity_pituitary"] == 0.0 and metrics["precision_pituitary"] == 0.0
    assert metrics["specificity_pituitary"] == pytest.approx(1.0)
    assert metrics["accuracy"] == pytest.approx(1.0)


# --- evaluation plots and tables -----------------------------------------------------------------------------

def test_evaluation_plots_and_metrics_from_prediction_frames(tmp_path):
    from components.evaluate import evaluate_frames, plot_reliability, plot_roc
    from components.metrics import plot_confusion

    frame = pd.DataFrame({"label": np.array(CLASSES)[LABELS], "clean": [True, True, True, False, True, True],
                          **{f"prob_{c}": PROBABILITIES[:, i] for i, c in enumerate(CLASSES)}})
    from components.config import EvaluateParams

    settings = EvaluateParams.model_construct(gradcam_examples=0, calibration_bins=1, tumor_threshold=0.5,
                                              interval_below=100,
                                              confidence=0.95)  # one ECE bin: a value ECE is easy to check by hand
    results = evaluate_frames({"m": frame}, CLASSES, settings)
    assert results["m"]["test"]["accuracy"] == pytest.approx(4 / 6)
    assert results["m"]["test_clean"]["accuracy"] == pytest.approx(3 / 5)  # row 3 (a notumor, right) dropped
    # one bin: accuracy 4/6, mean confidence 0.775
    assert results["m"]["test"]["ece"] == pytest.approx(0.775 - 4 / 6)
    for path in (plot_roc(frame, CLASSES, "m", tmp_path / "roc.png"),
                 plot_reliability({"m": frame}, CLASSES, 10, tmp_path / "reliability.png"),
                 plot_confusion(LABELS, PROBABILITIES, CLASSES, "m", tmp_path / "confusion.png")):
        assert path.stat().st_size > 0


# --- the report says what ran --------------------------------------------------------------------------------

GPU_TAGS = {"device": "GPU", "gpu_name": "NVIDIA A100-SXM4-40GB", "mixed_precision": "True", "host": "gpu-box"}
CPU_TAGS = {"device": "CPU", "gpu_name": "none", "mixed_precision": "False", "host": "laptop"}


def test_report_hardware_line_for_a_gpu_run_with_imagenet_weights():
    from components.report import hardware_lines, headline, training_setup

    setups = [training_setup(name, GPU_TAGS, {f"models.{name}.weights": "imagenet"}, "none")
              for name in ("mobilenetv2", "resnet50")]
    where, weights = hardware_lines(setups)
    assert "every training on GPU (NVIDIA A100-SXM4-40GB), mixed precision" in where and "CPU" not in where
    assert "`gpu-box`" in where
    assert "pretrained (`weights: imagenet`)" in weights and "scratch" not in weights
    assert headline(setups) == "GPU, pretrained"


def test_report_hardware_line_for_a_cpu_run_from_scratch():
    from components.report import hardware_lines, headline, training_setup

    setups = [training_setup(name, CPU_TAGS, {f"models.{name}.weights": "none"}, "imagenet")
              for name in ("mobilenetv2", "resnet50")]
    where, weights = hardware_lines(setups)
    assert "every training on CPU" in where and "GPU (" not in where
    assert "every model from scratch" in weights and "pretrained" not in weights
    assert headline(setups) == "CPU, from scratch"
    assert "bfloat16" not in where
    bfloat16 = [training_setup("resnet50", {**CPU_TAGS, "precision": "mixed_bfloat16"}, None, "none")]
    assert "CPU (no GPU visible), bfloat16" in hardware_lines(bfloat16)[0]


def test_report_names_each_model_when_trainings_differ():
    from components.report import hardware_lines, headline, training_setup

    setups = [training_setup("custom_cnn", CPU_TAGS, {"models.custom_cnn.weights": "imagenet"}, "none"),
              training_setup("densenet169", GPU_TAGS, {"models.densenet169.weights": "imagenet"}, "none")]
    where, weights = hardware_lines(setups)
    assert "CPU (no GPU visible): custom_cnn" in where
    assert "GPU (NVIDIA A100-SXM4-40GB), mixed precision: densenet169" in where
    # custom_cnn has no backbone: its weights setting loads nothing
    assert "from scratch: custom_cnn" in weights and "pretrained (`weights: imagenet`): densenet169" in weights
    assert headline(setups) == "CPU and GPU, partly pretrained"


def test_report_without_a_training_run_says_the_device_is_unknown():
    from components.report import hardware_lines, training_setup

    setup = training_setup("resnet50", None, None, "imagenet")
    assert setup.device == "unknown" and setup.pretrained  # weights from params when no run logged them
    where, _ = hardware_lines([setup])
    assert "unknown device" in where and "host" not in where


def test_written_page_states_the_device_and_weights_that_ran(params, tmp_path, monkeypatch):
    """write_report with the MLflow look-ups replaced by fakes: the page's header comes from the runs' setups."""
    import json

    from components import report
    from components.config import load_params
    from components.report import training_setup
    from tests.conftest import ROOT

    monkeypatch.chdir(tmp_path)
    setups = [training_setup(name, GPU_TAGS, {f"models.{name}.weights": "imagenet"}, "none")
              for name in params.stack.models]
    monkeypatch.setattr(report, "stage_times", lambda _params: ([], [], ["abc1234"]))
    monkeypatch.setattr(report, "training_setups", lambda _params: setups)
    metrics = {"accuracy": 0.9, "macro_f1": 0.9, "tumor_sensitivity": 0.9, "tumor_specificity": 0.9, "ece": 0.05,
               **{f"sensitivity_{c}": 0.9 for c in params.data.classes}}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluation.json").write_text(json.dumps(
        {name: {"test": metrics, "test_clean": metrics} for name in [*params.stack.models, "stack"]}))
    (tmp_path / "splits").mkdir()
    pd.DataFrame({"path": ["a", "b"], "label": ["glioma", "notumor"], "clean": [True, False]}).to_csv(tmp_path / "splits" / "test.csv", index=False)
    pd.DataFrame({"path": ["c", "d"], "label": ["glioma", "notumor"], "source": ["kaggle", "external-feltrin-dev"]}).to_csv(
        tmp_path / "splits" / "train.csv", index=False)
    local = load_params(ROOT / "params.yaml", ["paths.metrics=metrics", "paths.splits=splits", "paths.plots=plots",
                                               "paths.models=models", "report.out=docs/results.md",
                                               "report.figures=docs/results", "report.runs_dir=runs"])
    text = report.write_report(local, commit="def5678").read_text()
    header = text.split("## Profile", 1)[0]
    backbones = [name for name in params.stack.models if name not in NO_BACKBONE]
    start = "pretrained" if len(backbones) == len(params.stack.models) else "partly pretrained"
    assert header.startswith(f"# Results: GPU, {start}")
    assert "every training on GPU (NVIDIA A100-SXM4-40GB), mixed precision" in header
    assert "no GPU" not in text and "trained from scratch (`weights: none`)" not in text
    assert f"pretrained (`weights: imagenet`): {', '.join(backbones)}" in header
    profile = text.split("## Profile", 1)[1].split("## Comparison", 1)[0]
    assert "| mobilenetv2 |" in profile and profile.count("| imagenet |") == len(params.stack.models)
    # The data label comes from the training pool's sources, and the run is kept under it for the comparisons.
    assert "trained on `external-feltrin-dev+kaggle`" in header.splitlines()[0]
    assert (tmp_path / "runs" / f"external-feltrin-dev+kaggle-seed{local.seed}.json").exists()


# --- one tumor call -------------------------------------------------------------------------------------------

def test_every_report_makes_the_same_tumor_call():
    """Evaluate (full_metrics), the audit's style cells and evaluate-external call a scan tumor by the same rule:
    1 - P(notumor) >= evaluate.tumor_threshold. The rows below are chosen so that argmax and that rule disagree."""
    from components.audit import cell_metrics
    from components.config import load_params
    from components.external import group_figures
    from tests.conftest import ROOT

    settings = load_params(ROOT / "params.yaml").evaluate
    probabilities = np.array([
        [0.30, 0.25, 0.45, 0.00],  # glioma: argmax says notumor, 1 - P(notumor) = 0.55 says tumor
        [0.40, 0.00, 0.20, 0.40],  # pituitary: both say tumor
        [0.10, 0.05, 0.80, 0.05],  # glioma: both say healthy
        [0.35, 0.20, 0.45, 0.00],  # notumor: argmax says healthy, the rule says tumor
        [0.05, 0.05, 0.85, 0.05],  # notumor: healthy either way
    ])
    labels = np.array([0, 3, 0, 2, 2])
    names = np.array(CLASSES)[labels]
    evaluate = full_metrics(labels, probabilities, CLASSES, bins=10, tumor_threshold=settings.tumor_threshold)
    frame = pd.DataFrame(probabilities, columns=[f"prob_{c}" for c in CLASSES]).assign(label=names)
    audit = cell_metrics(frame, CLASSES, settings)
    external = group_figures(names, probabilities, CLASSES, True, settings)
    assert evaluate["tumor_sensitivity"] == audit["tumor_sensitivity"]["value"] == \
        external["tumor_sensitivity"]["value"] == pytest.approx(2 / 3)
    assert evaluate["tumor_specificity"] == audit["tumor_specificity"]["value"] == \
        external["tumor_specificity"]["value"] == pytest.approx(1 / 2)


def test_other_tumor_counts_as_a_tumor_and_stays_out_of_class_accuracy():
    from components.metrics import labelled_figures

    probabilities = np.array([[0.1, 0.1, 0.2, 0.6], [0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]])
    figures = labelled_figures(np.array(["other_tumor", "other_tumor", "glioma"], dtype=object), probabilities,
                               CLASSES, 0.5, 100, 0.95)
    assert (figures["tumor_sensitivity"]["k"], figures["tumor_sensitivity"]["n"]) == (2, 3)
    assert (figures["accuracy"]["k"], figures["accuracy"]["n"]) == (1, 1)
    assert "tumor_specificity" not in figures
