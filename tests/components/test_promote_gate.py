"""The promotion gate (exact McNemar on the gate split, tie rules, floors), rollback-then-promote, and predict before
any promotion. Fast: synthetic correctness vectors, and a real MLflow sqlite store in tmp_path holding a tiny
pyfunc that answers from the image path (no TensorFlow, no images)."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from flows.cli import main as cli_main
from components.config import PromoteParams, load_params
from components.predict import predict_paths
from components.promote import CHAMPION, TEST_NAME, PromotionError, gate, mcnemar, promote, rollback

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
NAME = "brain-tumor-ensemble"
# Test rules, chosen here (not read from params.yaml).
RULES = PromoteParams(model="ensemble", min_accuracy=0.6, min_class_sensitivity=0.5, alpha=0.05,
                      tie_rule="keep_champion")
IF_NOT_WORSE = RULES.model_copy(update={"tie_rule": "challenger_if_not_worse"})


def paired(both: int, b: int, c: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """(challenger, champion) correctness on the same images: `both` right by both, `b` by the challenger only,
    `c` by the champion only, `neither` by none; shuffled the same way so the order carries no signal."""
    challenger = np.array([True] * both + [True] * b + [False] * c + [False] * neither)
    champion = np.array([True] * both + [False] * b + [True] * c + [False] * neither)
    order = np.random.default_rng(0).permutation(len(challenger))
    return challenger[order], champion[order]


def metrics_of(correct: np.ndarray, sensitivity: float | None = None) -> dict[str, float]:
    value = float(correct.mean()) if sensitivity is None else sensitivity
    return {"accuracy": float(correct.mean()), **{f"sensitivity_{c}": value for c in CLASSES}}


# --- McNemar ---------------------------------------------------------------------------------------------------

def test_mcnemar_p_value_is_the_exact_one_sided_binomial_tail():
    challenger, champion = paired(both=70, b=8, c=2, neither=20)
    test = mcnemar(challenger, champion)
    assert (test.n, test.b, test.c) == (100, 8, 2)
    # By hand: P(X >= 8), X ~ Binomial(10, 1/2) = (C(10,8) + C(10,9) + C(10,10)) / 2^10 = (45 + 10 + 1) / 1024.
    assert test.p_better == pytest.approx(56 / 1024, rel=1e-12)
    # And the reverse tail, P(X >= 2) = 1 - (C(10,0) + C(10,1)) / 1024.
    assert test.p_worse == pytest.approx(1 - 11 / 1024, rel=1e-12)
    # Only the discordant pairs count: adding images both get right (or wrong) changes nothing.
    more = mcnemar(*paired(both=500, b=8, c=2, neither=300))
    assert more.p_better == test.p_better and more.n == 810


def test_mcnemar_with_no_disagreement_is_no_evidence_and_needs_same_images():
    same = np.array([True, False, True, True])
    test = mcnemar(same, same)
    assert (test.b, test.c, test.p_better, test.p_worse) == (0, 0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same images"):
        mcnemar(same, same[:3])


# --- the gate ---------------------------------------------------------------------------------------------------

def test_a_two_image_gain_out_of_100_is_noise_and_refused():
    challenger, champion = paired(both=40, b=12, c=10, neither=38)
    assert challenger.sum() == 52 and champion.sum() == 50
    decision = gate(metrics_of(challenger, 0.9), CLASSES, RULES, mcnemar(challenger, champion))
    assert not decision.promote
    assert decision.test.p_better > RULES.alpha
    assert any("no significant gain" in r and "b=12" in r and "c=10" in r for r in decision.reasons)
    # Even the most favourable split of a 2-image gain (b=2, c=0) is far from significant.
    lopsided = mcnemar(*paired(both=50, b=2, c=0, neither=48))
    assert lopsided.p_better == pytest.approx(0.25)
    assert not gate(metrics_of(np.ones(100, bool), 0.9), CLASSES, RULES, lopsided).promote


def test_a_large_gain_is_promoted_under_either_tie_rule():
    challenger, champion = paired(both=60, b=25, c=3, neither=12)
    test = mcnemar(challenger, champion)
    assert test.p_better < RULES.alpha
    for rules in (RULES, IF_NOT_WORSE):
        decision = gate(metrics_of(challenger, 0.9), CLASSES, rules, test)
        assert decision.promote, decision.reasons
        assert any("significant gain" in r for r in decision.reasons)


def test_tie_rules_behave_as_documented():
    # An even trade (b == c): not better, not worse.
    challenger, champion = paired(both=70, b=6, c=6, neither=18)
    tie = mcnemar(challenger, champion)
    assert not gate(metrics_of(challenger, 0.9), CLASSES, RULES, tie).promote  # keep_champion
    kept = gate(metrics_of(challenger, 0.9), CLASSES, IF_NOT_WORSE, tie)
    assert kept.promote and any("challenger_if_not_worse" in r for r in kept.reasons)
    # Significantly worse: refused by both rules.
    challenger, champion = paired(both=60, b=2, c=20, neither=18)
    worse = mcnemar(challenger, champion)
    assert worse.p_worse <= RULES.alpha
    refused = gate(metrics_of(challenger, 0.9), CLASSES, IF_NOT_WORSE, worse)
    assert not refused.promote and any("significantly worse" in r for r in refused.reasons)
    assert not gate(metrics_of(challenger, 0.9), CLASSES, RULES, worse).promote
    # Slightly (not significantly) worse: challenger_if_not_worse still promotes, keep_champion does not.
    challenger, champion = paired(both=70, b=4, c=7, neither=19)
    slight = mcnemar(challenger, champion)
    assert slight.p_worse > RULES.alpha
    assert gate(metrics_of(challenger, 0.9), CLASSES, IF_NOT_WORSE, slight).promote
    assert not gate(metrics_of(challenger, 0.9), CLASSES, RULES, slight).promote


def test_floors_refuse_even_a_significant_gain_and_decide_alone_without_champion():
    challenger, champion = paired(both=20, b=35, c=2, neither=43)  # accuracy 0.55, a large, significant gain
    test = mcnemar(challenger, champion)
    assert test.p_better < RULES.alpha and challenger.mean() < RULES.min_accuracy
    low = gate(metrics_of(challenger, 0.9), CLASSES, IF_NOT_WORSE, test)
    assert not low.promote and any(r.startswith("accuracy") for r in low.reasons)

    good, _ = paired(both=80, b=10, c=0, neither=10)
    one_class = {**metrics_of(good, 0.9), "sensitivity_notumor": RULES.min_class_sensitivity / 2}
    weak = gate(one_class, CLASSES, IF_NOT_WORSE, mcnemar(*paired(both=60, b=30, c=0, neither=10)))
    assert not weak.promote and weak.reasons == [
        f"sensitivity notumor {RULES.min_class_sensitivity / 2:.4f} < min {RULES.min_class_sensitivity}"]

    assert gate(metrics_of(good, 0.9), CLASSES, RULES, None).promote
    assert not gate(metrics_of(good, RULES.min_class_sensitivity / 2), CLASSES, RULES, None).promote
    assert not gate(metrics_of(challenger, 0.9), CLASSES, RULES, None).promote


# --- the registry: promote on the gate split, rollback, predict before promotion --------------------------------

GATE_IMAGES = 80


class PathOracle(mlflow.pyfunc.PythonModel):
    """Answers from the path `img_<index>_<label>.png`: right on the indices in `right`, wrong elsewhere."""

    classes = CLASSES

    def __init__(self, right):
        self.right = set(int(i) for i in right)

    def component_probabilities(self, model_input):
        """The ensemble's scoring interface (components.predict.score_files), with the stack as its only part."""
        rows = []
        for value in model_input["image"]:  # predict_paths sends each file's bytes: here, the file's own name
            _, index, label = Path(base64.b64decode(value).decode()).stem.split("_")
            truth = CLASSES.index(label)
            rows.append(np.eye(len(CLASSES))[truth if int(index) in self.right else (truth + 1) % len(CLASSES)])
        return {"stack": np.array(rows)}

    def predict(self, context, model_input, params=None):
        out = pd.DataFrame(self.component_probabilities(model_input)["stack"], columns=[f"prob_{c}" for c in CLASSES])
        out.insert(0, "predicted_class", np.array(CLASSES)[out.to_numpy().argmax(axis=1)])
        return out


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Params pointing at a sqlite MLflow store and a gate split in tmp_path; floors at 0 so the test decides."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    splits = tmp_path / "splits"
    splits.mkdir()
    for i in range(GATE_IMAGES):
        (tmp_path / f"img_{i}_{CLASSES[i % 4]}.png").write_text(f"img_{i}_{CLASSES[i % 4]}.png")
    pd.DataFrame({"path": [f"img_{i}_{CLASSES[i % 4]}.png" for i in range(GATE_IMAGES)],
                  "label": [CLASSES[i % 4] for i in range(GATE_IMAGES)]}).to_csv(splits / "gate.csv", index=False)
    params = load_params(ROOT / "params.yaml", [
        f"paths.splits={splits}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_root={tmp_path / 'artifacts'}", "promote.model=ensemble",
        "promote.min_accuracy=0.0", "promote.min_class_sensitivity=0.0", "promote.alpha=0.05",
        "promote.tie_rule=keep_champion"])
    yield params
    mlflow.set_tracking_uri(None)


