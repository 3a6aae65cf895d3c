"""IDDPM and rectified flow: closed forms against hand-computed values, loss parts, CFG, sampling (CPU, seeded)."""

import math

import numpy as np
import pytest
import torch
from soraflow.models.diffusion import IDDPM, RFlow, build_scheduler, space_timesteps
from soraflow.models.diffusion.iddpm import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    extract,
    forward_with_cfg,
    learned_range_log_variance,
    linear_betas,
    normal_kl,
)
from soraflow.models.diffusion.rflow import (
    euler_timesteps,
    interpolate,
    shift_timesteps,
    velocity_target,
)
from soraflow.models.stdit import build_stdit

SHAPE = (2, 4, 3, 4, 4)  # (B, C, T, H, W)


def hand_betas() -> list[float]:
    return [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]


def hand_abar(t: int) -> float:
    return math.prod(1 - b for b in hand_betas()[: t + 1])


# ---------------------------------------------------------------- IDDPM closed forms


def test_linear_schedule_and_alphas_cumprod():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(betas, hand_betas(), rtol=1e-12)
    d = GaussianDiffusion(betas)
    assert d.alphas_cumprod[999] == pytest.approx(hand_abar(999), rel=1e-9)
    assert d.alphas_cumprod[999] == pytest.approx(4.04e-5, abs=5e-8)  # the reference's quoted value
    assert d.alphas_cumprod[0] == pytest.approx(1 - 1e-4, rel=1e-12)
    assert linear_betas(500)[0] == pytest.approx(2e-4)  # other step counts rescale to the same curve


def test_posterior_closed_forms_by_hand():
    d = GaussianDiffusion(linear_betas(1000))
    for t in (1, 10, 500, 999):
        beta, abar, abar_prev = hand_betas()[t], hand_abar(t), hand_abar(t - 1)
        assert d.posterior_variance[t] == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-9)
        assert d.posterior_mean_coef1[t] == pytest.approx(beta * math.sqrt(abar_prev) / (1 - abar), rel=1e-9)
        assert d.posterior_mean_coef2[t] == pytest.approx((1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar), rel=1e-9)
        # noise-free x_t = sqrt(abar_t) x0 has posterior mean sqrt(abar_{t-1}) x0
        assert d.posterior_mean_coef1[t] + d.posterior_mean_coef2[t] * math.sqrt(abar) == pytest.approx(
            math.sqrt(abar_prev), rel=1e-9
        )
    assert d.posterior_variance[0] == 0.0
    # "clipped" log-variance: entry 0 takes entry 1's value
    assert (
        d.posterior_log_variance_clipped[0]
        == d.posterior_log_variance_clipped[1]
        == pytest.approx(math.log(d.posterior_variance[1]))
    )
    assert d.posterior_log_variance_clipped[7] == pytest.approx(math.log(d.posterior_variance[7]))


def test_extract_gathers_float32_per_sample():
    d = GaussianDiffusion(linear_betas(1000))
    out = extract(d.alphas_cumprod, torch.tensor([0, 999]), 5)
    assert out.shape == (2, 1, 1, 1, 1) and out.dtype == torch.float32
    assert out[1].item() == pytest.approx(hand_abar(999), rel=1e-6)


def test_q_sample_and_x0_from_eps_are_inverse():
    d = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 640])
    x_t = d.q_sample(x0, t, noise)
    a = hand_abar(640)
    torch.testing.assert_close(x_t[1], math.sqrt(a) * x0[1] + math.sqrt(1 - a) * noise[1])
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, noise), x0, rtol=0, atol=1e-4)


def test_learned_range_variance_identities():
    d = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 400])
    for v, expect in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        out = d.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], dim=1), x_t, t)
        torch.testing.assert_close(
            out["log_variance"][:, 0, 0, 0, 0], torch.tensor([expect[0], expect[400]], dtype=torch.float32)
        )
    mid = learned_range_log_variance(torch.tensor(0.0), torch.tensor(-4.0), torch.tensor(-2.0))
    assert mid.item() == pytest.approx(-3.0)
    # the mean is the posterior mean at the predicted x0, not clipped
    out = d.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], dim=1), x_t, t)
    x0_hat = d.predict_x0_from_eps(x_t, t, eps)
    torch.testing.assert_close(out["mean"], d.q_posterior(x0_hat, x_t, t)[0])
    assert x0_hat.abs().max() > 1  # really unclipped
    with pytest.raises(ValueError, match="pred_sigma"):
        d.p_mean_variance(eps, x_t, t)


