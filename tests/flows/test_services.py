"""`braintumor services up | down | status` against the real servers: a project-local PostgreSQL (run as the
unprivileged `postgres` user when we are root), MLflow with basic auth on it and Prefect with an auth string on it.

One module-scoped start (random free ports, data under tmp), driven through the CLI as a user would, shared by the
tests below; the last test stops everything and the fixture's teardown makes sure of it."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows import services as svc
from components.config import load_params
from tests.conftest import ROOT, environment

pytestmark = pytest.mark.slow

CLIENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL",
              "PREFECT_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_USERNAME", "BRAINTUMOR_PARENT_RUN_ID",
              "BRAINTUMOR_FLOW_RUN_ID", *svc.SECRET_ENV)
MODEL = "services-test-model"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Team:
    root: Path
    overrides: list[str]
    secrets: dict[str, str]
    first_up: subprocess.CompletedProcess
    first_up_seconds: float

    @property
    def params(self):
        return load_params(ROOT / "params.yaml", self.overrides)

    @property
    def layout(self) -> svc.Layout:
        return svc.layout(self.params.services)

    @property
    def mlflow_url(self) -> str:
        return svc.mlflow_url(self.params.services)

    @property
    def prefect_url(self) -> str:
        return svc.prefect_url(self.params.services)

    @property
    def admin(self) -> tuple[str, str]:
        return "admin", self.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]

    def env(self, **changes: str | None) -> dict[str, str]:
        """The environment of a fresh shell with the team's secrets (minus anything a developer had set)."""
        env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV} | self.secrets
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def cli(self, *args: str, env: dict[str, str] | None = None, overrides: list[str] | None = None):
        command = [sys.executable, "-m", "flows.cli"]
        for override in self.overrides if overrides is None else overrides:
            command += ["-S", override]
        return subprocess.run([*command, "services", *args], cwd=ROOT, env=env or self.env(), capture_output=True,
                              text=True, timeout=600)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    pg, ml, pf = sorted(ports)
    overrides = [f"services.dir={root / 'services'}", f"services.postgres.port={pg}", f"services.mlflow.port={ml}",
                 f"services.prefect.port={pf}", f"services.mlflow.artifacts={root / 'artifacts'}",
                 "services.startup_timeout=240", "services.stop_timeout=30"]
    team_secrets = {"MLFLOW_AUTH_ADMIN_PASSWORD": "adm-" + secrets.token_urlsafe(18),
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
                    "PREFECT_SERVER_API_AUTH_STRING": "team:" + secrets.token_urlsafe(18)}
    team = Team(root, overrides, team_secrets, None, 0.0)
    start = time.perf_counter()
    team.first_up = team.cli("up")
    team.first_up_seconds = time.perf_counter() - start
    try:
        assert team.first_up.returncode == 0, team.first_up.stderr
        yield team
    finally:
        done = team.cli("down")
        assert done.returncode == 0, done.stderr


@contextmanager
def mlflow_as(team: Team, user: str, password: str):
    """This process's MLflow client pointed at the team server as `user` (env credentials, as the pipeline does)."""
    from mlflow.tracking._tracking_service import utils

    saved_uri = utils._tracking_uri
    with environment(MLFLOW_TRACKING_URI=team.mlflow_url, MLFLOW_TRACKING_USERNAME=user,
                     MLFLOW_TRACKING_PASSWORD=password, BRAINTUMOR_PARENT_RUN_ID=None, BRAINTUMOR_FLOW_RUN_ID=None):
        mlflow.set_tracking_uri(team.mlflow_url)
        try:
            yield MlflowClient(team.mlflow_url)
        finally:
            mlflow.set_tracking_uri(saved_uri)


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture(scope="module")
def logged(team, tmp_path_factory):
    """As admin, through components/tracking.py: one run with the pipeline's params and provenance tags, a file
    and a small pyfunc model, registered as MODEL version 1 with @champion."""
    from components import tracking

    previous = Path.cwd()
    os.chdir(ROOT)  # provenance reads git and data/raw.dvc from the repo
    try:
        with mlflow_as(team, *team.admin) as client:
            params = load_params(ROOT / "params.yaml")
            assert tracking.configure(params.tracking) == team.mlflow_url
            with tracking.stage_run(params, "services-check", "services") as run:
                mlflow.log_params(tracking.flatten("", params.model_dump(mode="json", by_alias=True)))
                mlflow.set_tags({"purpose": "team services test", "tracking_uri": tracking.public_uri(
                    os.environ["MLFLOW_TRACKING_URI"])})
                mlflow.log_metric("accuracy", 0.5)
                mlflow.log_dict({"note": "written by the run"}, "notes/run.json")
                info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            version = mlflow.register_model(info.model_uri, MODEL)
            client.set_registered_model_alias(MODEL, "champion", version.version)
            experiment = client.get_experiment_by_name(params.tracking.experiment)
    finally:
        os.chdir(previous)
    return {"run_id": run.info.run_id, "experiment_id": experiment.experiment_id, "version": version.version,
            "model_uri": info.model_uri}


