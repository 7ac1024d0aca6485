"""`flow.runner: ray` builds prefect-ray's RayTaskRunner; a flow's tasks run on a local CPU Ray."""

import os

from prefect import flow, task

import flows.training as training
from tests.conftest import ROOT, tiny_params


@task
def where_am_i() -> int:
    return os.getpid()


def test_ray_runner_runs_tasks_in_ray_workers(prefect_harness, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
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
