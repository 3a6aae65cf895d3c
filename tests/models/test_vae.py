"""VideoVAE: frame folding, scaling factor, micro-batching, save/load round trip (tiny random AutoencoderKL)."""

import pytest
import torch
from soraflow.models.vae import VideoVAE, build_tiny_vae

SF = 0.18215


@pytest.fixture(scope="module")
def vae():
    return VideoVAE(build_tiny_vae(block_out_channels=(16, 32, 32), norm_num_groups=8, seed=0)).eval()


def video(b=2, t=3, h=16, w=24, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sizes(vae):
    assert vae.downsample == 4 and vae.latent_channels == 4
    assert vae.get_latent_size((16, 32, 48)) == (16, 8, 12)
    with pytest.raises(ValueError, match="divisible"):
        vae.get_latent_size((16, 30, 32))
    x = video()
    assert vae.encode(x).shape == (2, 4, 3, 4, 6)
    assert vae.decode(torch.randn(2, 4, 3, 4, 6)).shape == (2, 3, 3, 16, 24)
    assert VideoVAE(build_tiny_vae(block_out_channels=(8, 16), norm_num_groups=4)).downsample == 2


def test_frames_folded_in_order_and_scaled(vae):
    x = video()
    mean, std = vae.encode_moments(x)  # (B, C, T, h, w)
    post = vae.module.encode(x[1, :, 2][None]).latent_dist  # sample 1, frame 2 on its own
    torch.testing.assert_close(mean[1, :, 2], post.mean[0] * SF, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std[1, :, 2], post.std[0] * SF, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vae.encode(x, sample=False), mean)
    z = vae.encode(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(z, vae.encode(x, generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(z, vae.encode(x, generator=torch.Generator().manual_seed(4)))
    # decode divides by the scaling factor, frame by frame
    rec = vae.decode(z)
    torch.testing.assert_close(rec[0, :, 1], vae.module.decode(z[0, :, 1][None] / SF).sample[0], rtol=1e-5, atol=1e-5)


def test_micro_batching_changes_nothing(vae):
    x = video(b=2, t=4)  # 8 frames in chunks of 3: 3 + 3 + 2
    small = VideoVAE(vae.module, micro_batch_size=3).eval()
    calls = []
    hook = vae.module.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        m1, s1 = vae.encode_moments(x)
        m3, s3 = small.encode_moments(x)
    finally:
        hook.remove()
    assert calls == [8, 3, 3, 2]
    torch.testing.assert_close(m3, m1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s3, s1, rtol=1e-5, atol=1e-6)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(small.encode(x, generator=g()), vae.encode(x, generator=g()), rtol=1e-5, atol=1e-6)
    z = vae.encode(x, sample=False)
    torch.testing.assert_close(small.decode(z), vae.decode(z), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(vae, tmp_path):
    vae.module.save_pretrained(str(tmp_path / "vae"))
    assert (tmp_path / "vae" / "config.json").exists() and list((tmp_path / "vae").glob("*.safetensors"))
    loaded = VideoVAE.from_pretrained(tmp_path / "vae", micro_batch_size=2, scaling_factor=0.5)
    assert loaded.micro_batch_size == 2 and loaded.scaling_factor == 0.5 and not loaded.training
    x = video()
    torch.testing.assert_close(
        loaded.encode(x, sample=False), vae.encode(x, sample=False) / SF * 0.5, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(FileNotFoundError, match="missing-vae"):
        VideoVAE.from_pretrained(tmp_path / "missing-vae")


def test_build_is_seeded_and_leaves_rng_alone():
    state = torch.get_rng_state()
    a, b = build_tiny_vae(seed=0), build_tiny_vae(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_tiny_vae(seed=1)
    assert not torch.equal(a.encoder.conv_in.weight, c.encoder.conv_in.weight)
    assert a.config.block_out_channels == (32, 64, 64) or list(a.config.block_out_channels) == [32, 64, 64]
