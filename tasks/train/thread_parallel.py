"""Data parallel over threads in one process: a batch split into N parts, one thread and one
torch thread each, their gradients summed in memory.

    split = BatchThreads(2)
    loss = split.loss_and_grads(loss_fn, parts, params)   # loss_fn(part) -> mean loss of that part
        thread k: g_k = d(loss_fn(part_k) * n_k / B) / d(params)
        params[i].grad = sum_k g_k[i]                       # the gradient of the whole batch's mean loss

Why: STDiT-Tiny's matrices are small (a batch of 16 is 1024 tokens of width 128), so two torch
threads on one batch leave a quarter of the second core idle (README: measured); two batches
side by side, each on one core, keep both busy. Two processes would do the same but must
all-reduce their gradients every step (DDP over gloo gave back the gain); threads share the
weights and sum the gradients in memory. torch ops release the GIL while they run, and each
thread runs its backward on itself (autograd's CPU engine works on the calling thread).

Each part's gradients come back from `torch.autograd.grad`, never accumulated into `.grad` from
two threads at once, and are summed in part order, so a run is as deterministic as its parts.
Everything random (timesteps, noise, caption dropout) is drawn by the caller before the split.
Autocast is per thread: `loss_fn` enters whatever context it needs itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


def batch_rows(batch: dict) -> int:
    """B of a {name: (B, ...) tensor or anything else} batch: its first tensor's leading size."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


def split_batch(batch: dict, n: int) -> list[dict]:
    """{name: (B, ...) tensor} -> n dicts of row slices as even as possible (the last B % n get one more)."""
    b = batch_rows(batch)
    if not 1 <= n <= b:
        raise ValueError(f"cannot split a batch of {b} into {n} parts")
    bounds = [b * k // n for k in range(n + 1)]
    return [
        {k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        for lo, hi in zip(bounds, bounds[1:])
    ]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op torch threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BatchThreads:
    """A pool of `n` threads that computes one batch's loss and gradients in `n` parts."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"train.batch_threads must be >= 1, got {n}")
        self.n = n
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="soraflow-batch") if n > 1 else None

    def __enter__(self) -> BatchThreads:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def loss_and_grads(self, loss_fn: Callable[[dict], torch.Tensor], parts: Sequence[dict],
                       params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        """Set each param's .grad to d(mean loss over all rows)/d(param); return that mean loss (detached).

        `parts` are the row slices of one batch (split_batch); loss_fn(part) returns the part's mean loss.
        """
        total = sum(batch_rows(p) for p in parts)

        def work(part: dict) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
            loss = loss_fn(part).float() * (batch_rows(part) / total)  # this part's share of the batch mean
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return loss.detach(), grads

        results = [work(p) for p in parts] if self.pool is None else list(self.pool.map(work, parts))
        with torch.no_grad():
            for i, param in enumerate(params):
                grads = [g[i] for _, g in results if g[i] is not None]
                if not grads:
                    continue
                g = grads[0]
                for more in grads[1:]:  # in part order: deterministic
                    g = g + more
                param.grad = g if param.grad is None else param.grad + g
        return torch.stack([loss for loss, _ in results]).sum()