def test_kl_and_discretized_likelihood_by_hand():
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0))
    assert kl.item() == pytest.approx(0.5 * (-1 + 1 - 0 + math.exp(-1) + math.exp(-1)))
    assert normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0)).item() == 0.0

    def cdf(v):
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    assert approx_standard_normal_cdf(torch.tensor(0.7)).item() == pytest.approx(cdf(0.7), rel=1e-6)
    assert abs(cdf(1.0) - 0.5 * (1 + math.erf(1 / math.sqrt(2)))) < 1e-3  # it does approximate Phi
    x = torch.tensor([0.2, 1.0, -1.0])
    means, log_scale = torch.tensor([0.1, 0.95, -0.9]), torch.tensor(-1.5)
    s = math.exp(-1.5)
    got = discretized_gaussian_log_likelihood(x, means, log_scale)
    assert got[0].item() == pytest.approx(math.log(cdf((0.1 + 1 / 255) / s) - cdf((0.1 - 1 / 255) / s)), rel=1e-4)
    assert got[1].item() == pytest.approx(math.log(1 - cdf((0.05 - 1 / 255) / s)), rel=1e-4)  # top bin takes the tail
    assert got[2].item() == pytest.approx(math.log(cdf((-0.1 + 1 / 255) / s)), rel=1e-4)  # bottom bin likewise


def test_space_timesteps():
    steps = sorted(space_timesteps(1000, "100"))
    assert len(steps) == 100 and steps[:7] == [0, 10, 20, 30, 40, 50, 61] and steps[-2:] == [989, 999]
    assert steps == [round(i * 999 / 99) for i in range(100)]
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert sorted(space_timesteps(100, "2,3")) == [0, 49, 50, 74, 99]
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_schedule_keeps_alphas_cumprod_and_maps_timesteps():
    s = IDDPM()
    d, tmap = s.spaced(100)
    assert d.num_timesteps == 100 and tmap.tolist() == sorted(space_timesteps(1000, "100"))
    np.testing.assert_allclose(d.alphas_cumprod, s.diffusion.alphas_cumprod[tmap.numpy()], rtol=1e-12)
    assert d.betas[1] == pytest.approx(1 - hand_abar(10) / hand_abar(0), rel=1e-9)
    assert d.betas[0] == pytest.approx(1e-4)


# ---------------------------------------------------------------- IDDPM loss


class ToyEps(torch.nn.Module):
    """Output [a * x_t ; b]: eps from one scalar, the variance values from another (records its inputs)."""

    def __init__(self, c=4):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.b = torch.nn.Parameter(torch.tensor(0.2))
        self.c = c
        self.calls = []

    def forward(self, x, t, y=None, mask=None):
        self.calls.append({"x": x, "t": t, "y": y, "mask": mask})
        return torch.cat([self.a * x, self.b * torch.ones_like(x)], dim=1)


