"""monitor_batch (flows/monitoring.py) on a private copy of the trained workspace: a drifted batch, monitored with the
registered ensemble and the reference it was registered with, emits a Prefect event and triggers train_pipeline
with its evidence, which trains nothing on unchanged input; appended labelled data is a new DVC data version, and
the next monitoring run retrains on it, once."""

import json

import mlflow
import pandas as pd
import pytest

import flows.training as training
from components import tracking
from flows import cli
from components.config import load_params, write_overrides
from components.data_append import append_dataset
from components.data_import import data_hash
from flows.monitoring import monitor_batch
from tests.batches import write_batch
from tests.conftest import write_tiny_dataset

ENSEMBLE = "brain-tumor-ensemble"
DATA_STAGES = ("manifest", "validate", "split")  # the stages a test below runs for real


@pytest.fixture
def copy(trained_copy, monkeypatch):
    monkeypatch.chdir(trained_copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return trained_copy


def read_flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def flow_run_artifacts(flow_run_id: str, key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_a_drifted_batch_emits_an_event_and_triggers_training_with_its_evidence(prefect_harness, copy):
    params = load_params(copy / "params.yaml")
    tracking.configure(params.tracking)
    client = mlflow.MlflowClient()
    challenger = client.get_model_version_by_alias(ENSEMBLE, "challenger").version
    client.set_registered_model_alias(ENSEMBLE, "champion", challenger)
    normal, inverted = write_batch(copy / "data" / "incoming" / "tuesday", 24, seed=404, inverted=20)

    result = monitor_batch(str(copy / "data" / "incoming" / "tuesday"), f"models:/{ENSEMBLE}@challenger",
                           str(copy / "params.yaml"))

    summary = result["summary"]
    assert summary["drift"] and set(inverted) <= {row["file"] for row in summary["ood_files"]}
    assert result["event_id"] is not None, "a drifted batch emits a Prefect event"
    # The registered version's own reference artifact was used: the profile `register` logged from the workspace.
    assert not summary["reference"].startswith(str(copy))
    assert json.loads(open(f"{summary['reference']}/reference.json").read()) == json.loads(
        (copy / "models" / "reference" / "reference.json").read_text())
    monitoring_run = mlflow.get_run(summary["mlflow_run_id"])
    assert monitoring_run.data.tags["champion_version"] == str(challenger)
    assert monitoring_run.data.tags["model_version"] == f"{ENSEMBLE}/{challenger}"
    monitoring_flow_run = monitoring_run.data.tags["prefect_flow_run_id"]
    artifact = flow_run_artifacts(monitoring_flow_run, "batch-monitoring")
    assert artifact and "**drift:" in artifact[0].data and inverted[0] in artifact[0].data

    retrain = result["retrain"]
    assert retrain is not None and retrain["ran"] == [], "unchanged input: train_pipeline trains nothing"
    tags = mlflow.get_run(retrain["mlflow_parent_run_id"]).data.tags
    assert tags["trigger.reason"] == "drift" and tags["trigger.report"] == summary["report"]
    assert tags["trigger.metrics.ood_share"] == str(summary["metrics"]["ood_share"])
    assert tags["trigger.monitoring_mlflow_run_id"] == summary["mlflow_run_id"]
    assert {"retrain", "trigger:drift"} <= set(read_flow_run(retrain["prefect_flow_run_id"]).tags)
    training_summary = flow_run_artifacts(retrain["prefect_flow_run_id"], "train-pipeline-summary")
    assert "Triggered by: drift" in training_summary[0].data and summary["report"] in training_summary[0].data


def test_appended_labelled_data_is_a_new_data_version_and_the_next_monitoring_run_retrains_once(
        prefect_harness, copy, monkeypatch, tmp_path):
    """The data stages run for real; the later stages' commands (the trainings among them) are replaced by a
    recorder: what is tested is that new data makes the flow run them (the end-to-end test trains for real)."""
    params = load_params(copy / "params.yaml")
    dvc_file = copy / "data" / "raw.dvc"
    old_hash = data_hash(dvc_file)
    appended = append_dataset(write_tiny_dataset(tmp_path / "new", {"Training": 2}, seed=31), params)
    assert appended["appended"] == 8 and data_hash(dvc_file) == appended["dvc_hash"] != old_hash
    commands = []
    real = training.run_command

    def recorded(spec, root, env, log_path, tail_lines):
        commands.append(spec.name)
        if spec.name in DATA_STAGES:
            return real(spec, root, env, log_path, tail_lines)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"recorded: {spec.cmd}\n")
        return 0.0

    monkeypatch.setattr(training, "run_command", recorded)
    incoming = copy / "data" / "incoming" / "wednesday"
    incoming.mkdir(parents=True)
    (incoming / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    first = monitor_batch(str(incoming), None, str(copy / "params.yaml"))

    assert first["summary"]["metrics"]["quarantined"] == 1 and not first["summary"]["verdict"]
    # The stages that read the raw images: the manifest, and the trainings (a node without the flow's disk pulls them).
    assert first["new_data"] == sorted(["manifest", *(f"train@{m}" for m in params.stack.models)])
    assert not first["summary"]["drift"]
    ran = first["retrain"]["ran"]
    assert set(DATA_STAGES) | {f"train@{m}" for m in params.stack.models} <= set(ran), ran
    train_split = pd.read_csv(copy / "data" / "splits" / "train.csv")
    assert train_split.path.str.contains("/Ad-").any(), "the appended scans reach the training split"
    tags = mlflow.get_run(first["retrain"]["mlflow_parent_run_id"]).data.tags
    assert tags["trigger.reason"] == "new_data" and tags["trigger.new_data_stages"] == str(first["new_data"])
    assert tags["dvc_data_hash"] == appended["dvc_hash"]

    second = monitor_batch(str(incoming), None, str(copy / "params.yaml"))

    assert second["new_data"] == [] and second["retrain"] is None, "nothing retrains on unchanged input"


def test_the_cli_only_parses_flow_monitor(monkeypatch, capsys):
    import flows.monitoring

    calls = []
    monkeypatch.setattr(flows.monitoring, "monitor_batch", lambda *args: calls.append(args) or {"ok": True})
    assert cli.main(["flow", "monitor", "data/incoming/x", "--model-uri", "models:/m@champion"]) == 0
    # The CLI hands over its arguments and the params it parsed (once), nothing else.
    assert [call[:3] for call in calls] == [("data/incoming/x", "models:/m@champion", "params.yaml")]
    assert calls[0][3] == load_params("params.yaml")
    assert cli.main(["flow", "monitor", "data/incoming/x"]) == 0 and calls[-1][1] is None
    assert cli.main(["-S", "monitor.min_scans=5", "flow", "monitor", "data/incoming/x"]) == 1
    assert "does not take overrides" in capsys.readouterr().err
