"""The model parts a config names -- text encoder, VAE, STDiT, scheduler -- and the pipeline they make.

The one place they are built: training, the latent cache, evaluation, generation, explain, the
model-folder reader and the MLflow model all come here, so a config key (say
`scheduler.logit_std`) reaches every part the same way.

    text encoder  text_encoder.path, or the tiny T5 built once under <data root>/models/
    VAE           vae.path, or the tiny VAE the train flow fitted (tasks/train/vae_fit.py)
    STDiT         model.preset + stdit_kwargs(cfg, latent (C, T, h, w), caption channels)
    scheduler     scheduler.* (IDDPM or rectified flow)
    pipeline      the four above as a TextToVideo

Nothing here downloads: a configured path must be a local folder.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from soraflow.configs.schema import SoraFlowConfig
from soraflow.models.diffusion import build_scheduler
from soraflow.models.stdit import STDiT, build_stdit
from soraflow.models.text_encoder import T5TextEncoder, build_tiny_t5
from soraflow.models.text_to_video import TextToVideo
from soraflow.models.vae import VideoVAE, build_tiny_vae
from soraflow.storage.layout import DataRoot


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


def load_text_encoder(cfg: SoraFlowConfig, root: DataRoot | None = None, path: Path | None = None) -> T5TextEncoder:
    """The T5 at `path`, else the configured one (or the tiny one under `root`)."""
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


def new_tiny_vae(cfg: SoraFlowConfig):
    """An untrained tiny diffusers AutoencoderKL (vae.tiny), seeded by train.seed: what the VAE fit starts from."""
    return build_tiny_vae(**cfg.vae.tiny.model_dump(), seed=cfg.train.seed)


def load_vae(cfg: SoraFlowConfig, root: DataRoot | None = None, path: Path | None = None,
             allow_random: bool = False) -> tuple[VideoVAE, bool]:
    """(vae, pretrained): the VAE at `path`, else the configured or fitted one; with none fitted, a
    random tiny one only if allow_random."""
    opts = {"micro_batch_size": cfg.vae.micro_batch_size, "scaling_factor": cfg.vae.scaling_factor}
    path = path or vae_path(cfg, root)
    if path is not None:
        return VideoVAE.from_pretrained(str(path), **opts).eval(), True
    if not allow_random:
        raise FileNotFoundError("no VAE: config key 'vae.path' is empty and the tiny VAE has not been fitted yet "
                                "(run `soraflow train`)")
    return VideoVAE(new_tiny_vae(cfg), **opts).eval(), False


def latent_size(cfg: SoraFlowConfig, vae: VideoVAE) -> tuple[int, int, int, int]:
    """(C, T, H/f, W/f): the latent of one configured clip."""
    return (vae.latent_channels, *vae.get_latent_size((cfg.video.num_frames, *cfg.video.image_size)))


# ---------------------------------------------------------------- STDiT + scheduler


def stdit_kwargs(cfg: SoraFlowConfig, latent: tuple[int, int, int, int], caption_channels: int) -> dict:
    """Constructor kwargs of the configured preset for latents (C, T, h, w) and T5 features of caption_channels."""
    c, *thw = latent
    return {
        "input_size": [int(s) for s in thw],
        "in_channels": int(c),
        "caption_channels": int(caption_channels),
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


def build_model(cfg: SoraFlowConfig, kwargs: dict) -> STDiT:
    """The configured STDiT preset with constructor kwargs from stdit_kwargs (or a checkpoint's saved ones)."""
    return build_stdit(cfg.model.preset, **kwargs)


def scheduler_for(cfg: SoraFlowConfig):
    s = cfg.scheduler
    return build_scheduler(s.type, num_sampling_steps=s.num_sampling_steps, cfg_scale=s.cfg_scale,
                           num_train_timesteps=s.num_train_timesteps, shift=s.shift, logit_std=s.logit_std)


def pipeline_for(cfg: SoraFlowConfig, stdit: STDiT, vae: VideoVAE, text_encoder: T5TextEncoder) -> TextToVideo:
    """The text-to-video pipeline of these parts, sampling with the configured scheduler and precision."""
    return TextToVideo(stdit=stdit.eval(), vae=vae, text_encoder=text_encoder, scheduler=scheduler_for(cfg),
                       num_frames=cfg.video.num_frames, image_size=tuple(cfg.video.image_size),
                       precision=cfg.scheduler.sample_precision)
