"""Frame-wise video VAE: a diffusers AutoencoderKL applied to every frame (Open-Sora v1.0, sd-vae-ft-ema).

    x (B, 3, T, H, W) in [-1, 1] -> frames (B*T, 3, H, W) -> encoder, in micro-batches of frames
      -> posterior N(mean, std^2) per frame (B*T, C, H/f, W/f) -> sample (or mean) * scaling_factor
      -> latents (B, C, T, H/f, W/f)
    decode: latents / scaling_factor -> decoder per frame -> (B, 3, T, H, W)

f = 2**(len(block_out_channels) - 1): 8 for the SD VAE, 4 for the tiny default. No temporal compression.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from .noise import randn


class VideoVAE(nn.Module):
    """Per-frame AutoencoderKL with Open-Sora's scaling factor and optional micro-batching over frames."""

    def __init__(self, vae: AutoencoderKL, micro_batch_size: int | None = None, scaling_factor: float = 0.18215):
        super().__init__()
        self.module = vae  # "module" as in Open-Sora's VideoAutoencoderKL, so its state-dict keys match
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = scaling_factor

    @classmethod
    def from_pretrained(
        cls, path: str | Path, micro_batch_size: int | None = None, scaling_factor: float = 0.18215
    ) -> VideoVAE:
        """Load an AutoencoderKL saved with save_pretrained from a local folder (never downloads)."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"VAE: {p} is not a local directory (SoraFlow never downloads weights)")
        if not (p / "config.json").exists() and (p / "vae" / "config.json").exists():
            p = p / "vae"  # a diffusers pipeline folder
        vae = AutoencoderKL.from_pretrained(
            str(p), local_files_only=True, low_cpu_mem_usage=False
        )  # no accelerate needed
        return cls(vae, micro_batch_size=micro_batch_size, scaling_factor=scaling_factor).eval()

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.module.config.latent_channels

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) pixels -> (T, H/f, W/f) latents; H and W must be multiples of f."""
        t, h, w = input_size
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"video size {h}x{w} is not divisible by the VAE downsampling factor {f}")
        return (t, h // f, w // f)

    def _chunks(self, n: int) -> list[slice]:
        step = self.micro_batch_size or n
        return [slice(i, i + step) for i in range(0, n, step)]

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, T, H, W) in [-1, 1] -> posterior (mean, std), each (B, C, T, H/f, W/f), times the scaling factor."""
        b, _, t, h, w = x.shape
        dtype = next(self.module.parameters()).dtype
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w).to(dtype)  # (B*T, 3, H, W)
        means, stds = [], []
        for s in self._chunks(b * t):
            post = self.module.encode(frames[s]).latent_dist  # log-variance clamped to [-30, 20] by diffusers
            means.append(post.mean)
            stds.append(post.std)
        mean, std = torch.cat(means), torch.cat(stds)  # (B*T, C, h, w)

        def unfold(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4) * self.scaling_factor  # (B, C, T, h, w)

        return unfold(mean), unfold(std)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, 3, T, H, W) in [-1, 1] -> latents (B, C, T, H/f, W/f): a posterior sample (Open-Sora) or the mean.

        The noise is drawn once for the whole batch, so a seeded result does not depend on micro_batch_size.
        """
        mean, std = self.encode_moments(x)
        if not sample:
            return mean
        return mean + std * randn(mean.shape, generator, mean.device, mean.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, C, T, h, w) -> video (B, 3, T, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        b, c, t, h, w = z.shape
        dtype = next(self.module.parameters()).dtype
        frames = (z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w) / self.scaling_factor).to(dtype)  # (B*T, C, h, w)
        out = torch.cat([self.module.decode(frames[s]).sample for s in self._chunks(b * t)])  # (B*T, 3, H, W)
        return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)


def build_tiny_vae(block_out_channels=(32, 64, 64), layers_per_block: int = 1, latent_channels: int = 4,
                   norm_num_groups: int = 16, seed: int = 0) -> AutoencoderKL:
    """A small random AutoencoderKL (the SD VAE's architecture, narrower):
    2**(len(block_out_channels)-1)x downsampling."""
    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):  # seeded build, the caller's RNG state untouched
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=list(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            scaling_factor=0.18215,
        )
