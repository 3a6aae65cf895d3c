"""Distribution for one training worker: DDP/FSDP wrapping, full-state gathering, gradient
clipping and averaging, the precision wrapper of a wrapped model, and a resumable distributed sampler.

Plain functions of (model, EMA, optimizer, format); `fmt` is the optimizer-state format,
"plain" (alone or DDP) or "fsdp".
"""

from __future__ import annotations

import ray.train.torch
import torch
import torch.distributed as dist
from soraflow.tasks.train.precision import Precision
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DistributedSampler


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def wrap_for_strategy(model: torch.nn.Module, ema: torch.nn.Module, strategy: str, world: int):
    """(model, ema, optimizer-state format) for one worker: unwrapped when alone, else DDP or FSDP.

    FSDP (GPUs only, Ray's prepare_model refuses it on CPU) shards the EMA copy exactly like
    the model (same module tree, same flat parameters), so each rank updates the EMA of its own shard.
    """
    if world <= 1:
        return model, ema, "plain"
    if strategy == "fsdp":
        kw = {
            "use_orig_params": False
        }  # flat shards; the FSDP1 optimizer round trip with use_orig_params=True loses exp_avg (torch 2.14)
        model = ray.train.torch.prepare_model(model, parallel_strategy="fsdp", parallel_strategy_kwargs=kw)
        ema = ray.train.torch.prepare_model(ema, parallel_strategy="fsdp", parallel_strategy_kwargs=kw)
        return model, ema, "fsdp"
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp"), ema, "plain"


def full_states(model, ema, optimizer, fmt: str) -> tuple[dict, dict, dict]:
    """Full (model, EMA, optimizer) state dicts; under FSDP a collective call, full on rank 0 only."""
    if fmt != "fsdp":
        return unwrap(model).state_dict(), ema.state_dict(), optimizer.state_dict()
    sd_cfg, osd_cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True), FullOptimStateDictConfig(
        offload_to_cpu=True, rank0_only=True
    )
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, sd_cfg, osd_cfg):
        model_sd, optim_sd = model.state_dict(), FSDP.optim_state_dict(model, optimizer)
    with FSDP.state_dict_type(ema, StateDictType.FULL_STATE_DICT, sd_cfg):
        ema_sd = ema.state_dict()
    return model_sd, ema_sd, optim_sd


def load_optimizer(model, optimizer, saved: dict, fmt: str) -> None:
    if fmt == "fsdp":
        saved = FSDP.optim_state_dict_to_load(model, optimizer, saved)
    optimizer.load_state_dict(saved)


def clip_grads(model, max_norm: float, fmt: str) -> torch.Tensor:
    """Global-norm clipping; FSDP needs its own (the norm spans every rank's shard)."""
    if fmt == "fsdp":
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over every rank (the value itself when alone)."""
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def build_precision(model: torch.nn.Module, mode: str, fmt: str, world: int) -> Precision:
    """The training step's precision (tasks/train/precision.py) for a wrapped model.

    "bf16" keeps a bf16 copy of the *unwrapped* model (a DDP wrapper would all-reduce the copy's
    bf16 grads, not the master's): with several workers the loop averages the master's grads
    itself (average_grads). FSDP shards the weights it would have to copy: refused."""
    if mode == "bf16":
        if fmt == "fsdp":
            raise ValueError("train.precision=bf16 does not combine with train.strategy=fsdp: use precision autocast")
        return Precision(unwrap(model), mode)
    return Precision(model, mode)


def average_grads(model: torch.nn.Module, world: int) -> None:
    """Average every gradient over the ranks (what DDP does during backward)."""
    for q in unwrap(model).parameters():
        if q.grad is not None:
            dist.all_reduce(q.grad)
            q.grad /= world
