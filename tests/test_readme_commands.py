"""The docs' `mlflow` commands, run as written (after the README's set-up export) in a trained tiny workspace: the
UI (docs/pipeline.md) and the model server (docs/registry-serving.md) find the project's store, nothing leaves a
stray ./mlflow.db behind, and the served model answers as the registered model does in process."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import ROOT

def readme_line(pattern: str, page: str = "README.md") -> str:
    """The line of `page` matching `pattern` (anchored at its start), joined with its `\\` continuation lines."""
    match = re.search(rf"^{pattern}.*?(?<!\\)$", (ROOT / page).read_text(), flags=re.MULTILINE | re.DOTALL)
    assert match, f"{page} has no line starting with {pattern!r}"
    return match.group(0)


SET_UP = readme_line("export MLFLOW_TRACKING_URI=")


def wait_for(url: str, seconds: float, process: subprocess.Popen) -> bytes:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            log = process.log_path
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            time.sleep(2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@contextmanager
def background(command: str, cwd):
    log_path = Path(cwd) / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(["bash", "-c", f"{SET_UP}\nexec {command}"], cwd=cwd, start_new_session=True,
                                   stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


@pytest.fixture
def champion_workspace(trained_copy):
    """The trained copy with its ensemble at @champion, and a scan.jpg to post."""
    # Explicit: an earlier mlflow.set_tracking_uri in this process would win over the environment.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained_copy}/mlflow/mlflow.db")
    name = "brain-tumor-ensemble"
    version = client.get_model_version_by_alias(name, "challenger").version
    client.set_registered_model_alias(name, "champion", version)
    first_test_image = pd.read_csv(trained_copy / "data" / "splits" / "test.csv").path.iloc[0]
    shutil.copy2(trained_copy / first_test_image, trained_copy / "scan.jpg")
    return trained_copy


def test_mlflow_ui_as_written_reads_the_project_store(champion_workspace):
    command = readme_line("mlflow ui ", "docs/pipeline.md")
    with background(command, champion_workspace) as server:
        body = wait_for("http://127.0.0.1:5000/ajax-api/2.0/mlflow/registered-models/get"
                        "?name=brain-tumor-ensemble", 240, server)
    assert json.loads(body)["registered_model"]["name"] == "brain-tumor-ensemble"
    assert not (champion_workspace / "mlflow.db").exists(), "the README's command left a stray ./mlflow.db"


def test_mlflow_models_serve_and_curl_as_written_score_a_scan_as_the_process_does(champion_workspace):
    """The docs' serve and curl commands as written; then the same server's answers for a few test scans, posted as
    base64, equal this process's predict_paths on the same registered version."""
    import base64

    import numpy as np
    import requests

    from components.predict import predict_paths

    serve = readme_line("mlflow models serve ", "docs/registry-serving.md")
    curl = readme_line("curl ", "docs/registry-serving.md")
    scans = [str(champion_workspace / p) for p in
             pd.read_csv(champion_workspace / "data" / "splits" / "test.csv").path.iloc[:3]]
    payload = {"dataframe_split": {"columns": ["image"],
                                   "data": [[base64.b64encode(open(p, "rb").read()).decode()] for p in scans]}}
    with background(serve, champion_workspace) as server:
        wait_for("http://127.0.0.1:5001/ping", 420, server)
        done = subprocess.run(["bash", "-c", f"{SET_UP}\n{curl}"], cwd=champion_workspace, capture_output=True,
                              text=True, timeout=120)
        answer = requests.post("http://127.0.0.1:5001/invocations", json=payload, timeout=120)
    predictions = json.loads(done.stdout)["predictions"]
    assert len(predictions) == 1 and predictions[0]["predicted_class"] in {"glioma", "meningioma", "notumor",
                                                                           "pituitary"}
    assert not (champion_workspace / "mlflow.db").exists()
    assert answer.ok, answer.text
    served = pd.DataFrame(answer.json()["predictions"])
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(f"sqlite:///{champion_workspace}/mlflow/mlflow.db"):  # restores the process's own after
        local = predict_paths(scans, "models:/brain-tumor-ensemble@champion")
    assert served.predicted_class.tolist() == local.predicted_class.tolist()
    np.testing.assert_allclose(served.filter(like="prob_").to_numpy(), local.filter(like="prob_").to_numpy(),
                               rtol=1e-5)
