"""The pipeline flow: ingest, then train on what ingest produced (scheduled retraining runs this)."""

from __future__ import annotations

from prefect import flow

from soraflow.flows.ingest import ingest_flow, with_task_runner
from soraflow.flows.params import RunParams
from soraflow.flows.train import train_flow


@flow(name="soraflow-pipeline", log_prints=True)
def pipeline_flow(params: RunParams = RunParams()) -> dict:
    """ingest -> (VAE fit) -> cache -> train -> evaluate -> register."""
    cfg = params.load_config()
    ingested = with_task_runner(ingest_flow, cfg)(params, trigger_training=False)  # trains below itself
    trained = train_flow(ingested["manifest"], params)
    return {"manifest": ingested["manifest"], "dataset_version": ingested["dataset_version"], "clips": ingested["ok"], "rejected": ingested["rejected"], **trained}
