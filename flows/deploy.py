"""A scheduled deployment of train_pipeline (`braintumor flow serve`): cron, parameters and task runner from
params.yaml, read when the deployment is served."""

from __future__ import annotations

from prefect.client.schemas.schedules import CronSchedule

from components.config import Params, load_params
from flows.training import configured_flow

DEPLOYMENT = "scheduled-retraining"


def build_deployment(params_path: str = "params.yaml", params: Params | None = None):
    params = params or load_params(params_path)
    return configured_flow(params).to_deployment(
        name=DEPLOYMENT,
        schedules=[CronSchedule(cron=params.flow.cron, timezone=params.flow.timezone)],
        parameters={"params_path": params_path, "params_overrides": [], "promote_champion": params.flow.promote},
        description="Retrain, stack, evaluate and register; stages DVC reports up to date are skipped.",
        tags=["braintumor", "training"],
    )


def serve(params_path: str = "params.yaml", params: Params | None = None) -> None:
    """Serve the deployment from this process until stopped (Ctrl-C); runs start on schedule or on demand (each
    scheduled run reads params_path afresh)."""
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(params_path, params))
