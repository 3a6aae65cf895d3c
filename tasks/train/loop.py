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
    EMA (fp32, decay train.ema_decay, trainable parameters, every step: tasks/train/ema.py)
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

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch
from soraflow.configs.loader import config_hash
from soraflow.configs.schema import SoraFlowConfig
from soraflow.models.noise import randn
from soraflow.storage.checkpoints import load_weights_into, read_state_dict
from soraflow.storage.data.dataset import VideoClipDataset
from soraflow.storage.data.latent_cache import LatentCacheDataset, OnlineEncoder
from soraflow.storage.layout import DataRoot
from soraflow.storage.model_parts import build_model, load_text_encoder, load_vae, scheduler_for
from soraflow.tasks.train.distributed import (
    StatefulDistributedSampler,
    average_grads,
    build_precision,
    clip_grads,
    full_states,
    load_optimizer,
    mean_over_ranks,
    wrap_for_strategy,
)
from soraflow.tasks.train.ema import ema_copy, ema_pairs, update_ema
from soraflow.tasks.train.lr_schedule import lr_at, set_lr
from soraflow.tasks.train.precision import Precision
from soraflow.tasks.train.progress import write_progress
from soraflow.tasks.train.resume import RunPosition, resume_state, save_checkpoint
from soraflow.tasks.train.thread_parallel import BatchThreads, split_batch, torch_threads
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
    model_kwargs: dict[str, Any]  # STDiT constructor kwargs (storage/model_parts.stdit_kwargs)
    run_dir: str
    root: str
    total_steps: int
    local_mode: bool  # num_workers 0: the loop runs in the caller, Ray persists nothing for us
    on_step: list[Callable[[StepInfo], None]] = field(default_factory=list)


# ---------------------------------------------------------------- one worker's set-up


@dataclass
class Worker:
    """Everything one worker's loop works with, built once by start_worker."""

    lc: LoopConfig
    rank: int
    world: int
    device: torch.device
    pos: RunPosition  # step, epoch, data position, loss history (tasks/train/resume.py)
    model: torch.nn.Module  # DDP/FSDP-wrapped when world > 1
    ema: torch.nn.Module
    ema_tensors: tuple[list, list]  # (EMA tensors, model tensors), paired once
    fmt: str  # optimizer-state format: "plain" or "fsdp"
    optimizer: torch.optim.Optimizer
    scheduler: Any  # IDDPM or RFlow (models/diffusion)
    dataset: Any
    encoder: OnlineEncoder | None  # the online path's VAE + T5; None on the latent cache
    sampler: StatefulDistributedSampler
    loader: DataLoader
    precision: Precision
    threads: BatchThreads
    gen: torch.Generator  # timesteps, noise and caption dropout of this rank
    nonfinite: int = 0  # steps in a row whose gradient norm was not finite


def build_dataset(lc: LoopConfig, device: torch.device):
    """(dataset, encoder): encoder is None for the cache, an OnlineEncoder for the online path."""
    v, seed = lc.cfg.video, lc.cfg.train.seed
    if isinstance(lc.data, CacheData):
        ds = LatentCacheDataset(lc.data.cache_dir, v.num_frames, v.frame_interval, seed=seed, train=True,
                                clip_ids=lc.train_clip_ids)
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
    model = build_model(lc.cfg, lc.model_kwargs)
    if state:
        model.load_state_dict(state["model"])
    elif lc.cfg.model.from_pretrained:
        load_weights_into(model, read_state_dict(lc.cfg.model.from_pretrained), lc.cfg.model.from_pretrained)
    ema = ema_copy(model)
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
        print(f"train: optimizer state saved as {saved_fmt!r}, running as {fmt!r}: AdamW restarts its moments",
              flush=True)


