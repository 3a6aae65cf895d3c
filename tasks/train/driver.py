"""STDiT training with Ray Train: Open-Sora v1.0's scripts/train.py on TorchTrainer (Train V2).

Driver (`train`), in this process:

    manifest --split_rows--> training clips (held-out clips never train)
      -> VAE: vae.path, or the tiny VAE fitted by tasks.vae_fit
      -> latent cache (train.use_latent_cache) or the online path (VAE + T5 in the step)
      -> TorchTrainer(train_loop_per_worker, ScalingConfig(train.num_workers, train.use_gpu),
                      RunConfig(name, storage_path=<root>/runs, FailureConfig(train.max_failures)))
         num_workers 0 = Ray's local mode: the loop runs here, no Ray cluster is started
      -> the latest checkpoint's EMA weights -> model folder <run>/model + loss_curve.png

Each worker (`train_loop_per_worker`), as v1.0's loop (reference section 6):

    batch {"x0": (B, C, T, h, w), "y": (B, 1, L, C_text), "mask": (B, L)}
    t = scheduler.sample_timesteps(B)                             (B,)
    loss = scheduler.training_loss(STDiT, x0, {y, mask}, t)["loss"].mean()
        (caption dropout happens inside STDiT in train mode)
    backward -> clip_grad_norm_(train.grad_clip) -> AdamW(lr, weight_decay) step
    EMA (fp32, decay train.ema_decay, trainable parameters, every step)
    every log_every steps: a progress line + ray.train.report(metrics)
    every ckpt_every steps and at the end: save_training_state (safetensors + JSON: model,
        EMA, optimizer, step, epoch, data position, loss history) and
        ray.train.report(metrics, checkpoint) -- all ranks report, rank 0 passes the checkpoint

Resume: a run with the same name continues from its latest checkpoint (Ray's
get_checkpoint() after a worker restart or a re-instantiated trainer, or the newest
<run>/checkpoint_step_* folder, e.g. from local mode); step, data position and loss history
carry on. Checkpoints never hold pickles.

Test hook (tests only): with SORAFLOW_TEST_KILL_AT_STEP=N and SORAFLOW_TEST_KILL_MARKER=<file>
set, the last-rank Ray worker calls os._exit(1) right after step N, once (it creates the marker
file first), so a test can watch FailureConfig restart the group from the last checkpoint.
It is inert in local mode (num_workers=0), where it would kill the caller.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import task
from torch.utils.data import DataLoader, DistributedSampler

from soraflow.configs.schema import SoraFlowConfig, config_hash
from soraflow.storage.checkpoints import CheckpointError, load_training_state, save_training_state
from soraflow.storage.layout import DataRoot
from soraflow.storage.latent_cache import rows_for, split_rows
from soraflow.storage.manifest import dataset_version
from soraflow.tasks.task_policy import STAGE_RETRIES
from soraflow.tasks.train.encode import prepare_latent_cache

CKPT_PREFIX = "checkpoint_step_"
KEEP_CHECKPOINTS = 3
KILL_ENV, KILL_MARKER_ENV = "SORAFLOW_TEST_KILL_AT_STEP", "SORAFLOW_TEST_KILL_MARKER"


@dataclass
class TrainResult:
    run_dir: Path  # <root>/runs/<name>: Ray Train storage, checkpoints, exports
    checkpoint_dir: Path  # the latest training state (state.safetensors + state.json)
    model_dir: Path  # exported EMA model folder (tasks.components.export_model_dir layout)
    metrics: dict = field(default_factory=dict)  # final_loss, steps, samples_per_s, ...
    loss_curve_png: Path | None = None
    resumed_from_step: int = 0  # step of the checkpoint this call started from (0 = fresh run)


# ---------------------------------------------------------------- checkpoints on disk


def checkpoint_step(folder: str | Path) -> int | None:
    """The step stored in a training-state folder, or None if it is not a complete one."""
    p = Path(folder) / "state.json"
    if not (p.exists() and (Path(folder) / "state.safetensors").exists()):
        return None
    try:
        return int(json.loads(p.read_text())["meta"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run_dir: str | Path) -> tuple[Path | None, int]:
    """(folder, step) of the newest complete checkpoint under a run folder, or (None, 0)."""
    best: tuple[Path | None, int] = (None, 0)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return best
    for d in run_dir.glob(f"{CKPT_PREFIX}*"):
        step = checkpoint_step(d)
        if step is not None and (best[0] is None or step > best[1]):
            best = (d, step)
    return best


def _prune_checkpoints(run_dir: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    found = sorted((s, d) for d in run_dir.glob(f"{CKPT_PREFIX}*") if (s := checkpoint_step(d)) is not None)
    for _, d in found[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- data


class StatefulDistributedSampler(DistributedSampler):
    """DistributedSampler that can skip the first `start_index` samples of an epoch (Open-Sora's, for resume)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        self.start_index = int(start_index)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index :])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start_index)


def _build_dataset(config: dict, cfg: SoraFlowConfig, device: torch.device):
    """(dataset, encoder): encoder is None for the cache, an OnlineEncoder for the online path."""
    from soraflow.storage.latent_cache import LatentCacheDataset, OnlineEncoder

    data = config["data"]
    v = cfg.video
    if data["kind"] == "cache":
        ds = LatentCacheDataset(data["cache_dir"], v.num_frames, v.frame_interval, seed=cfg.train.seed, train=True,
                                clip_ids=config["train_clip_ids"])
        return ds, None
    from soraflow.storage.dataset import VideoClipDataset
    from soraflow.tasks.train.model_factory import load_text_encoder, load_vae

    root = DataRoot(config["root"])
    wanted = set(config["train_clip_ids"])
    rows = [r for r in rows_for(data["manifest"]) if r["clip_id"] in wanted]
    ds = VideoClipDataset(rows, v.num_frames, v.frame_interval, tuple(v.image_size), seed=cfg.train.seed, train=True)
    vae, _ = load_vae(cfg, root, Path(data["vae_dir"]))
    te = load_text_encoder(cfg, root, Path(data["text_encoder_dir"]))
    return ds, OnlineEncoder(vae.to(device), te)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ---------------------------------------------------------------- the worker loop


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def wrap_for_strategy(model: torch.nn.Module, ema: torch.nn.Module, strategy: str, world: int):
    """(model, ema, optimizer-state format) for one worker: unwrapped when alone, else DDP or FSDP.

    FSDP (GPUs only, Ray's prepare_model refuses it on CPU) shards the EMA copy exactly like
    the model (same module tree, same flat parameters), so each rank updates the EMA of its own shard.
    """
    if world <= 1:
        return model, ema, "plain"
    import ray.train.torch

    if strategy == "fsdp":
        kw = {"use_orig_params": False}  # flat shards; the FSDP1 optimizer round trip with use_orig_params=True loses exp_avg (torch 2.14)
        model = ray.train.torch.prepare_model(model, parallel_strategy="fsdp", parallel_strategy_kwargs=kw)
        ema = ray.train.torch.prepare_model(ema, parallel_strategy="fsdp", parallel_strategy_kwargs=kw)
        return model, ema, "fsdp"
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp"), ema, "plain"


def ema_pairs(model: torch.nn.Module, ema: torch.nn.Module, fmt: str) -> tuple[list, list]:
    """(EMA tensors, model tensors) paired by name over trainable parameters (v1.0 skips pos_embed)."""
    src = model if fmt == "fsdp" else _unwrap(model)
    ema_named = dict(ema.named_parameters())
    pairs = [(ema_named[n], p) for n, p in src.named_parameters() if p.requires_grad and "pos_embed" not in n]
    return [e for e, _ in pairs], [p for _, p in pairs]


def full_states(model, ema, optimizer, fmt: str) -> tuple[dict, dict, dict]:
    """Full (model, EMA, optimizer) state dicts; under FSDP a collective call, full on rank 0 only."""
    if fmt != "fsdp":
        return _unwrap(model).state_dict(), ema.state_dict(), optimizer.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    sd_cfg, osd_cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True), FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, sd_cfg, osd_cfg):
        model_sd, optim_sd = model.state_dict(), FSDP.optim_state_dict(model, optimizer)
    with FSDP.state_dict_type(ema, StateDictType.FULL_STATE_DICT, sd_cfg):
        ema_sd = ema.state_dict()
    return model_sd, ema_sd, optim_sd


