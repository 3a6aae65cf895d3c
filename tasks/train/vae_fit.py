"""Fit the tiny VAE on the sample data (only when no pretrained VAE is configured).

Open-Sora v1.0 uses the frozen sd-vae-ft-ema. The laptop path has no downloads, so it fits
a tiny diffusers AutoencoderKL (config vae.tiny) on frames of the training clips, then
freezes it for diffusion training, exactly where sd-vae-ft-ema would sit:

    ok clips --all frames, resize + crop--> frames (N, 3, H, W) in [-1, 1]
      training split -> fit frames, held-out split (storage.holdout) -> test frames
    per step: batch (B, 3, H, W) -> encoder -> posterior N(mean, std) (B, C, H/f, W/f)
              -> sample -> decoder -> recon (B, 3, H, W)
              loss = MSE(recon, x) + vae.fit.kl_weight * KL(posterior || N(0, I)) / pixels
    AdamW(vae.fit.lr), vae.fit.steps steps, vae.fit.batch_size frames per step

Then a calibration SD's VAE does not need: its latents were scaled by 0.18215 to have about
unit variance, ours have whatever spread the fit gave. The 1x1 `quant_conv` and
`post_quant_conv` are rescaled per latent channel (mean' = a * (mean - m), the decoder
undoes it exactly), so that `vae.scaling_factor * latent` has zero mean and unit variance
on the fit frames, which is what the diffusion noise schedule assumes.

Saved with save_pretrained (safetensors) into storage/model_parts.tiny_vae_dir(cfg, root,
dataset_version) and copied to the "latest" folder next to it. A folder that already holds
a fit for that dataset version is reused (the fit is skipped).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task
from soraflow.configs.schema import SoraFlowConfig
from soraflow.models.noise import randn
from soraflow.storage.data.dataset import VideoClipDataset
from soraflow.storage.data.holdout import DatasetSplit
from soraflow.storage.data.latent_cache import read_clip_frames
from soraflow.storage.layout import DataRoot, atomic_write_text
from soraflow.storage.model_parts import new_tiny_vae, tiny_vae_dir
from soraflow.tasks.task_policy import STAGE_RETRIES, stage_cache_key

METRICS_FILE = "fit_metrics.json"
MAX_FRAMES_PER_CLIP = 32  # evenly spaced; enough variety, bounded memory on long clips


@dataclass
class VaeFitResult:
    path: Path  # the VAE folder to use (fitted tiny one, or the configured vae.path)
    metrics: dict = field(default_factory=dict)  # recon_mse, psnr, steps, latent stats, seconds
    fitted: bool = False  # True only when this call ran the fit


def collect_frames(
    rows: list[dict], image_size: tuple[int, int], max_per_clip: int = MAX_FRAMES_PER_CLIP
) -> torch.Tensor:
    """Frames of the given clips, resized and cropped: (N, 3, H, W) in [-1, 1]."""
    out = []
    for row in rows:
        video = read_clip_frames(row, image_size)  # (3, T_all, H, W)
        t = video.shape[1]
        keep = np.unique(np.linspace(0, t - 1, min(t, max_per_clip)).astype(int))
        out.append(video[:, keep].permute(1, 0, 2, 3))  # (t, 3, H, W)
    return torch.cat(out)


def _vae_loss(
    vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, reconstruction MSE) for a batch of frames (B, 3, H, W); `bf16`: compute under autocast."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        posterior = vae.encode(x).latent_dist  # mean, std: (B, C, h, w)
        z = posterior.mean + posterior.std * randn(posterior.mean.shape, generator, posterior.mean.device)
        recon = vae.decode(z).sample  # (B, 3, H, W)
    mse = F.mse_loss(recon.float(), x)
    kl = posterior.kl().float().mean() / x[0].numel()  # per pixel, so kl_weight is resolution free
    return mse + kl_weight * kl, mse


@torch.no_grad()
def _recon_mse(vae, frames: torch.Tensor, batch: int = 64) -> float:
    total, n = 0.0, 0
    for i in range(0, len(frames), batch):
        x = frames[i : i + batch]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        total += F.mse_loss(recon, x, reduction="sum").item()
        n += x.numel()
    return total / max(n, 1)


@torch.no_grad()
def latent_stats(vae, frames: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of posterior samples over `frames`: each (C,)."""
    zs = []
    g = torch.Generator().manual_seed(0)
    for i in range(0, len(frames), batch):
        post = vae.encode(frames[i : i + batch]).latent_dist
        zs.append(post.mean + post.std * randn(post.mean.shape, g, post.mean.device))
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # (C, N*h*w)
    return z.mean(1), z.std(1).clamp_min(1e-6)


