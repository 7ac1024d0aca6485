import json

import numpy as np
import pandas as pd
import pytest

from components import stack as stack_module
from components.stack import STACK, Stacker, load_predictions, stack_features
from tests.conftest import TRAINED_EXTRA, tiny_params


def test_stacker_never_sees_the_rows_its_base_models_were_selected_on(in_trained, monkeypatch):
    """Early stopping and the schedules chose on val; the meta-learner (and its temperature) are fitted on the
    stack split alone, which shares no image and no duplicate group with train, val or test."""
    from components.dataset import read_split
    from components.metrics import scores

    params = tiny_params(in_trained, TRAINED_EXTRA)
    seen = []
    from flaml import AutoML

    original = AutoML.fit

    def spy(self, X_train=None, y_train=None, **kwargs):
        seen.append(X_train.copy())
        return original(self, X_train, y_train, **kwargs)

    monkeypatch.setattr(AutoML, "fit", spy)
    splits = {name: read_split(params.paths.splits, name) for name in ("train", "val", "stack", "test")}
    fit_rows = load_predictions(params, stack_module.FIT_SPLIT, params.stack.models)
    stacker = stack_module.fit_stacker(fit_rows, params.data.classes, params.stack, params.seed)

    assert stack_module.FIT_SPLIT == "stack" and len(seen) == 1
    assert set(next(iter(fit_rows.values())).path) == set(splits["stack"].path)
    expected = stack_features({n: scores(f, params.data.classes)[1] for n, f in fit_rows.items()}, params.stack)
    pd.testing.assert_frame_equal(seen[0].reset_index(drop=True), expected)
    for other in ("train", "val", "test"):
        assert not set(splits["stack"].path) & set(splits[other].path), other
    assert not set(splits["stack"].group) & (set(splits["train"].group) | set(splits["val"].group))
    fitted_rows = {tuple(np.round(r, 6)) for r in seen[0].to_numpy()}
    for other in ("val", "test"):
        frames = load_predictions(params, other, params.stack.models)
        features = stack_features({n: scores(f, params.data.classes)[1] for n, f in frames.items()}, params.stack)
        assert not any(tuple(np.round(r, 6)) in fitted_rows for r in features.to_numpy()), other
    # What the stage recorded: the stack split's paths, and a temperature fitted out of fold.
    meta = json.loads((params.paths.models / "stacker" / "meta.json").read_text())
    assert meta["fit_split"] == "stack" and meta["fit_rows"] == len(splits["stack"])
    assert meta["fit_paths_sha"] == stack_module._paths_digest(splits["stack"].path)
    assert stacker.temperature > 0 and meta["temperature"] > 0


def test_temperature_softens_an_overconfident_model_and_one_changes_nothing():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    # Right 70% of the time, but always 99% sure: an overconfident model.
    predicted = np.where(rng.random(400) < 0.7, labels, (labels + 1) % 4)
    probabilities = np.full((400, 4), 0.01 / 3)
    probabilities[np.arange(400), predicted] = 0.99
    temperature = stack_module.fit_temperature(labels, probabilities, 4)
    softened = stack_module.with_temperature(probabilities, temperature)
    assert temperature > 1
    assert softened.max(axis=1).mean() == pytest.approx(0.7, abs=0.05), "confidence comes down to the accuracy"
    np.testing.assert_allclose(softened.sum(axis=1), 1.0)
    np.testing.assert_array_equal(softened.argmax(axis=1), probabilities.argmax(axis=1))
    np.testing.assert_array_equal(stack_module.with_temperature(probabilities, 1.0), probabilities)


def test_stack_outputs_and_baselines(in_trained):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    table = json.loads((params.paths.metrics / "ensemble.json").read_text())
    assert set(table) == {*params.stack.models, "soft_vote", "stack"}
    for name in table:
        assert {"test", "test_clean"} <= set(table[name])
    assert (params.paths.models / "stacker" / "flaml_search.log").stat().st_size > 0
    stacker = Stacker.load(params.paths.models / "stacker" / "stacker.pkl")
    frame = pd.read_parquet(params.paths.predictions / STACK / "test.parquet")
    np.testing.assert_allclose(frame.filter(like="prob_").sum(axis=1), 1.0, rtol=1e-6)
    assert stacker.models == params.stack.models


def test_evaluation_report_and_dvc_metrics(in_trained):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    metrics = json.loads((params.paths.metrics / "evaluation.json").read_text())
    for name in [*params.stack.models, "soft_vote", "stack"]:
        for test_set in ("test", "test_clean"):
            values = metrics[name][test_set]
            assert {"accuracy", "macro_f1", "specificity_glioma", "precision_pituitary", "tumor_sensitivity",
                    "tumor_specificity", "ece", "brier"} <= set(values)
            assert 0 <= values["accuracy"] <= 1
    report = (in_trained / "reports" / "evaluation.md").read_text()
    assert "### clean test" in report and "reliability.png" in report and "gradcam_" in report
    plots = params.paths.plots / "evaluation"
    assert list(plots.glob("gradcam_*.png")) and (plots / "roc_stack.png").exists()


def test_metrics_match_sklearn_on_a_known_case():
    from components.metrics import full_metrics

    labels = np.array([0, 0, 1, 2, 3, 3])
    probabilities = np.eye(4)[[0, 1, 1, 2, 3, 2]] * 0.7 + 0.075
    metrics = full_metrics(labels, probabilities, ["glioma", "meningioma", "notumor", "pituitary"], bins=10, tumor_threshold=0.5)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["sensitivity_glioma"] == pytest.approx(0.5)
    assert metrics["specificity_meningioma"] == pytest.approx(4 / 5)
    # notumor is class 2: tumours (0, 1, 3) predicted as tumours: 4 of 5 rows (row 5 became notumor)
    assert metrics["tumor_sensitivity"] == pytest.approx(4 / 5)
