"""train_pipeline wiring on the CPU: the device scheduler with fake GPU ids, retries and failure reports, the
scheduled deployment, and the concurrent-run lock. Trainings are replaced by a recorder process."""

import json
import sys
import textwrap
import threading
import time

import pytest
from prefect import flow

import flows.training as training
from components.devices import DeviceSlots, process_env, resolve_gpus
from flows.dvc_sync import ConcurrentRun, run_lock
from tests.conftest import ROOT, tiny_params

RECORDER = textwrap.dedent("""
    import json, os, sys, time
    model, out = sys.argv[1], sys.argv[2]
    attempt_file = os.path.join(out, model + ".attempts")
    attempts = int(open(attempt_file).read()) + 1 if os.path.exists(attempt_file) else 1
    open(attempt_file, "w").write(str(attempts))
    start = time.time()
    time.sleep(0.6)
    with open(os.path.join(out, model + "-" + str(attempts) + ".json"), "w") as f:
        json.dump({"model": model, "device": os.environ["CUDA_VISIBLE_DEVICES"], "start": start,
                   "end": time.time(), "parent": os.environ.get("BRAINTUMOR_PARENT_RUN_ID")}, f)
    if model in os.environ.get("FAIL_MODELS", "").split(","):
        print("boom: out of memory in", model)
        sys.exit(3)
""")


@pytest.fixture
def fake_trainings(tmp_path, monkeypatch):
    """Trainings become a recorder process; DVC is told every stage needs running and commits are no-ops."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setattr(training, "training_command", lambda model: [sys.executable, str(script), model,
                                                                     str(records)])
    monkeypatch.setattr(training, "stage_up_to_date", lambda stage, root: False)
    monkeypatch.setattr(training, "commit", lambda stage, root: None)
    return records


def run_trainings(params, root):
    @flow
    def only_trainings():
        futures = training.submit_trainings(params, root, {"BRAINTUMOR_PARENT_RUN_ID": "parent-123"})
        return [f.result(raise_on_failure=False) for f in futures]

    return only_trainings.with_options(task_runner=training.task_runner(params))()


def test_fake_gpus_are_never_shared_and_never_oversubscribed(prefect_harness, fake_trainings, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("BRAINTUMOR_GPUS", "0,1")
    params = tiny_params(ROOT, ["flow.retries=0"])
    outcomes = run_trainings(params, tmp_path)
    assert all(o["ran"] for o in outcomes)
    records = [json.loads(p.read_text()) for p in fake_trainings.glob("*.json")]
    assert sorted(r["model"] for r in records) == sorted(params.stack.models)
    assert {r["device"] for r in records} <= {"0", "1"} and all(r["parent"] == "parent-123" for r in records)
    for r in records:
        overlapping = [o for o in records if o is not r and o["start"] < r["end"] and r["start"] < o["end"]]
        assert len(overlapping) <= 1, "more trainings at once than GPUs"
        assert all(o["device"] != r["device"] for o in overlapping), "two trainings shared a GPU"
    assert max(len([o for o in records if o["start"] <= r["start"] < o["end"]]) for r in records) == 2


def test_cpu_slots_come_from_params(monkeypatch):
    monkeypatch.setenv("BRAINTUMOR_GPUS", "")
    params = tiny_params(ROOT)
    assert resolve_gpus(params.devices) == []
    slots = DeviceSlots([], params.devices.cpu_concurrency)
    assert slots.capacity == 1
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
    monkeypatch.setenv("BRAINTUMOR_GPUS", "")
    monkeypatch.setenv("FAIL_MODELS", "densenet169")
    params = tiny_params(ROOT, ["flow.retries=1", "flow.retry_delay_seconds=0", "devices.cpu_concurrency=2"])
    outcomes = run_trainings(params, tmp_path)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failures) == 1
    message = str(failures[0])
    assert "train@densenet169 failed (exit 3)" in message and "boom: out of memory in densenet169" in message
    assert (fake_trainings / "densenet169.attempts").read_text() == "2"
    for model in ("custom_cnn", "mobilenetv2", "resnet50"):
        assert (fake_trainings / f"{model}-1.json").exists(), f"{model} must finish despite the failure"


def test_deployment_has_the_weekly_schedule_and_parameters():
    from flows.deploy import DEPLOYMENT, build_deployment

    deployment = build_deployment(str(ROOT / "params.yaml"))
    params = tiny_params(ROOT)
    assert deployment.name == DEPLOYMENT
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == params.flow.cron == "0 3 * * 1" and schedule.timezone == "UTC"
    assert deployment.parameters["params_path"].endswith("params.yaml")
    assert deployment.parameters["promote_champion"] is False


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