def register(params, right) -> str:
    """A new version answering right on `right`, given @challenger as `braintumor register` does."""
    from components import tracking

    tracking.configure(params.tracking)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=PathOracle(right), registered_model_name=NAME,
                                       pip_requirements=["mlflow"])
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "challenger", version)
    return version


def champion_version() -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, CHAMPION).version)


def test_promote_scores_the_gate_split_tags_the_test_and_never_repromotes_a_rolled_back_version(registry):
    params = registry
    client = mlflow.MlflowClient
    v1 = register(params, range(0, 48))  # 60% right
    first = promote(params)
    assert first["decision"] == "promoted" and first["split"] == "gate" and first["images"] == GATE_IMAGES
    assert champion_version() == v1
    assert client().get_model_version(NAME, v1).tags["promotion.compared_with"] == "none"

    v2 = register(params, range(0, 50))  # two more images right: noise
    noise = promote(params)
    assert noise["decision"] == "refused" and champion_version() == v1
    tags = client().get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "refused" and (tags["promotion.b"], tags["promotion.c"]) == ("2", "0")

    v3 = register(params, range(0, 76))  # 95% right: b=28, c=0 against v1
    assert promote(params, dry_run=True)["decision"] == "would be promoted (dry run)"
    assert champion_version() == v1, "a dry run changes nothing"
    assert promote(params)["decision"] == "promoted" and champion_version() == v3
    tags = client().get_model_version(NAME, v3).tags
    expected = mcnemar(np.arange(GATE_IMAGES) < 76, np.arange(GATE_IMAGES) < 48)
    assert tags["promotion.split"] == "gate" and tags["promotion.images"] == str(GATE_IMAGES)
    assert tags["promotion.test"] == TEST_NAME and tags["promotion.tie_rule"] == params.promote.tie_rule
    assert (tags["promotion.b"], tags["promotion.c"]) == (str(expected.b), str(expected.c))
    assert float(tags["promotion.p_value"]) == pytest.approx(expected.p_better, rel=1e-5)
    assert tags["promotion.compared_with"] == v1 and "significant gain" in tags["promotion.reasons"]

    assert str(rollback(params)["champion"]) == v1 and champion_version() == v1
    assert client().get_model_version(NAME, v3).tags["promotion.rolled_back"] == "true"
    # v3 still holds @challenger: promoting it again is refused, and says what to do.
    with pytest.raises(PromotionError, match="register a new version"):
        promote(params)
    with pytest.raises(RuntimeError, match="rolled back"):
        promote(params, dry_run=True)
    assert champion_version() == v1

    v4 = register(params, range(0, 76))  # a newly registered version may be promoted
    assert promote(params)["decision"] == "promoted" and champion_version() == v4


