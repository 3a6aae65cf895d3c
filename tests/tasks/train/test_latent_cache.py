"""Latent cache: keys, atomic build and reuse, items as the loss wants them, the online path."""

from __future__ import annotations

import json

import pytest
import torch
from soraflow.storage.layout import DataRoot
from training_data import make_clip_manifest

# ---------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A random tiny VAE (4x) and the tiny T5, as the pipeline would load them."""
    from soraflow.models.text_encoder import T5TextEncoder, build_tiny_t5
    from soraflow.models.vae import VideoVAE, build_tiny_vae

    base = tmp_path_factory.mktemp("enc")
    build_tiny_vae(
        block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8, seed=0
    ).save_pretrained(str(base / "vae"))
    build_tiny_t5(base / "t5", d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=256)
    vae = VideoVAE.from_pretrained(str(base / "vae"), micro_batch_size=None, scaling_factor=0.18215).eval()
    te = T5TextEncoder(str(base / "t5"), max_length=12)
    return base, vae, te


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    base = tmp_path_factory.mktemp("clips")
    root = DataRoot(base / "data")
    return root, make_clip_manifest(base / "videos", root, n=6, frames=12)


def _build(clips, encoders, **kw):
    from soraflow.storage.data.latent_cache import build_latent_cache, folder_identity

    root, manifest = clips
    base, vae, te = encoders
    args = dict(
        vae_id=folder_identity(base / "vae"),
        text_id=folder_identity(base / "t5"),
        num_frames=8,
        frame_interval=1,
        image_size=(32, 32),
    )
    args.update(kw)
    return build_latent_cache(manifest, root, lambda: (vae, te), **args)


def test_cache_builds_once_and_serves_items(clips, encoders):
    from soraflow.storage.data.latent_cache import INDEX, LatentCacheDataset, read_index

    root, _ = clips
    _, vae, te = encoders
    info = _build(clips, encoders)
    assert info.built and info.clips == 6 and info.captions == 6
    assert (info.path / INDEX).exists() and info.path.parent == root.root / "cache"
    assert not [p for p in info.path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    files = sorted(p.name for p in info.path.iterdir())
    assert all(f.endswith((".safetensors", ".json")) for f in files)
    index = read_index(info.path)
    assert [e["frames"] for e in index["clips"]] == [12] * 6  # ALL frames stored, not one window
    again = _build(clips, encoders)
    assert not again.built and again.path == info.path

    ds = LatentCacheDataset(info.path, num_frames=8, frame_interval=1, seed=3, train=True)
    item = ds[0]
    assert item["x0"].shape == (4, 8, 8, 8)  # (C, T, h, w)
    assert item["y"].shape == (1, 12, te.output_dim) and item["mask"].shape == (12,)
    # the caption embedding is exactly T5's for that caption
    enc = te.encode([item["text"]])
    torch.testing.assert_close(item["y"], enc["y"][0].float())
    assert torch.equal(item["mask"], enc["mask"][0].to(item["mask"].dtype))
    # same epoch -> same item; new epoch -> new window and/or posterior sample
    assert torch.equal(ds[0]["x0"], item["x0"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["x0"], item["x0"])
    # eval items are the posterior mean of the centred window, deterministic
    ev = LatentCacheDataset(info.path, num_frames=8, frame_interval=1, train=False)
    mean, std = ev.moments(0)
    assert mean.shape == (4, 12, 8, 8) and (std > 0).all()
    torch.testing.assert_close(ev[0]["x0"], mean[:, 2:10])
    # stored moments are the VAE's for the whole clip
    from soraflow.storage.data.latent_cache import read_clip_frames
    from soraflow.storage.data.manifest import ok_rows

    first = index["clips"][0]
    row = [r for r in ok_rows(clips[1]) if r["clip_id"] == first["clip_id"]][0]
    row_mean, _ = vae.encode_moments(read_clip_frames(row, (32, 32))[None])  # (1, C, 12, 8, 8)
    torch.testing.assert_close(ev.moments(0)[0], row_mean[0], atol=1e-5, rtol=1e-4)
    # a subset by clip id
    sub = LatentCacheDataset(info.path, 8, 1, clip_ids=[first["clip_id"]])
    assert len(sub) == 1 and sub[0]["clip_id"] == first["clip_id"]


def test_cache_key_changes_with_inputs(clips, encoders, tmp_path):
    base = _build(clips, encoders)
    assert _build(clips, encoders, vae_id="another-vae").path != base.path
    assert _build(clips, encoders, text_id="another-t5").path != base.path
    assert _build(clips, encoders, image_size=(16, 16)).path != base.path
    # a new manifest (one more clip) is a new dataset version, so a new key
    root, _ = clips
    other = make_clip_manifest(tmp_path / "more", root, n=7, frames=12)
    from soraflow.storage.data.latent_cache import build_latent_cache, folder_identity

    b, vae, te = encoders
    info = build_latent_cache(
        other, root, lambda: (vae, te), folder_identity(b / "vae"), folder_identity(b / "t5"), 8, 1, (32, 32)
    )
    assert info.path != base.path and info.clips == 7


def test_folder_identity_follows_the_weights(encoders, tmp_path):
    import shutil

    from soraflow.storage.data.latent_cache import folder_identity

    base, _, _ = encoders
    shutil.copytree(base / "vae", tmp_path / "vae")
    assert folder_identity(tmp_path / "vae") == folder_identity(base / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    cfg["_edited"] = 1
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    assert folder_identity(tmp_path / "vae") != folder_identity(base / "vae")


def test_online_path_gives_the_same_batch_as_the_cache(clips, encoders):
    from soraflow.storage.data.dataset import VideoClipDataset
    from soraflow.storage.data.latent_cache import LatentCacheDataset, OnlineEncoder
    from torch.utils.data import DataLoader

    _, manifest = clips
    _, vae, te = encoders
    info = _build(clips, encoders)
    cached = next(iter(DataLoader(LatentCacheDataset(info.path, 8, 1, train=False), batch_size=3)))
    raw = next(iter(DataLoader(VideoClipDataset(manifest, 8, 1, (32, 32), train=False), batch_size=3)))
    online = OnlineEncoder(vae, te)(raw, generator=torch.Generator().manual_seed(0))
    for key in ("x0", "y", "mask"):
        assert online[key].shape == cached[key].shape, key
        assert online[key].dtype == cached[key].dtype or key == "mask", key
    # both are the same clips in the same order; the online x0 is a posterior sample near the cached mean
    assert list(online["clip_id"]) == list(cached["clip_id"])
    torch.testing.assert_close(online["y"], cached["y"])
    # the online x0 is a posterior sample: (x0 - mean) / std is standard normal
    from soraflow.storage.data.dataset import frame_indices

    ds = LatentCacheDataset(info.path, 8, 1, train=False)
    idx = frame_indices(12, 8, 1, None)
    std = torch.stack([ds.moments(i)[1][:, idx] for i in range(3)])
    z = (online["x0"] - cached["x0"]) / std
    assert abs(z.mean().item()) < 0.1 and 0.9 < z.std().item() < 1.1


def test_missing_cache_is_a_clear_error(tmp_path):
    from soraflow.storage.data.latent_cache import LatentCacheDataset, LatentCacheError

    with pytest.raises(LatentCacheError, match="not a latent cache"):
        LatentCacheDataset(tmp_path, 8, 1)