@torch.no_grad()
def calibrate(vae, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """Re-parametrise the latent space in place: z' = scale * (z - shift), decoder unchanged.

    Acts on the 1x1 quant_conv (posterior mean rows; log-variance rows get + 2 log scale)
    and post_quant_conv (input channels / scale, bias absorbs the shift). Without those
    convs only a scale can be folded in exactly (into the encoder's and decoder's conv
    layers), so the shift is left at 0.
    """
    c = scale.numel()
    q = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    pq = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else None
    if pq is None:
        shift = torch.zeros_like(shift)
    q.weight[:c] *= scale.view(-1, 1, 1, 1)
    q.bias[:c] = scale * (q.bias[:c] - shift)
    q.bias[c:] += 2 * torch.log(scale)  # logvar of z' = logvar of z + 2 log scale
    if pq is not None:
        w = pq.weight  # (C, C, 1, 1): out, in
        pq.bias += (w[:, :, 0, 0] * shift.view(1, -1)).sum(1)
        w /= scale.view(1, -1, 1, 1)
    else:
        vae.decoder.conv_in.weight /= scale.view(1, -1, 1, 1)


def fit_vae(cfg: SoraFlowConfig, data: DatasetSplit, root: DataRoot, progress: bool = True) -> VaeFitResult:
    """Fit (or reuse) the tiny VAE for this dataset version; see the module docstring."""
    if cfg.vae.path:
        path = Path(cfg.vae.path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"config key 'vae.path': {path} is not a local directory")
        return VaeFitResult(path, {"steps": 0}, fitted=False)

    version = data.version
    target = tiny_vae_dir(cfg, root, version)
    latest = tiny_vae_dir(cfg, root, None)
    if (target / "config.json").exists():
        metrics = json.loads((target / METRICS_FILE).read_text()) if (target / METRICS_FILE).exists() else {}
        _publish_latest(target, latest)
        return VaeFitResult(target, metrics, fitted=False)

    t0 = time.perf_counter()
    size = tuple(cfg.video.image_size)
    usable = VideoClipDataset(data.rows, 1, 1, size, train=False).rows  # readable ok rows with captions
    rows = usable or data.rows
    if not rows:
        raise ValueError(f"{data.manifest}: no ok clips to fit the VAE on")
    held = set(data.held_out)  # the evaluation's held-out clips test the fit too
    train_rows, test_rows = [r for r in rows if r["clip_id"] not in held], [r for r in rows if r["clip_id"] in held]
    if not train_rows:
        raise ValueError(f"{data.manifest}: every usable clip is held out; no clip to fit the VAE on")
    train_frames = collect_frames(train_rows, size)  # (N, 3, H, W)
    test_frames = collect_frames(test_rows, size) if test_rows else train_frames[: max(1, len(train_frames) // 10)]

    # As the posterior variance shrinks (small kl_weight), gradients through std * eps become
    # subnormal floats, which are 10-100x slower on CPUs; flush them to zero while fitting.
    torch.set_flush_denormal(True)
    try:
        vae, train_metrics = _fit(cfg, train_frames, test_frames, t0, progress)
    finally:
        torch.set_flush_denormal(False)  # the default
    metrics = {**train_metrics, "dataset_version": version}
    if progress:
        print(
            f"vae fit: held-out recon mse {metrics['recon_mse']:.4f}, PSNR {metrics['psnr']:.1f} dB "
            f"in {metrics['seconds']} s",
            flush=True,
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vae.", dir=target.parent))
    try:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_text(tmp / METRICS_FILE, json.dumps(metrics, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _publish_latest(target, latest)
    return VaeFitResult(target, metrics, fitted=True)


def _fit(cfg: SoraFlowConfig, train_frames: torch.Tensor, test_frames: torch.Tensor, t0: float, progress: bool):
    """The fit loop and the calibration; returns (vae in eval mode, metrics)."""
    fit = cfg.vae.fit
    torch.manual_seed(cfg.train.seed)
    vae = new_tiny_vae(cfg)
    vae.train()
    bf16 = fit.precision == "bf16"  # autocast: the convolutions run in bf16, the weights stay fp32
    opt = torch.optim.AdamW(vae.parameters(), lr=fit.lr, weight_decay=0.0, fused=True)  # one kernel for all tensors
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(1, fit.steps)))
    )
    g = torch.Generator().manual_seed(cfg.train.seed)
    n = len(train_frames)
    log_every = max(1, fit.steps // 10)
    for step in range(fit.steps):
        idx = torch.randint(0, n, (min(fit.batch_size, n),), generator=g)
        loss, mse = _vae_loss(vae, train_frames[idx], fit.kl_weight, g, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress and ((step + 1) % log_every == 0 or step == 0):
            print(
                f"vae fit: step {step + 1}/{fit.steps} recon mse {mse.item():.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    vae.eval()

    shift, std = latent_stats(vae, train_frames)
    calibrate(vae, shift, 1.0 / (cfg.vae.scaling_factor * std))
    shift_after, std_after = latent_stats(vae, train_frames)
    mse = _recon_mse(vae, test_frames)
    metrics = {
        "recon_mse": mse,
        "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),  # pixel range [-1, 1] has peak-to-peak 2
        "steps": fit.steps,
        "fit_frames": int(n),
        "test_frames": int(len(test_frames)),
        "scaled_latent_std": [round(float(s), 4) for s in std_after * cfg.vae.scaling_factor],
        "scaled_latent_mean": [round(float(s), 4) for s in shift_after * cfg.vae.scaling_factor],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return vae, metrics


def _publish_latest(src: Path, latest: Path) -> None:
    """Copy the fit to `latest` (what `vae_path(cfg, root)` finds), replacing it atomically."""
    marker = latest / METRICS_FILE
    if marker.exists() and (src / METRICS_FILE).exists() and marker.read_bytes() == (src / METRICS_FILE).read_bytes():
        return
    tmp = Path(tempfile.mkdtemp(prefix=".latest.", dir=latest.parent))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    old = latest.parent / f".old-{os.getpid()}-{time.time_ns()}"
    if latest.exists():
        os.rename(latest, old)
    os.rename(tmp, latest)
    shutil.rmtree(old, ignore_errors=True)


@task(name="fit-vae", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def fit_vae_task(cfg: SoraFlowConfig, data: DatasetSplit, data_root: str) -> VaeFitResult:
    """Fit the tiny VAE on the dataset's frames (skipped when a pretrained VAE is configured)."""
    return fit_vae(cfg, data, DataRoot(data_root))
