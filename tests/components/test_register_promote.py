import base64
import io

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import tracking
from components.predict import BadInput, load_pyfunc, predict_paths
from components.promote import CHAMPION, PromotionError, promote, rollback
from tests.conftest import TRAINED_EXTRA, tiny_params

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
CHALLENGER_URI = "models:/brain-tumor-ensemble@challenger"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def ensemble(in_trained):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    tracking.configure(params.tracking)
    return load_pyfunc(CHALLENGER_URI)  # loaded once for these tests (a registry version is loaded once per process)


def test_registry_holds_five_models_with_alias_tags_and_card(in_trained):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    tracking.configure(params.tracking)
    client = mlflow.MlflowClient()
    names = {m.name for m in client.search_registered_models()}
    assert names == {f"brain-tumor-{n}" for n in [*params.stack.models, "ensemble"]}
    for name in names:
        version = client.get_model_version_by_alias(name, "challenger")
        assert {"git_commit", "dvc_data_hash", "params_hash"} <= set(version.tags)
        assert "Intended use" in version.description and "test_clean" in version.description
    info = mlflow.models.get_model_info(CHALLENGER_URI)
    assert info.signature.inputs.input_names() == ["image"]
    assert info.saved_input_example_info is not None


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_pyfunc_scores_bytes_of_any_size_and_mode_and_predict_paths_agrees(in_trained, ensemble, tmp_path):
    test = pd.read_csv(in_trained / "data" / "splits" / "test.csv")
    first = test.path.iloc[0]
    rgba = tmp_path / "alpha.png"
    Image.open(first).convert("RGBA").resize((70, 50)).save(rgba)
    sixteen = Image.fromarray((np.asarray(Image.open(first).convert("L"), dtype=np.uint16) * 257))
    frame = pd.DataFrame({"image": [
        b64(first),
        b64(rgba),
        base64.b64encode(png_bytes(sixteen)).decode(),
        base64.b64encode(png_bytes(Image.open(first).convert("RGB").resize((300, 200)))).decode(),
    ]})
    out = ensemble.predict(frame)
    assert list(out.columns) == ["predicted_class", *[f"prob_{c}" for c in CLASSES]]
    assert len(out) == 4 and set(out.predicted_class) <= set(CLASSES)
    np.testing.assert_allclose(out.filter(like="prob_").sum(axis=1), 1.0, rtol=1e-6)
    # `braintumor predict` reads local files and sends their bytes: the same answer as posting the same bytes in
    # one request. (Compared batch for batch: oneDNN's float sums change in the last bits with the batch size,
    # and a tree stacker can turn such a change into a different leaf.)
    local = predict_paths([first, str(rgba)], CHALLENGER_URI)
    posted = ensemble.predict(frame.iloc[:2])
    np.testing.assert_allclose(local.filter(like="prob_").to_numpy(), posted.filter(like="prob_").to_numpy(),
                               rtol=1e-6)


def test_pyfunc_scores_raw_files_as_the_stack_stage_scored_them(in_trained, ensemble):
    stage = pd.read_parquet(in_trained / "predictions" / "stack" / "test.parquet")
    out = ensemble.predict(pd.DataFrame({"image": [b64(p) for p in stage.path]}))
    columns = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(out[columns].to_numpy(), stage[columns].to_numpy(), atol=1e-4)


def test_bad_rows_get_named_errors(ensemble, in_trained):
    from mlflow.exceptions import MlflowException

    from components.predict import BadInput

    good = pd.read_csv(in_trained / "data" / "splits" / "test.csv").path.iloc[0]
    frame = pd.DataFrame({"image": [b64(good), "/no/such/file.jpg", base64.b64encode(b"plain text").decode()]})
    with pytest.raises(BadInput) as failure:
        ensemble.predict(frame)
    message = str(failure.value)
    assert "row 1" in message and "row 2" in message and "row 0" not in message
    assert "not an image" in message
    with pytest.raises(MlflowException, match=r"missing inputs \['image'\]"):  # the signature is enforced
        ensemble.predict(pd.DataFrame({"picture": [b64(good)]}))


