"""Faults of the team services and of the flow process, each with what happens and a check that nothing is lost:

1. the MLflow server is down when a training starts, then killed mid-training: a clear error each time naming the
   server and `braintumor services up`; after `up`, the re-run resumes from the saved epoch and logs its model;
2. the Prefect server restarts mid-flow: the run goes on or fails clearly, and a re-run retrains no finished stage;
3. `kill -9` of the flow process mid-stage: the stage's processes stop with it, and the next run takes over the
   lock, saying whose it was, and runs only what did not finish;
4. PostgreSQL is down: `status` and the tracking client name the server and how to start it;
5. the artifact store is full during `register`: a clear error, and no registry version points at a partial model.

Tests 1-4 share one start of the team services (tests/flows/test_services.py's `team` fixture: PostgreSQL, MLflow with
basic auth and Prefect on random ports under tmp); test 4 stops PostgreSQL, so it runs after the others. Test 5
uses a local sqlite store. MLflow's HTTP retries are made small (MLFLOW_HTTP_REQUEST_*), so failures come fast.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import requests

from flows import services as svc
from tests.conftest import ROOT, git_dvc_repo, tiny_overrides
from tests.flows.test_services import mlflow_as, team  # noqa: F401  (`team`: the module-scoped services fixture)

pytestmark = pytest.mark.slow

FAST_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BRAINTUMOR = str(Path(sys.executable).with_name("braintumor"))
TIMINGS: dict[str, float] = {}


def timed(label: str, start: float) -> float:
    TIMINGS[label] = seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s")
    return seconds


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------- 1. MLflow server down / killed

EPOCHS = 6
TRAIN_OVERRIDES = tiny_overrides([f"models.custom_cnn.epochs={EPOCHS}", "train.early_stopping_patience=100"])


def client_env(team, **extra: str) -> dict[str, str]:
    """A training's environment: the team MLflow as admin, fast retries, CPU; none of the servers' secrets."""
    return team.env(MLFLOW_TRACKING_URI=team.mlflow_url, MLFLOW_TRACKING_USERNAME="admin",
                    MLFLOW_TRACKING_PASSWORD=team.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"], CUDA_VISIBLE_DEVICES="",
                    **FAST_RETRIES, **{key: None for key in svc.SECRET_ENV}, **extra)


def train_command() -> list[str]:
    return [BRAINTUMOR, *[arg for o in TRAIN_OVERRIDES for arg in ("-S", o)], "train", "--model", "custom_cnn"]


def assert_names_the_tracking_server(team, stderr: str, why: str) -> None:
    assert f"MLflow tracking server {team.mlflow_url} (MLFLOW_TRACKING_URI) {why}" in stderr, stderr[-3000:]
    assert "`braintumor services up`" in stderr and "`braintumor services status`" in stderr
    assert "Traceback" not in stderr, "a raw traceback instead of the clear message"
    assert team.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"] not in stderr


def test_mlflow_down_at_start_then_killed_mid_training_then_resumed(team, workspace):
    metadata = workspace / ".checkpoints" / "custom_cnn" / "full" / "training_metadata.json"

    def saved_epoch() -> int:
        try:
            return json.loads(metadata.read_text() or "{}").get("epoch", 0)
        except (OSError, ValueError):
            return 0

    # (a) the server is down before the training starts: a clear error, fast, and no epoch trained for nothing
    assert svc.stop_service(team.params, "mlflow") == "stopped"
    start = time.perf_counter()
    refused = subprocess.run(train_command(), cwd=workspace, env=client_env(team), capture_output=True, text=True,
                             timeout=300)
    seconds = timed("1a training against a stopped MLflow server fails", start)
    assert refused.returncode == 1
    assert_names_the_tracking_server(team, refused.stderr, "cannot be reached")
    assert saved_epoch() == 0 and seconds < 120

    # (b) `up` starts it again; it is killed (SIGKILL, all its workers) after the second epoch
    assert team.cli("up").returncode == 0
    start = time.perf_counter()
    with (workspace / "killed.out").open("w") as out, (workspace / "killed.err").open("w") as err:
        training = subprocess.Popen(train_command(), cwd=workspace, env=client_env(team), stdout=out, stderr=err,
                                    start_new_session=True)
    try:
        wait_for(lambda: saved_epoch() >= 2, 240, "the second epoch", training)
        os.killpg(int(team.layout.pid("mlflow").read_text()), signal.SIGKILL)
        training.wait(timeout=180)
    finally:
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
            training.wait()
    stderr = (workspace / "killed.err").read_text()
    timed("1b training until the server is killed, then its failure", start)
    assert training.returncode == 1
    assert_names_the_tracking_server(team, stderr, "cannot be reached")
    saved = saved_epoch()
    assert 2 <= saved < EPOCHS, "the training must stop at the epoch whose metrics it could not send"

    # (c) `up` again; the same command resumes from the saved epoch and finishes with its model in MLflow
    assert team.cli("up").returncode == 0
    start = time.perf_counter()
    resumed = subprocess.run(train_command(), cwd=workspace, env=client_env(team), capture_output=True, text=True,
                             timeout=400)
    timed("1c resumed training, model logged", start)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout[resumed.stdout.rindex('{\n  "model"'):])
    assert result["resumed_from_epoch"] == saved and result["epochs_run"] == EPOCHS

    import pandas as pd
    from mlflow.entities import LoggedModelStatus

    epochs = list(pd.read_csv(workspace / "plots" / "custom_cnn" / "history.csv").epoch)
    assert epochs == list(range(EPOCHS)), "the history holds every epoch once: none retrained, none lost"
    logged = json.loads((workspace / "models" / "custom_cnn" / "mlflow.json").read_text())
    with mlflow_as(team, *team.admin) as client:
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == str(saved)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(saved, EPOCHS))
        assert {"plots/history.png", "plots/confusion_matrix.png"} <= {
            a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        # the killed run keeps what it sent before the server died: every epoch but the one it could not send
        # (or that one too, when the server stored it but died before answering)
        killed = [r for r in client.search_runs([run.info.experiment_id], "attributes.run_name = 'train-custom_cnn'")
                  if r.info.run_id != run.info.run_id]
        assert len(killed) == 1, "the run refused at the start must not exist, the killed one must"
        sent = [m.step for m in client.get_metric_history(killed[0].info.run_id, "loss")]
        assert sent in (list(range(saved - 1)), list(range(saved)))
        assert logged["run_id"] == run.info.run_id
        assert mlflow.get_logged_model(logged["model_id"]).status == LoggedModelStatus.READY
        version = mlflow.register_model(logged["model_uri"], "faults-custom_cnn")
        assert client.get_model_version("faults-custom_cnn", version.version).status == "READY"


# ------------------------------------------------------------------------------------------- toy DVC repo + flow

MAKE = textwrap.dedent("""
    import os, pathlib, sys, time
    name, *inputs = sys.argv[1:]
    with open("runs.log", "a") as log:
        log.write(f"{name} {os.getpid()}\\n")
    if name == "slow":  # runs until the test writes `release`
        pathlib.Path("slow.pid").write_text(str(os.getpid()))
        deadline = time.time() + 150
        while not pathlib.Path("release").exists() and time.time() < deadline:
            time.sleep(0.1)
    pathlib.Path("out").mkdir(exist_ok=True)
    text = "".join(pathlib.Path(p).read_text() for p in inputs)
    pathlib.Path("out", name + ".txt").write_text(name + ":" + text)