def test_up_prints_how_to_point_the_pipeline_and_no_secret(team):
    out, err = team.first_up.stdout, team.first_up.stderr
    assert f"export MLFLOW_TRACKING_URI={team.mlflow_url}" in out
    assert "export MLFLOW_TRACKING_USERNAME=admin" in out
    assert 'export MLFLOW_TRACKING_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD"' in out
    assert f"export PREFECT_API_URL={team.prefect_url}" in out
    assert 'export PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"' in out
    for secret in team.secrets.values():
        assert secret not in out + err
    print(f"first `services up`: {team.first_up_seconds:.1f} s")


def test_postgres_runs_unprivileged_on_loopback(team):
    data = team.layout.data
    pid = int((data / "postmaster.pid").read_text().split()[0])
    if os.geteuid() == 0:
        assert os.stat(f"/proc/{pid}").st_uid != 0, "PostgreSQL must not run as root"
        assert data.stat().st_uid == os.stat(f"/proc/{pid}").st_uid
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    conf = (data / "braintumor.conf").read_text()
    assert "listen_addresses = '127.0.0.1'" in conf and f"port = {team.params.services.postgres.port}" in conf
    # No password, no connection: the role's password never travels in a URI
    import sqlalchemy

    engine = sqlalchemy.create_engine(svc.database_uri(team.params.services, "mlflow", driver="psycopg2"))
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password"):
        engine.connect()
    engine.dispose()


def test_mlflow_refuses_requests_without_credentials(team):
    search = f"{team.mlflow_url}/api/2.0/mlflow/experiments/search"
    assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
    wrong = ("admin", team.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"] + "x")
    assert requests.get(search, params={"max_results": 1}, auth=wrong, timeout=30).status_code == 401
    artifacts = f"{team.mlflow_url}/api/2.0/mlflow-artifacts/artifacts"
    assert requests.get(artifacts, timeout=30).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=team.admin, timeout=30).status_code == 200


def test_read_only_user_reads_and_loads_but_cannot_register_or_alias(team, logged):
    from mlflow.server import get_app_client

    reader, password = "reader", "rd-" + secrets.token_urlsafe(16)
    with mlflow_as(team, *team.admin):
        get_app_client("basic-auth", tracking_uri=team.mlflow_url).create_user(reader, password)
    with mlflow_as(team, reader, password) as client:
        run = client.get_run(logged["run_id"])
        assert run.data.metrics["accuracy"] == 0.5 and run.data.tags["stage"] == "services"
        assert client.search_runs([logged["experiment_id"]])
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")  # through the served artifacts
        import pandas as pd

        assert model.predict(pd.DataFrame({"x": [1, 2]}))["x"].tolist() == [1, 2]
        for attempt in (lambda: client.create_model_version(MODEL, logged["model_uri"], run_id=logged["run_id"]),
                        lambda: mlflow.register_model(logged["model_uri"], MODEL),
                        lambda: client.set_registered_model_alias(MODEL, "champion", logged["version"]),
                        lambda: client.create_run(logged["experiment_id"])):
            with pytest.raises(MlflowException) as refused:
                attempt()
            assert refused.value.get_http_status_code() == 403, refused.value
        assert client.get_model_version_by_alias(MODEL, "champion").version == logged["version"]
    assert requests.get(f"{team.mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": logged["run_id"]},
                        auth=(reader, password + "x"), timeout=30).status_code == 401


