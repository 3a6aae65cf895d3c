"""Seeded Gaussian noise: the one place a `torch.Generator` turns into a noise tensor.

A generator draws on its own device (a CPU generator gives the same numbers whatever device the
model runs on); the result is then moved to `device`. Without a generator, the global RNG is used.
"""

from __future__ import annotations

import torch


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Normal noise of `shape` from `generator` (on its own device, then moved) or from the global RNG."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