def test_training_loss_is_mse_plus_vb_with_detached_eps():
    s = IDDPM()
    model = ToyEps()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g).clamp(-1, 1), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 500])
    out = s.training_loss(model, x0, {"y": "cond"}, t=t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"} and all(v.shape == (2,) for v in out.values())
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    x_t = s.diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(model.calls[0]["x"], x_t)
    assert model.calls[0]["y"] == "cond" and model.calls[0]["t"].tolist() == [0, 500]
    torch.testing.assert_close(out["mse"], ((noise - 0.5 * x_t) ** 2).mean(dim=(1, 2, 3, 4)))
    # vb: decoder NLL in bits at t = 0, KL in bits at t > 0
    p = s.diffusion.p_mean_variance(model(x_t, t), x_t, t)
    nll0 = -discretized_gaussian_log_likelihood(x0[0], p["mean"][0], 0.5 * p["log_variance"][0]).mean() / math.log(2)
    qm, qlv = s.diffusion.q_posterior(x0, x_t, t)
    kl1 = normal_kl(qm[1], qlv[1], p["mean"][1], p["log_variance"][1]).mean() / math.log(2)
    torch.testing.assert_close(out["vb"], torch.stack([nll0, kl1]))
    # the VB term trains only the variance values: no gradient reaches eps through it
    out["vb"].sum().backward()
    assert model.a.grad is None or model.a.grad == 0
    assert model.b.grad.abs() > 0
    model.zero_grad()
    out = s.training_loss(model, x0, {}, t=t, noise=noise)
    out["mse"].sum().backward()
    assert model.a.grad.abs() > 0


def test_sample_timesteps_and_generator_noise():
    s = IDDPM()
    t = s.sample_timesteps(4096, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and 450 < t.float().mean() < 550
    assert torch.equal(t, s.sample_timesteps(4096, "cpu", torch.Generator().manual_seed(0)))
    model = ToyEps()
    x0 = torch.zeros(SHAPE)
    a = s.training_loss(model, x0, {}, generator=torch.Generator().manual_seed(3))["loss"]
    b = s.training_loss(model, x0, {}, generator=torch.Generator().manual_seed(3))["loss"]
    c = s.training_loss(model, x0, {}, generator=torch.Generator().manual_seed(4))["loss"]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- classifier-free guidance


class TextDependent(torch.nn.Module):
    """out[:, k] = x[:, k % C] + (k + 1) * mean(y) per sample, so cond and uncond differ in every channel."""

    def __init__(self, out_channels=8):
        super().__init__()
        self.out_channels = out_channels
        self.calls = []

    def forward(self, x, t, y, mask=None):
        self.calls.append({"x": x, "t": t, "y": y, "mask": mask})
        c = x.shape[1]
        ym = y.float().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return torch.stack([x[:, k % c] + (k + 1) * ym for k in range(self.out_channels)], dim=1)


def test_cfg_guides_channels_0_to_2_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    y, y_null = torch.randn(2, 1, 5, 6, generator=g), torch.randn(2, 1, 5, 6, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    model = TextDependent()
    t = torch.tensor([7, 7])
    out = forward_with_cfg(model, x, t, y, y_null, mask, cfg_scale=4.0)
    call = model.calls[0]
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["y"], torch.cat([y, y_null]))
    assert call["t"].tolist() == [7, 7, 7, 7] and call["mask"] is mask  # n mask rows; STDiT tiles them
    cond, uncond = model(x, t, y), model(x, t, y_null)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # eps channel 3 and the variance values: unguided
    assert not torch.allclose(out[:, 3:], uncond[:, 3:] + 4.0 * (cond[:, 3:] - uncond[:, 3:]))
    every = forward_with_cfg(model, x, t, y, y_null, mask, cfg_scale=4.0, cfg_channel=8)
    torch.testing.assert_close(every, uncond + 4.0 * (cond - uncond))


def reference_p_sample_loop(s: IDDPM, model, z, y, y_null, mask, cfg_scale, num_steps, generator):
    """Open-Sora's loop literally: a 2n-row state [z; z], forward_with_cfg on its first half, noise over 2n rows."""
    d, tmap = s.spaced(num_steps)
    n = z.shape[0]
    x = torch.cat([z, z])
    yy = torch.cat([y, y_null])
    for i in reversed(range(num_steps)):
        idx = torch.full((2 * n,), i)
        half = x[:n]
        out = model(torch.cat([half, half]), tmap[idx], y=yy, mask=mask)
        eps, rest = out[:, :3], out[:, 3:]
        c, u = eps[:n], eps[n:]
        guided = u + cfg_scale * (c - u)
        out = torch.cat([torch.cat([guided, guided]), rest], dim=1)
        p = d.p_mean_variance(out, x, idx)
        noise = torch.randn(x.shape, generator=generator)
        nonzero = (idx != 0).float().view(-1, 1, 1, 1, 1)
        x = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise
    return x[:n]


def test_iddpm_sample_is_open_sora_loop_and_original_timesteps():
    s = IDDPM(num_sampling_steps=10, cfg_scale=7.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(SHAPE, generator=g)
    y, y_null = torch.randn(2, 1, 5, 6, generator=g), torch.randn(5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    model = TextDependent()
    out = s.sample(model, z, {"y": y, "mask": mask}, y_null, generator=torch.Generator().manual_seed(5))
    ref = reference_p_sample_loop(s, TextDependent(), z, y, y_null[None, None].expand(2, 1, 5, 6), mask, 7.0, 10,
                                  torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    seen = [c["t"][0].item() for c in model.calls]
    assert seen == sorted(space_timesteps(1000, "10"), reverse=True)  # original indices, not 9..0
    assert all(c["t"].shape == (4,) and c["mask"] is mask for c in model.calls)


def test_iddpm_sample_seeded_tiny_stdit():
    torch.manual_seed(0)
    m = build_stdit("STDiT-Tiny", depth=1, input_size=[3, 4, 4]).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.05)
        for blk in m.blocks:
            torch.nn.init.normal_(blk.cross_attn.proj.weight, std=0.05)
    s = build_scheduler("iddpm", num_sampling_steps=5)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    kw = {
        "y": torch.randn(2, 1, 16, 64, generator=torch.Generator().manual_seed(1)),
        "mask": torch.ones(2, 16, dtype=torch.long),
    }
    null = m.y_embedder.y_embedding

    def run(seed, **extra):
        return s.sample(m, z, kw, null, generator=torch.Generator().manual_seed(seed), **extra)

    a, b, c = run(1), run(1), run(2)
    assert a.shape == SHAPE and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, run(1, cfg_scale=1.0))  # guidance changes the result
    assert not torch.allclose(a, run(1, num_steps=3))


def test_progress_bar(capsys):
    s = IDDPM(num_sampling_steps=3)
    s.sample(TextDependent(), torch.zeros(SHAPE), {"y": torch.zeros(2, 1, 5, 6)}, torch.zeros(5, 6), progress=True)
    assert "3/3" in capsys.readouterr().err
    s.sample(TextDependent(), torch.zeros(SHAPE), {"y": torch.zeros(2, 1, 5, 6)}, torch.zeros(5, 6), progress=False)
    assert "3/3" not in capsys.readouterr().err


# ---------------------------------------------------------------- rectified flow


def test_rflow_closed_forms():
    x0, noise = torch.full((2, 1, 1, 1, 1), 3.0), torch.full((2, 1, 1, 1, 1), -1.0)
    torch.testing.assert_close(interpolate(x0, noise, torch.tensor([0.0, 1.0])).flatten(), torch.tensor([3.0, -1.0]))
    assert interpolate(x0, noise, torch.tensor([0.25, 0.25]))[0].item() == pytest.approx(0.75 * 3 - 0.25)
    assert velocity_target(x0, noise)[0].item() == 4.0
    tau = torch.tensor([0.0, 0.3, 1.0])
    torch.testing.assert_close(shift_timesteps(tau, 1.0), tau)
    torch.testing.assert_close(shift_timesteps(tau, 3.0), torch.tensor([0.0, 0.9 / 1.6, 1.0]))
    assert euler_timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_rflow_timesteps_are_logit_normal():
    s = RFlow()
    t = s.sample_timesteps(8192, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1000
    logit = torch.logit(t / 1000)
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05


class Oracle(torch.nn.Module):
    """Knows x0: returns the exact velocity x0 - noise = (x0 - x_t) / tau, in 2C channels (sigma half ignored)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, y=None, mask=None):
        tau = (t / 1000).view(-1, 1, 1, 1, 1)
        v = (self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1, 1) - x) / tau
        return torch.cat([v, torch.full_like(v, 123.0)], dim=1)


def test_rflow_loss_and_sampling_with_an_oracle():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g)
    s = RFlow(num_sampling_steps=7)
    out = s.training_loss(Oracle(x0), x0, {}, generator=g)
    assert set(out) == {"loss"} and out["loss"].shape == (2,) and out["loss"].max() < 1e-8
    wrong = s.training_loss(lambda x, t, **kw: torch.zeros_like(x), x0, {}, generator=g)["loss"]
    assert wrong.min() > 0.5
    # Euler on straight paths lands exactly on x0, whatever the number of steps and the guidance
    z = torch.randn(SHAPE, generator=g)
    y = torch.zeros(2, 1, 5, 6)
    torch.testing.assert_close(s.sample(Oracle(x0), z, {"y": y}, torch.ones(5, 6)), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.sample(Oracle(x0), z, {"y": y}, None, num_steps=2), x0, rtol=1e-4, atol=1e-4)


def test_rflow_cfg_on_all_channels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(SHAPE, generator=g)
    y, y_null = torch.randn(2, 1, 5, 6, generator=g), torch.randn(2, 1, 5, 6, generator=g)
    model = TextDependent(out_channels=4)
    out = RFlow(num_sampling_steps=1, cfg_scale=3.0).sample(model, z, {"y": y, "mask": None}, y_null)
    t = torch.full((2,), 1000.0)
    cond, uncond = model(z, t, y), model(z, t, y_null)
    torch.testing.assert_close(out, z + uncond + 3.0 * (cond - uncond))  # one step: tau 1 -> 0
    assert model.calls[0]["t"].tolist() == [1000.0] * 4 and torch.equal(model.calls[0]["y"], torch.cat([y, y_null]))


def test_rflow_sampling_deterministic_given_noise():
    torch.manual_seed(0)
    m = build_stdit("STDiT-Tiny", depth=1, input_size=[3, 4, 4], pred_sigma=False).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.05)
    s = build_scheduler("rflow", num_sampling_steps=4)
    kw = {
        "y": torch.randn(2, 1, 16, 64, generator=torch.Generator().manual_seed(1)),
        "mask": torch.ones(2, 16, dtype=torch.long),
    }

    def run(seed):
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
        return s.sample(m, z, kw, m.y_embedder.y_embedding)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------- factory and learning


def test_build_scheduler():
    s = build_scheduler("iddpm", num_sampling_steps=50, cfg_scale=4.0)
    assert isinstance(s, IDDPM) and s.num_sampling_steps == 50 and s.cfg_scale == 4.0 and s.num_timesteps == 1000
    r = build_scheduler("rflow", num_sampling_steps=30)
    assert isinstance(r, RFlow) and r.num_sampling_steps == 30 and r.cfg_scale == 7.0 and r.shift == 1.0
    with pytest.raises(ValueError, match="iddpm.*rflow"):
        build_scheduler("ddim")
    assert build_scheduler("rflow", shift=3.0).shift == 3.0
    with pytest.raises(ValueError, match="shift=3.0 applies to rflow only"):
        build_scheduler("iddpm", shift=3.0)


def test_rflow_shift_moves_training_times_towards_noise():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = RFlow().sample_timesteps(4096, "cpu", g()) / 1000
    shifted = RFlow(shift=3.0).sample_timesteps(4096, "cpu", g()) / 1000
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain), atol=1e-5)
    assert (shifted > 0.9).float().mean() > 5 * (plain > 0.9).float().mean()


def test_rflow_logit_std_widens_training_times_about_the_shifted_centre():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    narrow = RFlow(shift=6.0).sample_timesteps(8192, "cpu", g()) / 1000
    wide = RFlow(shift=6.0, logit_std=2.0).sample_timesteps(8192, "cpu", g()) / 1000
    for tau, sd in ((narrow, 1.0), (wide, 2.0)):  # logit-normal(ln 6, sd): the shift is a translation in logit space
        logit = torch.logit(tau.double())
        assert abs(logit.mean().item() - math.log(6.0)) < 0.05 * sd and abs(logit.std().item() - sd) < 0.05 * sd
    # both ends gain: mid noise (where shapes form) and the noise end (where motion is decided)
    assert (wide < 0.5).float().mean() > 2.5 * (narrow < 0.5).float().mean()
    assert (wide > 0.95).float().mean() > 1.5 * (narrow > 0.95).float().mean()
    assert build_scheduler("rflow", shift=6.0, logit_std=2.0).logit_std == 2.0
    with pytest.raises(ValueError, match="logit_std=2.0 applies to rflow only"):
        build_scheduler("iddpm", logit_std=2.0)


@pytest.mark.parametrize("kind,steps,ratio", [("iddpm", 100, 0.5), ("rflow", 150, 0.8)])
def test_tiny_stdit_overfits_one_batch(kind, steps, ratio):
    """The loss at fixed (t, noise) on one memorised batch falls clearly after a short training."""
    torch.manual_seed(0)
    m = build_stdit("STDiT-Tiny", depth=2, hidden_size=64, num_heads=2, input_size=[4, 8, 8],
                    pred_sigma=kind == "iddpm", class_dropout_prob=0.0)
    s = build_scheduler(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 8, 8, generator=g)
    kw = {"y": torch.randn(2, 1, 16, 64, generator=g), "mask": torch.ones(2, 16, dtype=torch.long)}
    ge = torch.Generator().manual_seed(1)  # validation: 8 fixed (t, noise) draws per sample
    t_val = torch.cat([s.sample_timesteps(2, "cpu", ge) for _ in range(8)])
    noise_val = torch.randn(16, *x0.shape[1:], generator=ge)
    kw_val = {"y": kw["y"].repeat(8, 1, 1, 1), "mask": kw["mask"].repeat(8, 1)}

    def val() -> float:
        with torch.no_grad():
            return (
                s.training_loss(m.eval(), x0.repeat(8, 1, 1, 1, 1), kw_val, t=t_val, noise=noise_val)["loss"]
                .mean()
                .item()
            )

    before = val()
    opt = torch.optim.AdamW(m.train().parameters(), lr=3e-3, weight_decay=0.0)
    gt = torch.Generator().manual_seed(2)
    for _ in range(steps):
        loss = s.training_loss(m, x0, kw, generator=gt)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val()
    assert after < ratio * before, (before, after)
