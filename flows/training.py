"""`train_pipeline`: DVC's pipeline run by Prefect 3.

The flow holds no copy of the pipeline. The stages, their order and their commands come from `dvc.yaml`
(flows.dvc_stages); each task runs one stage's own `cmd` in a subprocess, exactly as `dvc repro` would, so a
long-lived `braintumor flow serve` always runs today's code. Stages of one generation (the four trainings) run in
parallel, each training on its own device slot. A stage `dvc status` reports up to date is skipped; a stage that
ran is committed to dvc.lock once its dependencies are checked unchanged, so afterwards `dvc status` is clean.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from components import tracking
from components.config import Params, ProjectError, load_params, write_overrides
from components.devices import DeviceSlots, process_env, resolve_gpus
from flows.remote import (
    NodeCheckout,
    SharedWorkspace,
    audit_env,
    is_tracking_server,
    dvc_remote_url,
    finish_checkout,
    land,
    node_checkout,
    opened_paths,
    prepare_checkout,
    push_inputs,
    run_commit,
    tracked_dependencies,
)
from flows.dvc_stages import (
    StageSpec,
    commit_unchanged,
    dependency_fingerprints,
    pipeline_generations,
    run_lock,
    stale_stages,
)


class StageFailed(ProjectError):
    pass


relay = logging.getLogger("flows.stages")  # the stages' own console lines, passed on to the flow's console
CONSOLE_LINE = re.compile(r"\d\d:\d\d:\d\d \S+: ")


def log_tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stage_environment(base: dict[str, str]) -> dict[str, str]:
    """The stage's environment, with this interpreter's scripts first on PATH so that `braintumor` in a
    dvc.yaml command is the one installed beside the running flow."""
    scripts = str(Path(sys.executable).parent)
    return {**base, "PATH": os.pathsep.join([scripts, base.get("PATH", "")])}


# The stage's command runs under this small guard, so that no stage process outlives the flow that started it.
# The guard asks the kernel (Linux prctl PR_SET_PDEATHSIG) for SIGTERM when the flow's thread that started it
# dies, even by `kill -9`, and runs the command through the shell in a process group of its own; on SIGTERM, SIGHUP
# or SIGINT it stops that whole group (the shell and everything the command started), SIGKILL after a grace time.
# A training stopped this way resumes from its last finished epoch at the next run.
STAGE_GUARD = r"""
import os, signal, subprocess, sys
flow_pid, grace, command = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
child = None
def stop(signum, frame):
    if child is not None:
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(128 + signum)
for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(signum, stop)
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != flow_pid:  # the flow died before the request above took effect
    sys.exit(128 + signal.SIGTERM)
