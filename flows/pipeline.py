"""The pipeline flow: ingest, then train on what ingest produced (scheduled retraining runs this)."""

from __future__ import annotations

import time

from prefect import flow
from soraflow.flows.ingest import ingest_flow, with_task_runner
from soraflow.flows.params import RunParams
from soraflow.flows.train import TrainFlowResult, train_flow


def ingest_then_train(params: RunParams) -> tuple[dict, TrainFlowResult, dict[str, float]]:
    """The ingest sub-flow, then the train sub-flow on its manifest: (ingested, trained, wall
    seconds per stage). The pipeline and the local flow both run this."""
    cfg = params.load_config()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    ingested = with_task_runner(ingest_flow, cfg)(params, trigger_training=False)  # trains below itself
    timings["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = train_flow(ingested["manifest"], params)
    timings.update({f"train: {k}": v for k, v in trained.timings.items()})
    timings["train (all)"] = time.perf_counter() - t
    return ingested, trained, timings


@flow(name="soraflow-pipeline", log_prints=True)
def pipeline_flow(params: RunParams | None = None) -> dict:
    """ingest -> (VAE fit) -> cache -> train -> evaluate -> register."""
    params = params or RunParams()  # the local preset, made at call time: importing a flow reads no config
    ingested, trained, _ = ingest_then_train(params)
    return {"manifest": ingested["manifest"], "dataset_version": ingested["dataset_version"], "clips": ingested["ok"],
            "rejected": ingested["rejected"], **trained.as_dict()}
