"""The per-worker STDiT training loop: Open-Sora v1.0's scripts/train.py loop on Ray Train.

Each worker (or the caller itself in Ray's local mode, num_workers=0):

    batch {"x0": (B, C, T, h, w), "y": (B, 1, L, C_text), "mask": (B, L)}
    t = scheduler.sample_timesteps(B)                             (B,)
    loss = scheduler.training_loss(STDiT, x0, {y, mask}, t)["loss"].mean()
        (caption dropout happens inside STDiT in train mode)
        (train.batch_threads > 1, in process: the batch in parts on as many threads, tasks/train/thread_parallel.py)
    backward -> clip_grad_norm_(train.grad_clip) -> AdamW(lr_at(step), weight_decay) step
        (a step whose gradient norm is not finite is skipped; MAX_NONFINITE_STEPS in a row stop the run)
        (lr_at: train.lr_schedule, tasks/train/lr_schedule.py)
    EMA (fp32, decay train.ema_decay, trainable parameters, every step)
    every log_every steps: a progress line + ray.train.report(metrics)
    every ckpt_every steps and at the end: save_training_state (safetensors + JSON: model,
        EMA, optimizer, step, epoch, data position, loss history; its completion marker last)
        and ray.train.report(metrics, checkpoint) -- all ranks report, rank 0 passes the checkpoint

Resume: the newest valid checkpoint (Ray's get_checkpoint() after a worker restart, or the run
folder's newest, tasks/train/resume.py); step, data position and loss history carry on.

`LoopConfig.on_step` holds callables run after every optimizer step with a `StepInfo` (tests
install one that kills a worker). They travel to Ray workers with the config (cloudpickle).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint
from soraflow.configs.schema import SoraFlowConfig, config_hash
from soraflow.models.noise import randn
from soraflow.models.stdit import build_stdit
from soraflow.storage.checkpoints import (
    load_weights_into,
    read_state_dict,
    save_training_state,
)
from soraflow.storage.data.dataset import VideoClipDataset
from soraflow.storage.data.latent_cache import LatentCacheDataset, OnlineEncoder
from soraflow.storage.layout import DataRoot
from soraflow.tasks.train.distributed import (
    StatefulDistributedSampler,
    average_grads,
    build_precision,
    clip_grads,
    ema_pairs,
    full_states,
    load_optimizer,
    mean_over_ranks,
    update_ema,
    wrap_for_strategy,
)
from soraflow.tasks.train.model_factory import (
    load_text_encoder,
    load_vae,
    scheduler_for,
)
from soraflow.tasks.train.lr_schedule import lr_at, set_lr
from soraflow.tasks.train.thread_parallel import BatchThreads, split_batch, torch_threads
from soraflow.tasks.train.progress import write_progress
from soraflow.tasks.train.resume import (
    Progress,
    checkpoint_name,
    prune_checkpoints,
    resume_state,
)
from torch.utils.data import DataLoader


@dataclass
class CacheData:
    """Train on the latent cache (storage/data/latent_cache.py)."""

    cache_dir: str


@dataclass
class OnlineData:
    """Train on the clips themselves, encoding each batch with the VAE and T5 in the step (as v1.0)."""

    rows: list[dict[str, Any]]
    vae_dir: str
    text_encoder_dir: str


@dataclass
class StepInfo:
    """What an on_step hook sees after each optimizer step."""

    step: int
    total_steps: int
    rank: int
    world_size: int
    local_mode: bool
    loss: float
    lr: float  # the learning rate this step ran at (train.lr_schedule)


@dataclass
class LoopConfig:
    cfg: SoraFlowConfig
    data: CacheData | OnlineData
    train_clip_ids: list[str]
    model_kwargs: dict[str, Any]  # STDiT constructor kwargs (model_factory.stdit_kwargs)
    run_dir: str
    root: str
    total_steps: int
    local_mode: bool  # num_workers 0: the loop runs in the caller, Ray persists nothing for us
    on_step: list[Callable[[StepInfo], None]] = field(default_factory=list)


# ---------------------------------------------------------------- set-up helpers


def build_dataset(lc: LoopConfig, device: torch.device):
    """(dataset, encoder): encoder is None for the cache, an OnlineEncoder for the online path."""
    v, seed = lc.cfg.video, lc.cfg.train.seed
    if isinstance(lc.data, CacheData):
        ds = LatentCacheDataset(lc.data.cache_dir, v.num_frames, v.frame_interval, seed=seed, train=True, clip_ids=lc.train_clip_ids)
        return ds, None
    root = DataRoot(lc.root)
    wanted = set(lc.train_clip_ids)
    rows = [r for r in lc.data.rows if r["clip_id"] in wanted]
    ds = VideoClipDataset(rows, v.num_frames, v.frame_interval, tuple(v.image_size), seed=seed, train=True)
    vae, _ = load_vae(lc.cfg, root, Path(lc.data.vae_dir))
    te = load_text_encoder(lc.cfg, root, Path(lc.data.text_encoder_dir))
    return ds, OnlineEncoder(vae.to(device), te)


def build_models(lc: LoopConfig, state: dict | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(STDiT, its fp32 EMA copy) from the training state, the configured weights, or seeded init."""
    torch.manual_seed(lc.cfg.train.seed)  # the same initial weights (and null caption) on every rank
    model = build_stdit(lc.cfg.model.preset, **lc.model_kwargs)
    if state:
        model.load_state_dict(state["model"])
    elif lc.cfg.model.from_pretrained:
        load_weights_into(model, read_state_dict(lc.cfg.model.from_pretrained), lc.cfg.model.from_pretrained)
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)  # v1.0: EMA starts as a copy
    if state and state.get("ema"):
        ema.load_state_dict(state["ema"])
    return model, ema


