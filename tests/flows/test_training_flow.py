"""train_pipeline wiring on the CPU: the device scheduler with fake GPU ids, retries and failure reports, the
scheduled deployment, and the concurrent-run lock. Trainings are replaced by a recorder process."""

import json
import sys
import textwrap
import threading
import time

import os
from pathlib import Path

import pytest
from prefect import flow

import flows.training as training
from components.config import write_overrides
from components.devices import DeviceSlots, process_env, resolve_gpus
from flows.dvc_stages import ConcurrentRun, StageSpec, run_lock
from tests.conftest import ROOT, TRAINED_AND_RAY, tiny_params

pytestmark = TRAINED_AND_RAY  # starts Ray: see tests/conftest.py

RECORDER = textwrap.dedent("""
    import json, os, sys, time
    model, out = sys.argv[1], sys.argv[2]
    attempt_file = os.path.join(out, model + ".attempts")
    attempts = int(open(attempt_file).read()) + 1 if os.path.exists(attempt_file) else 1
    open(attempt_file, "w").write(str(attempts))
    start = time.time()
    time.sleep(0.6)
    with open(os.path.join(out, model + "-" + str(attempts) + ".json"), "w") as f:
        json.dump({"model": model, "device": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), "start": start,
                   "end": time.time(), "parent": os.environ.get("BRAINTUMOR_PARENT_RUN_ID")}, f)
    if model in os.environ.get("FAIL_MODELS", "").split(","):
        print("boom: out of memory in", model)
        sys.exit(3)
""")


