"""The whole pipeline against the team services, as a team member runs it: data -> train -> register -> promote
-> serve, with nothing but the environment `braintumor services up` tells them to export.

One module-scoped start of the real servers (tests/flows/test_services.py's `team` fixture: PostgreSQL, MLflow with basic
auth and Prefect with an auth string, on random ports under tmp). In a throwaway git + DVC repo with tiny generated
data (32 px, one epoch per model, eager; custom_cnn and MobileNetV2 only): `braintumor data import`, then `braintumor -S ... flow train --promote`
reporting to the team Prefect server and logging to the team MLflow server. Then the registry on the server must
hold brain-tumor-ensemble@champion, and `mlflow models serve -m models:/brain-tumor-ensemble@champion` (credentials
in its environment) must answer a base64 image."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from flows import services as svc
from tests.conftest import CLASSES, TRAINED_EXTRA, init_repo, keep_models, tiny_overrides, write_tiny_dataset
from tests.flows.test_services import mlflow_as, team  # noqa: F401  (`team`: the module-scoped services fixture)

pytestmark = pytest.mark.slow

ENSEMBLE = "brain-tumor-ensemble"
# Two of the four architectures: the chain is the same for any ensemble, and the heavy two would add ~300 MB of
# uploads to the server (trainings, then the registered ensemble) and downloads to serve it.
TEAM_MODELS = ["custom_cnn", "mobilenetv2"]
CHAMPION = f"models:/{ENSEMBLE}@champion"
BIN = Path(sys.executable).parent
TIMINGS: dict[str, float] = {}


def timed(label: str, start: float) -> None:
    TIMINGS[label] = time.perf_counter() - start
    print(f"{label}: {TIMINGS[label]:.1f} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def member_env(team, tmp: Path, **changes: str | None) -> dict[str, str]:
    """A team member's shell after `eval "$(braintumor services up)"`: the servers and their credentials, a private
    PREFECT_HOME, the CPU; none of the servers' own secrets."""
    return team.env(MLFLOW_TRACKING_URI=team.mlflow_url, MLFLOW_TRACKING_USERNAME="admin",
                    MLFLOW_TRACKING_PASSWORD=team.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"],
                    PREFECT_API_URL=team.prefect_url,
                    PREFECT_API_AUTH_STRING=team.secrets["PREFECT_SERVER_API_AUTH_STRING"],
                    PREFECT_HOME=str(tmp / "prefect-home"), CUDA_VISIBLE_DEVICES="", BRAINTUMOR_GPUS="",
                    PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
                    **{key: None for key in svc.SECRET_ENV}) | {k: v for k, v in changes.items() if v is not None}


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command[:6])} ... failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def pipeline(team, tmp_path_factory) -> dict:
    """The tiny pipeline run end to end on the team servers; returns the repo, its env and the flow's result."""
    work = tmp_path_factory.mktemp("team-pipeline")
    repo = init_repo(work / "repo")
    ensemble = keep_models(repo, TEAM_MODELS)
    env = member_env(team, work)
    start = time.perf_counter()
    run([str(BIN / "braintumor"), "data", "import", "--source",
         str(write_tiny_dataset(work / "tiny", {"Training": 12, "Testing": 4}))], repo, env, 300)
    timed("data import", start)
    # two tiny trainings at a time: they are mostly Python overhead, so the 2-core machine runs them side by side
    overrides = [arg for o in tiny_overrides(TRAINED_EXTRA + ensemble + ["devices.cpu_concurrency=2"])
                 for arg in ("-S", o)]
    start = time.perf_counter()
    flow = run([str(BIN / "braintumor"), *overrides, "flow", "train", "--promote"], repo, env, 900)
    timed("flow train --promote (tiny, team servers)", start)
    result = json.loads(flow.stdout[flow.stdout.rindex('{\n  "ran"'):])
    return {"repo": repo, "env": env, "work": work, "result": result}


def test_flow_trains_registers_and_promotes_on_the_team_servers(team, pipeline):
    result, repo = pipeline["result"], pipeline["repo"]
    assert {*(f"train@{m}" for m in TEAM_MODELS), "stack", "evaluate", "register"} <= set(result["ran"]), result
    assert '"decision": "promoted"' in (result["promotion"] or ""), result["promotion"]
    assert not (repo / "mlflow" / "mlflow.db").exists(), "the pipeline wrote to a local store, not the server"
    registered = json.loads((repo / "reports" / "registered.json").read_text())
    with mlflow_as(team, *team.admin) as client:
        champion = client.get_model_version_by_alias(ENSEMBLE, "champion")
        assert champion.version == str(registered["versions"][ENSEMBLE])
        assert champion.status == "READY"
        assert {"git_commit", "prefect_flow_run_id"} <= set(champion.tags), champion.tags
        run_ = client.get_run(champion.run_id)  # the run that logged it lives on the server
        assert run_.info.status == "FINISHED"
        parent = client.get_run(result["mlflow_parent_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["prefect_flow_run_id"] == \
            champion.tags["prefect_flow_run_id"]
        trainings = client.search_runs([parent.info.experiment_id],
                                       f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {f"train-{m}" for m in TEAM_MODELS} <= {r.info.run_name for r in trainings}
    # the flow run is on the team Prefect server, completed
    auth = base64.b64encode(team.secrets["PREFECT_SERVER_API_AUTH_STRING"].encode()).decode()
    answer = requests.post(f"{team.prefect_url}/flow_runs/filter", json={"flow_runs": {"id": {"any_": [
        champion.tags["prefect_flow_run_id"]]}}}, headers={"Authorization": f"Basic {auth}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert [(r["name"] != "", r["state_type"]) for r in answer.json()] == [(True, "COMPLETED")]


def test_the_served_champion_answers_a_base64_image(team, pipeline):
    repo, work = pipeline["repo"], pipeline["work"]
    image = sorted((repo / "data" / "raw" / "Testing" / "glioma").glob("*.jpg"))[0]
    port = free_port()
    log = work / "model-server.log"
    start = time.perf_counter()
    with log.open("w") as handle:  # the member's env: the registry's credentials, nothing else
        server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port)], cwd=work, env=pipeline["env"],
                                  stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-5000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"the model server did not answer:\n{log.read_text()[-5000:]}"
            time.sleep(0.5)
        timed("mlflow models serve @champion ready", start)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        [prediction] = answer.json()["predictions"]
        assert prediction["predicted_class"] in CLASSES
        assert abs(sum(prediction[f"prob_{c}"] for c in CLASSES) - 1) < 1e-6
        refused = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                                json={"dataframe_split": {"columns": ["image"], "data": [[str(image)]]}})
        assert refused.status_code == 400 and "does not read file paths" in refused.text
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(30)
    secret_text = log.read_text()
    assert not any(secret in secret_text for secret in team.secrets.values())
