"""Diffusion maths behind one interface: IDDPM (Open-Sora v1.0) and rectified flow (v1.2-style).

Both schedulers offer:

    sample_timesteps(batch_size, device, generator=None) -> t (B,)   the model's time scale (0..999 or 0..1000)
    training_loss(model, x0, model_kwargs, t=None, noise=None, generator=None) -> {"loss": (B,), ...}
                                                                     (given t and noise: deterministic validation)
    sample(model, z, model_kwargs, y_null, cfg_scale=None, num_steps=None, progress=False, generator=None) -> x0

with x0, z (B, C, T, H, W), model_kwargs {"y": (B, 1, L, C_text), "mask": (B, L)} and y_null the
model's null caption (B, 1, L, C_text) for classifier-free guidance.
"""

from __future__ import annotations

from .iddpm import IDDPM, GaussianDiffusion, space_timesteps
from .rflow import RFlow

SCHEDULERS = {"iddpm": IDDPM, "rflow": RFlow}


def build_scheduler(type: str, num_sampling_steps: int = 100, cfg_scale: float = 7.0, num_train_timesteps: int = 1000,
                    shift: float = 1.0, logit_std: float = 1.0) -> IDDPM | RFlow:
    """A scheduler by name: "iddpm" (v1.0, 1000 training steps, respaced sampling) or "rflow"
    (`shift` > 1 moves training and sampling times towards noise, `logit_std` widens the training
    times; IDDPM has neither)."""
    if type not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {type!r}; known: {', '.join(SCHEDULERS)}")
    kwargs = dict(num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale, num_train_timesteps=num_train_timesteps)
    if type == "rflow":
        return RFlow(**kwargs, shift=shift, logit_std=logit_std)
    for key, value in (("shift", shift), ("logit_std", logit_std)):
        if value != 1.0:
            raise ValueError(f"scheduler {type!r}: {key}={value} applies to rflow only; leave it at 1.0")
    return SCHEDULERS[type](**kwargs)


__all__ = ["IDDPM", "RFlow", "GaussianDiffusion", "SCHEDULERS", "build_scheduler", "space_timesteps"]
