"""STDiT training with Ray Train: Open-Sora v1.0's scripts/train.py on TorchTrainer (Train V2).

Driver (`train`), in this process:

    DatasetSplit (manifest read and split once by the flow): training clips only
      -> the VAE folder (vae.path, or the tiny VAE the flow's fit task made)
      -> latent cache (train.use_latent_cache; given by the flow or built here) or the online
         path (VAE + T5 in the step)
      -> TorchTrainer(loop.train_loop_per_worker, ScalingConfig(train.num_workers, train.use_gpu),
                      RunConfig(name, storage_path=<root>/runs, FailureConfig(train.max_failures)))
         num_workers 0 = Ray's local mode: the loop runs here, no Ray cluster is started
         STDiT built for the cache's latent (C, T, h, w) and caption width: no VAE or T5 loaded here
      -> the newest valid checkpoint's EMA weights -> model folder <run>/model + loss_curve.png
         (its loss history returned in TrainResult, not read again by later stages)

The worker loop is tasks/train/loop.py; checkpoints and resume tasks/train/resume.py; DDP/FSDP
tasks/train/distributed.py; the EMA tasks/train/ema.py; starting Ray and quieting its logs
ray_runtime.py. The model parts are built by storage/model_parts.py, as everywhere else.
A run with the same name continues from its newest valid checkpoint. Checkpoints never hold pickles.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from soraflow.configs.loader import config_hash
from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.checkpoints import CheckpointError
from soraflow.storage.data.holdout import DatasetSplit
from soraflow.storage.data.latent_cache import CacheInfo
from soraflow.storage.layout import DataRoot
from soraflow.storage.model_parts import latent_size, load_text_encoder, load_vae, stdit_kwargs, text_encoder_path
from soraflow.storage.registry.model_folder import export_model_dir
from soraflow.tasks.task_policy import STAGE_RETRIES
from soraflow.tasks.train.encode import prepare_latent_cache
from soraflow.tasks.train.loss_curve import write_loss_curve
from soraflow.tasks.train.progress import watch_progress
from soraflow.tasks.train.resume import (
    KEEP_CHECKPOINTS,
    checkpoint_folders,
    latest_step,
    newest_valid_state,
)


@dataclass
class TrainResult:
    run_dir: Path  # <root>/runs/<name>: Ray Train storage, checkpoints, exports
    checkpoint_dir: Path  # the newest valid training state (state.safetensors + state.json + complete.json)
    model_dir: Path  # exported EMA model folder (storage/registry/model_folder.py layout)
    metrics: dict = field(default_factory=dict)  # final_loss, steps, samples_per_s, ...
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of every step, resumes included
    loss_curve_png: Path | None = None
    resumed_from_step: int = 0  # step of the checkpoint this call started from (0 = fresh run)


def _fit(cfg: SoraFlowConfig, name: str, root: DataRoot, loop_config) -> None:
    """Run the loop: here (local mode) or on Ray workers, starting Ray if nothing is connected."""
    # Imported here, not at the top: flows import this module to declare train_task, and Ray
    # Train takes seconds to import; it loads only when a run really trains.
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer
    from soraflow.tasks.train.loop import train_loop_per_worker
    from soraflow.tasks.train.ray_runtime import quiet_ray_logs, start_ray

    tc = cfg.train
    if loop_config.local_mode:  # the loop runs here, not in a worker that runs the set-up hook
        started = False
        quiet_ray_logs()
    else:
        started = start_ray(cfg)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"loop": loop_config},  # Ray's train_loop_config is a dict
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu),
            run_config=RunConfig(
                name=name,
                storage_path=str(root.runs),
                failure_config=FailureConfig(max_failures=tc.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                logging_config=LoggingConfig(log_level="WARNING"),  # not one INFO line per report
            ),
            torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()


def _export(cfg: SoraFlowConfig, run_dir: Path, state: dict, model_kwargs: dict, vae_dir: Path, te_dir: Path) -> Path:
    """The EMA weights as a self-contained model folder <run>/model, replaced atomically."""
    model_dir = run_dir / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=run_dir))
    try:
        export_model_dir(
            tmp, cfg, state["ema"], state["meta"].get("model_kwargs", model_kwargs),
            vae_dir=None if cfg.vae.path else vae_dir,
            text_encoder_dir=None if cfg.text_encoder.path else te_dir,
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def train(
    cfg: SoraFlowConfig,
    data: DatasetSplit,
    root: DataRoot,
    vae_dir: str | Path,
    run_name: str | None = None,
    cache: CacheInfo | None = None,
    on_step: Sequence[Callable] = (),
) -> TrainResult:
    """Train (or resume) STDiT on the training split of `data`; see the module docstring.

    `cache`: the latent cache the flow built (built here when train.use_latent_cache and none is
    given). `on_step`: callables run by every worker after each step (loop.StepInfo), e.g. test hooks.
    """
    from soraflow.tasks.train.loop import (  # with Ray, see _fit
        CacheData,
        LoopConfig,
        OnlineData,
    )

    t0 = time.perf_counter()
    tc = cfg.train
    name = run_name or tc.run_name
    run_dir = root.run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not data.rows:
        raise ValueError(f"{data.manifest}: no ok rows to train on")
    train_rows = data.train

    vae_dir = Path(vae_dir)
    te_dir = Path(text_encoder_path(cfg, root))
    timings: dict[str, float] = {}
    if tc.use_latent_cache:  # the cache's index says what STDiT is built for: no VAE or T5 loaded here
        t = time.perf_counter()
        cache = cache or prepare_latent_cache(cfg, data, root, vae_dir)
        timings["latent_cache"] = time.perf_counter() - t
        loop_data = CacheData(str(cache.path))
        model_kwargs = stdit_kwargs(cfg, cache.latent, cache.caption_channels)
    else:  # the online path: the workers load both to encode in the step; here they give the sizes
        loop_data = OnlineData(train_rows, str(vae_dir.resolve()), str(te_dir.resolve()))
        vae, _ = load_vae(cfg, root, vae_dir)
        model_kwargs = stdit_kwargs(cfg, latent_size(cfg, vae), load_text_encoder(cfg, root, te_dir).output_dim)
        del vae

    resumed_from = latest_step(run_dir)
    loop_config = LoopConfig(
        cfg=cfg,
        data=loop_data,
        train_clip_ids=[r["clip_id"] for r in train_rows],
        model_kwargs=model_kwargs,
        run_dir=str(run_dir),
        root=str(root.root),
        total_steps=tc.steps,
        local_mode=tc.num_workers == 0,
        on_step=list(on_step),
    )
    t = time.perf_counter()
    if resumed_from >= tc.steps:
        print(
            f"train: run {name!r} already has step {resumed_from} >= train.steps={tc.steps}; nothing to train",
            flush=True,
        )
    else:
        _fit(cfg, name, root, loop_config)
    timings["fit"] = time.perf_counter() - t

    ckpt_dir, state = newest_valid_state(checkpoint_folders(run_dir))
    if ckpt_dir is None:
        raise CheckpointError(f"{run_dir}: training finished but left no valid checkpoint_step_* folder")
    meta = state["meta"]
    step = int(meta["step"])
    model_dir = _export(cfg, run_dir, state, model_kwargs, vae_dir, te_dir)

    history = [(int(s), float(v)) for s, v in meta["loss_history"]]
    png = write_loss_curve(run_dir / "loss_curve.png", history, meta.get("segments", []),
                           f"{cfg.model.preset}, {len(train_rows)} clips, run {name}")
    tail = [v for _, v in history[-max(1, min(tc.log_every, len(history))):]]
    head = [v for _, v in history[: max(1, min(tc.log_every, len(history)))]]
    metrics = {
        "final_loss": sum(tail) / len(tail),
        "first_loss": sum(head) / len(head),
        "steps": step,
        "samples_per_s": meta.get("samples_per_s", 0.0),
        "samples_seen": meta.get("samples_seen", 0),
        "train_clips": len(train_rows),
        "val_clips": len(data.held_out),
        "world_size": meta.get("world_size", 1),
        "segments": len(meta.get("segments", [])),  # 1 + resumes + worker restarts
        "seconds": time.perf_counter() - t0,
        **{f"{k}_s": v for k, v in timings.items()},
    }
    print(f"train: done: step {step}, loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}, "
          f"model {model_dir}, loss curve {png}", flush=True)
    return TrainResult(run_dir, ckpt_dir, model_dir, metrics, history, png, resumed_from)


def run_name_for(cfg: SoraFlowConfig, dataset_version: str) -> str:
    """One training run per (dataset version, config): re-running resumes it, new data starts a new one."""
    return f"{cfg.train.run_name}-{dataset_version[:8]}-{config_hash(cfg)[:6]}"


@task(name="train-stdit", **STAGE_RETRIES)
def train_task(cfg: SoraFlowConfig, data: DatasetSplit, vae_dir: str, data_root: str, run_name: str,
               cache: CacheInfo | None = None) -> TrainResult:
    """Ray Train STDiT; resumes run `run_name` from its newest valid checkpoint if it exists."""
    root = DataRoot(data_root)
    artifact = create_progress_artifact(
        0.0, key="soraflow-train-progress", description=f"training {run_name}: starting"
    )

    def show(p: dict) -> None:
        update_progress_artifact(
            artifact,
            100.0 * p["step"] / max(1, p["total"]),
            description=f"training {run_name}: step {p['step']}/{p['total']}, loss {p['loss']:.4f}, "
            f"{p['samples_per_s']:.1f} samples/s",
        )

    with watch_progress(root.run_dir(run_name), show):
        return train(cfg, data, root, vae_dir, run_name=run_name, cache=cache)
