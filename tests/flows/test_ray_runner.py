"""`flow.runner: ray` builds prefect-ray's RayTaskRunner; a flow's tasks run on a local CPU Ray."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from prefect import flow, task

import flows.training as training
from tests.conftest import ROOT, TRAINED_AND_RAY, tiny_params

pytestmark = TRAINED_AND_RAY  # starts Ray: see tests/conftest.py


@task
def where_am_i() -> int:
    return os.getpid()


@pytest.fixture
def stale_ray_cluster(monkeypatch):
    """Ray's temp dir naming a cluster that `ray start` left behind and that is long gone."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (ray_tmp / "ray").mkdir()  # Ray's own folder under RAY_TMPDIR
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    yield ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(300)  # joining the stale cluster would wait for its GCS until this fails (about 30 s otherwise)
def test_ray_runner_runs_tasks_in_ray_workers(prefect_harness, monkeypatch, stale_ray_cluster):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # no address: the flow starts its own Ray, whatever Ray finds
    params = tiny_params(ROOT, ["flow.runner=ray"])
    runner = training.task_runner(params)
    assert type(runner).__name__ == "RayTaskRunner"

    @flow(task_runner=runner)
    def on_ray():
        from prefect_ray.context import remote_options

        with remote_options(num_cpus=1, num_gpus=0):
            return [f.result() for f in [where_am_i.submit(), where_am_i.submit()]]

    pids = on_ray()
    assert pids and all(pid != os.getpid() for pid in pids), "tasks ran in Ray worker processes"
