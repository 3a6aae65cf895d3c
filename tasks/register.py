"""The register stage: log the training run to MLflow, register its model, promote only if better.

The run holds the redacted config as params, the per-step training loss and learning rate (the
history the training result carries), the dataset version as a dataset input, the evaluation
figures, the loss curve and the samples; the model folder, with its model card written now that
all of that is known, becomes the version's MLflow pyfunc model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from soraflow.configs.loader import config_hash
from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.data.holdout import DatasetSplit
from soraflow.storage.layout import DataRoot
from soraflow.storage.registry.model_card import write_model_card
from soraflow.storage.redact import redact_config, redact_url
from soraflow.storage.registry.model_registry import ModelRegistry
from soraflow.storage.registry.tracking import log_dataset_input, log_history, run_url
from soraflow.tasks.evaluate import EvalResult
from soraflow.tasks.task_policy import STAGE_RETRIES
from soraflow.tasks.train.driver import TrainResult
from soraflow.tasks.train.lr_schedule import lr_at
from soraflow.tasks.train.vae_fit import VaeFitResult

MLFLOW_UI_ENV = "SORAFLOW_MLFLOW_UI"  # the `mlflow ui` address the Prefect link points at
EXAMPLE_PROMPTS = 2  # held-out captions the card and the registry note show


@dataclass
class RegisterResult:
    name: str  # the registered model
    version: int
    promoted: bool  # `champion` moved to this version
    reason: str  # why it was or was not promoted
    run_id: str
    experiment_id: str
    tracking_uri: str
    history_points: int  # per-step metric points logged
    run_url: str  # the run in the MLflow UI
    dataset_version: str
    example_prompts: list[str]  # held-out captions of the model's data

    def as_dict(self) -> dict:
        return asdict(self)


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def training_history(cfg: SoraFlowConfig, trained: TrainResult) -> dict[str, list[tuple[int, float]]]:
    """Per-step training loss, and the learning rate each of those steps ran at (history step n is
    optimizer step n - 1: train.lr_schedule depends on the step alone)."""
    loss = trained.loss_history
    return {"train_loss": loss, "learning_rate": [(step, lr_at(cfg.train, int(step) - 1)) for step, _ in loss]}


def register_model(
    cfg: SoraFlowConfig, data: DatasetSplit, trained: TrainResult, evaluated: EvalResult, vae: VaeFitResult,
    data_root: str, run_name: str,
) -> RegisterResult:
    """Log the run to MLflow, register the model folder, and move `champion` only if it is better."""
    registry = ModelRegistry(DataRoot(data_root), cfg.registry)
    version = data.version
    tags = {
        "dataset_version": version,
        "config_hash": config_hash(cfg),
        "manifest": data.manifest,
        "run_name": run_name,
    }
    params = {"config": redact_config(cfg.model_dump(mode="json"))}
    metrics = {**_numbers(evaluated.metrics), **_numbers(trained.metrics, "train_"), **_numbers(vae.metrics, "vae_")}
    steps = int(trained.metrics.get("steps") or 0)
    history = training_history(cfg, trained)
    prompts = data.held_out_captions(EXAMPLE_PROMPTS)
    with registry.run(run_name, params=params, tags=tags) as run_id:
        points = log_history(registry.client, run_id, history)
        log_dataset_input(
            registry.client,
            run_id,
            data.manifest,
            name=cfg.name,
            version=version,
            profile={"train_clips": trained.metrics.get("train_clips"), "val_clips": trained.metrics.get("val_clips")},
        )
        for path in [trained.loss_curve_png, evaluated.samples_gif, *evaluated.samples_mp4]:
            if path and Path(path).exists():
                registry.log_artifact(run_id, path, artifact_path="evaluation")
        model_dir = Path(trained.model_dir)
        write_model_card(model_dir, cfg, dataset_version=version, metrics=metrics, prompts=prompts)
        info = registry.register(run_id, model_dir, metrics=metrics, tags=tags, step=steps)
    promoted, reason = registry.promote_if_better(info.version, cfg.eval.metric, cfg.eval.higher_is_better)
    return RegisterResult(
        info.name,
        int(info.version),
        promoted,
        reason,
        info.run_id,
        registry.experiment_id,
        registry.tracking_uri,
        points,
        run_url(registry.tracking_uri, registry.experiment_id, info.run_id, os.environ.get(MLFLOW_UI_ENV)),
        version,
        prompts,
    )


def registered_markdown(r: RegisterResult, trained: TrainResult, evaluated: EvalResult) -> str:
    """The Prefect summary of a registered version: where it is, how to load it, what to look at."""
    backend = redact_url(r.tracking_uri)
    prompt = json.dumps(r.example_prompts[0] if r.example_prompts else "a caption like the training data's")
    return (f"## {r.name} v{r.version}\n\n"
            f"* champion: {'yes' if r.promoted else 'no'} ({r.reason})\n"
            f"* dataset version: `{r.dataset_version}`\n"
            f"* MLflow run: [{r.run_id}]({r.run_url}) (`mlflow ui --backend-store-uri {backend}`)\n"
            f"* model folder: `{trained.model_dir}`\n* loss curve: `{trained.loss_curve_png}`\n"
            f"* samples (GIF grid): `{evaluated.samples_gif}`\n* run folder: `{trained.run_dir}`\n"
            f"* load it: `mlflow.set_tracking_uri(\"{backend}\")`, then "
            f"`mlflow.pyfunc.load_model(\"models:/{r.name}/{r.version}\").predict([{prompt}])`\n")


@task(name="register", **STAGE_RETRIES)
def register_task(
    cfg: SoraFlowConfig, data: DatasetSplit, trained: TrainResult, evaluated: EvalResult, vae: VaeFitResult,
    data_root: str, run_name: str,
) -> RegisterResult:
    """Log the run to MLflow, register the model folder, and move `champion` only if it is better."""
    registered = register_model(cfg, data, trained, evaluated, vae, data_root, run_name)
    create_link_artifact(registered.run_url, link_text=f"MLflow run of {registered.name} v{registered.version}",
                         key="mlflow-run", description="The training run in the MLflow UI (start `mlflow ui` first)")
    create_markdown_artifact(registered_markdown(registered, trained, evaluated), key="registered-model",
                             description="The registered MLflow model version")
    return registered