def load_optimizer(model, optimizer, saved: dict, fmt: str) -> None:
    if fmt == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        saved = FSDP.optim_state_dict_to_load(model, optimizer, saved)
    optimizer.load_state_dict(saved)


def clip_grads(model, max_norm: float, fmt: str) -> torch.Tensor:
    """Global-norm clipping; FSDP needs its own (the norm spans every rank's shard)."""
    if fmt == "fsdp":
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _resume_state(run_dir: Path) -> tuple[dict | None, Path | None]:
    """The newest training state: Ray's checkpoint (worker restart / resumed run) or a run folder's."""
    import ray.train

    candidates: list[tuple[int, Path]] = []
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None and Path(ray_ckpt.path).exists():
        step = checkpoint_step(ray_ckpt.path)
        if step is not None:
            candidates.append((step, Path(ray_ckpt.path)))
    folder, step = latest_checkpoint(run_dir)
    if folder is not None:
        candidates.append((step, folder))
    if not candidates:
        return None, None
    step, folder = max(candidates, key=lambda c: c[0])
    return load_training_state(folder), folder


def train_loop_per_worker(config: dict) -> dict:
    """One Ray Train worker (or the caller itself in local mode); see the module docstring."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from soraflow.models.stdit import build_stdit
    from soraflow.storage.checkpoints import load_weights_into, read_state_dict
    from soraflow.tasks.train.model_factory import scheduler_for

    cfg = SoraFlowConfig.model_validate(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_mode = config["local_mode"]
    if local_mode:
        device = torch.device("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu")
    else:
        import ray.train.torch

        device = ray.train.torch.get_device()
    run_dir = Path(config["run_dir"])
    total_steps = int(config["total_steps"])
    is_main = rank == 0

    state, state_dir = _resume_state(run_dir)
    meta = state["meta"] if state else {}
    start_step = int(meta.get("step", 0))
    torch.manual_seed(tc.seed)  # the same initial weights (and null caption) on every rank
    model = build_stdit(config["preset"], **config["model_kwargs"])
    if state:
        model.load_state_dict(state["model"])
    elif cfg.model.from_pretrained:
        load_weights_into(model, read_state_dict(cfg.model.from_pretrained), cfg.model.from_pretrained)
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)  # v1.0: EMA starts as a copy
    if state and state.get("ema"):
        ema.load_state_dict(state["ema"])
    model.to(device).train()
    ema.to(device)
    # Per-rank streams (caption dropout, timesteps, noise) that depend on the start step, so a
    # resumed run is reproducible from its checkpoint.
    torch.manual_seed(tc.seed + 1009 * rank + 7919 * start_step)
    gen = torch.Generator(device=device).manual_seed(tc.seed + 31 * rank + 7919 * start_step + 1)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model, ema, fmt = wrap_for_strategy(model, ema, tc.strategy, world)
    ema_list, model_list = ema_pairs(model, ema, fmt)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay)
    if state and state.get("optimizer"):
        if meta.get("optimizer_format", "plain") == fmt:
            load_optimizer(model, optimizer, state["optimizer"], fmt)
        elif is_main:
            print(f"train: optimizer state saved as {meta.get('optimizer_format')!r}, running as {fmt!r}: AdamW restarts its moments", flush=True)
    scheduler = scheduler_for(cfg)

    dataset, encoder = _build_dataset(config, cfg, device)
    sampler = StatefulDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed, drop_last=True)
    per_rank = len(sampler)
    if per_rank < tc.batch_size:
        raise ValueError(f"train.batch_size={tc.batch_size} is larger than the {per_rank} training clips each of the "
                         f"{world} worker(s) gets ({len(dataset)} clips): lower train.batch_size or add data")
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                        num_workers=tc.dataloader_workers, persistent_workers=False)

    epoch = int(meta.get("epoch", 0))
    batch_in_epoch = int(meta.get("batch_in_epoch", 0)) if int(meta.get("world_size", world)) == world else 0
    loss_history: list[list[float]] = [list(x) for x in meta.get("loss_history", [])]
    segments = list(meta.get("segments", [])) + [{"start_step": start_step, "world_size": world, "from": str(state_dir) if state_dir else None}]
    samples_seen = int(meta.get("samples_seen", 0))
    if is_main:
        where = f"resuming from step {start_step} ({state_dir})" if state else "from scratch"
        print(f"train: {config['preset']} ({n_params / 1e6:.2f} M trainable params) on {len(dataset)} clips, "
              f"{world} worker(s) x batch {tc.batch_size}, steps {start_step}->{total_steps}, {where}", flush=True)

    kill_at, kill_marker = config.get("test_kill", (0, None))
    if device.type == "cpu":  # subnormal floats are 10-100x slower on CPUs; flush them to zero
        torch.set_flush_denormal(True)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    step = start_step
    t_start, window = time.perf_counter(), []
    last_metrics: dict[str, Any] = {}

    def metrics_now(loss_avg: float) -> dict[str, Any]:
        elapsed = time.perf_counter() - t_start
        return {"step": step, "epoch": epoch, "loss": loss_history[-1][1], "avg_loss": loss_avg,
                "samples_per_s": (step - start_step) * tc.batch_size * world / max(elapsed, 1e-9),
                "start_step": start_step, "world_size": world}

    def save_and_report(metrics: dict[str, Any]) -> None:
        name = f"{CKPT_PREFIX}{step:07d}"
        state_meta = {
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "sample_start_index": batch_in_epoch * tc.batch_size, "world_size": world,
            "samples_seen": samples_seen, "loss_history": loss_history, "segments": segments,
            "samples_per_s": metrics["samples_per_s"], "config_hash": config_hash(cfg),
            "preset": config["preset"], "model_kwargs": config["model_kwargs"], "optimizer_format": fmt,
        }
        model_sd, ema_sd, optim_sd = full_states(model, ema, optimizer, fmt)  # every rank (FSDP gathers)
        if not is_main:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        if local_mode:  # nothing copies the folder for us: write it in place
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
            save_training_state(tmp, model_sd, ema_sd, optim_sd, state_meta)
            if (run_dir / name).exists():  # a leftover from an attempt that died after saving
                shutil.rmtree(run_dir / name)
            os.replace(tmp, run_dir / name)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(run_dir / name)), checkpoint_dir_name=name)
            _prune_checkpoints(run_dir)
        else:  # Ray persists it as <storage_path>/<name>/<checkpoint_dir_name>
            with tempfile.TemporaryDirectory(prefix="soraflow-ckpt-") as tmp:
                save_training_state(tmp, model_sd, ema_sd, optim_sd, state_meta)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    while step < total_steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.set_start_index(batch_in_epoch * tc.batch_size)
        finished_epoch = True
        for batch in loader:
            batch = _to_device(batch, device)
            if encoder is not None:
                batch = encoder(batch, generator=gen)
            x0 = batch["x0"]  # (B, C, T, h, w)
            t = scheduler.sample_timesteps(x0.shape[0], device, gen)  # (B,)
            with autocast:
                out = scheduler.training_loss(model, x0, model_kwargs={"y": batch["y"], "mask": batch["mask"]}, t=t, generator=gen)
            loss = out["loss"].float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grads(model, tc.grad_clip, fmt)
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_list, [p.detach().float() for p in model_list], 1.0 - tc.ema_decay)
            loss_value = loss.detach()
            if world > 1:
                dist.all_reduce(loss_value)
                loss_value /= world
            step += 1
            batch_in_epoch += 1
            samples_seen += x0.shape[0] * world
            loss_history.append([step, float(loss_value)])
            window.append(float(loss_value))

            if kill_at and not local_mode and step == kill_at and rank == world - 1 and kill_marker and not Path(kill_marker).exists():
                Path(kill_marker).write_text(f"killed rank {rank} after step {step}\n")
                print(f"train: test hook {KILL_ENV}={kill_at}: rank {rank} exits now", flush=True)
                os._exit(1)

            is_last = step >= total_steps
            if step % tc.log_every == 0 or step % tc.ckpt_every == 0 or is_last:
                avg = sum(window) / len(window)
                metrics = {**metrics_now(avg), "grad_norm": float(grad_norm)}
                if is_main and (step % tc.log_every == 0 or is_last):
                    print(f"train: step {step}/{total_steps} loss {avg:.4f} (mean of {len(window)}) grad-norm {float(grad_norm):.2f} "
                          f"{metrics['samples_per_s']:.1f} samples/s, {time.perf_counter() - t_start:.0f} s", flush=True)
                if step % tc.ckpt_every == 0 or is_last:
                    save_and_report(metrics)
                else:
                    ray.train.report(metrics)
                window = []
                last_metrics = metrics
            if is_last:
                finished_epoch = False
                break
        if finished_epoch:
            epoch += 1
            batch_in_epoch = 0
    if device.type == "cpu":
        torch.set_flush_denormal(False)  # the default, for the caller in local mode
    return last_metrics


# ---------------------------------------------------------------- the driver


def _as_root(root) -> DataRoot:
    return root if isinstance(root, DataRoot) else DataRoot(root)


def write_loss_curve(path: Path, loss_history: list[list[float]], segments: list[dict], title: str) -> Path:
    """Per-step loss (thin) and its moving average (thick); dotted lines where a run resumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array([s for s, _ in loss_history], dtype=float)
    losses = np.array([v for _, v in loss_history], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss per step")
    k = max(1, min(50, len(losses) // 10))
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=2.0, label=f"moving average ({k} steps)")
    for seg in segments[1:]:
        if seg.get("start_step"):
            ax.axvline(seg["start_step"], ls=":", color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _start_ray(cfg: SoraFlowConfig) -> bool:
    """Connect to train.ray_address or start a local instance; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {
        # Train V2 would also route every print through its logger: each progress line twice.
        # A job-level runtime_env drops Ray's default of one OpenMP thread per worker (CPU: 1
        # each): set it, or every worker spawns a thread per core and they fight (4x slower here).
        "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "OMP_NUM_THREADS": "1"},
        # On a real cluster the autoscaling coordinator's warnings stay visible (quiet_local_ray_logs).
        "worker_process_setup_hook": "soraflow.tasks.train.driver." + ("quiet_ray_logs" if cfg.train.ray_address else "quiet_local_ray_logs"),
    }
    if cfg.train.ray_address:
        ray.init(address=cfg.train.ray_address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)
    return True


class _BelowLevel:
    """A logging filter that drops records under `level`."""

    def __init__(self, level: int):
        self.level = level

    def filter(self, record) -> bool:
        return record.levelno >= self.level


def _quiet(name: str, level: int) -> None:
    """Raise a logger's threshold to `level`. Also as a filter: Train's controller configures the
    `ray.train` logger with logging.config.dictConfig after the set-up hook has run, and that resets
    the level of every existing child logger (filters survive it)."""
    import logging

    logger = logging.getLogger(name)
    logger.setLevel(level)
    if not any(isinstance(f, _BelowLevel) for f in logger.filters):
        logger.addFilter(_BelowLevel(level))


def quiet_ray_logs() -> None:
    """Worker set-up hook (and called by `train` itself in local mode, where the loop runs in this
    process): keep training output to our own progress lines. Without the dashboard
    (local runs) the state API is absent, and Train's placement-group cleaner would warn about it
    every second of the run."""
    import logging

    import ray.train.v2._internal.execution.context as train_context

    _quiet("ray.train.v2._internal.execution.controller.placement_group_cleaner", logging.ERROR)
    # Train logs every ray.train.report at INFO through a logger named after its file (outside
    # the ray.train hierarchy that LoggingConfig sets): one long line per report and rank.
    _quiet(train_context.__file__, logging.WARNING)
    # ... and, in local mode (num_workers 0), through the module logger of train_fn_utils
    _quiet("ray.train.v2._internal.execution.train_fn_utils", logging.WARNING)


def quiet_local_ray_logs() -> None:
    """quiet_ray_logs, plus: on the local instance we start ourselves (no autoscaler), Train's
    controller still asks the autoscaling coordinator for its workers' resources, within 5 s; on
    2 busy cores the coordinator actor is often not up by then and a harmless timeout prints a
    full traceback. On a real cluster (train.ray_address) that warning stays visible."""
    import logging

    quiet_ray_logs()
    _quiet("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client", logging.ERROR)


def train(
    cfg: SoraFlowConfig,
    manifest_path: str | Path,
    root,
    run_name: str | None = None,
    vae_dir: str | Path | None = None,
) -> TrainResult:
    """Train (or resume) STDiT on the manifest's training split; see the module docstring."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from soraflow.tasks.train.model_factory import export_model_dir, load_text_encoder, load_vae, stdit_kwargs, text_encoder_path

    t0 = time.perf_counter()
    root = _as_root(root)
    tc = cfg.train
    name = run_name or tc.run_name
    run_dir = root.run_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_for(manifest_path)
    if not rows:
        raise ValueError(f"{manifest_path}: no ok rows to train on")
    train_rows, val_rows = split_rows(rows, tc.val_fraction)

    if vae_dir is None:
        from soraflow.tasks.train.vae_fit import fit_vae

        vae_dir = fit_vae(cfg, manifest_path, root).path
    vae_dir = Path(vae_dir)
    te_dir = text_encoder_path(cfg, root)
    vae, _ = load_vae(cfg, root, vae_dir)
    te = load_text_encoder(cfg, root, te_dir)
    model_kwargs = stdit_kwargs(cfg, vae, te.output_dim)

    timings: dict[str, float] = {}
    if tc.use_latent_cache:
        t = time.perf_counter()
        info = prepare_latent_cache(cfg, manifest_path, root, vae_dir, vae=vae, text_encoder=te)
        timings["latent_cache"] = time.perf_counter() - t
        data = {"kind": "cache", "cache_dir": str(info.path)}
    else:
        data = {"kind": "online", "manifest": str(Path(manifest_path).resolve()), "vae_dir": str(vae_dir.resolve()),
                "text_encoder_dir": str(Path(te_dir).resolve())}
    del vae, te

    _, resumed_from = latest_checkpoint(run_dir)
    local_mode = tc.num_workers == 0
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "data": data,
        "train_clip_ids": [r["clip_id"] for r in train_rows],
        "preset": cfg.model.preset,
        "model_kwargs": model_kwargs,
        "run_dir": str(run_dir),
        "root": str(root.root),
        "total_steps": tc.steps,
        "local_mode": local_mode,
        # the test hook, read here so it reaches workers on any node: (step, marker file)
        "test_kill": (int(os.environ.get(KILL_ENV, "0") or 0), os.environ.get(KILL_MARKER_ENV)),
    }
    t = time.perf_counter()
    if resumed_from >= tc.steps:
        print(f"train: run {name!r} already has step {resumed_from} >= train.steps={tc.steps}; nothing to train", flush=True)
    else:
        if local_mode:  # the loop runs here, not in a worker that runs the set-up hook
            started = False
            quiet_ray_logs()
        else:
            started = _start_ray(cfg)
        try:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=loop_config,
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
                import ray

                ray.shutdown()
    timings["fit"] = time.perf_counter() - t

    ckpt_dir, step = latest_checkpoint(run_dir)
    if ckpt_dir is None:
        raise CheckpointError(f"{run_dir}: training finished but left no checkpoint_step_* folder")
    state = load_training_state(ckpt_dir)
    meta = state["meta"]

    model_dir = run_dir / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=run_dir))
    try:
        export_model_dir(
            tmp, cfg, state["ema"], meta.get("model_kwargs", model_kwargs),
            vae_dir=None if cfg.vae.path else vae_dir,
            text_encoder_dir=None if cfg.text_encoder.path else Path(te_dir),
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    history = meta["loss_history"]
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
        "val_clips": len(val_rows),
        "world_size": meta.get("world_size", 1),
        "segments": len(meta.get("segments", [])),  # 1 + resumes + worker restarts
        "seconds": time.perf_counter() - t0,
        **{f"{k}_s": v for k, v in timings.items()},
    }
    print(f"train: done: step {step}, loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}, "
          f"model {model_dir}, loss curve {png}", flush=True)
    return TrainResult(run_dir, ckpt_dir, model_dir, metrics, png, resumed_from)


def run_name_for(cfg: SoraFlowConfig, manifest: str) -> str:
    """One training run per (dataset version, config): re-running resumes it, new data starts a new one."""
    return f"{cfg.train.run_name}-{dataset_version(manifest)[:8]}-{config_hash(cfg)[:6]}"


@task(name="train-stdit", **STAGE_RETRIES)
def train_task(manifest: str, vae_dir: str, config: dict, data_root: str, run_name: str) -> dict:
    """Ray Train STDiT; resumes run `run_name` from its latest checkpoint if it exists."""
    result = train(SoraFlowConfig.model_validate(config), manifest, DataRoot(data_root), run_name=run_name, vae_dir=vae_dir)
    return {
        "run_dir": str(result.run_dir),
        "checkpoint_dir": str(result.checkpoint_dir),
        "model_dir": str(result.model_dir),
        "loss_curve": str(result.loss_curve_png) if result.loss_curve_png else None,
        "metrics": result.metrics,
        "resumed_from_step": result.resumed_from_step,
    }
