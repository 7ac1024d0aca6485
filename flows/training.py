"""`train_pipeline`: DVC's pipeline run by Prefect 3.

The flow holds no copy of the pipeline. The stages, their order and their commands come from `dvc.yaml`
(flows.dvc_stages); each task runs one stage's own `cmd` in a subprocess, exactly as `dvc repro` would, so a
long-lived `braintumor flow serve` always runs today's code. Stages of one generation (the four trainings) run in
parallel, each training on its own device slot. A stage `dvc status` reports up to date is skipped; a stage that
ran is committed to dvc.lock once its dependencies are checked unchanged, so afterwards `dvc status` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    """Run the stage's dvc.yaml command in its working directory; its output goes to `log_path`. The command runs
    under STAGE_GUARD: if the flow process dies, even by `kill -9`, the stage's processes are stopped with it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # Through the shell, as `dvc repro` runs a stage's cmd.
        code = subprocess.run([sys.executable, "-c", STAGE_GUARD, str(os.getpid()), str(STAGE_STOP_GRACE_SECONDS),
                               spec.cmd], cwd=root / spec.wdir, env=stage_environment(env), stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise StageFailed(f"{spec.name} failed (exit {code}); last lines of {log_path}:\n"
                          f"{log_tail(log_path, tail_lines)}")
    return time.perf_counter() - start


@task(cache_policy=NO_CACHE)
def run_stage(spec: StageSpec, root: Path, env: dict[str, str], slots: DeviceSlots | None,
              tail_lines: int) -> dict:
    """One DVC stage's command in its own process. With `slots` it waits for a free device (a GPU id or a CPU
    slot) and gets it through CUDA_VISIBLE_DEVICES; under Ray, Ray has already set that for this worker."""
    logger = get_run_logger()
    log_path = root / "logs" / f"{spec.name.replace('@', '-')}.log"
    if slots is None:
        seconds = run_command(spec, root, env, log_path, tail_lines)
    else:
        with slots.acquire() as device:
            device_env = process_env(device, env)
            logger.info("%s starts on %s", spec.name, f"GPU {device}" if slots.gpus else "the CPU")
            seconds = run_command(spec, root, device_env, log_path, tail_lines)
    logger.info("%s finished in %.0f s", spec.name, seconds)
    return {"stage": spec.name, "seconds": seconds}


@task(cache_policy=NO_CACHE)
def promote(root: Path, env: dict[str, str], tail_lines: int) -> str:
    """The gated promotion, as `braintumor promote` (not a DVC stage: it changes the registry, not files)."""
    spec = StageSpec("promote", "braintumor promote", Path("."))
    log_path = root / "logs" / "promote.log"
    run_command(spec, root, env, log_path, tail_lines)
    output = log_path.read_text()
    get_run_logger().info("promotion:\n%s", output)
    return output


def task_runner(params: Params):
    if params.flow.runner == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=os.environ.get("RAY_ADDRESS"))
    return ThreadPoolTaskRunner(max_workers=max(len(params.stack.models), 1))


def configured_flow(params: Params):
    """train_pipeline with the task runner params.yaml asks for (local threads or Ray); used by direct runs and
    by the served deployment alike."""
    return train_pipeline.with_options(task_runner=task_runner(params))


def submit_generation(specs: list[StageSpec], params: Params, root: Path, env: dict[str, str]) -> list:
    """Submit one generation of stages; stages in `flow.device_stages` take a device slot each (with Ray, a GPU
    each when the cluster has GPUs) and are retried `flow.retries` times."""
    device_specs = [s for s in specs if s.group in params.flow.device_stages]
    retried = run_stage.with_options(retries=params.flow.retries,
                                     retry_delay_seconds=params.flow.retry_delay_seconds)
    tail = params.flow.log_tail_lines
    futures = [run_stage.submit(s, root, env, None, tail) for s in specs if s not in device_specs]
    if not device_specs:
        return futures
    gpus = resolve_gpus(params.devices)
    if params.flow.runner == "ray":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1 if gpus else 0):
            return futures + [retried.submit(s, root, env, None, tail) for s in device_specs]
    slots = DeviceSlots(gpus, params.devices.cpu_concurrency)
    get_run_logger().info("running %s on %s", ", ".join(s.name for s in device_specs),
                          f"GPUs {slots.gpus}" if slots.gpus else f"the CPU, {slots.capacity} at a time")
    return futures + [retried.submit(s, root, env, slots, tail) for s in device_specs]


