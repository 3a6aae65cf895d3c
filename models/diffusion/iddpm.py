"""IDDPM as Open-Sora v1.0 uses it: 1000 linear-beta steps, eps prediction, learned-range variance.

Everything per timestep is computed once in float64 numpy and gathered as float32 (as the reference
`gaussian_diffusion.py` does). Shapes: x0, x_t, noise (B, C, T, H, W); t (B,) int64 in 0..999;
model output (B, 2C, T, H, W) = [eps (C) ; v (C)], v in [-1, 1] picks the log-variance between
the clipped posterior log-variance (v = -1) and log beta_t (v = +1).

    training  : t ~ U{0..999}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
                loss = mean((noise - eps)^2) + vb,  vb = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits
                (decoder NLL at t = 0), computed with eps DETACHED so vb trains only v
    sampling  : respaced to N steps ({0, 10, 20, ..., 989, 999} for N = 100), ancestral p_sample from
                step N-1 down to 0, no clipping, classifier-free guidance on latent channels 0..2 only
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..noise import randn

# ---------------------------------------------------------------- closed forms (pure functions)


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """(num_timesteps,) float64 betas, linear from 1e-4 to 0.02 (rescaled so any step count spans the same curve)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """The original timesteps a respaced sampler keeps, as in IDDPM's respace.py.

    "100" -> one section of 100 steps at stride (1000-1)/(100-1), rounded: {0, 10, 20, ..., 50, 61, ..., 989, 999}.
    "10,15,20" -> the range is cut into 3 equal sections, with 10, 15 and 20 steps each.
    "ddim50" -> the integer stride that gives exactly 50 steps (range(0, 1000, 20)).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives exactly {want} of {num_timesteps} steps")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride  # accumulated, not i*stride: the original's float rounding, kept bit for bit
        start += size
    return set(kept)


def respaced_betas(alphas_cumprod: np.ndarray, use_timesteps: set[int]) -> tuple[np.ndarray, list[int]]:
    """Betas of the kept steps, beta'_i = 1 - abar[t_i] / abar[t_{i-1}] (abar before the first = 1),
    and the timestep map."""
    betas, timestep_map, last = [], [], 1.0
    for t, abar in enumerate(alphas_cumprod):
        if t in use_timesteps:
            betas.append(1.0 - abar / last)
            last = abar
            timestep_map.append(t)
    return np.array(betas, dtype=np.float64), timestep_map


def loss_inputs(scheduler, x0: torch.Tensor, t: torch.Tensor | None, noise: torch.Tensor | None,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t on x0's device, noise) of a training-loss call: the ones given, else drawn in that order
    (the timesteps by the scheduler's own rule, then Gaussian noise shaped like x0)."""
    if t is None:
        t = scheduler.sample_timesteps(x0.shape[0], x0.device, generator)
    if noise is None:
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
    return t.to(x0.device), noise


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): mean over every non-batch dim."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (as in IDDPM / PixelCNN++)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of x in [-1, 1] under a Gaussian discretised into 256 bins of width 2/255.

    The outermost bins (x < -0.999, x > 0.999) take the whole tail. Open-Sora applies this to VAE latents as is.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def learned_range_log_variance(v: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor) -> torch.Tensor:
    """LEARNED_RANGE: v = -1 gives min_log (clipped posterior log-variance), v = +1 gives max_log (log beta)."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather float64 per-step values at t (B,) as float32, shaped (B, 1, ..., 1) with `ndim` dims in all."""
    out = torch.from_numpy(arr).to(t.device)[t].float()  # (B,)
    return out.view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """The per-step constants of one beta schedule, and the closed forms that use them."""

    def __init__(self, betas: np.ndarray):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be in (0, 1]"
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # x_0 from eps
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log takes entry 1 there ("clipped")
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.ndim) * x0 + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        return mean, extract(self.posterior_log_variance_clipped, t, x_t.ndim)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output (B, 2C, ...) = [eps ; v]; pred_x0 is not clipped (Open-Sora)."""
        c = x_t.shape[1]
        if model_output.shape[1] != 2 * c:
            raise ValueError(f"IDDPM with learned sigma needs a model output of {2 * c} channels (pred_sigma=True), "
                             f"got {model_output.shape[1]}")
        eps, v = model_output[:, :c], model_output[:, c:]  # each (B, C, ...)
        log_var = learned_range_log_variance(
            v, extract(self.posterior_log_variance_clipped, t, x_t.ndim), extract(self.log_betas, t, x_t.ndim))
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        mean, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """(B,) variational bound term in bits: KL(q || p) for t > 0, the decoder NLL of x0 at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(
            2.0
        )
        return torch.where(t == 0, nll, kl)


