import json

import numpy as np
import pandas as pd
import pytest

from components import stack as stack_module
from components.stack import STACK, Stacker, load_predictions, stack_features
from tests.conftest import TRAINED_EXTRA, tiny_params


def test_stacker_is_fitted_on_val_rows_only(in_trained, monkeypatch):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    seen = {}
    from flaml import AutoML

    original = AutoML.fit

    def spy(self, X_train=None, y_train=None, **kwargs):
        seen["X"], seen["y"] = X_train.copy(), np.asarray(y_train).copy()
        return original(self, X_train, y_train, **kwargs)

    monkeypatch.setattr(AutoML, "fit", spy)
    val = load_predictions(params, "val", params.stack.models)
    test = load_predictions(params, "test", params.stack.models)
    stack_module.fit_stacker(val, params.data.classes, params.stack, params.seed)

    from components.metrics import scores
    expected = stack_features({n: scores(f, params.data.classes)[1] for n, f in val.items()}, params.stack)
    pd.testing.assert_frame_equal(seen["X"].reset_index(drop=True), expected)
    test_features = stack_features({n: scores(f, params.data.classes)[1] for n, f in test.items()}, params.stack)
    fitted_rows = {tuple(np.round(r, 6)) for r in seen["X"].to_numpy()}
    assert not any(tuple(np.round(r, 6)) in fitted_rows for r in test_features.to_numpy())
    meta = json.loads((params.paths.models / "stacker" / "meta.json").read_text())
    assert meta["fit_rows"] == len(next(iter(val.values())))


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
    metrics = full_metrics(labels, probabilities, ["glioma", "meningioma", "notumor", "pituitary"], bins=10)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["sensitivity_glioma"] == pytest.approx(0.5)
    assert metrics["specificity_meningioma"] == pytest.approx(4 / 5)
    # notumor is class 2: tumours (0, 1, 3) predicted as tumours: 4 of 5 rows (row 5 became notumor)
    assert metrics["tumor_sensitivity"] == pytest.approx(4 / 5)
