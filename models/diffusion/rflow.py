"""Rectified flow, Open-Sora v1.2 convention (opensora/schedulers/rf), kept short.

Time tau in [0, 1]: tau = 0 is data, tau = 1 is noise; the model sees t = 1000 * tau (a float).

    x_tau  = (1 - tau) x0 + tau noise             straight line from data to noise
    target = x0 - noise                            the velocity the model predicts (d x / d(-tau))
    training: tau = sigmoid(n), n ~ N(0, sd^2)     logit-normal (SD3's, sd = `logit_std`): most samples near tau = 0.5
              loss = mean((model - target)^2) per sample
    sampling: tau_i = 1 - i/N for i = 0..N-1, then 0; Euler x <- x + v * (tau_i - tau_{i+1}),
              v = uncond + s (cond - uncond) on ALL channels (v1.2; unlike IDDPM's 3-channel quirk)

Models built with pred_sigma=True return 2C channels; the first C are used as the velocity.
`shift` > 1 is v1.2's resolution-aware timestep transform, tau' = s tau / (1 + (s - 1) tau), which
spends more steps at high noise; the default 1 leaves timesteps unchanged. In logit space the shift
is a translation, logit(tau') = logit(tau) + ln s, so training times are logit-normal(ln s, sd):
`logit_std` sd > 1 widens them to both ends (more high-noise and more mid-noise samples) without
moving their centre; sampling uses the shift alone.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..noise import randn
from .iddpm import expand_null, loss_inputs, mean_flat


def interpolate(x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """x_tau = (1 - tau) x0 + tau noise, tau (B,) in [0, 1]."""
    tau = tau.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - tau) * x0 + tau * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model should predict at every tau: x0 - noise."""
    return x0 - noise


def shift_timesteps(tau: torch.Tensor, shift: float) -> torch.Tensor:
    """v1.2's timestep transform tau' = s tau / (1 + (s - 1) tau); fixes 0 and 1, identity for s = 1."""
    return shift * tau / (1 + (shift - 1) * tau)


def euler_timesteps(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """(num_steps + 1,) float64 times from 1 (noise) down to 0 (data), uniform before the shift."""
    tau = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return shift_timesteps(tau, shift)


class RFlow:
    """Rectified-flow scheduler with the IDDPM scheduler's interface."""

    def __init__(self, num_sampling_steps: int = 30, cfg_scale: float = 7.0, num_train_timesteps: int = 1000,
                 shift: float = 1.0, logit_std: float = 1.0):
        self.num_timesteps = num_train_timesteps  # model time scale: t = num_timesteps * tau
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.shift = shift
        self.logit_std = logit_std

    def sample_timesteps(self, batch_size: int, device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) float model times t = 1000 * sigmoid(N(0, logit_std^2)) (logit-normal tau, then the shift)."""
        tau = torch.sigmoid(self.logit_std * randn((batch_size,), generator, device))
        return shift_timesteps(tau, self.shift) * self.num_timesteps

    def training_loss(self, model: Callable, x0: torch.Tensor, model_kwargs: dict, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample (B,) "loss" = mean((v_pred - (x0 - noise))^2) at model times t (B,) in [0, 1000]."""
        t, noise = loss_inputs(self, x0, t, noise, generator)
        t = t.float()
        x_t = interpolate(x0, noise, t / self.num_timesteps)  # (B, C, T, H, W)
        v = model(x_t, t, **model_kwargs).float()[:, : x0.shape[1]]  # (B, C, T, H, W); drop sigma channels if any
        return {"loss": mean_flat((v - velocity_target(x0, noise).float()) ** 2)}

    @torch.no_grad()
    def sample(self, model: Callable, z: torch.Tensor, model_kwargs: dict, y_null: torch.Tensor | None,
               cfg_scale: float | None = None, num_steps: int | None = None, progress: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler-integrate z (n, C, T, H, W) from noise to data; deterministic given z (`generator` is unused)."""
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        num_steps = num_steps or self.num_sampling_steps
        taus = euler_timesteps(num_steps, self.shift)  # (N+1,) from 1 to 0
        y, mask = model_kwargs["y"], model_kwargs.get("mask")
        n, c = z.shape[:2]
        x = z.float()
        for i in tqdm(range(num_steps), desc="RFlow sampling", disable=not progress):
            t = torch.full((n,), float(taus[i]) * self.num_timesteps, device=z.device)  # (n,)
            if y_null is None:
                v = model(x, t, y=y, mask=mask).float()[:, :c]
            else:  # [cond; uncond] in one pass; the n-row mask is tiled by the model
                out = model(
                    torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, expand_null(y_null, y)]), mask=mask
                ).float()[:, :c]
                cond, uncond = out[:n], out[n:]
                v = uncond + cfg_scale * (cond - uncond)  # (n, C, T, H, W)
            x = x + v * float(taus[i] - taus[i + 1])  # tau decreases, v points from noise to data
        return x
