"""Evaluation scorers beyond the validation loss, chosen by `eval.scorers` (configs/schema.py).

    run_scorers(cfg, pipe, frames, prompts, val_clips, train_clips) -> Scores

Validation loss and samples always run (tasks/evaluate.py); these score the samples:

* `adherence`: the synthetic world's prompt adherence (tasks/sample_world/adherence.py): is the
  colour, shape and direction the prompt names what the video shows, next to each attribute's
  chance level. Only for captions from its vocabulary (the local preset turns it on). The
  detector's circle threshold is the fixed ROUND_BELOW (fitted once on a reference set, see
  bench/fit_round_below.py), the same for every run; the same score on the VAE reconstructions
  of the held-out clips is the ceiling the VAE and the detector leave at this resolution.
* `clip_similarity`: text-video similarity through open_clip from a local checkpoint
  (eval.clip_path, for the architecture eval.clip_model: a name open_clip knows or the path of
  a model config .json): 100 x cosine between the prompt's text embedding and the mean image
  embedding of frames at 10/50/90 % of the video (CLIPScore's scale; Open-Sora's `match` score
  uses CLIP on the middle frame). `recon_clip_score` is the same on VAE reconstructions of the
  held-out clips with their captions: the ceiling the VAE leaves.

The metric names each scorer adds are listed in configs.schema.SCORER_METRICS, which the
config checks `eval.metric` against.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from soraflow.configs.loader import ConfigError
from soraflow.configs.schema import SCORER_METRICS, SoraFlowConfig
from soraflow.storage.data.dataset import VideoClipDataset
from soraflow.storage.data.video_io import to_uint8_frames

ATTRS = ("color", "shape", "direction", "all")
CLIP_FRAME_POINTS = (0.1, 0.5, 0.9)


@dataclass
class Scores:
    metrics: dict = field(default_factory=dict)
    per_sample: list[dict] = field(default_factory=list)  # one dict per sample, merged across scorers
    summary: list[str] = field(default_factory=list)  # one phrase per scorer for the progress line


@torch.no_grad()
def reconstruct(pipe, clips: VideoClipDataset, limit: int | None = None) -> list[np.ndarray]:
    """The first `limit` clips after a VAE round trip (posterior mean): (T, H, W, 3) uint8 each."""
    out = []
    for i in range(len(clips) if limit is None else min(limit, len(clips))):
        mean, _ = pipe.vae.encode_moments(clips[i]["video"][None])  # (1, C, T, h, w)
        out.append(to_uint8_frames(pipe.vae.decode(mean)[0].clamp(-1, 1)))
    return out


# ---------------------------------------------------------------- adherence


def adherence(cfg, pipe, frames, prompts, val_clips, train_clips) -> Scores:
    from soraflow.tasks.sample_world.adherence import (
        ROUND_BELOW,
        flat_metrics,
        score_videos,
    )

    try:
        result = score_videos(frames, prompts, round_below=ROUND_BELOW)
    except ValueError as e:  # captions that are not the synthetic world's: say what to configure
        raise ValueError(f"{e}; the 'adherence' scorer reads only the synthetic sample's captions: remove it from "
                         f"eval.scorers and set eval.metric to val_loss (or use clip_similarity)") from None
    fixed = result["accuracy"]
    recon = score_videos(reconstruct(pipe, val_clips), [r["text"] for r in val_clips.rows], round_below=ROUND_BELOW)
    metrics = {
        **flat_metrics(result),
        **flat_metrics(recon, prefix="recon_adherence_", chance_prefix=None),
        "shape_round_below": ROUND_BELOW,
        # the names runs logged when the threshold was re-fitted per run; now the same figures
        "adherence_shape_fixed": float(fixed["shape"]),
        "adherence_all_fixed": float(fixed["all"]),
    }
    line = ", ".join(f"{a} {metrics[f'adherence_{a}']:.2f} (chance {metrics[f'chance_{a}']:.2f})" for a in ATTRS)
    summary = f"adherence: {line} (shape detector's fixed circle threshold {ROUND_BELOW})"
    return Scores(metrics, result["rows"], [summary])


# ---------------------------------------------------------------- open_clip similarity


class ClipSimilarity:
    """open_clip image and text towers from a local checkpoint; nothing is downloaded."""

    def __init__(self, model: str, path: str):
        import open_clip

        if not Path(path).expanduser().is_file():
            raise ConfigError(
                f"eval.clip_path {path!r}: no such file (local open_clip weights, .safetensors or a state dict)"
            )
        if model.endswith(".json"):  # a model config of one's own: register it under its file stem
            if not Path(model).is_file():
                raise ConfigError(f"eval.clip_model {model!r}: no such model config file")
            open_clip.add_model_config(model)
            model = Path(model).stem
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
            open_clip.load_checkpoint(self.model, str(Path(path).expanduser()))
            self.tokenizer = open_clip.get_tokenizer(model)
        except (RuntimeError, AssertionError, KeyError, ValueError) as e:  # unknown model, or another architecture
            raise ConfigError(f"eval.clip_path {path!r} for eval.clip_model {model!r}: {e}") from e
        self.model.eval()
        self._lock = threading.Lock()

    @torch.no_grad()
    def score(self, videos: list[np.ndarray], texts: list[str]) -> list[float]:
        """100 x cos(text, mean frame embedding) per (T, H, W, 3) uint8 video."""
        from PIL import Image

        with self._lock:
            sims = []
            for video, text in zip(videos, texts):
                n = len(video)
                pixels = torch.stack(
                    [self.preprocess(Image.fromarray(video[min(n - 1, int(n * p))])) for p in CLIP_FRAME_POINTS]
                )
                img = self.model.encode_image(pixels).float()  # (3, D)
                img = img / img.norm(dim=-1, keepdim=True)
                img = img.mean(0)
                img = img / img.norm()
                txt = self.model.encode_text(self.tokenizer([text])).float()[0]  # (D,)
                sims.append(float(100.0 * (img @ (txt / txt.norm()))))
            return sims


_CLIP_MODELS: dict[tuple[str, str], ClipSimilarity] = {}
_CLIP_LOCK = threading.Lock()


def clip_model(model: str, path: str) -> ClipSimilarity:
    with _CLIP_LOCK:
        if (model, path) not in _CLIP_MODELS:
            _CLIP_MODELS[(model, path)] = ClipSimilarity(model, path)
        return _CLIP_MODELS[(model, path)]


def clip_similarity(cfg, pipe, frames, prompts, val_clips, train_clips) -> Scores:
    scorer = clip_model(cfg.eval.clip_model, cfg.eval.clip_path)
    per = scorer.score(frames, prompts)
    recon = scorer.score(reconstruct(pipe, val_clips), [r["text"] for r in val_clips.rows])
    metrics = {"clip_score": float(np.mean(per)), "recon_clip_score": float(np.mean(recon))}
    summary = (
        f"CLIP similarity {metrics['clip_score']:.1f} "
        f"(VAE reconstructions of held-out clips: {metrics['recon_clip_score']:.1f})"
    )
    return Scores(metrics, [{"clip_score": s} for s in per], [summary])


# ---------------------------------------------------------------- registry

Scorer = Callable[..., Scores]
SCORERS: dict[str, Scorer] = {"adherence": adherence, "clip_similarity": clip_similarity}
assert set(SCORERS) == set(SCORER_METRICS), "every scorer lists its metrics in configs.schema.SCORER_METRICS"


def run_scorers(cfg: SoraFlowConfig, pipe, frames: list[np.ndarray], prompts: list[str], val_clips: VideoClipDataset,
                train_clips: Callable[[], VideoClipDataset]) -> Scores:
    """Every scorer in cfg.eval.scorers on the samples; per-sample rows start with the prompt."""
    out = Scores(per_sample=[{"prompt": p} for p in prompts])
    for name in cfg.eval.scorers:
        got = SCORERS[name](cfg, pipe, frames, prompts, val_clips, train_clips)
        out.metrics.update(got.metrics)
        out.summary.extend(got.summary)
        for row, extra in zip(out.per_sample, got.per_sample):
            row.update(extra)
    return out
