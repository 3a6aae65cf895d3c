"""A tiny, untrained SoraFlow model folder in a second or two (no training): for registry and MLflow tests."""

from __future__ import annotations

from pathlib import Path

from soraflow.storage.layout import DataRoot
from training_data import train_cfg


def make_model_folder(root: DataRoot, folder: Path, **overrides) -> tuple[Path, object]:
    """(folder, cfg): the tiny T5, a random tiny VAE and a random STDiT-Tiny, exported as training exports."""
    import torch
    from soraflow.tasks.train.model_factory import (
        build_model,
        export_model_dir,
        load_text_encoder,
        load_vae,
        stdit_kwargs,
        text_encoder_path,
    )

    torch.manual_seed(0)
    cfg = train_cfg(root, **{"scheduler.num_sampling_steps": 2, **overrides})
    te_dir = text_encoder_path(cfg, root)
    text_encoder = load_text_encoder(cfg, root, te_dir)
    vae, _ = load_vae(cfg, root, allow_random=True)
    vae_dir = folder.parent / f"{folder.name}-vae"
    vae.module.save_pretrained(str(vae_dir))
    stdit = build_model(cfg, vae, text_encoder.output_dim)
    export_model_dir(folder, cfg, stdit.state_dict(), stdit_kwargs(cfg, vae, text_encoder.output_dim), vae_dir, te_dir,
                     dataset_version="test-data-v1", metrics={"val_loss": 0.5})
    return folder, cfg