@pytest.fixture
def fake_trainings(tmp_path):
    """Four `train@<model>` stages whose command is a recorder process (what the flow runs is dvc.yaml's cmd)."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    records = tmp_path / "records"
    records.mkdir()
    return records, [StageSpec(f"train@{model}", f"{sys.executable} {script} {model} {records}", Path("."))
                     for model in ("custom_cnn", "mobilenetv2", "densenet169", "resnet50")]


def run_trainings(params, root, specs):
    @flow
    def only_trainings():
        futures = training.submit_generation(specs, params, root, {**os.environ,
                                                                   "BRAINTUMOR_PARENT_RUN_ID": "parent-123"})
        return [f.result(raise_on_failure=False) for f in futures]

    return only_trainings.with_options(task_runner=training.task_runner(params))()


def test_fake_gpus_are_never_shared_and_never_oversubscribed(prefect_harness, fake_trainings, tmp_path,
                                                             monkeypatch):
    records_dir, specs = fake_trainings
    monkeypatch.setenv("BRAINTUMOR_GPUS", "0,1")
    params = tiny_params(ROOT, ["flow.retries=0"])
    outcomes = run_trainings(params, tmp_path, specs)
    assert sorted(o["stage"] for o in outcomes) == sorted(s.name for s in specs)
    records = [json.loads(p.read_text()) for p in records_dir.glob("*.json")]
    assert sorted(r["model"] for r in records) == sorted(s.name.split("@")[1] for s in specs)
    assert {r["device"] for r in records} <= {"0", "1"} and all(r["parent"] == "parent-123" for r in records)
    for r in records:
        overlapping = [o for o in records if o is not r and o["start"] < r["end"] and r["start"] < o["end"]]
        assert all(o["device"] != r["device"] for o in overlapping), "two trainings shared a GPU"
    # At every training's start, how many run: never more than the two GPUs, and both GPUs get used at once.
    running = [len([o for o in records if o["start"] <= r["start"] < o["end"]]) for r in records]
    assert max(running) == 2, running


def test_stages_outside_device_stages_take_no_device_slot(prefect_harness, fake_trainings, tmp_path, monkeypatch):
    records_dir, specs = fake_trainings
    monkeypatch.setenv("BRAINTUMOR_GPUS", "5")
    params = tiny_params(ROOT, ["flow.retries=0", "flow.device_stages=[]"])
    run_trainings(params, tmp_path, specs)
    records = [json.loads(p.read_text()) for p in records_dir.glob("*.json")]
    assert len(records) == 4 and all(r["device"] == "unset" for r in records), records


def test_cpu_slots_come_from_params(monkeypatch):
    monkeypatch.setenv("BRAINTUMOR_GPUS", "")
    params = tiny_params(ROOT, ["devices.cpu_concurrency=3"])
    assert resolve_gpus(params.devices) == []
    assert DeviceSlots([], params.devices.cpu_concurrency).capacity == 3
    assert DeviceSlots([4, 6], params.devices.cpu_concurrency).capacity == 2, "with GPUs, one slot per GPU"
    assert process_env(None, {})["CUDA_VISIBLE_DEVICES"] == ""
    assert process_env(3, {})["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("BRAINTUMOR_GPUS", "0,x")
    with pytest.raises(ValueError, match="BRAINTUMOR_GPUS"):
        resolve_gpus(params.devices)


def test_slots_block_until_a_device_is_free():
    slots, active, peak = DeviceSlots([7]), [], []

    def work():
        with slots.acquire() as device:
            active.append(device)
            peak.append(len(active))
            time.sleep(0.05)
            active.remove(device)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert max(peak) == 1


def test_failed_training_is_retried_then_reported_while_others_finish(prefect_harness, fake_trainings, tmp_path,
                                                                       monkeypatch):
    records_dir, specs = fake_trainings
    monkeypatch.setenv("BRAINTUMOR_GPUS", "")
    monkeypatch.setenv("FAIL_MODELS", "densenet169")
    params = tiny_params(ROOT, ["flow.retries=1", "flow.retry_delay_seconds=0", "devices.cpu_concurrency=2"])
    outcomes = run_trainings(params, tmp_path, specs)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failures) == 1
    message = str(failures[0])
    assert "train@densenet169 failed (exit 3)" in message and "boom: out of memory in densenet169" in message
    assert (records_dir / "densenet169.attempts").read_text() == str(1 + params.flow.retries)
    for model in ("custom_cnn", "mobilenetv2", "resnet50"):
        assert (records_dir / f"{model}-1.json").exists(), f"{model} must finish despite the failure"


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_deployment_takes_schedule_parameters_and_task_runner_from_params(tmp_path, monkeypatch, runner):
    import flows.deploy as deploy

    params_path = tmp_path / "params.yaml"
    params_path.write_text((ROOT / "params.yaml").read_text())
    write_overrides(params_path, ['flow.cron="17 5 * * 3"', "flow.timezone=Europe/Paris", "flow.promote=true",
                                  f"flow.runner={runner}"])
    built = []
    monkeypatch.setattr(deploy, "configured_flow", lambda params: built.append(training.configured_flow(params))
                        or built[-1])
    deployment = deploy.build_deployment(str(params_path))
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("17 5 * * 3", "Europe/Paris")
    assert deployment.parameters == {"params_path": str(params_path), "params_overrides": [],
                                     "promote_champion": True}
    expected = "RayTaskRunner" if runner == "ray" else "ThreadPoolTaskRunner"
    assert [type(f.task_runner).__name__ for f in built] == [expected]


def test_overrides_wait_for_the_lock_of_a_running_flow(prefect_harness, tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text((ROOT / "params.yaml").read_text())
    write_overrides(params_path, ["flow.lock_timeout=0.5"])
    before = params_path.read_text()
    with run_lock(5, tmp_path):
        with pytest.raises(ConcurrentRun):
            training.train_pipeline(str(params_path), ["models.resnet50.epochs=99"])
    assert params_path.read_text() == before, "a waiting run must not change params under the running one"


def test_concurrent_runs_are_serialised_with_a_clear_message(tmp_path):
    with run_lock(5, tmp_path):
        with pytest.raises(ConcurrentRun, match="another train_pipeline run holds .*flow.lock_timeout"):
            with run_lock(0.2, tmp_path):
                pass
    released = []

    def second():
        with run_lock(10, tmp_path):
            released.append(time.time())

    with run_lock(5, tmp_path):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        held_until = time.time()
    waiter.join()
    assert released and released[0] >= held_until, "the second run waited for the first"
