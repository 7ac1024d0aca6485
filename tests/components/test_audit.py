"""The shortcut audit: style features tell MRI weightings apart on phantoms, and the stage's tables add up."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.audit import per_cell, shortcut_gaps
from components.style import STYLE_FEATURES, T1, T2, style_features, weighting_model
from tests.conftest import TRAINED_EXTRA, tiny_params


def phantom(weighting: str, rng: np.random.Generator, size: int = 128) -> bytes:
    """An axial head phantom. T1-like (contrast T1): bright scalp fat, gray brain, dark ventricles.
    T2-like (as this data set's healthy scans look): a dim scalp, a brighter brain, and bright fluid in the
    ventricles and around the brain."""
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    radius = np.hypot(y / 0.42, x / 0.36)
    scalp, brain, csf_rim = radius < 1.0, radius < 0.86, (radius > 0.80) & (radius < 0.86)
    ventricles = (np.hypot((y - 0.02) / 0.16, (np.abs(x) - 0.07) / 0.05) < 1.0)
    if weighting == T1:
        levels = {"scalp": 230, "brain": 120, "csf": 35}
    else:
        levels = {"scalp": 90, "brain": 140, "csf": 235}
    image = np.zeros((size, size))
    image[scalp] = levels["scalp"]
    image[brain] = levels["brain"]
    image[brain & (ventricles | csf_rim)] = levels["csf"]
    image = np.clip(image + rng.normal(0, 8, image.shape) * scalp, 0, 255).astype(np.uint8)
    import io

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=90 + int(rng.integers(0, 6)))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def phantoms() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(30):
        weighting = (T1, T2)[index % 2]
        rows.append({"file": f"Training/x/{index}.jpg", "weighting": weighting,
                     **style_features(phantom(weighting, rng))})
    return pd.DataFrame(rows)


def test_every_style_feature_is_computed_and_finite_for_a_phantom(phantoms):
    assert set(STYLE_FEATURES) <= set(phantoms.columns)
    assert np.isfinite(phantoms[STYLE_FEATURES].to_numpy()).all()
    assert (phantoms.stored_rgb == 0).all() and (phantoms.jpeg_quality >= 85).all()


def test_t1_like_and_t2_like_phantoms_are_told_apart_by_the_rule_and_by_the_fitted_classifier(params, phantoms):
    truth = (phantoms.weighting == T2).to_numpy()
    hand, features = phantoms[["file", "weighting"]], phantoms.drop(columns="weighting")
    # Too few hand labels: the documented one-feature rule.
    few = params.style.model_copy(update={"min_hand_labels": 100})
    rule, method = weighting_model(features, hand, few, params.seed)
    assert method["method"].startswith("rule") and "min_hand_labels" in method["why"]
    np.testing.assert_array_equal(rule(features), truth)
    assert method["agreement"]["value"] == 1.0 and method["agreement"]["n"] == len(phantoms)
    # Enough: the logistic regression, whose out-of-fold agreement is measured against the hand labels.
    enough = params.style.model_copy(update={"min_hand_labels": 10})
    fitted, method = weighting_model(features, hand, enough, params.seed)
    assert method["method"].startswith("logistic regression") and method["agreement"]["value"] >= 0.9
    np.testing.assert_array_equal(fitted(features), truth)
    # Brightness alone does not decide it: a darker copy of a T2 phantom stays T2-like.
    darker = features[truth].copy()
    darker[["inner_median", "rim_p95"]] *= 0.6
    assert rule(darker).all()


def test_cells_count_every_test_scan_once_and_the_gap_is_in_points(params):
    classes = params.data.classes
    paths = [f"/t/{i}.jpg" for i in range(8)]
    labels = ["glioma", "glioma", "meningioma", "pituitary", "notumor", "notumor", "glioma", "notumor"]
    weighting = [T1, T2, T1, T2, T2, T1, T2, T2]
    # Tumors called tumor except the T2-like glioma /t/1 and /t/6; healthy scans called healthy.
    called = ["glioma", "notumor", "meningioma", "pituitary", "notumor", "notumor", "notumor", "notumor"]
    probabilities = np.eye(4)[[classes.index(c) for c in called]]
    frame = pd.DataFrame({"path": paths, "label": labels, **{f"prob_{c}": probabilities[:, i]
                                                            for i, c in enumerate(classes)}})
    styles = pd.DataFrame({"path": paths, "weighting": weighting})
    cells = per_cell({"model": frame}, styles, classes, params.evaluate)["model"]

    assert cells["all"]["accuracy"]["n"] == 8
    assert cells["tumor"]["tumor_sensitivity"]["k"] == 3 and cells["tumor"]["tumor_sensitivity"]["n"] == 5
    assert cells[f"tumor {T2}"]["tumor_sensitivity"]["k"] == 1 and cells[f"tumor {T2}"]["tumor_sensitivity"]["n"] == 3
    assert cells[f"tumor {T1}"]["tumor_sensitivity"]["value"] == 1.0
    assert cells[f"notumor {T1}"]["tumor_specificity"]["n"] == 1
    assert "ci_low" in cells["tumor"]["tumor_sensitivity"], "5 scans: a Wilson interval"
    gap = shortcut_gaps({"model": cells})["model"]
    assert gap["gap_points"] == pytest.approx(100 * (3 / 5 - 1 / 3), abs=0.01) and gap["n"] == 3


def test_the_audit_stage_of_the_trained_pipeline_accounts_for_every_scan(in_trained):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    summary = json.loads((params.paths.metrics / "audit.json").read_text())
    styles = pd.read_parquet(params.paths.style)
    manifest = pd.read_parquet(params.paths.manifest)
    assert len(styles) == manifest.readable.sum() == summary["scans"]
    assert set(styles.weighting) <= {T1, T2} and styles[STYLE_FEATURES].notna().all(axis=1).all()
    test = pd.read_csv(params.paths.splits / "test.csv")
    assert (styles.split == "test").sum() == len(test)
    by_label = summary["tables"]["weighting_by_label_test"]
    assert sum(sum(row.values()) for row in by_label.values()) == len(test)
    for name in [*params.stack.models, "soft_vote", "stack"]:
        assert summary["test_cells"][name]["all"]["accuracy"]["n"] == len(test)
    report = params.paths.audit_report.read_text()
    assert "Style alone predicts the label" in report and "counter-shortcut" in report
