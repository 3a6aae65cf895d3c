"""Tiny VAE fit: it learns, it is calibrated, it is saved as safetensors, it is reused, exact re-parametrisation."""

from __future__ import annotations

import math

import pytest
import torch
from soraflow.storage.data.holdout import DatasetSplit
from soraflow.storage.layout import DataRoot
from training_data import make_clip_manifest, small_cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("vaefit")
    root = DataRoot(base / "data")
    manifest = make_clip_manifest(base / "videos", root, n=6, frames=12)
    return root, DatasetSplit.read(manifest, small_cfg(root).train.val_fraction)


def test_fit_learns_calibrates_saves_and_is_reused(data):
    from soraflow.models.vae import build_tiny_vae
    from soraflow.storage.checkpoints import refuse_pickles
    from soraflow.storage.model_parts import tiny_vae_dir, vae_path
    from soraflow.tasks.train.vae_fit import _recon_mse, collect_frames, fit_vae

    root, split = data
    cfg = small_cfg(root)
    result = fit_vae(cfg, split, root, progress=False)
    assert result.fitted
    assert result.path == tiny_vae_dir(cfg, root, result.metrics["dataset_version"])
    assert (result.path / "config.json").exists() and list(result.path.glob("*.safetensors"))
    refuse_pickles(result.path)
    assert vae_path(cfg, root) == tiny_vae_dir(cfg, root)  # "latest" points at the fit
    assert set(result.metrics) >= {"recon_mse", "psnr", "steps"} and result.metrics["steps"] == 60
    # it learned: far better than the untrained VAE on the same frames
    frames = collect_frames(split.rows, (32, 32))
    untrained = _recon_mse(build_tiny_vae(**cfg.vae.tiny.model_dump(), seed=cfg.train.seed).eval(), frames)
    assert result.metrics["recon_mse"] < 0.5 * untrained
    assert math.isclose(result.metrics["psnr"], 10 * math.log10(4 / result.metrics["recon_mse"]))
    # calibrated: scaling_factor * latent has about unit spread per channel and zero mean
    assert all(0.85 < s < 1.15 for s in result.metrics["scaled_latent_std"])
    assert all(abs(m) < 0.1 for m in result.metrics["scaled_latent_mean"])
    # the second call reuses the fit
    again = fit_vae(cfg, split, root, progress=False)
    assert not again.fitted and again.path == result.path and again.metrics == result.metrics


def test_bf16_fit_learns_and_saves_fp32_weights(data):
    from safetensors import safe_open
    from soraflow.models.vae import build_tiny_vae
    from soraflow.tasks.train.vae_fit import _recon_mse, collect_frames, fit_vae

    root, split = data
    cfg = small_cfg(root, **{"vae.fit.precision": "bf16"})
    result = fit_vae(cfg, split, root, progress=False)
    from soraflow.storage.model_parts import tiny_vae_dir

    fp32 = small_cfg(root, **{"vae.fit.precision": "fp32"})
    assert result.path != tiny_vae_dir(fp32, root, split.version)  # a recipe of its own, a folder of its own
    frames = collect_frames(split.rows, (32, 32))
    untrained = _recon_mse(build_tiny_vae(**cfg.vae.tiny.model_dump(), seed=cfg.train.seed).eval(), frames)
    assert result.metrics["recon_mse"] < 0.5 * untrained
    assert all(0.85 < s < 1.15 for s in result.metrics["scaled_latent_std"])  # calibrated as the fp32 fit
    for f in result.path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float32}


def test_configured_vae_path_is_not_fitted(data, tmp_path):
    from soraflow.tasks.train.vae_fit import fit_vae

    root, split = data
    (tmp_path / "sd-vae").mkdir()
    out = fit_vae(small_cfg(root, **{"vae.path": str(tmp_path / "sd-vae")}), split, root)
    assert not out.fitted and out.path == tmp_path / "sd-vae"
    with pytest.raises(FileNotFoundError, match="vae.path"):
        fit_vae(small_cfg(root, **{"vae.path": str(tmp_path / "missing")}), split, root)


@pytest.mark.parametrize("quant_convs", [True, False])
def test_calibration_is_an_exact_reparametrisation(quant_convs):
    from diffusers import AutoencoderKL
    from soraflow.tasks.train.vae_fit import calibrate

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                        norm_num_groups=4, use_quant_conv=quant_convs, use_post_quant_conv=quant_convs).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        recon_before = vae.decode(before.mean).sample
        shift, scale = torch.tensor([0.5, -1.0, 0.2, 0.0]), torch.tensor([2.0, 0.5, 3.0, 1.5])
        calibrate(vae, shift, scale)
        after = vae.encode(x).latent_dist
        recon_after = vae.decode(after.mean).sample
    used_shift = shift if quant_convs else torch.zeros(4)
    torch.testing.assert_close(
        after.mean, scale.view(1, -1, 1, 1) * (before.mean - used_shift.view(1, -1, 1, 1)), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(after.std, scale.view(1, -1, 1, 1) * before.std, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(recon_after, recon_before, atol=1e-4, rtol=1e-4)