""")

# `slow` is a compound command: the shell forks for it, so stopping the shell alone would leave make.py running
DVC_YAML = textwrap.dedent("""
    stages:
      first:
        cmd: python make.py first in.txt
        deps: [make.py, in.txt]
        outs: [out/first.txt]
      slow:
        cmd: python make.py slow out/first.txt && echo slow done
        deps: [make.py, out/first.txt]
        outs: [out/slow.txt]
      last:
        cmd: python make.py last out/slow.txt
        deps: [make.py, out/slow.txt]
        outs: [out/last.txt]
""")

FLOW = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from prefect import flow
    from components.config import load_params
    from flows.dvc_stages import run_lock
    from flows.training import run_generations

    repo = Path(sys.argv[1])
    params = load_params(Path("params.yaml"), ["flow.retries=0"])

    @flow(name="faults-toy")
    def toy():
        with run_lock(60, repo):  # as train_pipeline takes it
            return run_generations(params, repo, dict(os.environ))

    ran, skipped = toy()
    print("RESULT " + json.dumps({"ran": ran, "skipped": skipped}))
""")


def toy_repo(folder: Path) -> Path:
    return git_dvc_repo(folder, {"make.py": MAKE, "dvc.yaml": DVC_YAML, "in.txt": "input\n",
                                 ".gitignore": "runs.log\nslow.pid\nrelease\nlogs/\n"})


