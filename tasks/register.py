"""The register stage: log the training run to MLflow, register its model, promote only if better."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from soraflow.configs.schema import SoraFlowConfig, config_hash
from soraflow.storage.holdout import DatasetSplit
from soraflow.storage.layout import DataRoot
from soraflow.storage.registry import ModelRegistry
from soraflow.tasks.evaluate import EvalResult
from soraflow.tasks.task_policy import STAGE_RETRIES
from soraflow.tasks.train.driver import TrainResult
from soraflow.tasks.train.vae_fit import VaeFitResult


def register_model(cfg: SoraFlowConfig, data: DatasetSplit, trained: TrainResult, evaluated: EvalResult, vae: VaeFitResult,
                   data_root: str, run_name: str) -> dict:
    """Log the run to MLflow, register the model folder, and move `champion` only if it is better."""
    registry = ModelRegistry(DataRoot(data_root), cfg.registry)
    tags = {"dataset_version": data.version, "config_hash": config_hash(cfg), "manifest": data.manifest, "run_name": run_name}
    params = {"config": cfg.model_dump(mode="json")}
    metrics = {**{k: float(v) for k, v in evaluated.metrics.items() if isinstance(v, (int, float))},
               **{f"train_{k}": float(v) for k, v in trained.metrics.items() if isinstance(v, (int, float))},
               **{f"vae_{k}": float(v) for k, v in vae.metrics.items() if isinstance(v, (int, float))}}
    with registry.run(run_name, params=params, tags=tags) as run_id:
        registry.log_metrics(run_id, metrics)
        for path in [trained.loss_curve_png, evaluated.samples_gif, *evaluated.samples_mp4]:
            if path and Path(path).exists():
                registry.log_artifact(run_id, path, artifact_path="evaluation")
        info = registry.register(run_id, trained.model_dir, metrics=metrics, tags=tags)
    promoted, reason = registry.promote_if_better(info.version, cfg.eval.metric, cfg.eval.higher_is_better)
    return {"name": info.name, "version": info.version, "promoted": promoted, "reason": reason, "run_id": info.run_id}


@task(name="register", **STAGE_RETRIES)
def register_task(cfg: SoraFlowConfig, data: DatasetSplit, trained: TrainResult, evaluated: EvalResult, vae: VaeFitResult,
                  data_root: str, run_name: str) -> dict:
    """Log the run to MLflow, register the model folder, and move `champion` only if it is better."""
    return register_model(cfg, data, trained, evaluated, vae, data_root, run_name)