def restore_optimizer(model, optimizer, state: dict | None, fmt: str, is_main: bool) -> None:
    if not (state and state.get("optimizer")):
        return
    saved_fmt = state["meta"].get("optimizer_format", "plain")
    if saved_fmt == fmt:
        load_optimizer(model, optimizer, state["optimizer"], fmt)
    elif is_main:
        print(f"train: optimizer state saved as {saved_fmt!r}, running as {fmt!r}: AdamW restarts its moments", flush=True)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def step_metrics(p: Progress, window: list[float], elapsed: float, batch_size: int, world: int) -> dict[str, Any]:
    return {"step": p.step, "epoch": p.epoch, "loss": p.loss_history[-1][1], "avg_loss": sum(window) / len(window),
            "samples_per_s": (p.step - p.start_step) * batch_size * world / max(elapsed, 1e-9),
            "start_step": p.start_step, "world_size": world}


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_and_report(lc: LoopConfig, model, ema, optimizer, fmt: str, meta: dict, metrics: dict, rank: int) -> None:
    """Write the training state and report it to Ray; every rank calls this (FSDP gathers)."""
    name = checkpoint_name(meta["step"])
    model_sd, ema_sd, optim_sd = full_states(model, ema, optimizer, fmt)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    if lc.local_mode:  # nothing copies the folder for us: write it in place (temporary name, then rename)
        run_dir = Path(lc.run_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
        save_training_state(tmp, model_sd, ema_sd, optim_sd, meta)
        final = run_dir / name
        if final.exists():  # a leftover from an attempt that died after saving
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run_dir)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(final)), checkpoint_dir_name=name)
        prune_checkpoints(run_dir)
    else:  # Ray persists it as <storage_path>/<name>/<checkpoint_dir_name>
        with tempfile.TemporaryDirectory(prefix="soraflow-ckpt-") as tmp:
            save_training_state(tmp, model_sd, ema_sd, optim_sd, meta)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


# ---------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's entry point; Ray passes its train_loop_config dict, {"loop": LoopConfig}."""
    return run_loop(config["loop"])


