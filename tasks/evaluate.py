"""Evaluate a trained model folder on the held-out clips: validation loss, samples, the configured scorers.

    DatasetSplit --held_out--> held-out clips (training never saw them; storage/data/holdout.py)
      val loss : each clip's centred window, posterior mean (VAE) and caption (T5) ->
                 scheduler.training_loss at timesteps and noise drawn from a generator seeded
                 with eval.seed, averaged. The same model always gives the same number.
      samples  : up to eval.num_prompts distinct held-out captions -> the model folder loaded
                 with storage/registry/model_folder.load_model_folder -> (B, 3, T, H, W) -> one mp4 per prompt
                 and one GIF grid
      scorers  : eval.scorers (tasks/eval_scorers.py) on the samples: prompt adherence for the
                 synthetic world's captions, open_clip text-video similarity for any captions

Metric keys: val_loss, num_prompts, num_samples, val_clips, sampling figures, and each
configured scorer's (configs.schema.SCORER_METRICS).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prefect import task
from soraflow.configs.schema import SoraFlowConfig
from soraflow.models.noise import randn
from soraflow.storage.data.dataset import VideoClipDataset
from soraflow.storage.data.holdout import DatasetSplit, distinct_captions
from soraflow.storage.layout import DataRoot, atomic_write_text
from soraflow.storage.registry.model_folder import is_model_folder, load_model_folder
from soraflow.storage.data.video_io import tile_grid, to_uint8_frames, write_gif, write_video
from soraflow.tasks.generate import slug
from soraflow.tasks.eval_scorers import run_scorers
from soraflow.tasks.task_policy import STAGE_RETRIES

VAL_REPEATS = 4  # (timestep, noise) draws per held-out clip


@dataclass
class EvalResult:
    metrics: dict
    samples_mp4: list[Path] = field(default_factory=list)
    samples_gif: Path | None = None  # one grid of all samples
    per_prompt: list[dict] = field(default_factory=list)  # prompt, expected, predicted, correct, mp4


def sampling_steps(cfg: SoraFlowConfig) -> int:
    """The evaluation's denoising steps: eval.sampling_steps, else the scheduler's own."""
    return cfg.eval.sampling_steps or cfg.scheduler.num_sampling_steps


def sample_prompts(cfg: SoraFlowConfig, pipe, rows: list[dict]) -> tuple[list[str], list[str], list, float]:
    """Up to eval.num_prompts distinct captions of `rows`, eval.samples_per_prompt seeds each, sampled
    as evaluation samples them: (distinct captions, prompts, (T, H, W, 3) uint8 frames each, seconds)."""
    distinct = distinct_captions(rows, cfg.eval.num_prompts)
    prompts = [
        p for p in distinct for _ in range(cfg.eval.samples_per_prompt)
    ]  # each eval.samples_per_prompt times, different noise
    t = time.perf_counter()
    videos = pipe(
        prompts, steps=sampling_steps(cfg), cfg_scale=cfg.scheduler.cfg_scale, seed=cfg.eval.seed
    )  # (B, 3, T, H, W)
    seconds = time.perf_counter() - t
    return distinct, prompts, [to_uint8_frames(x) for x in videos], seconds


@torch.no_grad()
def validation_loss(pipe, clips: VideoClipDataset, seed: int, repeats: int = VAL_REPEATS, batch: int = 16) -> float:
    """Mean diffusion loss over held-out clips at seeded timesteps and noise (deterministic)."""
    model, scheduler = pipe.stdit.eval(), pipe.scheduler
    xs, ys, masks = [], [], []
    for i in range(len(clips)):
        item = clips[i]
        mean, _ = pipe.vae.encode_moments(item["video"][None])  # (1, C, T, h, w), scaled
        enc = pipe.text_encoder.encode([item["text"]])  # y (1, 1, L, C), mask (1, L)
        for _ in range(repeats):
            xs.append(mean[0])
            ys.append(enc["y"][0].float())
            masks.append(enc["mask"][0])
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(xs), batch):
        x0 = torch.stack(xs[i : i + batch])  # (b, C, T, h, w)
        t = scheduler.sample_timesteps(x0.shape[0], x0.device, g)
        noise = randn(x0.shape, g, x0.device)
        out = scheduler.training_loss(
            model,
            x0,
            model_kwargs={"y": torch.stack(ys[i : i + batch]), "mask": torch.stack(masks[i : i + batch])},
            t=t,
            noise=noise,
            generator=g,
        )
        total += out["loss"].float().sum().item()
        n += x0.shape[0]
    return total / max(n, 1)


def evaluate(
    cfg: SoraFlowConfig,
    data: DatasetSplit,
    model_dir: str | Path,
    root: DataRoot,
    out_dir: str | Path,
    progress: bool = True,
) -> EvalResult:
    """Validation loss, samples and the configured scorers of `model_dir` on the held-out clips of `data`."""
    t0 = time.perf_counter()
    manifest_path = data.manifest
    model_dir = Path(model_dir)
    if not is_model_folder(model_dir):
        raise FileNotFoundError(
            f"evaluate: {model_dir} is not a model folder (no soraflow.json); pass TrainResult.model_dir"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = data.train, data.val
    if not val_rows:
        raise ValueError(f"{manifest_path}: no held-out clips (train.val_fraction={cfg.train.val_fraction}); "
                         "evaluation needs clips the model did not train on")

    pipe, _ = load_model_folder(model_dir, cfg)
    source = f"model folder {model_dir}"
    v = cfg.video
    clips = VideoClipDataset(val_rows, v.num_frames, v.frame_interval, tuple(v.image_size), train=False)
    if not len(clips):
        raise ValueError(f"{manifest_path}: none of the {len(val_rows)} held-out clips is usable: {clips.skipped[:3]}")
    val_loss = validation_loss(pipe, clips, cfg.eval.seed)

    distinct, prompts, frames, sample_s = sample_prompts(cfg, pipe, clips.rows)
    reps = cfg.eval.samples_per_prompt
    mp4s = []
    for k, (prompt, f) in enumerate(zip(prompts, frames)):
        mp4s.append(write_video(out_dir / f"{k // reps:02d}-{k % reps}-{slug(prompt)}.mp4", f, fps=v.fps))
    gif = write_gif(
        out_dir / "samples_grid.gif", tile_grid(frames, cols=reps if reps > 1 else None), fps=v.fps, scale=3
    )  # a row per prompt
    train_clips = lambda: VideoClipDataset(
        train_rows, v.num_frames, v.frame_interval, tuple(v.image_size), train=False
    )  # noqa: E731
    scores = run_scorers(cfg, pipe, frames, prompts, clips, train_clips)  # eval.scorers (tasks/eval_scorers.py)

    metrics = {
        "val_loss": val_loss,
        **scores.metrics,
        "num_prompts": len(distinct),
        "num_samples": len(prompts),
        "val_clips": len(clips),
        "sampling_steps": sampling_steps(cfg),
        "cfg_scale": cfg.scheduler.cfg_scale,
        "sample_seconds": sample_s,
        "seconds": time.perf_counter() - t0,
    }
    per_prompt = [{**r, "mp4": str(p)} for r, p in zip(scores.per_sample, mp4s)]
    atomic_write_text(
        out_dir / "metrics.json",
        json.dumps({"metrics": metrics, "weights": source, "per_prompt": per_prompt}, indent=1, default=str),
    )
    if progress:
        print(
            f"evaluate: val loss {val_loss:.4f} on {len(clips)} held-out clips; "
            f"{len(prompts)} samples of {len(distinct)} held-out prompts"
            + "".join(f"; {line}" for line in scores.summary),
            flush=True,
        )
    for key in ("val_loss",):
        if not math.isfinite(metrics[key]):
            raise FloatingPointError(f"evaluate: {key} is {metrics[key]} for {model_dir}")
    return EvalResult(metrics, mp4s, gif, per_prompt)


@task(name="evaluate", **STAGE_RETRIES)
def evaluate_task(cfg: SoraFlowConfig, data: DatasetSplit, model_dir: str, data_root: str) -> EvalResult:
    """Validation loss, held-out samples and prompt adherence of a trained model folder."""
    return evaluate(cfg, data, model_dir, DataRoot(data_root), Path(model_dir).parent / "eval")
