"""Text to video: T5 -> noise -> STDiT denoising (IDDPM or rectified flow) -> VAE decode.

Shapes for one prompt batch of size B, latent channels C=4, VAE downsample f, patch (1, p, p):

    prompts (B strings)
      -> T5 tokens (B, L) -> embeddings y (B, 1, L, C_text), mask (B, L)
      -> noise z (B, C, T, H/f, W/f)
      -> STDiT per step: patches (B, T*S, D) with S = (H/f/p)*(W/f/p);
         spatial attention over (B*T, S, D), temporal over (B*S, T, D), cross attention to y
      -> denoised latents (B, C, T, H/f, W/f)
      -> VAE decode per frame -> video (B, 3, T, H, W) in [-1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import randn


@dataclass
class TextToVideo:
    """The four parts of a text-to-video model, used together."""

    stdit: torch.nn.Module
    vae: torch.nn.Module  # models.vae.VideoVAE
    text_encoder: object  # models.text_encoder.T5TextEncoder
    scheduler: object  # models.diffusion scheduler
    num_frames: int
    image_size: tuple[int, int]  # (H, W) in pixels
    precision: str = "fp32"  # "bf16": denoising and decoding under torch.autocast (weights stay fp32)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        t, h, w = self.vae.get_latent_size((self.num_frames, *self.image_size))
        return (self.vae.latent_channels, t, h, w)  # (C, T, H/f, W/f)

    def null_caption(self, batch: int) -> torch.Tensor:
        """The model's stored null caption, (B, 1, L, C_text), used for classifier-free guidance."""
        y_null = self.stdit.y_embedder.y_embedding  # (L, C_text)
        return y_null[None, None].expand(batch, 1, *y_null.shape)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int = 42,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate one video per prompt: (B, 3, T, H, W) in [-1, 1]."""
        self.stdit.eval()
        generator = torch.Generator().manual_seed(seed)
        cond = self.text_encoder.encode(prompts)  # y (B, 1, L, C_text), mask (B, L)
        z = randn((len(prompts), *self.latent_shape), generator, "cpu")  # (B, C, T, H/f, W/f)
        # bf16: the STDiT's and the VAE decoder's matmuls and convolutions in bf16; the Euler
        # update itself stays fp32 (the scheduler keeps x in fp32).
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            latents = self.scheduler.sample(
                self.stdit,
                z,
                model_kwargs={"y": cond["y"], "mask": cond["mask"]},
                y_null=self.null_caption(len(prompts)),
                cfg_scale=cfg_scale,
                num_steps=steps,
                progress=progress,
                generator=generator,
            )  # (B, C, T, H/f, W/f)
            video = self.vae.decode(latents)  # (B, 3, T, H, W)
        return video.float().clamp(-1, 1)