def run_loop(lc: LoopConfig) -> dict:
    """One worker's training, top to bottom; see the module docstring."""
    cfg, tc = lc.cfg, lc.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if lc.local_mode:
        device = torch.device("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu")
    else:
        device = ray.train.torch.get_device()
    ray_ckpt = ray.train.get_checkpoint()
    state_dir, state = resume_state(lc.run_dir, ray_ckpt.path if ray_ckpt else None,
                                    log=lambda msg: print(msg, flush=True) if rank == 0 else None)
    p = Progress.resume(state["meta"] if state else {}, world, state_dir)

    model, ema = build_models(lc, state)
    model.to(device).train()
    ema.to(device)
    # Per-rank streams (caption dropout, timesteps, noise) that depend on the start step, so a
    # resumed run is reproducible from its checkpoint.
    torch.manual_seed(tc.seed + 1009 * rank + 7919 * p.start_step)
    gen = torch.Generator(device=device).manual_seed(tc.seed + 31 * rank + 7919 * p.start_step + 1)
    n_params = sum(q.numel() for q in model.parameters() if q.requires_grad)
    model, ema, fmt = wrap_for_strategy(model, ema, tc.strategy, world)
    ema_list, model_list = ema_pairs(model, ema, fmt)
    # The fused kernel updates all parameters in one pass (5-10% of a STDiT-Tiny step on CPU); the
    # same state dict as the per-tensor loop. FSDP's sharded parameters keep the default.
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=fmt != "fsdp" and device.type in ("cpu", "cuda"))
    restore_optimizer(model, optimizer, state, fmt, rank == 0)
    scheduler = scheduler_for(cfg)

    dataset, encoder = build_dataset(lc, device)
    sampler = StatefulDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed, drop_last=True)
    if len(sampler) < tc.batch_size:
        raise ValueError(f"train.batch_size={tc.batch_size} is larger than the {len(sampler)} training clips each of the "
                         f"{world} worker(s) gets ({len(dataset)} clips): lower train.batch_size or add data")
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                        num_workers=tc.dataloader_workers, persistent_workers=False)
    if rank == 0:
        where = f"resuming from step {p.start_step} ({state_dir})" if state else "from scratch"
        print(f"train: {cfg.model.preset} ({n_params / 1e6:.2f} M trainable params) on {len(dataset)} clips, "
              f"{world} worker(s) x batch {tc.batch_size}, steps {p.start_step}->{lc.total_steps}, {where}", flush=True)

    if device.type == "cpu":  # subnormal floats are 10-100x slower on CPUs; flush them to zero
        torch.set_flush_denormal(True)
    precision = build_precision(model, tc.precision, fmt, world)
    split = BatchThreads(tc.batch_threads if world == 1 else 1)
    with split, torch_threads(1) if split.n > 1 else nullcontext():  # one torch thread per batch thread
        t_start, window, last_metrics, nonfinite = time.perf_counter(), [], {}, 0
        while p.step < lc.total_steps:
            sampler.set_epoch(p.epoch)
            dataset.set_epoch(p.epoch)
            sampler.set_start_index(p.batch_in_epoch * tc.batch_size)
            for batch in loader:
                batch = to_device(batch, device)
                if encoder is not None:
                    batch = encoder(batch, generator=gen)
                x0 = batch["x0"]  # (B, C, T, h, w)
                t = scheduler.sample_timesteps(x0.shape[0], device, gen)  # (B,)
                optimizer.zero_grad(set_to_none=True)
                with precision.step() as m:  # forward + backward in the configured precision; grads land on the fp32 model
                    if split.n > 1:
                        loss = threaded_loss(split, precision, scheduler, m, batch, t, gen)
                    else:
                        out = scheduler.training_loss(m, x0, model_kwargs={"y": batch["y"], "mask": batch["mask"]}, t=t, generator=gen)
                        loss = out["loss"].float().mean()
                        loss.backward()
                if tc.precision == "bf16" and world > 1:
                    average_grads(model, world)  # the bf16 copy is not DDP-wrapped: average its grads here
                grad_norm = clip_grads(model, tc.grad_clip, fmt)
                lr = lr_at(tc, p.step)
                set_lr(optimizer, lr)
                if torch.isfinite(grad_norm):
                    optimizer.step()
                    update_ema(ema_list, model_list, tc.ema_decay)
                    nonfinite = 0
                else:  # one bad batch must not poison the weights: skip its update, as AMP's GradScaler does
                    nonfinite += 1
                    check_nonfinite(nonfinite, p.step + 1, float(grad_norm), tc.lr, rank)
                loss_value = float(mean_over_ranks(loss.detach(), world))
                p.advance(loss_value, x0.shape[0] * world)
                window.append(loss_value)
                for hook in lc.on_step:
                    hook(StepInfo(p.step, lc.total_steps, rank, world, lc.local_mode, loss_value, lr))

                is_last = p.step >= lc.total_steps
                log_now, save_now = p.step % tc.log_every == 0 or is_last, p.step % tc.ckpt_every == 0 or is_last
                if log_now or save_now:
                    metrics = {**step_metrics(p, window, time.perf_counter() - t_start, tc.batch_size, world), "grad_norm": float(grad_norm)}
                    if rank == 0 and log_now:
                        write_progress(lc.run_dir, p.step, lc.total_steps, metrics["avg_loss"], metrics["samples_per_s"])
                        print(f"train: step {p.step}/{lc.total_steps} loss {metrics['avg_loss']:.4f} (mean of {len(window)}) "
                              f"grad-norm {float(grad_norm):.2f} {metrics['samples_per_s']:.1f} samples/s, "
                              f"{time.perf_counter() - t_start:.0f} s", flush=True)
                    if save_now:
                        meta = {**p.meta(tc.batch_size, world), "samples_per_s": metrics["samples_per_s"], "config_hash": config_hash(cfg),
                                "preset": cfg.model.preset, "model_kwargs": lc.model_kwargs, "optimizer_format": fmt}
                        save_and_report(lc, model, ema, optimizer, fmt, meta, metrics, rank)
                    else:
                        ray.train.report(metrics)
                    window, last_metrics = [], metrics
                if is_last:
                    break
            else:  # the epoch ran out (no break): the next one starts at its first batch
                p.next_epoch()
    if device.type == "cpu":
        torch.set_flush_denormal(False)  # the default, for the caller in local mode
    return last_metrics