FLOW = """
from prefect import flow

@flow(name="services-check")
def check():
    return 42

assert check() == 42
"""


def test_prefect_api_needs_the_auth_string(team):
    flows = f"{team.prefect_url}/flows/filter"
    assert requests.post(flows, json={}, timeout=30).status_code == 401
    wrong = base64.b64encode(b"team:wrong").decode()
    assert requests.post(flows, json={}, headers={"Authorization": f"Basic {wrong}"}, timeout=30).status_code == 401
    # a flow run the way the pipeline's flows reach the server: PREFECT_API_URL + PREFECT_API_AUTH_STRING
    client_env = team.env(PREFECT_API_URL=team.prefect_url, **{k: None for k in svc.SECRET_ENV})  # a client's shell
    refused = subprocess.run([sys.executable, "-c", FLOW], env=client_env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "401" in refused.stderr
    client_env["PREFECT_API_AUTH_STRING"] = team.secrets["PREFECT_SERVER_API_AUTH_STRING"]
    ran = subprocess.run([sys.executable, "-c", FLOW], env=client_env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    right = base64.b64encode(team.secrets["PREFECT_SERVER_API_AUTH_STRING"].encode()).decode()
    listed = requests.post(flows, json={}, headers={"Authorization": f"Basic {right}"}, timeout=30)
    assert listed.status_code == 200 and "services-check" in {f["name"] for f in listed.json()}


def test_credentials_come_only_from_the_environment(team, logged):
    """No secret in params.yaml, in any run's params or tags, in the servers' logs or files, in what the run
    wrote, or on a server's command line (which `ps` shows every user)."""
    needles = [value.encode() for value in team.secrets.values()]
    params_text = (ROOT / "params.yaml").read_bytes()
    assert not any(n in params_text for n in needles)
    with mlflow_as(team, *team.admin) as client:
        runs = client.search_runs([logged["experiment_id"]])
        assert logged["run_id"] in {r.info.run_id for r in runs}
        for run in runs:
            record = json.dumps({"params": run.data.params, "tags": run.data.tags}).encode()
            assert not any(n in record for n in needles), run.info.run_id
        downloaded = Path(mlflow.artifacts.download_artifacts(run_id=logged["run_id"],
                                                              dst_path=str(team.root / "download")))
    written = [p for folder in (team.layout.root, team.root / "artifacts", downloaded)
               for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in written) and any(p.name == "mlflow.log" for p in written)
    for path in written:  # every log, pid file, generated config, database file and artifact
        content = path.read_bytes()
        assert not any(n in content for n in needles), f"a secret is written in {path}"
    role_password = team.layout.secret.read_text().strip().encode()
    for service in ("mlflow", "prefect"):
        pgid = int(team.layout.pid(service).read_text())
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat_file.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
                cmdline = (stat_file.parent / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            assert not any(n in cmdline for n in [*needles, role_password]), cmdline
    assert oct(team.layout.secret.stat().st_mode & 0o777) == "0o600"


def test_status_and_a_second_up(team):
    before = {s: int(team.layout.pid(s).read_text()) for s in ("mlflow", "prefect")}
    status = team.cli("status")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["problems"] == []
    assert report["postgres"]["running"] and report["postgres"]["address"].endswith(
        f":{team.params.services.postgres.port}")
    assert report["mlflow"] | {"running": True, "answers": True, "url": team.mlflow_url} == report["mlflow"]
    assert report["prefect"] | {"running": True, "answers": True, "url": team.prefect_url} == report["prefect"]
    start = time.perf_counter()
    again = team.cli("up")
    seconds = time.perf_counter() - start
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already running") == 3 and "started" not in again.stderr
    assert {s: int(team.layout.pid(s).read_text()) for s in ("mlflow", "prefect")} == before
    assert f"export MLFLOW_TRACKING_URI={team.mlflow_url}" in again.stdout
    print(f"second `services up`: {seconds:.1f} s")


@pytest.mark.parametrize("password, says", [("short-pw", "has 8 characters"), (None, "is not set")])
def test_up_refuses_a_short_or_missing_admin_password(team, password, says):
    before = {s: int(team.layout.pid(s).read_text()) for s in ("mlflow", "prefect")}
    refused = team.cli("up", env=team.env(MLFLOW_AUTH_ADMIN_PASSWORD=password))
    assert refused.returncode == 1
    assert f"MLFLOW_AUTH_ADMIN_PASSWORD {says}" in refused.stderr and "12" in refused.stderr
    assert "Traceback" not in refused.stderr
    if password:
        assert password not in refused.stderr
    assert {s: int(team.layout.pid(s).read_text()) for s in ("mlflow", "prefect")} == before  # nothing touched


def test_missing_secret_key_and_auth_string_are_named(team, tmp_path):
    refused = team.cli("up", env=team.env(MLFLOW_FLASK_SERVER_SECRET_KEY=None, PREFECT_SERVER_API_AUTH_STRING=None),
                       overrides=[f"services.dir={tmp_path / 'other'}"])
    assert refused.returncode == 1
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY is not set" in refused.stderr
    assert "PREFECT_SERVER_API_AUTH_STRING is not set" in refused.stderr
    assert not (tmp_path / "other").exists()


def test_a_busy_port_fails_before_anything_starts(team, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        overrides = [f"services.dir={tmp_path / 'busy'}", f"services.postgres.port={free_port()}",
                     f"services.mlflow.port={port}", f"services.prefect.port={free_port()}"]
        refused = team.cli("up", overrides=overrides)
    assert refused.returncode == 1
    assert f"MLflow server: port {port} on 127.0.0.1 is in use" in refused.stderr
    assert "-S services.mlflow.port=N" in refused.stderr
    assert not (tmp_path / "busy" / "postgres").exists()


def test_zz_status_names_a_stopped_database_then_down_stops_all(team):
    """Runs last in this module: PostgreSQL stopped under the servers is named with its fix; `down` stops
    everything, frees the ports and is harmless a second time."""
    params = team.params
    assert svc._postgres_down(params.services, team.layout) == "stopped"
    report = json.loads(team.cli("status").stdout)
    assert not report["postgres"]["running"]
    assert any(p.startswith("PostgreSQL is not running") and "run `braintumor services up`" in p
               and str(team.layout.log("postgres")) in p for p in report["problems"])
    down = team.cli("down")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {"prefect": "stopped", "mlflow": "stopped", "postgres": "not running"}
    for port in (params.services.postgres.port, params.services.mlflow.port, params.services.prefect.port):
        assert svc._port_free("127.0.0.1", port), port
    report = json.loads(team.cli("status").stdout)
    assert not any(report[s]["running"] for s in ("postgres", "mlflow", "prefect"))
    assert report["problems"] == ["nothing runs: run `braintumor services up`"]
    again = team.cli("down")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {"prefect": "not running", "mlflow": "not running", "postgres": "not running"}


def test_a_server_found_running_that_exits_before_answering_is_started_again(tmp_path, monkeypatch):
    """`up` right after a server was killed can still see its dying process: it waits for it, and when it is gone,
    starts it instead of failing. A server `up` started itself that exits is an error naming its log."""
    from types import SimpleNamespace

    log = tmp_path / "mlflow.log"
    log.write_text("Traceback: the reason it exited\n")
    layout_ = SimpleNamespace(log=lambda service: log)
    monkeypatch.setattr(svc, "_running", lambda layout_, service: None)  # the process is gone
    services = SimpleNamespace(startup_timeout=30)
    started = []
    answers = iter([False, True])  # not while dying; then the new server answers
    svc._wait_ready(services, layout_, {"mlflow": lambda _: next(answers)},
                    restart={"mlflow": lambda: started.append("mlflow")})
    assert started == ["mlflow"]
    with pytest.raises(svc.ServiceError, match="exited while starting") as failure:
        svc._wait_ready(services, layout_, {"mlflow": lambda _: False})
    assert str(log) in str(failure.value) and "the reason it exited" in str(failure.value)
