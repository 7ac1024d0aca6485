"""A Ray cluster on one machine that shares nothing but the team's remotes: a head, worker nodes started with
`ray start` (each with resources and a scratch root of its own), a bare git remote, a DVC remote folder and an MLflow
server, all outside the flow's workspace. Used by tests/flows/test_ray_cluster.py and bench/remote.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sh(*command, cwd, env=None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed in {cwd}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def reload_ray_auth() -> None:
    """Make this process read Ray's auth settings (RAY_AUTH_MODE, RAY_AUTH_TOKEN) from its environment again.

    Ray caches them per process (RayConfig, the token loader) the first time it loads them, so a driver that used
    Ray before the cluster's token entered its environment (pytest, after the local-Ray tests) would connect without
    it and be refused. Call it after setting or restoring those variables. Ray's own tests reset the same two caches
    (ray._private.authentication_test_utils.reset_auth_token_state)."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if ray.is_initialized():
        ray.shutdown()
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def wait_until(check, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


class Cluster:
    """The processes of the one-machine cluster, and the folders each side may use."""

    def __init__(self, base: Path):
        self.base = base
        self.head_repo = base / f"head-{uuid.uuid4().hex}" / "repo"  # never passed to a worker
        self.git_remote = base / "remotes" / "code.git"
        self.dvc_remote = base / "remotes" / "dvc"
        self.port = free_port()
        self.mlflow_port = free_port()
        self.token = uuid.uuid4().hex + uuid.uuid4().hex  # Ray's token authentication: every process of it sends this
        self.nodes: dict[str, subprocess.Popen] = {}
        self.scratch: dict[str, Path] = {}
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def node_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BRAINTUMOR_", "RAY_"))}
        return env | {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "MLFLOW_TRACKING_URI": self.tracking_uri,
                      "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "BRAINTUMOR_GPUS": ""} | \
            self.ray_auth() | extra

    def ray_auth(self) -> dict[str, str]:
        """The environment every process of the cluster (nodes and drivers) needs: Ray's token authentication."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start_node(self, name: str, resources: dict[str, float], **env: str) -> None:
        scratch = self.base / "nodes" / name
        scratch.mkdir(parents=True)
        self.scratch[name] = scratch
        command = [str(BIN / "ray"), "start", "--block", f"--address={self.address}", "--num-cpus=1",
                   f"--resources={json.dumps(resources)}", "--disable-usage-stats"]
        self.nodes[name] = subprocess.Popen(command, env=self.node_env(BRAINTUMOR_NODE_SCRATCH=str(scratch), **env),
                                            cwd=scratch, start_new_session=True, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        wait_until(lambda: self.alive_nodes() >= len(self.nodes) + 1, 120, f"node {name} to join")

    def alive_nodes(self) -> int:
        done = subprocess.run([str(BIN / "python"), "-c", (
            "import ray\nray.init(address='%s', logging_level='ERROR')\n"
            "print(sum(1 for n in ray.nodes() if n['Alive']))") % self.address],
            capture_output=True, text=True, env=self.node_env())
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0

    def kill(self, name: str) -> None:
        os.killpg(self.nodes.pop(name).pid, signal.SIGKILL)

    def checkouts(self, name: str, stage: str) -> list[Path]:
        return sorted(p for p in self.scratch[name].glob(f"{stage.replace('@', '-')}-*") if p.is_dir())

    def opened(self, name: str) -> list[str]:
        return [line for record in self.scratch[name].glob("*/.braintumor-audit/opened.txt")
                for line in record.read_text().splitlines()]




    def start(self) -> None:
        """The MLflow server and the Ray head (workers: start_node)."""
        env = self.node_env()
        mlflow_dir = self.base / "mlflow-server"
        mlflow_dir.mkdir(parents=True, exist_ok=True)
        self.processes.append(subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{mlflow_dir}/mlflow.db", "--artifacts-destination",
             str(mlflow_dir / "artifacts")], cwd=mlflow_dir, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.processes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", "--num-cpus=0",
             "--disable-usage-stats", "--include-dashboard=false"], env=env, cwd=self.base, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(lambda: self.alive_nodes() >= 1, 120, "the Ray head")
        wait_until(lambda: answers(self.tracking_uri), 120, "the MLflow server")

    def stop(self) -> None:
        for node in list(self.nodes):
            self.kill(node)
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=self.node_env())


def answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3):
            return True
    except OSError:
        return False


def trimmed_dvc_yaml(root: Path, keep: tuple[str, ...], models: list[str]) -> str:
    """The project's dvc.yaml with only the stages `keep`, and the trainings of `models`."""
    import yaml

    document = yaml.safe_load((root / "dvc.yaml").read_text())
    document["stages"] = {name: stage for name, stage in document["stages"].items() if name in keep}
    document["stages"]["train"]["matrix"]["model"] = models
    return yaml.safe_dump(document, sort_keys=False)


def prepare_head_repo(cluster: Cluster, project: Path, models: list[str], overrides: list[str], data: Path,
                      sample: int | None) -> Path:
    """The flow's repo at cluster.head_repo: the project's code, its dvc.yaml cut to the data stages and the
    trainings of `models`, params with `overrides` and the cluster's Ray address, pushed to the bare git remote,
    with the DVC remote as default and `data` imported (its first `sample` scans per class)."""
    import shutil

    from components.config import write_overrides
    from components.data_import import import_dataset

    repo = cluster.head_repo
    repo.mkdir(parents=True)
    for name in ("params.yaml", ".gitignore", ".dvcignore"):
        if (project / name).exists():
            shutil.copy2(project / name, repo / name)
    for folder in ("components", "flows", "docs/audit"):
        shutil.copytree(project / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "dvc.yaml").write_text(trimmed_dvc_yaml(project, ("manifest", "validate", "split", "style", "train"),
                                                    models))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        sh(*command, cwd=repo)
    sh("git", "init", "-q", "--bare", str(cluster.git_remote), cwd=cluster.base)
    sh("git", "remote", "add", "origin", str(cluster.git_remote), cwd=repo)
    sh("dvc", "remote", "add", "-d", "team", str(cluster.dvc_remote), cwd=repo)
    write_overrides(repo / "params.yaml", [*overrides, "flow.runner=ray", f"flow.ray_address={cluster.address}"])
    for command in (["git", "add", "-A"], ["git", "-c", "user.email=bench@localhost", "-c", "user.name=bench",
                                           "commit", "-qm", "pipeline"], ["git", "push", "-q", "origin", "HEAD:main"]):
        sh(*command, cwd=repo)
    previous = Path.cwd()
    os.chdir(repo)
    try:
        import_dataset(str(data), repo / "data" / "raw", sample=sample)
    finally:
        os.chdir(previous)
    return repo