def test_promote_with_no_gate_split_names_the_fix(registry):
    (registry.paths.splits / "gate.csv").unlink()
    register(registry, range(10))
    with pytest.raises(FileNotFoundError, match="split"):
        promote(registry)


def test_predict_before_any_promotion_says_to_promote_or_pass_a_model_uri(registry, monkeypatch, capsys):
    version = register(registry, range(GATE_IMAGES))
    with pytest.raises(RuntimeError) as failure:
        predict_paths(["img_0_glioma.png"], f"models:/{NAME}@champion")
    message = str(failure.value)
    assert "braintumor promote" in message and "--model-uri" in message
    # Other MLflow errors are not reworded.
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found") as other:
        predict_paths(["img_0_glioma.png"], f"models:/{NAME}/{int(version) + 5}")
    assert not isinstance(other.value, RuntimeError)
    # The challenger still scores.
    out = predict_paths(["img_0_glioma.png"], f"models:/{NAME}@challenger")
    assert out.predicted_class.tolist() == ["glioma"]

    # The CLI prints the message, not a traceback.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking.tracking_uri)
    code = cli_main(["--params", str(ROOT / "params.yaml"), "predict", "img_0_glioma.png"])
    err = capsys.readouterr().err
    assert code != 0 and "braintumor promote" in err and "Traceback" not in err
