"""tasks/train/precision.py: bf16 compute with fp32 master weights follows the fp32 loss curve."""

from __future__ import annotations

import pytest
import torch
from soraflow.models.diffusion.rflow import RFlow
from soraflow.models.stdit import build_stdit
from soraflow.tasks.train.precision import Precision

KW = dict(
    depth=2,
    hidden_size=64,
    num_heads=4,
    input_size=[4, 8, 8],
    caption_channels=32,
    model_max_length=8,
    pred_sigma=False,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny ops: on a shared 2-core machine one thread is several times faster than two (OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(mode: str, steps: int = 12) -> tuple[list[float], Precision, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_stdit("STDiT-Tiny", **KW).train()
    model.y_embedder.uncond_prob = 0.0
    prec = Precision(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 4, 8, 8, generator=g)  # one fixed batch, times and noise: the loss must fall
    y = torch.randn(4, 1, 8, 32, generator=g)
    mask = torch.ones(4, 8, dtype=torch.long)
    t = torch.tensor([100.0, 400.0, 600.0, 900.0])
    noise = torch.randn(x0.shape, generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with prec.step() as m:
            loss = RFlow().training_loss(m, x0, {"y": y, "mask": mask}, t=t, noise=noise)["loss"].mean()
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, prec, opt


def test_bf16_follows_fp32_and_keeps_fp32_master_state():
    ref, _, _ = _train("fp32")
    got, prec, opt = _train("bf16")
    assert ref[-1] < 0.8 * ref[0], "the fixed batch must be learnt, or the comparison says nothing"
    # the same curve within bf16 rounding: every step within 5% of fp32, the end within 3%
    for a, b in zip(ref, got):
        assert abs(a - b) <= 0.05 * a, (a, b)
    assert abs(sum(got[-5:]) - sum(ref[-5:])) <= 0.03 * sum(ref[-5:])
    # master weights, their gradients and AdamW's moments stay fp32; the working copy is bf16
    assert all(p.dtype == torch.float32 for p in prec.master.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in prec.master.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.ndim > 0)
    assert all(p.dtype == torch.bfloat16 for p in prec.module.parameters())
    assert all(p.grad is None for p in prec.module.parameters()), "working-copy grads are handed over, not kept"


def test_bf16_gradients_match_fp32_gradients():
    torch.manual_seed(0)
    model = build_stdit("STDiT-Tiny", **{**KW, "depth": 1}).train()
    model.y_embedder.uncond_prob = 0.0
    for (
        p
    ) in (
        model.parameters()
    ):  # no zero-initialised layers (output, cross/temporal projections): every weight gets a gradient
        if p.ndim == 2 and not p.any():
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 4, 4, 8, 8)
    kwargs = {"y": torch.randn(2, 1, 8, 32), "mask": torch.ones(2, 8, dtype=torch.long)}
    t = torch.tensor([300.0, 700.0])
    model(x, t, **kwargs).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    prec = Precision(model, "bf16")
    with prec.step() as m:
        m(x, t, **kwargs).square().mean().backward()
    for n, p in model.named_parameters():
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref[n].flatten(), dim=0)
        assert cos > 0.98, (n, float(cos))


def test_autocast_mode_runs_and_unknown_mode_is_refused():
    losses, _, _ = _train("autocast", steps=3)
    assert all(v > 0 for v in losses)
    with pytest.raises(ValueError, match="train.precision"):
        Precision(torch.nn.Linear(2, 2), "fp16")