MAX_NONFINITE_STEPS = 5  # in a row: the run has diverged, it did not just meet one bad batch


def check_nonfinite(in_a_row: int, step: int, grad_norm: float, lr: float, rank: int) -> None:
    """Say that a step was skipped; stop the run once MAX_NONFINITE_STEPS in a row were."""
    if rank == 0:
        print(f"train: step {step}: gradient norm {grad_norm}, update skipped ({in_a_row} in a row)", flush=True)
    if in_a_row >= MAX_NONFINITE_STEPS:
        raise FloatingPointError(f"train: {in_a_row} steps in a row up to step {step} had non-finite gradients: the run "
                                 f"diverged; lower train.lr (now {lr}) or resume from an earlier checkpoint")


def threaded_loss(split: BatchThreads, precision, scheduler, m, batch: dict, t: torch.Tensor, gen) -> torch.Tensor:
    """The batch's mean loss with its gradients on m's parameters, computed in split.n threads.

    The noise and the caption dropout are drawn here, before the split, so the parts share nothing random.
    """
    x0 = batch["x0"]  # (B, C, T, h, w)
    rows = {"x0": x0, "y": batch["y"], "mask": batch["mask"], "t": t, "noise": randn(x0.shape, gen, x0.device, x0.dtype)}
    drop = m.y_embedder.draw_drop_ids(x0.shape[0], x0.device, gen)  # (B,) or None: the model's own caption dropout
    if drop is not None:
        rows["drop"] = drop

    def part_loss(part: dict) -> torch.Tensor:
        kwargs = {"y": part["y"], "mask": part["mask"], "force_drop_ids": part.get("drop")}
        with precision.forward_context():
            out = scheduler.training_loss(m, part["x0"], model_kwargs=kwargs, t=part["t"], noise=part["noise"])
        return out["loss"].float().mean()

    parts = split_batch(rows, min(split.n, x0.shape[0]))  # a batch smaller than the threads leaves some idle
    return split.loss_and_grads(part_loss, parts, [q for q in m.parameters() if q.requires_grad])
