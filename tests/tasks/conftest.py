"""Fixtures shared by the training and evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fitted_clips(tmp_path_factory):
    """(data root, clip manifest, fitted tiny VAE folder): 10 captioned clips of 12 frames and the VAE
    fitted on them with training_data.train_cfg, made once for the session. Training runs under the
    root are named by each test, so the tests that share it never resume one another's run."""
    from soraflow.storage.data.holdout import DatasetSplit
    from soraflow.storage.layout import DataRoot
    from soraflow.tasks.train.vae_fit import fit_vae
    from training_data import make_clip_manifest, train_cfg

    base = tmp_path_factory.mktemp("fitted-clips")
    root = DataRoot(base / "data")
    manifest = make_clip_manifest(base / "videos", root, n=10, frames=12)
    cfg = train_cfg(root)
    vae = fit_vae(cfg, DatasetSplit.read(manifest, cfg.train.val_fraction), root, progress=False)
    return root, manifest, vae.path
