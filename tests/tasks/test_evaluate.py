"""Evaluation: held-out split shared with training, deterministic validation loss, samples, adherence next to chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from soraflow.storage.data.holdout import DatasetSplit, holdout_split
from soraflow.storage.data.manifest import ok_rows
from training_data import train_cfg


@pytest.fixture(scope="module")
def trained(fitted_clips):
    """10 steps of training on the session's 10 clips and their fitted VAE (tests/tasks/conftest.py)."""
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = fitted_clips
    cfg = train_cfg(root, **{"train.steps": 10, "eval.num_prompts": 3})
    split = DatasetSplit.read(manifest, cfg.train.val_fraction)
    result = train(cfg, split, root, vae_dir, run_name="eval")
    return cfg, root, split, result


def test_evaluate_reports_metrics_samples_and_adherence(trained, tmp_path):
    from soraflow.storage.data.video_io import probe_video
    from soraflow.storage.data.holdout import distinct_captions
    from soraflow.tasks.evaluate import evaluate

    cfg, root, split, result = trained
    out = evaluate(cfg, split, result.model_dir, root, tmp_path / "eval")
    m = out.metrics
    for a in ("color", "shape", "direction", "all"):
        assert 0.0 <= m[f"adherence_{a}"] <= 1.0
        assert 0.0 <= m[f"recon_adherence_{a}"] <= 1.0
    assert m["chance_shape"] == pytest.approx(1 / 3) and m["chance_direction"] == pytest.approx(1 / 4)
    assert m["chance_all"] == pytest.approx(m["chance_color"] * m["chance_shape"] * m["chance_direction"])
    assert np.isfinite(m["val_loss"]) and m["val_loss"] > 0
    # the shape detector's circle threshold, calibrated on the VAE reconstructions of training clips
    assert 0.0 < m["shape_round_below"] <= 1.0 and 0.0 <= m["adherence_shape_fixed"] <= 1.0
    # prompts are held-out captions only
    train_rows, val_rows = holdout_split(ok_rows(split.manifest), cfg.train.val_fraction)
    prompts = distinct_captions(val_rows, cfg.eval.num_prompts)
    k = cfg.eval.samples_per_prompt
    assert [r["prompt"] for r in out.per_prompt] == [p for p in prompts for _ in range(k)]
    assert m["num_prompts"] == len(prompts) >= 1 and m["num_samples"] == k * len(prompts)
    assert len(out.samples_mp4) == k * len(prompts)
    info = probe_video(out.samples_mp4[0])
    assert (info.num_frames, info.height, info.width) == (8, 32, 32)
    assert out.samples_gif.exists() and out.samples_gif.read_bytes()[:3] == b"GIF"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["val_loss"] == m["val_loss"]
    # the same model gives the same validation loss
    again = evaluate(cfg, split, result.model_dir, root, tmp_path / "eval2")
    assert again.metrics["val_loss"] == m["val_loss"]
    assert [r["predicted"] for r in again.per_prompt] == [r["predicted"] for r in out.per_prompt]


def test_validation_loss_separates_models(trained, tmp_path):
    """A trained model's held-out loss beats the same architecture with random (zero-output) weights."""
    from soraflow.storage.data.dataset import VideoClipDataset
    from soraflow.tasks.evaluate import validation_loss
    from soraflow.storage.registry.model_folder import load_pipeline

    cfg, root, split, result = trained
    _, val_rows = holdout_split(ok_rows(split.manifest), cfg.train.val_fraction)
    clips = VideoClipDataset(val_rows, 8, 1, (32, 32), train=False)
    pipe, _ = load_pipeline(cfg, root, ckpt=result.model_dir)
    trained_loss = validation_loss(pipe, clips, seed=1)
    assert validation_loss(pipe, clips, seed=1) == trained_loss
    for p in pipe.stdit.parameters():
        p.data.normal_(0, 0.2)
    assert validation_loss(pipe, clips, seed=1) > trained_loss


def test_evaluate_needs_a_model_folder(trained, tmp_path):
    from soraflow.tasks.evaluate import evaluate

    cfg, root, split, _ = trained
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        evaluate(cfg, split, tmp_path, root, tmp_path / "out")


def test_bf16_sampling_keeps_fp32_output_and_the_same_video(trained):
    """scheduler.sample_precision=bf16 runs the denoising and the decode under autocast: the
    video comes back in fp32 and within bf16 rounding of the fp32 one (same noise, same weights)."""
    from soraflow.storage.registry.model_folder import load_model_folder

    cfg, _, _, result = trained
    pipe, _ = load_model_folder(result.model_dir, cfg)
    assert pipe.precision == cfg.scheduler.sample_precision
    videos = {}
    for precision in ("fp32", "bf16"):
        pipe.precision = precision
        videos[precision] = pipe(["a red circle moving left"], steps=4, seed=3)  # (1, 3, T, H, W)
    assert videos["bf16"].dtype == videos["fp32"].dtype == torch.float32
    assert videos["bf16"].shape == videos["fp32"].shape
    diff = (videos["bf16"] - videos["fp32"]).abs()
    assert 0 < diff.max() and diff.mean() < 0.05  # bf16 really ran, and drew the same picture
