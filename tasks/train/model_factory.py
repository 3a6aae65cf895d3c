"""The model parts a config names: text encoder, VAE, STDiT and scheduler, built or loaded.

Nothing here downloads. A configured path must exist locally; where the config names no
path, the tiny parts live under <data root>/models/: the tiny T5 is built once from its
config, the tiny VAE is fitted by the train flow (tasks/train/vae_fit.py).

A *model folder* is what the registry stores and `--ckpt` accepts; its layout (Hugging Face
conventions, a model card README.md) is described and read in storage/registry/model_folder.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from soraflow.configs.schema import SoraFlowConfig
from soraflow.models.diffusion import build_scheduler
from soraflow.models.stdit import STDIT_PRESETS, STDiT, build_stdit
from soraflow.models.text_encoder import T5TextEncoder, build_tiny_t5
from soraflow.models.text_to_video import TextToVideo
from soraflow.models.vae import VideoVAE, build_tiny_vae
from soraflow.storage.checkpoints import (
    CheckpointError,
    load_weights_into,
    read_state_dict,
    refuse_pickles,
    save_model_dir,
)
from soraflow.storage.layout import DataRoot, atomic_write_text
from soraflow.storage.registry.model_card import write_model_card
from soraflow.storage.registry.model_folder import is_model_folder, load_model_folder
from soraflow.storage.redact import redact_config

log = logging.getLogger(__name__)


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _require_dir(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"config key '{key}': {p} is not a local directory (SoraFlow never downloads weights)")
    return p


# ---------------------------------------------------------------- text encoder


def tiny_t5_dir(cfg: SoraFlowConfig, root: DataRoot) -> Path:
    return root.models / f"t5-tiny-{_short_hash(cfg.text_encoder.tiny.model_dump())}"


def text_encoder_path(cfg: SoraFlowConfig, root: DataRoot) -> Path:
    """The configured T5 directory, or the tiny T5 (built now if it does not exist yet)."""
    if cfg.text_encoder.path:
        return _require_dir(cfg.text_encoder.path, "text_encoder.path")
    target = tiny_t5_dir(cfg, root)
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            build_tiny_t5(Path(tmp) / "t5", **cfg.text_encoder.tiny.model_dump())
            if not target.exists():  # another thread may have won the race; both builds are identical
                (Path(tmp) / "t5").rename(target)
    return target


def load_text_encoder(cfg: SoraFlowConfig, root: DataRoot, path: Path | None = None) -> T5TextEncoder:
    return T5TextEncoder(str(path or text_encoder_path(cfg, root)), max_length=cfg.text_encoder.max_length)


# ---------------------------------------------------------------- VAE


def tiny_vae_dir(cfg: SoraFlowConfig, root: DataRoot, dataset_version: str | None = None) -> Path:
    """Where the tiny VAE fitted on one dataset version lives (or the latest fit when None)."""
    # Everything the fit depends on: a changed architecture, fit recipe, seed or frame size is a new VAE.
    key = _short_hash({"tiny": cfg.vae.tiny.model_dump(), "fit": cfg.vae.fit.model_dump(), "seed": cfg.train.seed,
                       "image_size": list(cfg.video.image_size)})
    return root.models / f"vae-tiny-{key}" / (dataset_version or "latest")


def vae_path(cfg: SoraFlowConfig, root: DataRoot, dataset_version: str | None = None) -> Path | None:
    """The configured VAE, the fitted tiny VAE, or None when the tiny one has not been fitted yet."""
    if cfg.vae.path:
        return _require_dir(cfg.vae.path, "vae.path")
    p = tiny_vae_dir(cfg, root, dataset_version)
    return p if (p / "config.json").exists() else None


def load_vae(cfg: SoraFlowConfig, root: DataRoot, path: Path | None = None, allow_random: bool = False) -> tuple[VideoVAE, bool]:
    """(vae, pretrained). With no fitted tiny VAE, a random one only if allow_random."""
    path = path or vae_path(cfg, root)
    if path is not None:
        vae = VideoVAE.from_pretrained(str(path), micro_batch_size=cfg.vae.micro_batch_size, scaling_factor=cfg.vae.scaling_factor)
        return vae.eval(), True
    if not allow_random:
        raise FileNotFoundError("no VAE: config key 'vae.path' is empty and the tiny VAE has not been fitted yet (run `soraflow train`)")
    vae = VideoVAE(build_tiny_vae(**cfg.vae.tiny.model_dump()), micro_batch_size=cfg.vae.micro_batch_size, scaling_factor=cfg.vae.scaling_factor)
    return vae.eval(), False


# ---------------------------------------------------------------- STDiT + scheduler


def stdit_kwargs(cfg: SoraFlowConfig, vae: VideoVAE, caption_channels: int) -> dict:
    """Constructor kwargs for the configured preset at the configured video size."""
    latent = vae.get_latent_size((cfg.video.num_frames, *cfg.video.image_size))  # (T, H/f, W/f)
    return {
        "input_size": list(latent),
        "in_channels": vae.latent_channels,
        "caption_channels": caption_channels,
        "model_max_length": cfg.text_encoder.max_length,
        "class_dropout_prob": cfg.model.class_dropout_prob,
        "pred_sigma": cfg.model.pred_sigma,
        "drop_path": cfg.model.drop_path,
        "space_scale": cfg.model.space_scale,
        "time_scale": cfg.model.time_scale,
        "enable_grad_checkpoint": cfg.model.grad_checkpoint,
        "temporal_pos": cfg.model.temporal_pos,
        **({"patch_size": list(cfg.model.patch_size)} if cfg.model.patch_size else {}),
    }


def build_model(cfg: SoraFlowConfig, vae: VideoVAE, caption_channels: int) -> STDiT:
    return build_stdit(cfg.model.preset, **stdit_kwargs(cfg, vae, caption_channels))


def scheduler_for(cfg: SoraFlowConfig):
    s = cfg.scheduler
    return build_scheduler(s.type, num_sampling_steps=s.num_sampling_steps, cfg_scale=s.cfg_scale,
                           num_train_timesteps=s.num_train_timesteps, shift=s.shift, logit_std=s.logit_std)


# ---------------------------------------------------------------- model folders


def export_model_dir(
    folder: Path,
    cfg: SoraFlowConfig,
    stdit_state: dict[str, torch.Tensor],
    stdit_config: dict,
    vae_dir: Path | None,
    text_encoder_dir: Path | None,
    dataset_version: str | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write a self-contained model folder (storage/registry/model_folder.py) with its model card.

    stdit/ is what `STDiT.save_pretrained` writes (model.safetensors without the recomputed
    positional buffers, config.json = the constructor kwargs), so `STDiT.from_pretrained` reads it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    save_model_dir(folder / "stdit", stdit_state, {**STDIT_PRESETS[cfg.model.preset], **stdit_config})
    atomic_write_text(folder / "soraflow.json", json.dumps(redact_config(cfg.model_dump(mode="json")), indent=2))  # folders get shared
    for name, src in (("vae", vae_dir), ("text_encoder", text_encoder_dir)):
        if src is not None:
            shutil.copytree(src, folder / name, dirs_exist_ok=True)
    write_model_card(folder, cfg, dataset_version=dataset_version, metrics=metrics)
    refuse_pickles(folder)
    return folder


def load_pipeline(
    cfg: SoraFlowConfig,
    root: DataRoot,
    ckpt: str | Path | None = None,
    num_frames: int | None = None,
) -> tuple[TextToVideo, str]:
    """A ready pipeline and a one-line description of where its weights came from.

    `ckpt` is a SoraFlow model folder, a .safetensors file, or an Open-Sora .pth. With none,
    the STDiT has random weights (the pipeline runs end to end, the video is noise-like).
    `num_frames` overrides the clip length: STDiT weights do not depend on it, only the
    recomputed temporal positional buffer does.
    """
    folder = Path(ckpt) if ckpt is not None else None
    if folder is not None and is_model_folder(folder):
        pipe, cfg = load_model_folder(folder, cfg, num_frames=num_frames)
        return pipe, f"model folder {folder}"
    else:
        if num_frames:
            cfg = cfg.model_copy(deep=True)
            cfg.video.num_frames = num_frames
        text_encoder = load_text_encoder(cfg, root)
        vae, vae_pretrained = load_vae(cfg, root, allow_random=True)
        stdit = build_model(cfg, vae, text_encoder.output_dim)
        if folder is not None:
            if not folder.exists():
                raise CheckpointError(f"--ckpt {folder}: no such file or folder")
            load_weights_into(stdit, read_state_dict(folder), str(folder))
            source = f"checkpoint {folder}"
        else:
            source = "RANDOM weights (no --ckpt or --model given: the video shows what an untrained STDiT makes)"
        if not vae_pretrained:
            source += "; VAE: random tiny (not fitted yet)"
    pipe = TextToVideo(
        stdit=stdit.eval(),
        vae=vae,
        text_encoder=text_encoder,
        scheduler=scheduler_for(cfg),
        num_frames=cfg.video.num_frames,
        image_size=tuple(cfg.video.image_size),
        precision=cfg.scheduler.sample_precision,
    )
    return pipe, source