child = subprocess.Popen(command, shell=True, start_new_session=True)
code = child.wait()
sys.exit(code if code >= 0 else 128 - code)
"""
STAGE_STOP_GRACE_SECONDS = 10


def run_command(spec: StageSpec, root: Path, env: dict[str, str], log_path: Path, tail_lines: int) -> float:
    """Run the stage's dvc.yaml command in its working directory. What it shows its console (its progress and
    result) is relayed to this flow's console, prefixed by its own time and stage, and written to `log_path`, where
    the stage's CLI also writes its library chatter. The command runs under STAGE_GUARD: if the flow process dies,
    even by `kill -9`, the stage's processes are stopped with it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # Through the shell, as `dvc repro` runs a stage's cmd.
        process = subprocess.Popen([sys.executable, "-c", STAGE_GUARD, str(os.getpid()),
                                    str(STAGE_STOP_GRACE_SECONDS), spec.cmd], cwd=root / spec.wdir,
                                   env=stage_environment(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", bufsize=1)
        for line in process.stdout:
            log.write(line)
            log.flush()
            if CONSOLE_LINE.match(line):  # a progress or result line of the stage's CLI (flows.console)
                relay.info("%s", line.rstrip(), extra={"relayed": True})
        code = process.wait()
    if code != 0:
        raise StageFailed(f"{spec.name} failed (exit {code}); last lines of {log_path}:\n"
                          f"{log_tail(log_path, tail_lines)}")
    return time.perf_counter() - start


@task(cache_policy=NO_CACHE)
def run_stage(spec: StageSpec, where: SharedWorkspace | NodeCheckout, env_extra: dict[str, str],
              slots: DeviceSlots | None, tail_lines: int) -> dict:
    """One DVC stage's command in its own process, in the flow's workspace or in a node-local checkout
    (flows.remote). `env_extra` (no secrets: the environment of the process that runs the task supplies those) is
    added to the environment. With `slots` it waits for a free device (a GPU id or a CPU slot) and gets it through
    CUDA_VISIBLE_DEVICES; under Ray, Ray has already set that for this worker."""
    logger = get_run_logger()
    env = {**os.environ, **env_extra}
    name = spec.name.replace("@", "-")
    if isinstance(where, NodeCheckout):
        started = time.perf_counter()
        folder = prepare_checkout(where, env)
        pulled = time.perf_counter() - started
        logger.info("%s starts on %s", spec.name, where.describe())
        stage_env, record = audit_env(folder, env)
        seconds = run_command(spec, folder, stage_env, folder / "logs" / f"{name}.log", tail_lines)
        started = time.perf_counter()
        out = finish_checkout(where, folder, stage_env)
        logger.info("%s finished in %.0f s on node %s (inputs pulled in %.0f s, outputs pushed in %.0f s)", spec.name,
                    seconds, socket.gethostname(), pulled, time.perf_counter() - started)
        return {"stage": spec.name, "seconds": seconds, "node": socket.gethostname(), "checkout": str(folder),
                "pull_seconds": pulled, "push_seconds": time.perf_counter() - started,
                "opened": opened_paths(record), **out}
    log_path = where.root / "logs" / f"{name}.log"
    if slots is None:
        seconds = run_command(spec, where.root, env, log_path, tail_lines)
    else:
        with slots.acquire() as device:
            device_env = process_env(device, env)
            logger.info("%s starts on %s", spec.name, f"GPU {device}" if slots.gpus else "the CPU")
            seconds = run_command(spec, where.root, device_env, log_path, tail_lines)
    logger.info("%s finished in %.0f s", spec.name, seconds)
    return {"stage": spec.name, "seconds": seconds}


@task(cache_policy=NO_CACHE)
def promote(root: Path, env: dict[str, str], tail_lines: int) -> str:
    """The gated promotion, as `braintumor promote` (not a DVC stage: it changes the registry, not files)."""
    spec = StageSpec("promote", "braintumor promote", Path("."))
    log_path = root / "logs" / "promote.log"
    run_command(spec, root, {**os.environ, **env}, log_path, tail_lines)
    output = log_path.read_text()
    get_run_logger().info("promotion:\n%s", output)
    return output


def ray_address(params: Params) -> str | None:
    """The Ray cluster to run on: flow.ray_address, else RAY_ADDRESS; None: a local Ray the flow starts."""
    return params.flow.ray_address or os.environ.get("RAY_ADDRESS") or None


def on_remote_nodes(params: Params) -> bool:
    """Whether device stages run in node-local checkouts: on a Ray cluster whose nodes do not mount the workspace
    (flow.shared_workspace false). A local Ray the flow starts itself shares its disk."""
    return params.flow.runner == "ray" and ray_address(params) is not None and not params.flow.shared_workspace


def task_runner(params: Params):
    if params.flow.runner == "ray":
        from prefect_ray import RayTaskRunner

        address = ray_address(params)
        # With no address, ray.init() joins the cluster named in <ray tmp>/ray_current_cluster, which `ray start`
        # leaves behind (even when that cluster is gone); "local" always starts the flow's own Ray.
        return RayTaskRunner(address=address, init_kwargs={} if address else {"address": "local"})
    return ThreadPoolTaskRunner(max_workers=max(len(params.stack.models), 1))


def configured_flow(params: Params):
    """train_pipeline with the task runner params.yaml asks for (local threads or Ray); used by direct runs and
    by the served deployment alike."""
    return train_pipeline.with_options(task_runner=task_runner(params))


@dataclass
class Remote:
    """What device stages need to run on cluster nodes that share no disk with the flow (flows.remote)."""
    commit: str
    git_url: str
    dvc_url: str
    dvc_name: str | None


def remote_setup(params: Params, root: Path) -> Remote | None:
    if not on_remote_nodes(params):
        return None
    commit, git_url = run_commit(root, params.flow.git_remote)
    return Remote(commit, git_url, dvc_remote_url(root, params.flow.dvc_remote), params.flow.dvc_remote)


class Done:
    """A stage that ran in the flow's own process, shaped like a future."""

    def __init__(self, outcome):
        self.outcome = outcome

    def result(self, raise_on_failure: bool = True):
        return self.outcome


def submit_generation(specs: list[StageSpec], params: Params, root: Path, env_extra: dict[str, str],
                      remote: Remote | None = None) -> list:
    """Submit one generation of stages; stages in `flow.device_stages` take a device slot each (with Ray, a GPU
    each when the cluster has GPUs, and flow.ray_stage_resources) and are retried `flow.retries` times; with
    `remote`, they run in node-local checkouts and the others in the flow's own process."""
    device_specs = [s for s in specs if s.group in params.flow.device_stages]
    retried = run_stage.with_options(retries=params.flow.retries,
                                     retry_delay_seconds=params.flow.retry_delay_seconds)
    tail = params.flow.log_tail_lines
    shared = SharedWorkspace(root)
    others = [s for s in specs if s not in device_specs]
    if remote is not None:  # nothing but device stages leaves the flow's disk
        futures = []
        for spec in others:
            try:
                futures.append(Done(run_stage(spec, shared, env_extra, None, tail)))
            except Exception as exc:  # noqa: BLE001 - reported with the generation's other outcomes
                futures.append(Done(exc))
    else:
        futures = [run_stage.submit(s, shared, env_extra, None, tail) for s in others]
    if not device_specs:
        return futures
    gpus = resolve_gpus(params.devices)
    if params.flow.runner == "ray":
        from prefect_ray.context import remote_options

        where = {s.name: shared for s in device_specs}
        if remote is not None:
            deps = {s.name: tracked_dependencies(root, s.name) for s in device_specs}
            push_inputs(root, sorted({d for found in deps.values() for d in found}), remote.dvc_name)
            where = {name: node_checkout(root, name, found, remote.commit, remote.git_url, remote.dvc_url)
                     for name, found in deps.items()}
        with remote_options(num_gpus=1 if gpus else 0, resources=dict(params.flow.ray_stage_resources) or None,
                            max_retries=params.flow.ray_node_retries):
            return futures + [retried.submit(s, where[s.name], env_extra, None, tail) for s in device_specs]
    slots = DeviceSlots(gpus, params.devices.cpu_concurrency)
    get_run_logger().info("running %s on %s", ", ".join(s.name for s in device_specs),
                          f"GPUs {slots.gpus}" if slots.gpus else f"the CPU, {slots.capacity} at a time")
    return futures + [retried.submit(s, shared, env_extra, slots, tail) for s in device_specs]


def run_generations(params: Params, root: Path, env_extra: dict[str, str], timings: dict | None = None
                    ) -> tuple[list[str], list[str]]:
    """Every dvc.yaml stage, generation by generation; returns (stages run, stages skipped). A stage that ran in
    the workspace is committed to dvc.lock there; one that ran in a node's checkout is landed from the DVC remote
    (flows.remote.land). Either way only if its inputs are what they were when it started."""
    logger = get_run_logger()
    ran, skipped = [], []
    remote = remote_setup(params, root)
    for generation in pipeline_generations(root):
        names = [s.name for s in generation]
        stale = set(stale_stages(names, root))
        skipped += [n for n in names if n not in stale]
        todo = [s for s in generation if s.name in stale]
        if not todo:
            logger.info("up to date, skipped: %s", ", ".join(names))
            continue
        started_with = dependency_fingerprints([s.name for s in todo], root)
        futures = submit_generation(todo, params, root, env_extra, remote)
        outcomes = [f.result(raise_on_failure=False) for f in futures]  # every stage of the generation ends
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                continue
            try:
                started = time.perf_counter()
                if "lock" in outcome:
                    land(root, outcome["stage"], outcome, started_with[outcome["stage"]], remote.dvc_name)
                else:
                    commit_unchanged(outcome["stage"], started_with[outcome["stage"]], root)
                ran.append(outcome["stage"])
                if timings is not None:  # what each stage cost: its command, and around it
                    timings[outcome["stage"]] = {key: round(outcome[key], 2) for key in
                                                 ("seconds", "pull_seconds", "push_seconds") if key in outcome}
                    timings[outcome["stage"]]["commit_seconds"] = round(time.perf_counter() - started, 2)
                    if "node" in outcome:
                        timings[outcome["stage"]]["checkout"] = outcome["checkout"]
            except ProjectError as exc:
                failures.append(exc)
        if failures:
            raise StageFailed("\n\n".join(str(f) for f in failures))
    return ran, skipped


def summary_markdown(params: Params) -> str:
    """Each model and the ensemble on both test sets, and the registered versions."""
    evaluation_path = params.paths.metrics / "evaluation.json"
    lines = ["# train_pipeline summary", ""]
    if evaluation_path.exists():
        from components.report import comparison_table

        lines.append(comparison_table(json.loads(evaluation_path.read_text()), params.data.classes))
    registered = params.paths.registered
    if registered.exists():
        info = json.loads(registered.read_text())
        lines += ["", f"Registered versions (alias `{info['alias']}`):", ""]
        lines += [f"- [`models:/{name}/{version}`]({tracking_ui_link(name, version)})"
                  for name, version in info["versions"].items()]
    return "\n".join(lines) + "\n"


def tracking_ui_link(name: str, version: str | int) -> str:
    base = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")
    return f"{base}/#/models/{name}/versions/{version}"


def trigger_tags(trigger: dict | None) -> dict[str, str]:
    """`trigger.<key>` tags (nested keys joined by dots) of what made a run start, e.g. the monitoring flow's
    evidence (flows.monitoring); {} for a run started by hand or on schedule."""
    if not trigger:
        return {}
    return {key: str(value)[:5000] for key, value in tracking.flatten("trigger", trigger).items()}


def trigger_markdown(trigger: dict | None) -> str:
    if not trigger:
        return ""
    lines = ["", f"## Triggered by: {trigger.get('reason', 'unknown')}", ""]
    lines += [f"- {key.removeprefix('trigger.')}: `{value}`" for key, value in trigger_tags(trigger).items()
              if key != "trigger.reason"]
    return "\n".join(lines) + "\n"


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(params_path: str = "params.yaml", params_overrides: list[str] | None = None,
                   promote_champion: bool | None = None, trigger: dict | None = None,
                   params: Params | None = None) -> dict:
    """Every dvc.yaml stage (validate, split, the trainings in parallel, stack, evaluate, register), then
    optionally the gated promotion. `params` is params_path with `params_overrides` applied, parsed once by the
    caller (the CLI); None parses it here (a scheduled run). `trigger` is the evidence that started the run
    (flows.monitoring: the report and the drift metrics, or the stages new data made stale): tags `trigger.*` on the
    MLflow parent run and a section of the summary artifact."""
    root = Path(params_path).resolve().parent
    logger = get_run_logger()
    params = params or load_params(params_path, params_overrides)
    with run_lock(params.flow.lock_timeout, root):
        if params_overrides:  # under the lock, so no other run sees params change beneath it
            write_overrides(Path(params_path), params_overrides)
        tracking.configure(params.tracking)
        flow_run_id = str(get_run_context().flow_run.id)
        client = mlflow.MlflowClient()
        parent = client.create_run(mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id,
                                   run_name="train_pipeline", tags={**tracking.provenance(params),
                                                                    "prefect_flow_run_id": flow_run_id,
                                                                    **trigger_tags(trigger)})
        # Stage runs nest under the parent run. What the tasks get is no secret (credentials stay in the environment
        # of the process that runs each task); nodes without the flow's disk log to the server their own
        # environment names, so a file store's path is never sent to them.
        env = {tracking.PARENT_RUN_ENV: parent.info.run_id, tracking.FLOW_RUN_ENV: flow_run_id}
        if not on_remote_nodes(params):
            env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # the store is passed on explicitly
        elif not is_tracking_server(mlflow.get_tracking_uri()):
            raise ProjectError(f"MLFLOW_TRACKING_URI {mlflow.get_tracking_uri()} is a file store, which a cluster "
                               "without a shared disk cannot reach: run the flow against the team tracking server "
                               "(`braintumor services up`, docs/services.md)")
        status = "FAILED"
        try:
            timings: dict[str, dict] = {}
            ran, skipped = run_generations(params, root, env, timings)
            promotion = None
            if (params.flow.promote if promote_champion is None else promote_champion) and "register" in ran:
                promotion = promote(root, env, params.flow.log_tail_lines)
            summary = summary_markdown(params) + trigger_markdown(trigger)
            create_markdown_artifact(summary, key="train-pipeline-summary", description="models on both test sets")
            client.log_text(parent.info.run_id, summary, "summary.md")
            status = "FINISHED"
            logger.info("stages run: %s", ", ".join(ran) or "none (everything up to date)")
            return {"ran": ran, "skipped": skipped, "timings": timings, "mlflow_parent_run_id": parent.info.run_id,
                    "promotion": promotion, "prefect_flow_run_id": flow_run_id}
        finally:
            client.set_terminated(parent.info.run_id, status)


def run_with_runner(params_path: str = "params.yaml", params_overrides: list[str] | None = None,
                    promote_champion: bool | None = None, params: Params | None = None) -> dict:
    """Run train_pipeline with the task runner that params (params_path with the overrides applied, parsed here
    unless the caller passes it) asks for."""
    params = params or load_params(params_path, params_overrides)
    return configured_flow(params)(params_path=params_path, params_overrides=params_overrides,
                                   promote_champion=promote_champion, params=params)
