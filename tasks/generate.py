"""Text-to-video generation: prompts in, mp4 files plus GIF previews out."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prefect import task
from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.video_io import to_uint8_frames, write_gif, write_video
from soraflow.storage.registry.model_folder import load_pipeline


@dataclass
class GenerateResult:
    videos: list[Path]
    gifs: list[Path]
    prompts: list[str]
    weights: str  # where the weights came from, in words
    seconds: float
    frames: list = field(default_factory=list, repr=False)  # (T, H, W, 3) uint8 per video


def slug(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:max_len].rstrip("-") or "prompt")


def generate_videos(
    cfg: SoraFlowConfig,
    root: DataRoot,
    prompts: list[str],
    ckpt: str | Path | None = None,
    model_ref: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    cfg_scale: float | None = None,
    num_frames: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    gif_scale: int = 4,
) -> GenerateResult:
    """Generate one video per prompt and write <out>/<k>-<slug>.mp4 and .gif."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("generate: every prompt must be a non-empty string")
    if ckpt is not None and model_ref is not None:
        raise ValueError("generate: give --ckpt or --model, not both")
    started = time.perf_counter()
    torch.manual_seed(cfg.generate.seed if seed is None else seed)
    if model_ref is not None:  # through the version's MLflow model, as mlflow.pyfunc.load_model loads it
        from soraflow.storage.registry.model_registry import ModelRegistry

        pipe, source = ModelRegistry(root, cfg.registry).load_pipeline(model_ref, cfg, num_frames)
    else:
        pipe, source = load_pipeline(cfg, root, ckpt, num_frames=num_frames)
    videos = pipe(
        prompts,
        steps=steps or cfg.generate.steps,
        cfg_scale=cfg_scale if cfg_scale is not None else cfg.generate.cfg_scale,
        seed=cfg.generate.seed if seed is None else seed,
        progress=progress,
    )  # (B, 3, T, H, W) in [-1, 1]
    out = Path(out_dir or cfg.generate.output_dir or root.samples)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    mp4s, gifs, frames = [], [], []
    for k, (prompt, video) in enumerate(zip(prompts, videos)):
        f = to_uint8_frames(video)  # (T, H, W, 3)
        name = f"{stamp}-{k}-{slug(prompt)}"
        mp4s.append(write_video(out / f"{name}.mp4", f, fps=cfg.video.fps))
        gifs.append(write_gif(out / f"{name}.gif", f, fps=cfg.video.fps, scale=gif_scale))
        frames.append(f)
    return GenerateResult(mp4s, gifs, list(prompts), source, time.perf_counter() - started, frames)


@task(name="generate", retries=1)
def generate_task(prompts: list[str], version: str, config: SoraFlowConfig, data_root: str) -> dict:
    """Generate from a registered model version through the registry (as a user would)."""
    result = generate_videos(config, DataRoot(data_root), prompts, model_ref=version, progress=False)
    return {"videos": [str(p) for p in result.videos], "gifs": [str(p) for p in result.gifs], "weights": result.weights}
