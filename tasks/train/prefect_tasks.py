"""The learning stages as Prefect tasks: VAE fit, latent cache, training, evaluation, registration.

Each wraps a plain function (tasks/vae_fit.py, tasks/train.py, tasks/evaluate.py,
storage/registry.py) and passes only paths, the config as a dict, and small results.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from soraflow.configs.schema import SoraFlowConfig, config_hash
from soraflow.storage.layout import DataRoot
from soraflow.storage.manifest import dataset_version
from soraflow.tasks.task_policy import RETRY_DELAYS, RETRY_JITTER, retry_unless_bad_input, stage_cache_key

_retry = dict(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=RETRY_JITTER, retry_condition_fn=retry_unless_bad_input)


def _cfg(config: dict) -> SoraFlowConfig:
    return SoraFlowConfig.model_validate(config)


def run_name_for(cfg: SoraFlowConfig, manifest: str) -> str:
    """One training run per (dataset version, config): re-running resumes it, new data starts a new one."""
    return f"{cfg.train.run_name}-{dataset_version(manifest)[:8]}-{config_hash(cfg)[:6]}"


@task(name="fit-vae", cache_key_fn=stage_cache_key, persist_result=True, **_retry)
def fit_vae_task(manifest: str, config: dict, data_root: str) -> dict:
    """Fit the tiny VAE on the dataset's frames (skipped when a pretrained VAE is configured)."""
    from soraflow.tasks.train.vae_fit import fit_vae

    result = fit_vae(_cfg(config), manifest, DataRoot(data_root))
    return {"path": str(result.path), "metrics": result.metrics, "fitted": result.fitted}


@task(name="latent-cache", cache_key_fn=stage_cache_key, persist_result=True, **_retry)
def latent_cache_task(manifest: str, vae_dir: str, config: dict, data_root: str) -> dict:
    """Encode every clip (VAE) and caption (T5) once, keyed by dataset and encoder versions."""
    from soraflow.tasks.train.driver import prepare_latent_cache

    info = prepare_latent_cache(_cfg(config), manifest, DataRoot(data_root), vae_dir)
    return {"path": str(info.path), "clips": info.clips, "captions": info.captions, "built": info.built, "seconds": info.seconds}


@task(name="train-stdit", **_retry)
def train_task(manifest: str, vae_dir: str, config: dict, data_root: str, run_name: str) -> dict:
    """Ray Train STDiT; resumes run `run_name` from its latest checkpoint if it exists."""
    from soraflow.tasks.train.driver import train

    result = train(_cfg(config), manifest, DataRoot(data_root), run_name=run_name, vae_dir=vae_dir)
    return {
        "run_dir": str(result.run_dir),
        "checkpoint_dir": str(result.checkpoint_dir),
        "model_dir": str(result.model_dir),
        "loss_curve": str(result.loss_curve_png) if result.loss_curve_png else None,
        "metrics": result.metrics,
        "resumed_from_step": result.resumed_from_step,
    }


@task(name="evaluate", **_retry)
def evaluate_task(manifest: str, model_dir: str, config: dict, data_root: str) -> dict:
    """Validation loss, held-out samples and prompt adherence of a trained model folder."""
    from soraflow.tasks.evaluate import evaluate

    out_dir = Path(model_dir).parent / "eval"
    result = evaluate(_cfg(config), manifest, model_dir, DataRoot(data_root), out_dir)
    return {
        "metrics": result.metrics,
        "samples": [str(p) for p in result.samples_mp4],
        "grid": str(result.samples_gif) if result.samples_gif else None,
        "per_prompt": result.per_prompt,
    }


@task(name="register", **_retry)
def register_task(manifest: str, trained: dict, evaluated: dict, vae: dict, config: dict, data_root: str, run_name: str) -> dict:
    """Log the run to MLflow, register the model folder, and move `champion` only if it is better."""
    from soraflow.storage.registry import ModelRegistry

    cfg = _cfg(config)
    registry = ModelRegistry(DataRoot(data_root), cfg.registry)
    version = dataset_version(manifest)
    tags = {"dataset_version": version, "config_hash": config_hash(cfg), "manifest": manifest, "run_name": run_name}
    params = {"config": cfg.model_dump(mode="json")}
    metrics = {**{k: float(v) for k, v in evaluated["metrics"].items() if isinstance(v, (int, float))},
               **{f"train_{k}": float(v) for k, v in trained["metrics"].items() if isinstance(v, (int, float))},
               **{f"vae_{k}": float(v) for k, v in vae["metrics"].items() if isinstance(v, (int, float))}}
    with registry.run(run_name, params=params, tags=tags) as run_id:
        registry.log_metrics(run_id, metrics)
        for path in [trained["loss_curve"], evaluated["grid"], *evaluated["samples"]]:
            if path and Path(path).exists():
                registry.log_artifact(run_id, path, artifact_path="evaluation")
        info = registry.register(run_id, Path(trained["model_dir"]), metrics=metrics, tags=tags)
    promoted, reason = registry.promote_if_better(info.version, cfg.eval.metric, cfg.eval.higher_is_better)
    return {"name": info.name, "version": info.version, "promoted": promoted, "reason": reason, "run_id": info.run_id}
