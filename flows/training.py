"""`train_pipeline`: the DVC pipeline as a Prefect 3 flow.

Each task is one DVC stage and calls the same component (or, for trainings, the same `braintumor train`
command) as `dvc repro`. A stage DVC reports up to date is skipped; a stage the flow ran is `dvc commit`-ed, so
`dvc status` is clean afterwards and a following `dvc repro` runs nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from components import tracking
from components.config import Params, load_params, write_overrides
from components.devices import DeviceSlots, process_env, resolve_gpus
from flows.dvc_sync import commit, run_lock, stage_up_to_date

DATA_STAGES = ("manifest", "validate")


class TrainingFailed(RuntimeError):
    pass


def dvc_step(stage: str, root: Path, action: Callable[[], object]) -> dict:
    """Run `action` unless DVC says `stage` is up to date; then record its outputs in dvc.lock."""
    logger = get_run_logger()
    if stage_up_to_date(stage, root):
        logger.info("%s is up to date: skipped", stage)
        return {"stage": stage, "ran": False}
    logger.info("running %s", stage)
    result = action()
    commit(stage, root)
    return {"stage": stage, "ran": True, "result": result}


@task(cache_policy=NO_CACHE)
def validate_data(params: Params, root: Path) -> list[dict]:
    import pandas as pd

    from components.manifest import write_manifest
    from components.validate import validate_manifest

    p = params.paths
    return [
        dvc_step("manifest", root, lambda: len(write_manifest(p.raw, p.manifest, params.manifest))),
        dvc_step("validate", root, lambda: validate_manifest(
            pd.read_parquet(p.manifest), params.validate_params, params.data.classes, p.validation_reports,
            p.quarantine, p.validation_summary)["quarantined"]),
    ]


@task(cache_policy=NO_CACHE)
def split_data(params: Params, root: Path) -> dict:
    from components.split import write_splits

    return dvc_step("split", root, lambda: write_splits(params.paths, params.split, params.seed)["clean_test"])


def training_command(model: str) -> list[str]:
    """The DVC stage's command, run with this interpreter."""
    return [sys.executable, "-m", "components.cli", "train", "--model", model]


def log_tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@task(cache_policy=NO_CACHE)
def train(model: str, params: Params, root: Path, slots: DeviceSlots | None, env_extra: dict[str, str]) -> dict:
    """One training in its own process. With `slots`, the process gets one free device (a GPU id, or a CPU slot);
    under Ray, `slots` is None and Ray has already set CUDA_VISIBLE_DEVICES for this worker."""
    logger = get_run_logger()
    stage = f"train@{model}"
    if stage_up_to_date(stage, root):
        logger.info("%s is up to date: skipped", stage)
        return {"stage": stage, "ran": False}
    log_path = root / "logs" / f"train-{model}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def run(device: int | None | str) -> int:
        env = {**(process_env(device) if slots is not None else dict(os.environ)), **env_extra}
        logger.info("%s starts on %s (CUDA_VISIBLE_DEVICES=%r)", stage,
                    "CPU" if not env.get("CUDA_VISIBLE_DEVICES") else "GPU", env.get("CUDA_VISIBLE_DEVICES"))
        with open(log_path, "w") as log:
            return subprocess.run(training_command(model), cwd=root, env=env, stdout=log,
                                  stderr=subprocess.STDOUT).returncode

    if slots is None:
        code = run(os.environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        with slots.acquire() as device:
            code = run(device)
    if code != 0:
        raise TrainingFailed(f"{stage} failed (exit {code}); last lines of {log_path}:\n"
                             f"{log_tail(log_path, params.flow.log_tail_lines)}")
    commit(stage, root)
    logger.info("%s finished", stage)
    return {"stage": stage, "ran": True}


@task(cache_policy=NO_CACHE)
def stack(params: Params, root: Path) -> dict:
    from components.stack import run_stack

    return dvc_step("stack", root, lambda: run_stack(params)["best_estimator"])


@task(cache_policy=NO_CACHE)
def evaluate(params: Params, root: Path) -> dict:
    from components.evaluate import run_evaluate

    return dvc_step("evaluate", root, lambda: run_evaluate(params)["report"])


@task(cache_policy=NO_CACHE)
def register(params: Params, root: Path) -> dict:
    from components.register import run_register

    return dvc_step("register", root, lambda: run_register(params))


@task(cache_policy=NO_CACHE)
def promote(params: Params) -> dict:
    from components.promote import promote as gated_promote

    result = gated_promote(params)
    get_run_logger().info("promotion: %s\n%s", result["decision"], result["table"])
    return result


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


def task_runner(params: Params):
    if params.flow.runner == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=os.environ.get("RAY_ADDRESS"))
    return ThreadPoolTaskRunner(max_workers=max(len(params.stack.models), 1))


