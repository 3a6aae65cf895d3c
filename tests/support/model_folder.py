"""A tiny, untrained SoraFlow model folder in a second or two (no training): for registry and MLflow tests."""

from __future__ import annotations

from pathlib import Path

from soraflow.storage.layout import DataRoot
from training_data import train_cfg


def make_model_folder(root: DataRoot, folder: Path, **overrides) -> tuple[Path, object]:
    """(folder, cfg): the tiny T5, a random tiny VAE and a random STDiT-Tiny, exported as training exports."""
    import torch
    from soraflow.storage.model_parts import (
        build_model,
        latent_size,
        load_text_encoder,
        load_vae,
        stdit_kwargs,
        text_encoder_path,
    )
    from soraflow.storage.registry.model_card import write_model_card
    from soraflow.storage.registry.model_folder import export_model_dir

    torch.manual_seed(0)
    cfg = train_cfg(root, **{"scheduler.num_sampling_steps": 2, **overrides})
    te_dir = text_encoder_path(cfg, root)
    text_encoder = load_text_encoder(cfg, root, te_dir)
    vae, _ = load_vae(cfg, root, allow_random=True)
    vae_dir = folder.parent / f"{folder.name}-vae"
    vae.module.save_pretrained(str(vae_dir))
    kwargs = stdit_kwargs(cfg, latent_size(cfg, vae), text_encoder.output_dim)
    export_model_dir(folder, cfg, build_model(cfg, kwargs).state_dict(), kwargs, vae_dir, te_dir)
    write_model_card(folder, cfg, dataset_version="test-data-v1", metrics={"val_loss": 0.5})  # as registration does
    return folder, cfg
