"""`monitor_batch`: drift monitoring of a folder of incoming scans, and retraining on evidence.

The batch goes through batch_predict's GX checks (components.validate.screen_folder), then components.monitor compares it with
the reference profile of the training data and writes the report, one MLflow run per batch. This flow adds the
Prefect side: a markdown artifact with the verdict, a Prefect event (params monitor.event) on drift, and the retrain
decision.

Retraining: self-hosted Prefect automations are unreliable (the trigger service must run beside the server, and an
event that arrives while it is down is not replayed), so this flow itself runs `train_pipeline` when the batch
drifted (monitor.retrain_on_drift) or new labelled data has landed, i.e. `dvc status` reports params paths.raw
changed since the pipeline last ran (monitor.retrain_on_new_data). The evidence (the report, the drift metrics, the
changed stages) is passed as train_pipeline's `trigger`, which it records on its MLflow parent run and in its
summary artifact; the training flow run also carries the Prefect tags `retrain` and `trigger:<reason>`. Nothing
retrains on unchanged input: train_pipeline skips every stage DVC reports up to date.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.events import emit_event

from components.config import Params, load_params
from components.monitor import markdown, monitor_paths
from components.validate import checked_folder, screen_folder

screen = task(screen_folder, name="screen", cache_policy=NO_CACHE)
EVENT_FILES = 20  # OOD files named in the event's payload (the report lists all)


@task(cache_policy=NO_CACHE)
def measure(params: Params, source: Path, paths: list[str], quarantine: pd.DataFrame, out_dir: Path,
            model_uri: str | None, run_tags: dict[str, str]) -> dict:
    return monitor_paths(params, source, paths, quarantine, out_dir, model_uri, run_tags)


@task(cache_policy=NO_CACHE)
def new_labelled_data(params: Params, root: Path) -> list[str]:
    """The stages whose dependency params paths.raw `dvc status` reports changed (new labelled scans landed)."""
    from dvc.exceptions import NotDvcRepoError

    from flows.dvc_stages import changed_dependencies

    raw = (root / params.paths.raw).resolve()
    try:
        changed = changed_dependencies(root)
    except NotDvcRepoError:
        get_run_logger().warning("%s is no DVC repo: new labelled data cannot be detected", root)
        return []
    return sorted(stage for stage, deps in changed.items() if any((root / dep).resolve() == raw for dep in deps))


def trigger_evidence(summary: dict, new_data: list[str], reasons: list[str], flow_run_id: str) -> dict:
    """What made this flow retrain, as train_pipeline records it."""
    return {"reason": "+".join(reasons), "batch": summary["batch"], "report": summary["report"],
            "drift_reasons": summary["reasons"], "metrics": summary["metrics"],
            "ood_files": [row["file"] for row in summary["ood_files"][:EVENT_FILES]], "new_data_stages": new_data,
            "monitoring_mlflow_run_id": summary["mlflow_run_id"], "monitoring_flow_run_id": flow_run_id}


@flow(name="monitor_batch", log_prints=True)
def monitor_batch(folder: str, model_uri: str | None = None, params_path: str = "params.yaml",
                  params: Params | None = None) -> dict:
    """Monitor one folder of scans (under flow.inference_root) with the workspace's models (model_uri None) or a
    registered ensemble; retrain on evidence. Returns the summary, the event id and the training run's result."""
    from flows.training import configured_flow

    params = params or load_params(params_path)
    logger = get_run_logger()
    source = checked_folder(folder, params.flow.inference_root)
    root = Path(params_path).resolve().parent
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = params.monitor.out_dir / f"{source.name}-{stamp}"
    flow_run_id = str(get_run_context().flow_run.id)
    paths, quarantine = screen(source, params.manifest, params.validate_params, params.data.classes,
                               out_dir / "validation")
    summary = measure(params, source, paths, quarantine, out_dir, model_uri, {"prefect_flow_run_id": flow_run_id})
    create_markdown_artifact(markdown(summary), key="batch-monitoring",
                             description=f"drift of {source} against the training data; report {summary['report']}")
    event = None
    if summary["drift"]:
        event = emit_event(
            event=params.monitor.event,
            resource={"prefect.resource.id": f"braintumor.batch.{source.name}", "prefect.resource.name": source.name},
            payload={"batch": summary["batch"], "report": summary["report"], "reasons": summary["reasons"],
                     "metrics": summary["metrics"], "mlflow_run_id": summary["mlflow_run_id"],
                     "ood_files": [row["file"] for row in summary["ood_files"][:EVENT_FILES]]})
        logger.warning("drift in %s: %s; report %s", source, ", ".join(summary["reasons"]), summary["report"])
    new_data = new_labelled_data(params, root) if params.monitor.retrain_on_new_data else []
    reasons = (["drift"] if summary["drift"] and params.monitor.retrain_on_drift else []) + \
        (["new_data"] if new_data else [])
    retrain = None
    if reasons:
        trigger = trigger_evidence(summary, new_data, reasons, flow_run_id)
        logger.info("running train_pipeline, triggered by %s", trigger["reason"])
        with tags("retrain", f"trigger:{trigger['reason']}"):
            retrain = configured_flow(params)(params_path=params_path, trigger=trigger, params=params)
    return {"summary": summary, "event_id": str(event.id) if event is not None else None, "new_data": new_data,
            "retrain": retrain}
