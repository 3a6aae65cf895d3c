"""Reading a SoraFlow model folder back into a ready text-to-video pipeline.

A model folder (written by `export_model_dir` here) follows the Hugging Face conventions, one
sub-folder per part, each loadable on its own:

    README.md                                     the model card, added by the register stage
                                                  (storage/registry/model_card.py)
    soraflow.json                                 the full SoraFlow config it was trained with
    stdit/model.safetensors + stdit/config.json   STDiT EMA weights and constructor kwargs
                                                  (`STDiT.from_pretrained`)
    vae/                                          diffusers AutoencoderKL (only if fitted locally)
    text_encoder/                                 T5 encoder + tokenizer (only if the tiny one)

This is the one writer and the one reader of that layout: `load_pipeline` (any `--ckpt`) and the
MLflow pyfunc model (storage/registry/mlflow_model.py) both call `load_model_folder`, which builds
the parts through storage/model_parts.py as training does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from soraflow.configs.schema import SoraFlowConfig
from soraflow.models.stdit import STDIT_PRESETS, STDiT
from soraflow.storage.checkpoints import (
    CheckpointError,
    load_weights_into,
    read_state_dict,
    refuse_pickles,
    save_model_dir,
)
from soraflow.storage.layout import DataRoot, atomic_write_text
from soraflow.storage.model_parts import (
    build_model,
    latent_size,
    load_text_encoder,
    load_vae,
    pipeline_for,
    stdit_kwargs,
)
from soraflow.storage.redact import redact_config

CONFIG_FILE = "soraflow.json"


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the folder and what is wrong."""


def is_model_folder(folder: str | Path) -> bool:
    return Path(folder).is_dir() and (Path(folder) / CONFIG_FILE).is_file()


def folder_config(folder: str | Path, base: SoraFlowConfig | None = None) -> SoraFlowConfig:
    """The config the folder was trained with; `base` keeps the caller's data and generate sections."""
    path = Path(folder) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: not a readable SoraFlow config: {e}") from e
    if base is not None:
        saved = {**saved, "data": base.data.model_dump(), "generate": base.generate.model_dump()}
    return SoraFlowConfig.model_validate(saved)


def _part(folder: Path, name: str, configured: str | None, key: str) -> Path:
    """The part shipped in the folder, else the configured local path (never a download)."""
    if (folder / name).is_dir():
        return folder / name
    if configured and Path(configured).expanduser().is_dir():
        return Path(configured).expanduser()
    raise ModelFolderError(
        f"{folder}: no {name}/ folder and config key '{key}' ({configured!r}) is not a local directory"
    )


def stdit_input_size(folder: str | Path) -> list[int]:
    """The latent (T, H, W) the STDiT was built for, from stdit/config.json (either layout)."""
    path = Path(folder) / "stdit" / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: not a readable STDiT config: {e}") from e
    kwargs = meta.get("kwargs", meta)  # {"preset", "kwargs"}: folders exported before the HF layout
    if "input_size" not in kwargs:
        raise ModelFolderError(f"{path}: no input_size")
    return [int(v) for v in kwargs["input_size"]]


def export_model_dir(folder: Path, cfg: SoraFlowConfig, stdit_state: dict[str, torch.Tensor], stdit_config: dict,
                     vae_dir: Path | None, text_encoder_dir: Path | None) -> Path:
    """Write a self-contained model folder (the layout above; the card comes with registration).

    stdit/ is what `STDiT.save_pretrained` writes (model.safetensors without the recomputed
    positional buffers, config.json = the constructor kwargs), so `STDiT.from_pretrained` reads it.
    A part given as None is not copied: the folder then names its configured path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    save_model_dir(folder / "stdit", stdit_state, {**STDIT_PRESETS[cfg.model.preset], **stdit_config})
    atomic_write_text(
        folder / CONFIG_FILE, json.dumps(redact_config(cfg.model_dump(mode="json")), indent=2)
    )  # folders get shared
    for name, src in (("vae", vae_dir), ("text_encoder", text_encoder_dir)):
        if src is not None:
            shutil.copytree(src, folder / name, dirs_exist_ok=True)
    refuse_pickles(folder)
    return folder


def load_model_folder(folder: str | Path, base: SoraFlowConfig | None = None, num_frames: int | None = None):
    """(TextToVideo, config) from a model folder. `num_frames` changes the clip length: the STDiT
    weights do not depend on it, only the temporal positional buffer recomputed from the config."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise ModelFolderError(f"{folder}: not a SoraFlow model folder (no {CONFIG_FILE})")
    refuse_pickles(folder)
    cfg = folder_config(folder, base)
    text_encoder = load_text_encoder(
        cfg, path=_part(folder, "text_encoder", cfg.text_encoder.path, "text_encoder.path")
    )
    vae, _ = load_vae(cfg, path=_part(folder, "vae", cfg.vae.path, "vae.path"))
    overrides = {}
    if num_frames:
        cfg.video.num_frames = num_frames
        size = stdit_input_size(folder)
        size[0] = vae.get_latent_size((num_frames, *cfg.video.image_size))[0]
        overrides["input_size"] = size
    try:
        stdit = STDiT.from_pretrained(folder / "stdit", **overrides)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{folder / 'stdit'}: {e}") from e
    return pipeline_for(cfg, stdit, vae, text_encoder), cfg


def load_pipeline(cfg: SoraFlowConfig, root: DataRoot, ckpt: str | Path | None = None, num_frames: int | None = None):
    """(TextToVideo, a one-line description of where its weights came from) for any `--ckpt`.

    `ckpt` is a SoraFlow model folder, a .safetensors file, or an Open-Sora .pth. With none, the
    STDiT has random weights (the pipeline runs end to end, the video is noise-like). `num_frames`
    overrides the clip length.
    """
    folder = Path(ckpt) if ckpt is not None else None
    if folder is not None and is_model_folder(folder):
        pipe, _ = load_model_folder(folder, cfg, num_frames=num_frames)
        return pipe, f"model folder {folder}"
    if num_frames:
        cfg = cfg.model_copy(deep=True)
        cfg.video.num_frames = num_frames
    text_encoder = load_text_encoder(cfg, root)
    vae, vae_pretrained = load_vae(cfg, root, allow_random=True)
    stdit = build_model(cfg, stdit_kwargs(cfg, latent_size(cfg, vae), text_encoder.output_dim))
    if folder is not None:
        if not folder.exists():
            raise CheckpointError(f"--ckpt {folder}: no such file or folder")
        load_weights_into(stdit, read_state_dict(folder), str(folder))
        source = f"checkpoint {folder}"
    else:
        source = "RANDOM weights (no --ckpt or --model given: the video shows what an untrained STDiT makes)"
    if not vae_pretrained:
        source += "; VAE: random tiny (not fitted yet)"
    return pipeline_for(cfg, stdit, vae, text_encoder), source
