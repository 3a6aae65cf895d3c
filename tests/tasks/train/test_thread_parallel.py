"""tasks/train/thread_parallel.py: a batch split over threads gives the whole batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch
from soraflow.models.diffusion.rflow import RFlow
from soraflow.models.stdit import build_stdit
from soraflow.tasks.train.precision import Precision
from soraflow.tasks.train.thread_parallel import BatchThreads, split_batch, torch_threads

KW = dict(
    depth=2,
    hidden_size=64,
    num_heads=4,
    input_size=[4, 8, 8],
    caption_channels=32,
    model_max_length=8,
    pred_sigma=False,
)


def _batch(b: int = 5) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"x0": torch.randn(b, 4, 4, 8, 8, generator=g), "y": torch.randn(b, 1, 8, 32, generator=g),
            "mask": (torch.arange(8)[None] < torch.tensor([8, 3, 5, 8, 1])[:b, None]).long(),
            "t": torch.tensor([10.0, 300.0, 500.0, 800.0, 990.0])[:b], "noise": torch.randn(b, 4, 4, 8, 8, generator=g),
            "drop": torch.tensor([0, 1, 0, 0, 1])[:b]}


def _loss(model, part: dict) -> torch.Tensor:
    kwargs = {"y": part["y"], "mask": part["mask"], "force_drop_ids": part["drop"]}
    return RFlow().training_loss(model, part["x0"], kwargs, t=part["t"], noise=part["noise"])["loss"].mean()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_stdit("STDiT-Tiny", **KW).train()


def test_split_batch_slices_rows_evenly_and_keeps_non_tensors():
    parts = split_batch({"a": torch.arange(5), "b": torch.arange(10).view(5, 2), "name": "x"}, 2)
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    assert parts[1]["b"].shape == (3, 2) and parts[0]["name"] == parts[1]["name"] == "x"
    with pytest.raises(ValueError, match="cannot split a batch of 5 into 6"):
        split_batch({"a": torch.arange(5)}, 6)


@pytest.mark.parametrize("n", [2, 3])
def test_threads_give_the_whole_batch_loss_and_gradients(n):
    """Uneven parts (5 rows in 2 or 3) weigh by their rows: the same mean loss and gradients as one pass."""
    batch = _batch()
    ref = _model()
    loss_ref = _loss(ref, batch)
    loss_ref.backward()

    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    with BatchThreads(n) as split, torch_threads(1):
        loss = split.loss_and_grads(lambda part: _loss(model, part), split_batch(batch, n), params)
    assert torch.allclose(loss, loss_ref.detach(), rtol=1e-5, atol=1e-6)
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6), name


def test_threads_are_deterministic_and_feed_the_bf16_copy():
    """Two runs give bit-identical gradients; with the bf16 working copy they arrive on the fp32 master."""
    batch = _batch(4)
    grads = []
    for _ in range(2):
        prec = Precision(_model(), "bf16")
        with BatchThreads(2) as split, torch_threads(1), prec.step() as m:
            params = [p for p in m.parameters() if p.requires_grad]
            split.loss_and_grads(lambda part: _loss(m, part), split_batch(batch, 2), params)
        assert all(p.grad is None for p in prec.module.parameters())
        grads.append([p.grad for p in prec.master.parameters() if p.grad is not None])
        assert grads[-1] and all(g.dtype == torch.float32 for g in grads[-1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_force_drop_ids_give_the_null_caption():
    model = _model().eval()
    b = _batch(2)
    null = model.y_embedder.y_embedding.expand(2, 1, 8, 32)
    with torch.no_grad():
        dropped = model(b["x0"], b["t"], b["y"], force_drop_ids=torch.tensor([1, 1]))
        via_null = model(b["x0"], b["t"], null)
    assert torch.equal(dropped, via_null)


def test_drawn_drop_ids_follow_the_model_and_its_generator():
    emb = _model().y_embedder
    draw = lambda: emb.draw_drop_ids(1000, torch.device("cpu"), torch.Generator().manual_seed(5))  # noqa: E731
    assert torch.equal(draw(), draw()) and 50 < int(draw().sum()) < 150  # uncond_prob 0.1
    emb.uncond_prob = 0.0
    assert draw() is None


def test_batch_threads_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_threads"):
        BatchThreads(0)


def test_autocast_reaches_the_worker_threads():
    """Autocast is thread-local: forward_context() inside each part makes the threads compute in bf16 too."""
    batch = _batch(4)
    prec = Precision(_model(), "autocast")
    dtypes = []
    hook = prec.master.blocks[0].attn.qkv.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))

    def part_loss(part):
        with prec.forward_context():
            return _loss(prec.module, part)

    with BatchThreads(2) as split, torch_threads(1), prec.step() as m:
        split.loss_and_grads(part_loss, split_batch(batch, 2), [p for p in m.parameters() if p.requires_grad])
    hook.remove()
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert all(
        p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
        for p in prec.master.parameters()
    )


def test_a_batch_smaller_than_the_threads_still_trains():
    from soraflow.tasks.train.loop import threaded_loss

    b = _batch(1)
    prec = Precision(_model(), "fp32")
    with BatchThreads(2) as split, torch_threads(1), prec.step() as m:
        loss = threaded_loss(split, prec, RFlow(), m, {"x0": b["x0"], "y": b["y"], "mask": b["mask"]}, b["t"],
                             torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and any(p.grad is not None for p in prec.master.parameters())
