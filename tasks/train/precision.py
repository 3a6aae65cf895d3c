"""Mixed precision for training on CPU: fp32 master weights and optimizer state, bf16 compute.

    precision = Precision(model, "bf16")              # "fp32" | "bf16" | "autocast"
    optimizer = torch.optim.AdamW(precision.master.parameters(), ...)   # fp32 state, as before
    with precision.step():                            # casts the weights once, then
        loss = loss_fn(precision.module)              #   forward on the working copy
        loss.backward()                               #   bf16 gradients ...
    optimizer.step()                                  # ... arrive as fp32 .grad on the master

Why not plain `torch.autocast`: autocast keeps the fp32 weights and casts them to bf16 inside
every op, every call (its weight cache lives only inside one autocast region and not across
the backward), plus a cast of every activation on the way in and out of each matmul. On
STDiT-Tiny's small tensors those casts cost more than bf16 matmuls save (issue 16: 230 vs
205 ms per step). "bf16" here casts the weights once per step into a bf16 copy of the
model, runs forward and backward wholly in bf16 (the activations stay bf16, so no per-op
casts), and adds the copy's gradients into the fp32 master's `.grad`. The optimizer, EMA,
gradient clipping and checkpoints all see the fp32 master, so the saved state is the same
as an fp32 run's. The loss is computed in fp32: STDiT returns float32 (models/stdit.py).
bench/bench_precision.py measures the step time and the loss curve of each mode.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

MODES = ("fp32", "bf16", "autocast")


class Precision:
    """A model's working copy for one precision mode (see the module docstring)."""

    def __init__(self, master: torch.nn.Module, mode: str = "fp32"):
        if mode not in MODES:
            raise ValueError(f"train.precision: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.master, self.mode = master, mode
        if mode == "bf16":
            self.module = copy.deepcopy(master).to(torch.bfloat16)
            self.module.requires_grad_(False)
            self._pairs = [(m, w) for m, w in zip(master.parameters(), self.module.parameters())]
            for m, w in self._pairs:
                w.requires_grad_(m.requires_grad)
            self._buffers = list(zip(master.buffers(), self.module.buffers()))
        else:
            self.module = master

    def train(self, mode: bool = True) -> Precision:
        self.master.train(mode)
        self.module.train(mode)
        return self

    @torch.no_grad()
    def _sync_weights(self) -> None:
        for m, w in self._pairs:
            w.copy_(m)  # one fp32 -> bf16 cast per parameter per step
        for m, w in self._buffers:
            w.copy_(m)

    @torch.no_grad()
    def _collect_grads(self) -> None:
        for m, w in self._pairs:
            if w.grad is None:
                continue
            g = w.grad.float()
            if m.grad is None:
                m.grad = g
            else:
                m.grad.add_(g)  # accumulates, as backward does (gradient accumulation keeps working)
            w.grad = None

    @contextmanager
    def step(self) -> Iterator[torch.nn.Module]:
        """The forward/backward region of one step; yields the module to call."""
        if self.mode == "bf16":
            self.module.train(self.master.training)
            self._sync_weights()
            yield self.module
            self._collect_grads()
        else:
            with self._autocast():
                yield self.module

    def forward_context(self):
        """The per-thread context a forward pass needs inside step() (autocast is thread-local)."""
        return self._autocast()

    def _autocast(self):
        if self.mode != "autocast":
            return nullcontext()
        device = next(self.master.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16)

    def inference(self):
        """A context for evaluation/sampling calls in this mode (the bf16 copy is refreshed first)."""
        if self.mode == "bf16":
            self._sync_weights()
        return self._autocast()
