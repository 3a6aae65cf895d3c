"""Reading a SoraFlow model folder back into a ready text-to-video pipeline.

A model folder (written by tasks/train/model_factory.export_model_dir) follows the Hugging Face
conventions, one sub-folder per part, each loadable on its own:

    README.md                                     the model card (storage/registry/model_card.py)
    soraflow.json                                 the full SoraFlow config it was trained with
    stdit/model.safetensors + stdit/config.json   STDiT EMA weights and constructor kwargs
                                                  (`STDiT.from_pretrained`)
    vae/                                          diffusers AutoencoderKL (only if fitted locally)
    text_encoder/                                 T5 encoder + tokenizer (only if the tiny one)

This is the one reader of that layout: `load_pipeline` (tasks/train/model_factory.py) and the
MLflow pyfunc model (storage/registry/mlflow_model.py) both call `load_model_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path

from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.checkpoints import refuse_pickles

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
    raise ModelFolderError(f"{folder}: no {name}/ folder and config key '{key}' ({configured!r}) is not a local directory")


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


def load_model_folder(folder: str | Path, base: SoraFlowConfig | None = None, num_frames: int | None = None):
    """(TextToVideo, config) from a model folder. `num_frames` changes the clip length: the STDiT
    weights do not depend on it, only the temporal positional buffer recomputed from the config."""
    from soraflow.models.diffusion import build_scheduler
    from soraflow.models.stdit import STDiT
    from soraflow.models.text_encoder import T5TextEncoder
    from soraflow.models.text_to_video import TextToVideo
    from soraflow.models.vae import VideoVAE

    folder = Path(folder)
    if not is_model_folder(folder):
        raise ModelFolderError(f"{folder}: not a SoraFlow model folder (no {CONFIG_FILE})")
    refuse_pickles(folder)
    cfg = folder_config(folder, base)
    text_encoder = T5TextEncoder(str(_part(folder, "text_encoder", cfg.text_encoder.path, "text_encoder.path")),
                                 max_length=cfg.text_encoder.max_length)
    vae = VideoVAE.from_pretrained(str(_part(folder, "vae", cfg.vae.path, "vae.path")),
                                   micro_batch_size=cfg.vae.micro_batch_size, scaling_factor=cfg.vae.scaling_factor).eval()
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
    s = cfg.scheduler
    scheduler = build_scheduler(s.type, num_sampling_steps=s.num_sampling_steps, cfg_scale=s.cfg_scale,
                                num_train_timesteps=s.num_train_timesteps, shift=s.shift)
    pipe = TextToVideo(stdit=stdit.eval(), vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                       num_frames=cfg.video.num_frames, image_size=tuple(cfg.video.image_size), precision=s.sample_precision)
    return pipe, cfg