def submit_trainings(params: Params, root: Path, env_extra: dict[str, str]) -> list:
    """Submit every training; with Ray each asks for one GPU when the cluster has GPUs."""
    models = params.stack.models
    retried = train.with_options(retries=params.flow.retries, retry_delay_seconds=params.flow.retry_delay_seconds)
    if params.flow.runner == "ray":
        from prefect_ray.context import remote_options

        gpus = resolve_gpus(params.devices)
        with remote_options(num_gpus=1 if gpus else 0):
            return [retried.submit(m, params, root, None, env_extra) for m in models]
    slots = DeviceSlots(resolve_gpus(params.devices), params.devices.cpu_concurrency)
    get_run_logger().info("training %s on %s", ", ".join(models),
                          f"GPUs {slots.gpus}" if slots.gpus else f"CPU, {slots.capacity} at a time")
    return [retried.submit(m, params, root, slots, env_extra) for m in models]


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(params_path: str = "params.yaml", params_overrides: list[str] | None = None,
                   promote_champion: bool | None = None) -> dict:
    """Validate, split, train the four CNNs in parallel, stack, evaluate, register, and optionally promote."""
    root = Path(params_path).resolve().parent
    logger = get_run_logger()
    if params_overrides:  # written into params.yaml, as `dvc exp run -S` does, so DVC sees the same values
        write_overrides(Path(params_path), params_overrides)
    params = load_params(params_path)
    with run_lock(params.flow.lock_timeout, root):
        tracking.configure(params.tracking)
        flow_run_id = str(get_run_context().flow_run.id)
        client = mlflow.MlflowClient()
        parent = client.create_run(mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id,
                                   run_name="train_pipeline", tags={**tracking.provenance(params),
                                                                    "prefect_flow_run_id": flow_run_id})
        env_extra = {tracking.PARENT_RUN_ENV: parent.info.run_id, tracking.FLOW_RUN_ENV: flow_run_id}
        previous_env = {k: os.environ.get(k) for k in env_extra}
        os.environ.update(env_extra)  # in-process stages nest under the parent run too
        status = "FAILED"
        try:
            steps = validate_data(params, root) + [split_data(params, root)]
            futures = submit_trainings(params, root, env_extra)
            outcomes = [f.result(raise_on_failure=False) for f in futures]  # every training finishes
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures:
                raise TrainingFailed("\n\n".join(str(f) for f in failures))
            steps += outcomes
            steps += [stack(params, root), evaluate(params, root), register(params, root)]
            ran = [s["stage"] for s in steps if s["ran"]]
            promotion = None
            if (params.flow.promote if promote_champion is None else promote_champion) and "register" in ran:
                promotion = promote(params)
            summary = summary_markdown(params)
            create_markdown_artifact(summary, key="train-pipeline-summary", description="models on both test sets")
            client.log_text(parent.info.run_id, summary, "summary.md")
            status = "FINISHED"
            logger.info("stages run: %s", ", ".join(ran) or "none (everything up to date)")
            return {"ran": ran, "skipped": [s["stage"] for s in steps if not s["ran"]],
                    "mlflow_parent_run_id": parent.info.run_id, "promotion": promotion}
        finally:
            client.set_terminated(parent.info.run_id, status)
            for key, value in previous_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_with_runner(params_path: str = "params.yaml", params_overrides: list[str] | None = None,
                    promote_champion: bool | None = None) -> dict:
    """Run train_pipeline with the task runner params.yaml asks for (local threads or Ray)."""
    params = load_params(params_path, params_overrides)
    configured = train_pipeline.with_options(task_runner=task_runner(params))
    return configured(params_path=params_path, params_overrides=params_overrides,
                      promote_champion=promote_champion)