def flow_env(team, tmp_path: Path) -> dict[str, str]:
    """A flow's environment: the team Prefect server with the auth string, a private PREFECT_HOME."""
    return team.env(PREFECT_API_URL=team.prefect_url,
                    PREFECT_API_AUTH_STRING=team.secrets["PREFECT_SERVER_API_AUTH_STRING"],
                    PREFECT_HOME=str(tmp_path / "prefect-home"), **{key: None for key in svc.SECRET_ENV})


def start_flow(repo: Path, env: dict[str, str], name: str) -> tuple[subprocess.Popen, Path]:
    out = repo.parent / f"{name}.out"
    handle = out.open("w")
    process = subprocess.Popen([sys.executable, "-c", FLOW, str(repo)], cwd=ROOT, env=env, stdout=handle,
                               stderr=subprocess.STDOUT)
    handle.close()
    return process, out


def flow_result(output: str) -> dict:
    return json.loads(output.rsplit("RESULT ", 1)[1].splitlines()[0])


def stage_runs(repo: Path) -> list[str]:
    return [line.split()[0] for line in (repo / "runs.log").read_text().splitlines()]


def dvc_clean(repo: Path) -> bool:
    done = subprocess.run(["dvc", "status", "--json"], cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(done.stdout or "{}") == {}


# ------------------------------------------------------------------------------ 2. Prefect server restarts mid-flow

def test_prefect_server_restart_mid_flow_then_rerun_retrains_nothing_finished(team, tmp_path):
    repo = toy_repo(tmp_path / "toy")
    env = flow_env(team, tmp_path)
    start = time.perf_counter()
    process, out = start_flow(repo, env, "first-run")
    try:
        wait_for(lambda: (repo / "slow.pid").exists(), 180, "the slow stage to start", process)
        outage = time.perf_counter()
        assert svc.stop_service(team.params, "prefect") == "stopped"
        assert not svc._prefect_ready(team.params.services)
        assert team.cli("up").returncode == 0, "`up` starts the Prefect server again"
        timed("2 Prefect server outage (stop, then `up`)", outage)
        (repo / "release").touch()
        code = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    timed("2 first flow run, across the restart", start)
    output = out.read_text()
    print(f"flow across the Prefect restart: exit {code}")
    if code == 0:  # the client rode out the outage (only its log lines sent during the outage are lost)
        assert flow_result(output) == {"ran": ["first", "slow", "last"], "skipped": []}
        run_id = output.split("/runs/flow-run/", 1)[1].split()[0]
        auth = {"Authorization": "Basic " + base64.b64encode(
            team.secrets["PREFECT_SERVER_API_AUTH_STRING"].encode()).decode()}
        record = requests.get(f"{team.prefect_url}/flow_runs/{run_id}", headers=auth, timeout=30).json()
        assert record["state_type"] == "COMPLETED", "the restarted server holds the run's final state"
        tasks = requests.post(f"{team.prefect_url}/task_runs/filter", headers=auth, timeout=30,
                              json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        assert sorted(t["state_type"] for t in tasks) == ["COMPLETED"] * 3, tasks
    else:  # or it failed, naming the Prefect API it could not reach
        assert team.prefect_url.removesuffix("/api") in output, output[-3000:]

    start = time.perf_counter()
    again = subprocess.run([sys.executable, "-c", FLOW, str(repo)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    timed("2 re-run", start)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    rerun = flow_result(again.stdout)
    assert "first" in rerun["skipped"] and "first" not in rerun["ran"], "a finished stage is never retrained"
    if code == 0:
        assert rerun == {"ran": [], "skipped": ["first", "slow", "last"]}
    assert stage_runs(repo).count("first") == 1 and stage_runs(repo).count("slow") == (1 if code == 0 else 2)
    assert (repo / "out" / "last.txt").read_text() == "last:slow:first:input\n"
    assert dvc_clean(repo)


# ------------------------------------------------------------------------------ 3. kill -9 of the flow mid-stage

def test_kill_9_of_the_flow_stops_its_stage_and_the_next_run_takes_over_the_lock(team, tmp_path):
    repo = toy_repo(tmp_path / "toy")
    env = flow_env(team, tmp_path)
    owner = repo / ".dvc" / "tmp" / "braintumor-flow.owner"
    process, out = start_flow(repo, env, "killed-run")
    try:
        wait_for(lambda: (repo / "slow.pid").exists(), 180, "the slow stage to start", process)
        stage = int((repo / "slow.pid").read_text())
        shell = int(Path(f"/proc/{stage}/stat").read_text().rsplit(")", 1)[1].split()[1])  # make.py's parent
        assert pid_alive(stage) and pid_alive(shell)
        assert owner.read_text().startswith(f"pid {process.pid} on ")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    start = time.perf_counter()
    wait_for(lambda: not pid_alive(stage) and not pid_alive(shell), 30, "the stage's processes to stop")
    timed("3 stage processes gone after kill -9 of the flow", start)
    assert not (repo / "out" / "slow.txt").exists(), "the stage was stopped, not finished"
    assert owner.read_text().startswith(f"pid {process.pid} on "), "kill -9 leaves the owner record behind"

    (repo / "release").touch()
    start = time.perf_counter()
    again = subprocess.run([sys.executable, "-c", FLOW, str(repo)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    timed("3 next run", start)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"taking over the lock of pid {process.pid}, no longer running" in again.stdout + again.stderr
    assert flow_result(again.stdout) == {"ran": ["slow", "last"], "skipped": ["first"]}
    assert stage_runs(repo) == ["first", "slow", "slow", "last"]
    assert not owner.exists() and dvc_clean(repo)


# ------------------------------------------------------------------------------------------- 4. PostgreSQL down

def test_postgres_down_is_named_with_its_fix_and_nothing_is_lost(team, monkeypatch):
    from components import tracking
    from components.config import load_params

    params = load_params(ROOT / "params.yaml")
    with mlflow_as(team, *team.admin) as client:  # something to find again afterwards
        assert tracking.configure(params.tracking) == team.mlflow_url
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        runs_before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}

    assert svc.stop_service(team.params, "postgres") == "stopped"
    report = json.loads(team.cli("status").stdout)
    assert not report["postgres"]["running"] and report["mlflow"]["running"]
    assert any(p.startswith("PostgreSQL is not running") and "`braintumor services up`" in p
               for p in report["problems"]), report["problems"]

    for key, value in FAST_RETRIES.items():
        monkeypatch.setenv(key, value)
    with mlflow_as(team, *team.admin):
        start = time.perf_counter()
        with pytest.raises(tracking.TrackingUnavailable) as refused:
            tracking.configure(params.tracking)
        timed("4 tracking.configure with PostgreSQL down", start)
    message = str(refused.value)
    print(message)
    assert message.startswith(f"MLflow tracking server {team.mlflow_url} (MLFLOW_TRACKING_URI) answered HTTP 5")
    assert "database (PostgreSQL) is down" in message and "`braintumor services up`" in message
    assert team.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"] not in message

    assert team.cli("up").returncode == 0
    with mlflow_as(team, *team.admin) as client:
        assert tracking.configure(params.tracking) == team.mlflow_url
        assert {r.info.run_id for r in client.search_runs([experiment.experiment_id])} == runs_before


# ------------------------------------------------------------------------------ 5. artifact store full at register

def test_artifact_store_full_during_register_leaves_no_version_on_a_partial_model(tmp_path, monkeypatch):
    import keras
    import numpy as np
    import pandas as pd
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from sklearn.linear_model import LogisticRegression

    from components import tracking
    from components.config import load_params
    from components.register import ArtifactStoreFull, run_register
    from components.stack import Stacker, stack_features
    from tests.conftest import CLASSES, class_image

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in ("BRAINTUMOR_PARENT_RUN_ID", "BRAINTUMOR_FLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    params = load_params(ROOT / "params.yaml", [
        f"paths.models={tmp_path / 'models'}", f"paths.splits={tmp_path / 'splits'}",
        f"paths.metrics={tmp_path / 'metrics'}", f"paths.registered={tmp_path / 'registered.json'}",
        "stack.models=[custom_cnn]", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_root={tmp_path / 'artifacts'}"])
    rng = np.random.default_rng(0)
    (tmp_path / "splits").mkdir()
    class_image(0, rng).save(tmp_path / "scan.jpg")
    pd.DataFrame({"path": [str(tmp_path / "scan.jpg")]}).to_csv(tmp_path / "splits" / "test.csv", index=False)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluation.json").write_text("{}\n")
    folder = tmp_path / "models" / "custom_cnn"
    folder.mkdir(parents=True)
    (tmp_path / "models" / "reference").mkdir()  # paths.reference (relative: cwd), logged with the ensemble
    (tmp_path / "models" / "reference" / "reference.json").write_text("{}\n")
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(len(CLASSES), "softmax")])
    model.save(folder / "model.keras")
    features = stack_features({"custom_cnn": rng.dirichlet(np.ones(len(CLASSES)), 40)}, params.stack)
    automl = LogisticRegression(max_iter=200).fit(features, np.arange(40) % len(CLASSES))
    automl.best_estimator = "lr"
    Stacker(automl, ["custom_cnn"], CLASSES, params.stack).save(tmp_path / "models" / "stacker")
    (tmp_path / "models" / "stacker" / "meta.json").write_text('{"best_estimator": "lr"}\n')

    previous_uri = mlflow.get_tracking_uri()
    try:
        tracking.configure(params.tracking)  # the base model, logged as training logs it
        with mlflow.start_run() as run:
            logged = tracking.log_keras_model(model, np.zeros((1, 32, 32, 3), np.float32))
        (folder / "mlflow.json").write_text(json.dumps({"run_id": run.info.run_id, "model_uri": logged.model_uri,
                                                        "model_id": logged.model_id}))
        client = mlflow.MlflowClient()
        names = ["brain-tumor-custom_cnn", "brain-tumor-ensemble"]

        def versions() -> dict[str, list[str]]:
            return {n: sorted(str(v.version) for v in client.search_model_versions(f"name='{n}'")) for n in names}

        original_log_artifacts = LocalArtifactRepository.log_artifacts

        def half_then_full(self, local_dir, artifact_path=None):
            """Writes the first file of the model, then the disk is full."""
            first = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())[0]
            target = Path(self.artifact_dir, artifact_path or "", first.relative_to(local_dir))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

        def full(self, local_file, artifact_path=None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(local_file))

        # (a) the store fills up while the ensemble is written: nothing registered, the partial model is FAILED
        start = time.perf_counter()
        with monkeypatch.context() as patch:
            patch.setattr(LocalArtifactRepository, "log_artifacts", half_then_full)
            patch.setattr(LocalArtifactRepository, "log_artifact", full)
            with pytest.raises(ArtifactStoreFull) as refused:
                run_register(params)
        timed("5a register with the artifact store full", start)
        message = str(refused.value)
        print(message)
        assert message.startswith("the artifact store is full: No space left on device writing ")
        assert str(tmp_path / "artifacts") in message and "Nothing was registered" in message and "`braintumor register` again" in message
        assert versions() == {n: [] for n in names}, "no version may exist after a failed register"
        ensembles = [m for m in mlflow.search_logged_models(output_format="list") if m.name == "ensemble"]
        assert len(ensembles) == 1 and ensembles[0].status == LoggedModelStatus.FAILED
        partial = Path(ensembles[0].artifact_location.removeprefix("file://"))
        assert len([p for p in partial.rglob("*") if p.is_file()]) == 1, "the injected fault wrote a partial model"
        assert not params.paths.registered.exists()

        # (b) space freed: the same command registers both, as version 1
        assert LocalArtifactRepository.log_artifacts is original_log_artifacts
        assert {n: str(v) for n, v in run_register(params)["versions"].items()} == {n: "1" for n in names}

        # (c) full again, at the last write (after the versions were created): they are taken back, the alias too
        with monkeypatch.context() as patch:
            patch.setattr(LocalArtifactRepository, "log_artifact", full)
            with pytest.raises(ArtifactStoreFull):
                run_register(params)
        timed("5 register: full, then free, then full at the last write", start)
        assert versions() == {n: ["1"] for n in names}
        for name in names:
            assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
            source = client.get_model_version(name, "1").source
            assert mlflow.get_logged_model(source.removeprefix("models:/")).status == LoggedModelStatus.READY
    finally:
        mlflow.set_tracking_uri(previous_uri)
