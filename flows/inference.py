"""`batch_predict`: score a folder of new scans with the champion ensemble.

New files go through the same row-level GX checks as training data: unusable files are quarantined and listed,
never scored and never fatal. With params monitor.after_batch_predict the flow ends by monitoring the batch with the
same model (flows.monitoring.monitor_batch: drift report, and retraining on evidence).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from components import tracking
from components.config import Params, load_params
from components.predict import DEFAULT_MODEL_URI, predict_paths
from components.validate import checked_folder, screen_folder

screen = task(screen_folder, name="screen", cache_policy=NO_CACHE)


@task(cache_policy=NO_CACHE)
def score(paths: list[str], model_uri: str) -> pd.DataFrame:
    return predict_paths(paths, model_uri) if paths else pd.DataFrame()


@flow(name="batch_predict", log_prints=True)
def batch_predict(folder: str, model_uri: str = DEFAULT_MODEL_URI, params_path: str = "params.yaml",
                  params: Params | None = None) -> dict:
    """Score the scans of `folder` (under flow.inference_root); `params` is params_path parsed (by the CLI), or None
    to parse it here."""
    params = params or load_params(params_path)
    logger = get_run_logger()
    source = checked_folder(folder, params.flow.inference_root)
    tracking.configure(params.tracking)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = params.flow.predictions_dir / f"{source.name}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, quarantine = screen(source, params.manifest, params.validate_params, params.data.classes,
                               out_dir / "validation")
    predictions = score(paths, model_uri)
    predictions.to_csv(out_dir / "predictions.csv", index=False)
    quarantine.to_csv(out_dir / "quarantine.csv", index=False)
    if not predictions.empty:
        table = predictions.assign(path=[Path(p).name for p in predictions.path]).round(4)
        create_table_artifact(table.to_dict(orient="records"), key="batch-predictions",
                              description=f"{len(table)} scans from {source} scored with {model_uri}")
    logger.info("scored %d scans, quarantined %d; wrote %s", len(predictions), len(quarantine), out_dir)
    monitoring = None
    if params.monitor.after_batch_predict and not predictions.empty:
        from flows.monitoring import monitor_batch  # its report, MLflow run, event and retraining: flows/monitoring.py

        monitoring = monitor_batch(str(source), model_uri, params_path, params)
    return {"scored": len(predictions), "quarantined": quarantine.to_dict(orient="records"),
            "predictions": str(out_dir / "predictions.csv"), "monitoring": monitoring}