def start_worker(lc: LoopConfig) -> Worker:
    """Resume state, models, optimizer, data and precision of this rank, in the order the RNG streams need."""
    tc = lc.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if lc.local_mode:
        device = torch.device("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu")
    else:
        device = ray.train.torch.get_device()
    ray_ckpt = ray.train.get_checkpoint()
    state_dir, state = resume_state(lc.run_dir, ray_ckpt.path if ray_ckpt else None,
                                    log=lambda msg: print(msg, flush=True) if rank == 0 else None)
    pos = RunPosition.resume(state["meta"] if state else {}, world, state_dir)

    model, ema = build_models(lc, state)
    model.to(device).train()
    ema.to(device)
    # Per-rank streams (caption dropout, timesteps, noise) that depend on the start step, so a
    # resumed run is reproducible from its checkpoint.
    torch.manual_seed(tc.seed + 1009 * rank + 7919 * pos.start_step)
    gen = torch.Generator(device=device).manual_seed(tc.seed + 31 * rank + 7919 * pos.start_step + 1)
    n_params = sum(q.numel() for q in model.parameters() if q.requires_grad)
    model, ema, fmt = wrap_for_strategy(model, ema, tc.strategy, world)
    # The fused kernel updates all parameters in one pass (5-10% of a STDiT-Tiny step on CPU); the
    # same state dict as the per-tensor loop. FSDP's sharded parameters keep the default.
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay, fused=fmt != "fsdp" and device.type in ("cpu", "cuda"))
    restore_optimizer(model, optimizer, state, fmt, rank == 0)

    dataset, encoder = build_dataset(lc, device)
    sampler = StatefulDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed,
                                         drop_last=True)
    if len(sampler) < tc.batch_size:
        raise ValueError(f"train.batch_size={tc.batch_size} is larger than the {len(sampler)} training clips each "
                         f"of the {world} worker(s) gets ({len(dataset)} clips): lower train.batch_size or add data")
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                        num_workers=tc.dataloader_workers, persistent_workers=False)
    if rank == 0:
        where = f"resuming from step {pos.start_step} ({state_dir})" if state else "from scratch"
        print(f"train: {lc.cfg.model.preset} ({n_params / 1e6:.2f} M trainable params) on {len(dataset)} clips, "
              f"{world} worker(s) x batch {tc.batch_size}, steps {pos.start_step}->{lc.total_steps}, {where}",
              flush=True)
    if device.type == "cpu":  # subnormal floats are 10-100x slower on CPUs: flush them to zero (run_loop restores it)
        torch.set_flush_denormal(True)
    return Worker(lc, rank, world, device, pos, model, ema, ema_pairs(model, ema, fmt), fmt, optimizer,
                  scheduler_for(lc.cfg), dataset, encoder, sampler, loader,
                  build_precision(model, tc.precision, fmt, world),
                  BatchThreads(tc.batch_threads if world == 1 else 1), gen)


# ---------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's entry point; Ray passes its train_loop_config dict, {"loop": LoopConfig}."""
    return run_loop(config["loop"])


def run_loop(lc: LoopConfig) -> dict:
    """One worker's training, top to bottom; see the module docstring."""
    w = start_worker(lc)
    tc, pos = lc.cfg.train, w.pos
    log = StepLog(time.perf_counter())
    with w.threads, torch_threads(1) if w.threads.n > 1 else nullcontext():  # one torch thread per batch thread
        while pos.step < lc.total_steps:
            w.sampler.set_epoch(pos.epoch)
            w.dataset.set_epoch(pos.epoch)
            w.sampler.set_start_index(pos.batch_in_epoch * tc.batch_size)
            for batch in w.loader:
                batch = to_device(batch, w.device)
                if w.encoder is not None:
                    batch = w.encoder(batch, generator=w.gen)
                loss, grad_norm = train_step(w, batch)
                lr = apply_update(w, grad_norm)
                loss_value = float(mean_over_ranks(loss.detach(), w.world))
                pos.advance(loss_value, batch["x0"].shape[0] * w.world)
                log.window.append(loss_value)
                for hook in lc.on_step:
                    hook(StepInfo(pos.step, lc.total_steps, w.rank, w.world, lc.local_mode, loss_value, lr))
                log_and_checkpoint(w, log, grad_norm)
                if pos.step >= lc.total_steps:
                    break
            else:  # the epoch ran out (no break): the next one starts at its first batch
                pos.next_epoch()
    if w.device.type == "cpu":
        torch.set_flush_denormal(False)  # the default, for the caller in local mode
    return log.last_metrics