def forward_with_cfg(model: Callable, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor,
                     mask: torch.Tensor | None, cfg_scale: float, cfg_channel: int = 3) -> torch.Tensor:
    """Classifier-free guidance as Open-Sora v1.0 (DiT's forward_with_cfg), for n samples.

    Runs the model once on [x; x] with [y; y_null] (2n rows; the n-row mask is tiled by STDiT, so the
    null caption is cut to its prompt's length). Guides only channels [0, cfg_channel) of the output:
    guided = uncond + s (cond - uncond). Every other channel (eps channel 3, the variance values) is the
    conditional pass's own. Returns the n guided rows (B=n, C_out, ...).
    """
    n = x.shape[0]
    out = model(
        torch.cat([x, x]), torch.cat([timestep, timestep]), y=torch.cat([y, y_null]), mask=mask
    )  # (2n, C_out, ...)
    cond, uncond = out[:n], out[n:]
    guided = uncond[:, :cfg_channel] + cfg_scale * (cond[:, :cfg_channel] - uncond[:, :cfg_channel])
    return torch.cat([guided, cond[:, cfg_channel:]], dim=1)  # (n, C_out, ...)


def expand_null(y_null: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The null caption, (L, C), (1, 1, L, C) or (n, 1, L, C), as (n, 1, L, C) like y, on y's device and dtype."""
    y_null = y_null.to(device=y.device, dtype=y.dtype)
    while y_null.ndim < y.ndim:
        y_null = y_null[None]
    return y_null.expand(y.shape[0], *y_null.shape[1:])


# ---------------------------------------------------------------- the scheduler


class IDDPM:
    """Open-Sora v1.0's scheduler: IDDPM training loss, respaced ancestral sampling with 3-channel CFG."""

    def __init__(self, num_sampling_steps: int = 100, cfg_scale: float = 7.0, num_train_timesteps: int = 1000,
                 cfg_channel: int = 3):
        self.num_timesteps = num_train_timesteps
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel  # v1.0 guides eps channels 0..2 only (opensora/schedulers/iddpm/__init__.py)
        self.diffusion = GaussianDiffusion(linear_betas(num_train_timesteps))
        self._spaced: dict[int, tuple[GaussianDiffusion, torch.Tensor]] = {}

    def spaced(self, num_steps: int) -> tuple[GaussianDiffusion, torch.Tensor]:
        """The respaced diffusion for `num_steps` steps and its map step index -> original timestep (num_steps,)."""
        if num_steps not in self._spaced:
            use = space_timesteps(self.num_timesteps, str(num_steps))
            betas, timestep_map = respaced_betas(self.diffusion.alphas_cumprod, use)
            self._spaced[num_steps] = (GaussianDiffusion(betas), torch.tensor(timestep_map, dtype=torch.long))
        return self._spaced[num_steps]

    def sample_timesteps(self, batch_size: int, device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) int64 uniform in 0..num_timesteps-1 (scripts/train.py; the importance samplers are unused)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)

    def training_loss(self, model: Callable, x0: torch.Tensor, model_kwargs: dict, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample (B,) "loss" = "mse" + "vb" for latents x0 (B, C, T, H, W) at timesteps t (B,) int."""
        t, noise = loss_inputs(self, x0, t, noise, generator)
        t = t.long()
        x_t = self.diffusion.q_sample(x0, t, noise)  # (B, C, T, H, W)
        out = model(x_t, t, **model_kwargs).float()  # (B, 2C, T, H, W) = [eps ; v]
        c = x0.shape[1]
        eps = out[:, :c]
        # the VB term sees eps as a constant, so it trains only the variance values v
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        vb = self.diffusion.vb_terms_bpd(frozen, x0.float(), x_t.float(), t)  # (B,)
        mse = mean_flat((noise.float() - eps) ** 2)  # (B,)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    @torch.no_grad()
    def sample(self, model: Callable, z: torch.Tensor, model_kwargs: dict, y_null: torch.Tensor | None,
               cfg_scale: float | None = None, num_steps: int | None = None, progress: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise z (n, C, T, H, W) with model_kwargs {y (n, 1, L, C_text), mask (n, L)}; returns x_0 (n, C, T, H, W).

        y_null None runs without guidance. Per-step noise is drawn for 2n rows, as Open-Sora's loop
        does over its duplicated batch, and only the first n rows are used (the second half of that
        batch never reaches the model), so a seeded generator consumes the same random numbers.
        """
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        num_steps = num_steps or self.num_sampling_steps
        diffusion, timestep_map = self.spaced(num_steps)
        timestep_map = timestep_map.to(z.device)
        y, mask = model_kwargs["y"], model_kwargs.get("mask")
        n = z.shape[0]
        x = z.float()
        for i in tqdm(range(num_steps - 1, -1, -1), desc="IDDPM sampling", disable=not progress):
            idx = torch.full((n,), i, dtype=torch.long, device=z.device)  # index into the respaced schedule
            t_model = timestep_map[idx]  # the model sees the original timestep (0..999), not i
            if y_null is None:
                out = model(x, t_model, y=y, mask=mask)
            else:
                out = forward_with_cfg(model, x, t_model, y, expand_null(y_null, y), mask, cfg_scale, self.cfg_channel)
            p = diffusion.p_mean_variance(out.float(), x, idx)
            noise = randn((2 * n, *x.shape[1:]), generator, x.device)[:n]
            not_last = (idx != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at the final step
            x = p["mean"] + not_last * torch.exp(0.5 * p["log_variance"]) * noise
        return x
