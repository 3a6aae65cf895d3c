"""The latent-cache stage: encode every clip (VAE) and caption (T5) once, keyed by dataset and encoders.

The cache format and its dataset live in storage/data/latent_cache.py; this stage loads the encoders
named by the config and builds (or reuses) the cache for one manifest.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.data.holdout import DatasetSplit
from soraflow.storage.data.latent_cache import CacheInfo, build_latent_cache, folder_identity
from soraflow.storage.layout import DataRoot
from soraflow.storage.model_parts import load_text_encoder, load_vae, text_encoder_path
from soraflow.tasks.task_policy import STAGE_RETRIES, stage_cache_key


def prepare_latent_cache(cfg: SoraFlowConfig, data: DatasetSplit, root: DataRoot, vae_dir: str | Path) -> CacheInfo:
    """Build (or reuse) the latent cache for this dataset (all its ok clips), VAE, text encoder and video config.

    Returns storage.latent_cache.CacheInfo (path, key, clips, captions, built, seconds, skipped, and
    the latent and caption sizes the STDiT is built for). The VAE and the text encoder are loaded
    only when the cache has to be built.
    """
    vae_dir = Path(vae_dir)
    te_dir = text_encoder_path(cfg, root)
    info = build_latent_cache(
        data.rows, root, lambda: (load_vae(cfg, root, vae_dir)[0], load_text_encoder(cfg, root, te_dir)),
        vae_id=f"{folder_identity(vae_dir)}-s{cfg.vae.scaling_factor}",
        text_id=f"{folder_identity(te_dir)}-L{cfg.text_encoder.max_length}",
        num_frames=cfg.video.num_frames, frame_interval=cfg.video.frame_interval,
        image_size=tuple(cfg.video.image_size), dataset=data.version, progress=True,
    )
    print(f"latent cache {'built' if info.built else 'reused'}: {info.path} ({info.clips} clips, "
          f"{info.captions} captions, {info.seconds:.1f} s)", flush=True)
    return info


@task(name="latent-cache", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def latent_cache_task(cfg: SoraFlowConfig, data: DatasetSplit, vae_dir: str, data_root: str) -> CacheInfo:
    """Encode every clip (VAE) and caption (T5) once, keyed by dataset and encoder versions; the
    result names the latent and caption sizes the STDiT is built for."""
    return prepare_latent_cache(cfg, data, DataRoot(data_root), vae_dir)