def train_step(w: Worker, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one batch in the configured precision, gradients averaged over the
    ranks and clipped: (the batch's mean loss, the gradient norm before clipping)."""
    x0 = batch["x0"]  # (B, C, T, h, w)
    t = w.scheduler.sample_timesteps(x0.shape[0], w.device, w.gen)  # (B,)
    w.optimizer.zero_grad(set_to_none=True)
    with w.precision.step() as m:  # forward + backward; the grads land on the fp32 model
        if w.threads.n > 1:
            loss = threaded_loss(w.threads, w.precision, w.scheduler, m, batch, t, w.gen)
        else:
            out = w.scheduler.training_loss(m, x0, model_kwargs={"y": batch["y"], "mask": batch["mask"]}, t=t,
                                            generator=w.gen)
            loss = out["loss"].float().mean()
            loss.backward()
    if w.lc.cfg.train.precision == "bf16" and w.world > 1:
        average_grads(w.model, w.world)  # the bf16 copy is not DDP-wrapped: average its grads here
    return loss, clip_grads(w.model, w.lc.cfg.train.grad_clip, w.fmt)


def apply_update(w: Worker, grad_norm: torch.Tensor) -> float:
    """AdamW at this step's learning rate, then the EMA; a step whose gradient norm is not finite is
    skipped (one bad batch must not poison the weights, as AMP's GradScaler does). Returns the rate."""
    tc = w.lc.cfg.train
    lr = lr_at(tc, w.pos.step)
    set_lr(w.optimizer, lr)
    if torch.isfinite(grad_norm):
        w.optimizer.step()
        update_ema(*w.ema_tensors, tc.ema_decay)
        w.nonfinite = 0
    else:
        w.nonfinite += 1
        check_nonfinite(w.nonfinite, w.pos.step + 1, float(grad_norm), tc.lr, w.rank)
    return lr


# ---------------------------------------------------------------- logging and checkpoints


@dataclass
class StepLog:
    """The losses since the last log line, and the last metrics reported."""

    t_start: float
    window: list[float] = field(default_factory=list)
    last_metrics: dict = field(default_factory=dict)


def log_and_checkpoint(w: Worker, log: StepLog, grad_norm: torch.Tensor) -> None:
    """Every log_every steps a progress line and a Ray report; every ckpt_every steps and at the end
    a checkpoint reported with it."""
    lc, tc, pos = w.lc, w.lc.cfg.train, w.pos
    is_last = pos.step >= lc.total_steps
    log_now, save_now = pos.step % tc.log_every == 0 or is_last, pos.step % tc.ckpt_every == 0 or is_last
    if not (log_now or save_now):
        return
    elapsed = time.perf_counter() - log.t_start
    metrics = {"step": pos.step, "epoch": pos.epoch, "loss": pos.loss_history[-1][1],
               "avg_loss": sum(log.window) / len(log.window),
               "samples_per_s": (pos.step - pos.start_step) * tc.batch_size * w.world / max(elapsed, 1e-9),
               "start_step": pos.start_step, "world_size": w.world, "grad_norm": float(grad_norm)}
    if w.rank == 0 and log_now:
        write_progress(lc.run_dir, pos.step, lc.total_steps, metrics["avg_loss"], metrics["samples_per_s"])
        print(f"train: step {pos.step}/{lc.total_steps} loss {metrics['avg_loss']:.4f} (mean of {len(log.window)}) "
              f"grad-norm {float(grad_norm):.2f} {metrics['samples_per_s']:.1f} samples/s, {elapsed:.0f} s", flush=True)
    if save_now:
        meta = {**pos.meta(tc.batch_size, w.world), "samples_per_s": metrics["samples_per_s"],
                "config_hash": config_hash(lc.cfg), "preset": lc.cfg.model.preset, "model_kwargs": lc.model_kwargs,
                "optimizer_format": w.fmt}
        save_checkpoint(lc.run_dir, lc.local_mode, full_states(w.model, w.ema, w.optimizer, w.fmt), meta, metrics,
                        w.rank)
    else:
        ray.train.report(metrics)
    log.window, log.last_metrics = [], metrics


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


MAX_NONFINITE_STEPS = 5  # in a row: the run has diverged, it did not just meet one bad batch


def check_nonfinite(in_a_row: int, step: int, grad_norm: float, lr: float, rank: int) -> None:
    """Say that a step was skipped; stop the run once MAX_NONFINITE_STEPS in a row were."""
    if rank == 0:
        print(f"train: step {step}: gradient norm {grad_norm}, update skipped ({in_a_row} in a row)", flush=True)
    if in_a_row >= MAX_NONFINITE_STEPS:
        raise FloatingPointError(f"train: {in_a_row} steps in a row up to step {step} had non-finite gradients: "
                                 f"the run diverged; lower train.lr (now {lr}) or resume from an earlier checkpoint")


def threaded_loss(split: BatchThreads, precision, scheduler, m, batch: dict, t: torch.Tensor, gen) -> torch.Tensor:
    """The batch's mean loss with its gradients on m's parameters, computed in split.n threads.

    The noise and the caption dropout are drawn here, before the split, so the parts share nothing random.
    """
    x0 = batch["x0"]  # (B, C, T, h, w)
    rows = {"x0": x0, "y": batch["y"], "mask": batch["mask"], "t": t,
            "noise": randn(x0.shape, gen, x0.device, x0.dtype)}
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
