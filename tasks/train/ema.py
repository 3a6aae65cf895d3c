"""The EMA of the STDiT weights: an fp32 copy moved toward the model after every optimizer step.

    ema = decay * ema + (1 - decay) * model      (Open-Sora v1.0 `update_ema`, opensora/utils/train_utils.py)

over the trainable parameters except the positional embedding (v1.0 skips pos_embed: it is a
recomputed buffer-like table). The EMA weights are what a run exports and evaluates.
"""

from __future__ import annotations

import copy

import torch


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA's starting point: an fp32, frozen copy of the model (v1.0 starts it as a copy)."""
    return copy.deepcopy(model).float().eval().requires_grad_(False)


def ema_pairs(model: torch.nn.Module, ema: torch.nn.Module, fmt: str) -> tuple[list, list]:
    """(EMA tensors, model tensors) paired by name over trainable parameters; `fmt` "fsdp" pairs the
    shards of two FSDP-wrapped copies, anything else the unwrapped model's parameters."""
    src = model if fmt == "fsdp" else getattr(model, "module", model)
    ema_named = dict(ema.named_parameters())
    pairs = [(ema_named[n], p) for n, p in src.named_parameters() if p.requires_grad and "pos_embed" not in n]
    return [e for e, _ in pairs], [p for _, p in pairs]


@torch.no_grad()
def update_ema(ema_tensors: list, model_tensors: list, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, in fp32, all tensors in one foreach kernel."""
    torch._foreach_lerp_(ema_tensors, [p.detach().float() for p in model_tensors], 1.0 - decay)
