"""train_pipeline end to end on tiny data and a local Ray (the session's `trained_workspace` runs it, twice):
every stage runs, DVC is clean afterwards, MLflow nests every stage under one parent run, Prefect holds the summary,
and a second run with nothing changed trains nothing."""

import json

import mlflow
import pytest

from components import tracking
from tests.conftest import TRAINED_EXTRA, tiny_params

from flows.dvc_stages import pipeline_generations

# The stages every run must include, whatever else dvc.yaml holds; the `stages` fixture reads all of dvc.yaml's.
CORE_STAGES = {"manifest", "validate", "split", "style", "train@custom_cnn", "train@mobilenetv2", "train@densenet169",
               "train@resnet50", "stack", "evaluate", "audit", "reference", "register"}


@pytest.fixture
def runs(in_trained) -> dict:
    return json.loads((in_trained / "flow_runs.json").read_text())


@pytest.fixture
def stages(in_trained) -> list[str]:
    return [spec.name for generation in pipeline_generations(in_trained) for spec in generation]


def test_first_run_ran_every_stage_on_ray_and_left_dvc_clean(runs, stages):
    assert CORE_STAGES <= set(stages)
    assert sorted(runs["first"]["ran"]) == sorted(stages)
    assert runs["dvc_status_after_first"] == {}, "dvc status must be clean after the flow"


def test_second_run_with_nothing_changed_trains_nothing_and_is_fast(runs, stages):
    assert runs["second"]["ran"] == []
    assert sorted(runs["second"]["skipped"]) == sorted(stages)
    assert runs["second"]["seconds"] < 0.25 * runs["first"]["seconds"], runs


def test_every_stage_is_a_child_of_the_flow_parent_run(in_trained, runs):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    tracking.configure(params.tracking)
    parent_id = runs["first"]["mlflow_parent_run_id"]
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect_flow_run_id"]
    children = mlflow.search_runs(search_all_experiments=True,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")
    names = sorted(run.info.run_name for run in children)
    assert set(names) >= {f"train-{m}" for m in params.stack.models} | {"stack", "evaluate", "audit", "register"}
    assert len(names) == len(set(names)), "one run per stage"
    assert all(run.data.tags["prefect_flow_run_id"] == parent.data.tags["prefect_flow_run_id"] for run in children)


def test_prefect_holds_the_summary_artifact_of_the_run(in_trained, runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    tracking.configure(tiny_params(in_trained, TRAINED_EXTRA).tracking)
    parent = mlflow.get_run(runs["first"]["mlflow_parent_run_id"])
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["train-pipeline-summary"])))
    flow_run_ids = {str(a.flow_run_id) for a in artifacts}
    assert parent.data.tags["prefect_flow_run_id"] in flow_run_ids
    summary = next(a for a in artifacts if str(a.flow_run_id) == parent.data.tags["prefect_flow_run_id"])
    assert "| stack |" in summary.data and "models:/brain-tumor-ensemble/" in summary.data