def run_generations(params: Params, root: Path, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """Every dvc.yaml stage, generation by generation; returns (stages run, stages skipped)."""
    logger = get_run_logger()
    ran, skipped = [], []
    for generation in pipeline_generations(root):
        names = [s.name for s in generation]
        stale = set(stale_stages(names, root))
        skipped += [n for n in names if n not in stale]
        todo = [s for s in generation if s.name in stale]
        if not todo:
            logger.info("up to date, skipped: %s", ", ".join(names))
            continue
        started_with = dependency_fingerprints([s.name for s in todo], root)
        futures = submit_generation(todo, params, root, env)
        outcomes = [f.result(raise_on_failure=False) for f in futures]  # every stage of the generation ends
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for outcome in outcomes:
            if not isinstance(outcome, BaseException):
                commit_unchanged(outcome["stage"], started_with[outcome["stage"]], root)
                ran.append(outcome["stage"])
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
                   promote_champion: bool | None = None, trigger: dict | None = None) -> dict:
    """Every dvc.yaml stage (validate, split, the trainings in parallel, stack, evaluate, register), then
    optionally the gated promotion. `trigger` is the evidence that started the run (flows.monitoring: the report and
    the drift metrics, or the stages new data made stale): tags `trigger.*` on the MLflow parent run and a section of
    the summary artifact."""
    root = Path(params_path).resolve().parent
    logger = get_run_logger()
    with run_lock(load_params(params_path).flow.lock_timeout, root):
        if params_overrides:  # under the lock, so no other run sees params change beneath it
            write_overrides(Path(params_path), params_overrides)
        params = load_params(params_path)
        tracking.configure(params.tracking)
        flow_run_id = str(get_run_context().flow_run.id)
        client = mlflow.MlflowClient()
        parent = client.create_run(mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id,
                                   run_name="train_pipeline", tags={**tracking.provenance(params),
                                                                    "prefect_flow_run_id": flow_run_id,
                                                                    **trigger_tags(trigger)})
        # Stage runs nest under the parent run; the store is passed on explicitly (MLflow exports its own).
        env = {**os.environ, tracking.PARENT_RUN_ENV: parent.info.run_id, tracking.FLOW_RUN_ENV: flow_run_id,
               "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
        status = "FAILED"
        try:
            ran, skipped = run_generations(params, root, env)
            promotion = None
            if (params.flow.promote if promote_champion is None else promote_champion) and "register" in ran:
                promotion = promote(root, env, params.flow.log_tail_lines)
            summary = summary_markdown(params) + trigger_markdown(trigger)
            create_markdown_artifact(summary, key="train-pipeline-summary", description="models on both test sets")
            client.log_text(parent.info.run_id, summary, "summary.md")
            status = "FINISHED"
            logger.info("stages run: %s", ", ".join(ran) or "none (everything up to date)")
            return {"ran": ran, "skipped": skipped, "mlflow_parent_run_id": parent.info.run_id,
                    "promotion": promotion, "prefect_flow_run_id": flow_run_id}
        finally:
            client.set_terminated(parent.info.run_id, status)


def run_with_runner(params_path: str = "params.yaml", params_overrides: list[str] | None = None,
                    promote_champion: bool | None = None) -> dict:
    """Run train_pipeline with the task runner that params.yaml (with the overrides applied) asks for."""
    flow_with_runner = configured_flow(load_params(params_path, params_overrides))
    return flow_with_runner(params_path=params_path, params_overrides=params_overrides,
                            promote_champion=promote_champion)
