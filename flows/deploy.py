"""Deployments: the pipeline on a cron schedule, and training triggered by a new dataset version.

`soraflow serve` runs both in one long-lived process (Prefect's `serve`); `prefect.yaml` at the
repository root declares the same two for work pools (`prefect deploy --all`).
"""

from __future__ import annotations

from prefect import serve
from prefect.events import DeploymentEventTrigger
from soraflow.flows.ingest import DATASET_EVENT, RETRAIN_LABEL
from soraflow.flows.params import RunParams
from soraflow.flows.pipeline import pipeline_flow
from soraflow.flows.train import TRAINING_LIMIT, train_flow

PIPELINE_DEPLOYMENT = "scheduled-pipeline"
RETRAIN_DEPLOYMENT = "retrain-on-new-data"


def dataset_trigger(params: RunParams, dataset_name: str) -> DeploymentEventTrigger:
    """Start a train run whenever ingest announces a version of this dataset not seen before
    (and not already being trained by the pipeline that ingested it)."""
    return DeploymentEventTrigger(
        name=f"new {dataset_name} dataset",
        expect={DATASET_EVENT},
        match={"prefect.resource.id": f"soraflow.dataset.{dataset_name}", RETRAIN_LABEL: "true"},
        parameters={"manifest": "{{ event.payload.manifest }}", "params": params.model_dump()},
    )


def build_deployments(params: RunParams, cron: str | None = "0 3 * * *"):
    """The two deployments, each limited to one run at a time."""
    cfg = params.load_config()
    pipeline = pipeline_flow.to_deployment(
        name=PIPELINE_DEPLOYMENT,
        cron=cron,
        parameters={"params": params.model_dump()},
        concurrency_limit=1,
        tags=["soraflow", cfg.name],
        description="Scheduled retraining: ingest the sources, then train, evaluate and register.",
    )
    retrain = train_flow.to_deployment(
        name=RETRAIN_DEPLOYMENT,
        triggers=[dataset_trigger(params, cfg.name)],
        parameters={"params": params.model_dump()},
        concurrency_limit=1,
        tags=["soraflow", cfg.name],
        description="Train on a new dataset version as soon as ingest publishes it.",
    )
    return [pipeline, retrain]


def ensure_training_limit() -> None:
    """One global slot shared by every training run, so scheduled and triggered runs never overlap."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(TRAINING_LIMIT, 1)


def serve_deployments(params: RunParams, cron: str | None = "0 3 * * *") -> None:
    ensure_training_limit()
    serve(*build_deployments(params, cron))