# The gate itself (McNemar, tie rules, floors) is tested fast in test_promote_gate.py; here it runs on the
# trained ensemble and the workspace's gate split.

def test_promote_dry_run_refusal_promotion_and_rollback(in_trained, capsys):
    from components.register import run_register

    params = tiny_params(in_trained, TRAINED_EXTRA)
    tracking.configure(params.tracking)
    client = mlflow.MlflowClient()
    name = "brain-tumor-ensemble"
    rules = params.promote
    keep = params.model_copy(update={"promote": rules.model_copy(update={"tie_rule": "keep_champion"})})
    not_worse = params.model_copy(update={"promote": rules.model_copy(update={"tie_rule":
                                                                              "challenger_if_not_worse"})})
    gate_rows = len(pd.read_csv(in_trained / "data" / "splits" / "gate.csv"))

    dry = promote(params, dry_run=True)
    assert "challenger v" in dry["table"] and "dry run" in dry["decision"]
    assert dry["split"] == "gate" and dry["images"] == gate_rows > 0
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, CHAMPION)

    first = promote(params)
    assert first["decision"] == "promoted"  # no champion: the floors alone decide
    v1 = client.get_model_version_by_alias(name, CHAMPION).version

    # The gate loaded v1 once: a registry version is loaded once per process, under its alias or its number.
    loaded_v1 = load_pyfunc(f"models:/{name}@{CHAMPION}")
    assert load_pyfunc(f"models:/{name}/{v1}") is loaded_v1 is load_pyfunc(f"models:/{name}@challenger")
    run_register(params)  # a new challenger of the same quality: no significant gain on the gate split
    assert load_pyfunc(f"models:/{name}@challenger") is not loaded_v1, "an alias is resolved on every load"
    refused = promote(keep)
    assert refused["decision"] == "refused"
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1, "a refused model never becomes champion"
    v2 = client.get_model_version_by_alias(name, "challenger").version
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.split"] == "gate"
    assert tags["promotion.images"] == str(gate_rows) and tags["promotion.tie_rule"] == "keep_champion"
    assert float(tags["promotion.p_value"]) > keep.promote.alpha

    assert promote(not_worse)["decision"] == "promoted"  # not significantly worse
    assert client.get_model_version_by_alias(name, CHAMPION).version == v2
    assert str(rollback(params)["champion"]) == str(v1)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(v1)
    with pytest.raises(PromotionError, match="register a new version"):  # v2 still holds @challenger
        promote(not_worse)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(v1)
    # (that a newly registered version is promoted again is the v2 step above: no third registration here)


def test_a_smoke_run_is_marked_in_the_registry_and_can_never_become_champion(trained_copy, monkeypatch):
    """tracking.smoke (the quick profile): the new versions carry tag smoke=true and a card that says so, and
    `braintumor promote` refuses the challenger whatever the gate would say."""
    from components.register import run_register

    monkeypatch.chdir(trained_copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_params(trained_copy, TRAINED_EXTRA + ["tracking.smoke=true"])
    tracking.configure(params.tracking)  # the copy's own store, before a client is made
    client = mlflow.MlflowClient()
    champion_before = client.get_registered_model("brain-tumor-ensemble").aliases.get("champion")
    run_register(params)
    version = client.get_model_version_by_alias("brain-tumor-ensemble", "challenger")
    assert version.tags["smoke"] == "true" and "**SMOKE RUN**" in version.description
    with pytest.raises(PromotionError, match="smoke run.*can never become @champion"):
        promote(params)
    # The refused promotion moved nothing: @champion is what the trained workspace's flow left, never the smoke run.
    champion_after = client.get_registered_model("brain-tumor-ensemble").aliases.get("champion")
    assert champion_after == champion_before and str(champion_after) != str(version.version)
    # The flow's own registration (no tracking.smoke) is marked as a full run.
    flows_own = [v.version for v in client.search_model_versions("name='brain-tumor-ensemble'")
                 if v.version != version.version]
    assert flows_own and all(client.get_model_version("brain-tumor-ensemble", v).tags["smoke"] == "false"
                             for v in flows_own)
