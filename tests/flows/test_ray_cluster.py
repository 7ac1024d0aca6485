"""Many machines that share nothing but the team's remotes, on one machine: a Ray head and two worker nodes started
with `ray start`, each worker with the custom resource `trainer` and a scratch root of its own, a bare git remote, a
DVC remote folder and an MLflow server, all outside every workspace. The flow's repo lies at a path the workers are
never told; every process a stage starts on a node records the files it opens (flows.remote's audit hook).

The trainings land on different workers, reach the head only through the remotes, and the flow commits both; a
second run does nothing. Faults: a worker killed mid-training (Ray re-runs the stage on the other node, and the result
is the model of the uninterrupted run), and a worker that cannot reach the DVC remote (a clear error naming the remote
and the stage, nothing committed)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from bench.cluster import BIN, Cluster, prepare_head_repo, reload_ray_auth, sh, wait_until
from tests.conftest import ROOT, TRAINED_AND_RAY, TRAINED_EXTRA, environment, tiny_overrides, write_tiny_dataset

pytestmark = TRAINED_AND_RAY  # starts Ray: see tests/conftest.py

MODELS = ["custom_cnn", "mobilenetv2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_harness):
    base = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(base)
    try:
        cluster.start()
        for name in ("a", "b"):
            cluster.start_node(name, {"trainer": 1})

        prepare_head_repo(cluster, ROOT, MODELS, tiny_overrides(TRAINED_EXTRA + [
            "flow.ray_stage_resources={trainer: 1}", "flow.retries=0", "flow.ray_node_retries=2"]),
            write_tiny_dataset(base / "tiny", {"Training": 12, "Testing": 4}), None)
        yield cluster
    finally:
        cluster.stop()


def run_flow(cluster: Cluster, overrides: list[str] | None = None) -> dict:
    from flows.training import run_with_runner

    previous = Path.cwd()
    os.chdir(cluster.head_repo)
    try:
        with environment(MLFLOW_TRACKING_URI=cluster.tracking_uri, RAY_ADDRESS=None, **cluster.ray_auth()):
            reload_ray_auth()  # this pytest process may have used Ray (without the token) in an earlier test
            return run_with_runner(str(cluster.head_repo / "params.yaml"), overrides)
    finally:
        reload_ray_auth()  # and later tests' local Ray runs without it
        os.chdir(previous)


def lock_entry(cluster: Cluster, stage: str) -> dict:
    return yaml.safe_load((cluster.head_repo / "dvc.lock").read_text())["stages"][stage]


def outs_hash(entry: dict, path: str) -> str:
    return next(out["md5"] for out in entry["outs"] if out["path"] == path)


@pytest.fixture(scope="module")
def first_runs(cluster):
    first = run_flow(cluster)
    status = sh(str(BIN / "dvc"), "status", "--json", cwd=cluster.head_repo)
    second = run_flow(cluster)
    return {"first": first, "status": json.loads(status or "{}"), "second": second}


def test_two_trainings_land_on_different_workers_and_the_flow_commits_both(cluster, first_runs):
    assert {f"train@{m}" for m in MODELS} <= set(first_runs["first"]["ran"])
    where = {m: [name for name in ("a", "b") if cluster.checkouts(name, f"train@{m}")] for m in MODELS}
    assert all(len(nodes) == 1 for nodes in where.values()), where
    assert where["custom_cnn"] != where["mobilenetv2"], "one training per worker (each has one `trainer`)"
    for model in MODELS:
        entry = lock_entry(cluster, f"train@{model}")
        assert (cluster.head_repo / "models" / model / "model.keras").exists()
        assert json.loads((cluster.head_repo / "metrics" / f"{model}.json").read_text())["val"]["accuracy"] >= 0
        assert outs_hash(entry, f"predictions/{model}")


def test_dvc_status_is_clean_and_a_second_run_does_nothing(first_runs):
    assert first_runs["status"] == {}, first_runs["status"]
    assert first_runs["second"]["ran"] == []


def test_no_worker_opened_a_file_of_the_flows_workspace(cluster, first_runs):
    head = str(cluster.head_repo.parent)
    for name in ("a", "b"):
        opened = cluster.opened(name)
        assert any("/components/" in path for path in opened), "the audit hook recorded the stage's imports"
        assert not [path for path in opened if path.startswith(head)], f"node {name} opened the flow's files"


def test_a_worker_killed_mid_training_is_retried_on_the_other_and_gives_the_same_model(cluster, first_runs):
    uninterrupted = outs_hash(lock_entry(cluster, "train@custom_cnn"), "predictions/custom_cnn")
    shutil.rmtree(cluster.head_repo / "predictions" / "custom_cnn")  # the stage is stale again, nothing else
    before = {name: set(cluster.checkouts(name, "train@custom_cnn")) for name in cluster.nodes}
    outcome = {}
    flow = threading.Thread(target=lambda: outcome.update(result=run_flow(cluster)), daemon=True)
    flow.start()

    def training_node():
        for name in list(cluster.nodes):
            for checkout in set(cluster.checkouts(name, "train@custom_cnn")) - before[name]:
                log = checkout / "logs" / "train-custom_cnn.log"
                if log.exists() and "training and" in log.read_text(errors="replace"):
                    return name
        return None

    victim = wait_until(training_node, 600, "custom_cnn to start training on a worker")
    cluster.kill(victim)
    flow.join(timeout=900)
    assert not flow.is_alive(), "the flow finished after the node died"
    assert "train@custom_cnn" in outcome["result"]["ran"]
    (survivor,) = [name for name in cluster.nodes if name != victim]
    assert set(cluster.checkouts(survivor, "train@custom_cnn")) - before[survivor], "re-run on the other node"
    retried = outs_hash(lock_entry(cluster, "train@custom_cnn"), "predictions/custom_cnn")
    assert retried == uninterrupted, "train.deterministic: the retried training gives the uninterrupted one's model"


def test_a_worker_that_cannot_reach_the_dvc_remote_fails_clearly_and_commits_nothing(cluster, first_runs):
    from flows.training import StageFailed

    unreachable = str(cluster.base / "no-such-remote")
    cluster.start_node("c", {"isolated": 1}, BRAINTUMOR_DVC_REMOTE_URL=unreachable)
    shutil.rmtree(cluster.head_repo / "predictions" / "mobilenetv2")
    lock_before = (cluster.head_repo / "dvc.lock").read_text()
    with pytest.raises(StageFailed) as failure:
        run_flow(cluster, ["flow.ray_stage_resources={isolated: 1}"])
    message = str(failure.value)
    assert "train@mobilenetv2" in message and unreachable in message and "nothing was run or committed" in message
    assert (cluster.head_repo / "dvc.lock").read_text() == lock_before, "nothing half-written is committed"
