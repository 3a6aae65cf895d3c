"""Training-side test data: captioned clips of coloured shapes moving in a direction, and small configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from soraflow.configs.loader import load_config
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import new_row, write_manifest
from soraflow.storage.data.video_io import write_video

STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _palette() -> dict[str, tuple[int, int, int]]:
    from soraflow.tasks.sample_world.scenes import COLORS

    return {k: tuple(int(c) for c in v) for k, v in COLORS.items()}


def render_clip(shape: str, rgb, direction: str, frames: int = 12, size: int = 32, seed: int = 0) -> np.ndarray:
    """(T, size, size, 3) uint8: one shape crossing 40% of a dark frame in `direction`."""
    rng = np.random.default_rng(seed)
    ss = 3
    ys, xs = np.mgrid[0 : size * ss, 0 : size * ss]
    r = 0.17 * size
    x0, y0 = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    background = np.array([30.0, 30.0, 40.0])
    out = []
    for t in range(frames):
        step = (t - (frames - 1) / 2) * 0.4 * size / max(1, frames - 1)
        cx, cy = x0 + STEPS[direction][0] * step, y0 + STEPS[direction][1] * step
        x, y = (xs + 0.5) / ss - cx, (ys + 0.5) / ss - cy
        if shape == "circle":
            inside = x**2 + y**2 <= r * r
        elif shape == "square":
            inside = (np.abs(x) <= r) & (np.abs(y) <= r)
        else:  # triangle pointing up
            inside = (y <= 0.6 * r) & (y >= -1.2 * r + np.sqrt(3) * np.abs(x))
        cover = inside.reshape(size, ss, size, ss).mean(axis=(1, 3))[..., None]
        img = background * (1 - cover) + np.asarray(rgb, float) * cover
        out.append(np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def make_clip_manifest(
    folder: Path, root: DataRoot, n: int = 8, frames: int = 12, size: int = 32, seed: int = 0
) -> Path:
    """n captioned clips ("a red circle moving left") as mp4 files + an ok-row manifest; returns its path."""
    palette = _palette()
    colors, shapes, dirs = sorted(palette), ["circle", "square", "triangle"], list(STEPS)
    rng = np.random.default_rng(seed)
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c, s, d = colors[rng.integers(len(colors))], shapes[rng.integers(3)], dirs[rng.integers(4)]
        path = folder / f"clip{i:03d}.mp4"
        write_video(path, render_clip(s, palette[c], d, frames, size, seed=int(rng.integers(1 << 30))), fps=8.0)
        rows.append(new_row(path=str(path), text=f"a {c} {s} moving {d}", num_frames=frames, height=size, width=size,
                            fps=8.0, clip_id=f"c{seed}-{i:03d}", video_id=f"v{i:03d}", source="pexels", status="ok"))
    rows.append(
        new_row(
            path=str(folder / "gone.mp4"),
            clip_id="bad",
            video_id="bad",
            source="pexels",
            status="rejected",
            error="404",
        )
    )
    return write_manifest(rows, "score", root)


def small_cfg(root: DataRoot, **extra):
    overrides = {
        "data.root": str(root.root),
        "video.num_frames": 8,
        "video.frame_interval": 1,
        "video.image_size": [32, 32],
        "vae.path": None,
        "vae.tiny.block_out_channels": [16, 32, 32],
        "vae.tiny.norm_num_groups": 8,
        "vae.fit.steps": 60,
        "vae.fit.batch_size": 16,
        "vae.fit.lr": 0.002,
        "train.val_fraction": 0.2,
    }
    overrides.update(extra)
    return load_config("local", overrides)


TRAIN = {
    "model.preset": "STDiT-Tiny",
    "text_encoder.max_length": 12,
    "text_encoder.tiny.d_model": 32,
    "text_encoder.tiny.num_layers": 1,
    "text_encoder.tiny.d_ff": 64,
    "vae.fit.steps": 40,
    "train.batch_size": 4,
    "train.lr": 0.001,
    "train.lr_schedule": "constant",  # tens of steps: the preset's warm-up and decay would hide the learning
    "train.warmup_steps": 0,
    "train.precision": "fp32",
    "scheduler.shift": 6.0,  # the recipe these 40-step "it learns" thresholds were set on
    "train.ema_decay": 0.9,
    "train.num_workers": 0,
    "train.log_every": 5,
    "train.ckpt_every": 10,
    "train.val_fraction": 0.2,
    "scheduler.num_sampling_steps": 10,
    "eval.num_prompts": 2,
}


def train_cfg(root: DataRoot, **extra):
    return small_cfg(root, **{**TRAIN, **extra})
