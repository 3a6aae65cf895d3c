"""STDiT: Open-Sora v1.0 layout, maths and masking (CPU, seeded, a few seconds in all)."""

import json
import math
from unittest import mock

import pytest
import soraflow.models.stdit as stdit_mod
import torch
import torch.nn.functional as F
import soraflow.models.layers as layers_mod
from soraflow.models.layers import PatchEmbed3D, TanhGELU, TimestepEmbedder, attend
from soraflow.models.stdit import (
    STDIT_PRESETS,
    STDiT,
    build_stdit,
    drop_positional_buffers,
    stdit_config,
)

LATENT = (4, 8, 8, 8)  # (C, T, H, W), the Tiny preset's training size
L, C_TEXT = 16, 64


def tiny(**kw) -> STDiT:
    torch.manual_seed(0)
    return build_stdit("STDiT-Tiny", **kw)


def randomize_zero_inits(model: STDiT, seed: int = 1) -> STDiT:
    """Give the zero-initialised layers random weights so every branch shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(b=2, seed=0, latent=LATENT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *latent, generator=g)
    t = torch.tensor([10, 700][:b] + [300] * max(0, b - 2))
    y = torch.randn(b, 1, L, C_TEXT, generator=g)
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1:, 5:] = 0  # sample 1+ has 5 real tokens
    return x, t, y, mask


# ---------------------------------------------------------------- an independent reference forward


def _attn(x, qkv, proj, heads):
    """Open-Sora's non-flash self-attention: fp32 softmax logits, heads concatenated head-major."""
    b, n, d = x.shape
    q, k, v = F.linear(x, qkv.weight, qkv.bias).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    w = (q * (d // heads) ** -0.5 @ k.transpose(-2, -1)).float().softmax(-1)
    return F.linear((w @ v).transpose(1, 2).reshape(b, n, d), proj.weight, proj.bias)


def reference_forward(m: STDiT, x, timestep, y, mask, temporal=True):
    """Open-Sora v1.0 STDiT forward written out plainly: explicit softmax, per-sample packed text tokens."""
    b, c, T, H, W = x.shape
    d, heads = m.hidden_size, m.num_heads
    pt, ph, pw = m.patch_size
    tok = F.conv3d(x, m.x_embedder.proj.weight, m.x_embedder.proj.bias, stride=m.patch_size)
    tok = tok.flatten(2).transpose(1, 2)  # (B, N, D)
    S = (H // ph) * (W // pw)
    tok = tok.view(b, T, S, d) + m.pos_embed
    if m.temporal_pos == "stream":  # SoraFlow's option: the time step enters the stream at the input
        tok = tok + m.pos_embed_temporal.view(1, T, 1, d)
    tok = tok.view(b, T * S, d)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    arg = timestep.float()[:, None] * freqs
    t = m.t_embedder.mlp(torch.cat([torch.cos(arg), torch.sin(arg)], -1))
    t0 = m.t_block(t)
    ye = m.y_embedder.y_proj(y).squeeze(1)  # (B, L, D)
    for i, blk in enumerate(m.blocks):
        sh1, sc1, g1, sh2, sc2, g2 = (blk.scale_shift_table[None] + t0.view(b, 6, d)).chunk(6, 1)
        xm = F.layer_norm(tok, (d,), eps=1e-6) * (1 + sc1) + sh1
        xs = _attn(xm.reshape(b * T, S, d), blk.attn.qkv, blk.attn.proj, heads).reshape(b, T * S, d)
        tok = tok + g1 * xs
        if temporal:
            xt = tok.view(b, T, S, d).permute(0, 2, 1, 3).reshape(b * S, T, d)
            if i == 0 and m.temporal_pos == "attention":
                xt = xt + m.pos_embed_temporal
            xt = _attn(xt, blk.attn_temp.qkv, blk.attn_temp.proj, heads)
            tok = tok + g1 * xt.view(b, S, T, d).permute(0, 2, 1, 3).reshape(b, T * S, d)
        ca = blk.cross_attn
        outs = []
        for j in range(b):  # each sample attends to its own valid text tokens only (xformers BlockDiagonalMask)
            kv_in = ye[j][mask[j].bool()] if mask is not None else ye[j]
            q = ca.q_linear(tok[j]).view(-1, heads, d // heads).transpose(0, 1)
            k, v = ca.kv_linear(kv_in).view(-1, 2, heads, d // heads).permute(1, 2, 0, 3)
            w = (q * (d // heads) ** -0.5 @ k.transpose(-2, -1)).softmax(-1)
            outs.append((w @ v).transpose(0, 1).reshape(-1, d))
        tok = tok + ca.proj(torch.stack(outs))
        xm = F.layer_norm(tok, (d,), eps=1e-6) * (1 + sc2) + sh2
        tok = tok + g2 * blk.mlp.fc2(F.gelu(blk.mlp.fc1(xm), approximate="tanh"))
    fl = m.final_layer
    sh, sc = (fl.scale_shift_table[None] + t[:, None]).chunk(2, 1)
    out = fl.linear(F.layer_norm(tok, (d,), eps=1e-6) * (1 + sc) + sh)  # (B, N, pt*ph*pw*C_out)
    co = m.out_channels
    out = out.view(b, T // pt, H // ph, W // pw, pt, ph, pw, co)
    return torch.einsum("bthwijkc->bctihjwk", out).reshape(b, co, T, H, W)


# ---------------------------------------------------------------- presets, layout, counts


def test_presets_and_build_errors():
    assert set(STDIT_PRESETS) == {"STDiT-XL/2", "STDiT-L/2", "STDiT-B/2", "STDiT-S/2", "STDiT-Tiny"}
    with pytest.raises(ValueError, match="STDiT-XL/2.*STDiT-Tiny"):
        build_stdit("STDiT-XXL/2")
    m = build_stdit("STDiT-Tiny", depth=2, pred_sigma=False)
    assert len(m.blocks) == 2 and m.out_channels == m.in_channels == 4
    cfg = json.loads(json.dumps(m.config))  # JSON-serialisable, lists not tuples
    assert cfg == m.config and cfg["input_size"] == [8, 8, 8] and cfg["patch_size"] == [1, 2, 2]
    assert build_stdit("STDiT-Tiny", **cfg).config == cfg


def test_xl2_layout_and_param_count_on_meta():
    with torch.device("meta"):
        m = build_stdit(
            "STDiT-XL/2", input_size=(16, 32, 32), space_scale=0.5, caption_channels=4096, model_max_length=120
        )
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 759_620_768
    sd = m.state_dict()
    assert len(sd) == 550
    keys = list(sd)
    assert keys[:2] == ["pos_embed", "pos_embed_temporal"]
    assert keys[-3:] == ["final_layer.scale_shift_table", "final_layer.linear.weight", "final_layer.linear.bias"]
    assert [k for k in keys if k.startswith("blocks.0.")] == [
        f"blocks.0.{k}"
        for k in (
            "scale_shift_table",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.proj.weight",
            "attn.proj.bias",
            "cross_attn.q_linear.weight",
            "cross_attn.q_linear.bias",
            "cross_attn.kv_linear.weight",
            "cross_attn.kv_linear.bias",
            "cross_attn.proj.weight",
            "cross_attn.proj.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
            "attn_temp.qkv.weight",
            "attn_temp.qkv.bias",
            "attn_temp.proj.weight",
            "attn_temp.proj.bias",
        )
    ]
    buffers = {n for n, _ in m.named_buffers()}
    assert buffers == {"pos_embed", "pos_embed_temporal", "y_embedder.y_embedding"}
    assert len(set(sd) - buffers) == 547 and len([k for k in sd if k not in ("pos_embed", "pos_embed_temporal")]) == 548
    shapes = {
        "pos_embed": (1, 256, 1152), "pos_embed_temporal": (1, 16, 1152),
        "x_embedder.proj.weight": (1152, 4, 1, 2, 2), "t_embedder.mlp.0.weight": (1152, 256),
        "t_block.1.weight": (6912, 1152), "y_embedder.y_embedding": (120, 4096),
        "y_embedder.y_proj.fc1.weight": (1152, 4096), "blocks.0.attn.qkv.weight": (3456, 1152),
        "blocks.27.cross_attn.kv_linear.weight": (2304, 1152), "blocks.27.mlp.fc1.weight": (4608, 1152),
        "final_layer.scale_shift_table": (2, 1152), "final_layer.linear.weight": (32, 1152),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("norm" in k for k in sd)  # LayerNorms carry no affine params

    ckpt = drop_positional_buffers(sd)
    assert len(ckpt) == 548 and set(sd) - set(ckpt) == {"pos_embed", "pos_embed_temporal"}
    with torch.device("meta"):
        fresh = build_stdit("STDiT-XL/2", input_size=(16, 32, 32))
    result = fresh.load_state_dict(ckpt, strict=False)
    assert set(result.missing_keys) == {"pos_embed", "pos_embed_temporal"} and result.unexpected_keys == []
    result = fresh.load_opensora_state_dict(ckpt)  # strict: the 548 keys are all there
    assert set(result.missing_keys) == {"pos_embed", "pos_embed_temporal"} and result.unexpected_keys == []


# ---------------------------------------------------------------- embeddings


def test_positional_buffers_match_reference_values():
    torch.manual_seed(0)
    m = STDiT(input_size=(16, 32, 32), hidden_size=1152, num_heads=16, depth=1, space_scale=0.5,
              caption_channels=8, model_max_length=4)  # 16x256x256 at space_scale 0.5
    assert m.pos_embed.shape == (1, 256, 1152) and m.pos_embed.dtype == torch.float32
    omega = 10000.0 ** (-torch.arange(288, dtype=torch.float64) / 288)
    row1 = m.pos_embed[0, 1].double()  # token (h=0, w=1): w/0.5 = 2
    torch.testing.assert_close(row1[:288], torch.sin(2 * omega), rtol=0, atol=1e-6)
    torch.testing.assert_close(row1[288:576], torch.cos(2 * omega), rtol=0, atol=1e-6)
    assert torch.equal(row1[576:864], torch.zeros(288, dtype=torch.float64))
    assert torch.equal(row1[864:], torch.ones(288, dtype=torch.float64))
    row16 = m.pos_embed[0, 16].double()  # token (h=1, w=0): h in the second half
    torch.testing.assert_close(row16[576:864], torch.sin(2 * omega), rtol=0, atol=1e-6)
    assert torch.equal(row16[:288], torch.zeros(288, dtype=torch.float64))

    omega_t = 10000.0 ** (-torch.arange(576, dtype=torch.float64) / 576)
    assert m.pos_embed_temporal.shape == (1, 16, 1152)
    for t in (0, 5, 15):
        expect = torch.cat([torch.sin(t * omega_t), torch.cos(t * omega_t)])
        torch.testing.assert_close(m.pos_embed_temporal[0, t].double(), expect, rtol=0, atol=1e-6)
    m2 = STDiT(
        input_size=(4, 4, 4),
        hidden_size=64,
        num_heads=4,
        depth=1,
        time_scale=2 / 3,
        caption_channels=8,
        model_max_length=4,
    )
    omega_t = 10000.0 ** (-torch.arange(32, dtype=torch.float64) / 32)
    torch.testing.assert_close(
        m2.pos_embed_temporal[0, 2].double()[:32], torch.sin(3.0 * omega_t), rtol=0, atol=1e-6
    )  # 2 / (2/3)


def test_timestep_embedding_cos_first():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 999.0]), 256)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    torch.testing.assert_close(emb[1, :128], torch.cos(999.0 * freqs))


def test_patch_embed_order_padding_and_unpatchify_layout():
    pe = PatchEmbed3D((1, 2, 2), in_chans=1, embed_dim=1)
    with torch.no_grad():
        pe.proj.weight.fill_(1.0)
        pe.proj.bias.zero_()
    x = torch.ones(1, 1, 2, 3, 5)  # H=3, W=5 padded to 4, 6 with zeros
    x[0, 0, 1] *= 10  # frame 1
    tok = pe(x)[0, :, 0]  # (T'*H'*W',) = 2*2*3
    assert tok.shape == (12,)
    # frame 0 row 0: full patches (4) except the last column (2); row 1: half rows (2, 2, 1)
    assert tok[:6].tolist() == [4, 4, 2, 2, 2, 1] and tok[6:].tolist() == [40, 40, 20, 20, 20, 10]

    m = tiny(input_size=[2, 4, 6], in_channels=3)  # out 6 channels, grid (2, 2, 3)
    n, _p, c = 2 * 2 * 3, 4, 6
    # token n, patch element (i, j), channel c encoded as a number
    x = torch.tensor(
        [[tn * 100 + (i * 2 + j) * 10 + ch for i in range(2) for j in range(2) for ch in range(c)] for tn in range(n)],
        dtype=torch.float32,
    )[None]
    out = m.unpatchify(x)  # (1, 6, 2, 4, 6)
    assert out.shape == (1, c, 2, 4, 6)
    for (t, h, w, i, j, ch) in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 1, 0, 5), (0, 1, 1, 0, 1, 3)]:
        token = t * 6 + h * 3 + w
        assert out[0, ch, t, 2 * h + i, 2 * w + j] == token * 100 + (i * 2 + j) * 10 + ch


# ---------------------------------------------------------------- forward behaviour


@pytest.mark.parametrize("pred_sigma", [True, False])
def test_output_shapes(pred_sigma):
    m = tiny(pred_sigma=pred_sigma).eval()
    x, t, y, mask = inputs()
    out = m(x, t, y, mask)
    assert out.shape == (2, 8 if pred_sigma else 4, 8, 8, 8) and out.dtype == torch.float32
    blk = m.blocks[0]
    h = torch.randn(2, 8 * 16, 128)
    ye = torch.randn(2, L, 128)
    assert blk(h, ye, torch.randn(2, 6 * 128), mask.bool(), 8, m.pos_embed_temporal).shape == (2, 128, 128)


def test_non_divisible_sizes():
    m = randomize_zero_inits(tiny(input_size=[3, 7, 9], patch_size=[2, 2, 2])).eval()
    assert m.grid_size == (2, 4, 5) and m.pos_embed.shape == (1, 20, 128) and m.pos_embed_temporal.shape == (1, 2, 128)
    x = torch.randn(2, 4, 3, 7, 9)
    out = m(x, torch.tensor([1, 2]), torch.randn(2, 1, L, C_TEXT))
    assert out.shape == (2, 8, 3, 7, 9) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(1, 4, 3, 12, 12), torch.tensor([1]), torch.randn(1, 1, L, C_TEXT))


@pytest.mark.parametrize("temporal_pos", ["attention", "stream"])
def test_matches_reference_forward(temporal_pos):
    m = randomize_zero_inits(tiny(temporal_pos=temporal_pos)).eval()
    x, t, y, mask = inputs()
    with torch.no_grad():
        out, ref = m(x, t, y, mask), reference_forward(m, x, t, y, mask)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m(x, t, y), reference_forward(m, x, t, y, None), rtol=1e-4, atol=1e-5)
    assert out.abs().mean() > 1e-2  # the comparison is not between zeros


def test_temporal_pos_stream_is_a_different_model_with_the_same_weights():
    a = randomize_zero_inits(tiny()).eval()
    b = randomize_zero_inits(tiny(temporal_pos="stream")).eval()
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert b.config["temporal_pos"] == "stream" and STDiT(**b.config).temporal_pos == "stream"
    x, t, y, mask = inputs()
    with torch.no_grad():
        assert not torch.allclose(a(x, t, y, mask), b(x, t, y, mask), atol=1e-4)
    with pytest.raises(ValueError, match="temporal_pos"):
        tiny(temporal_pos="everywhere")


def test_zero_init_temporal_is_pixart_at_init():
    m = tiny().eval()
    with torch.no_grad():  # non-zero output layers, but attn_temp.proj stays zero as initialised
        for blk in m.blocks:
            torch.nn.init.normal_(blk.cross_attn.proj.weight, std=0.05)
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.05)
        assert all(blk.attn_temp.proj.weight.abs().sum() == 0 for blk in m.blocks)
        x, t, y, mask = inputs()
        out = m(x, t, y, mask)
        torch.testing.assert_close(out, reference_forward(m, x, t, y, mask, temporal=False), rtol=1e-4, atol=1e-5)
        torch.nn.init.normal_(m.blocks[1].attn_temp.proj.weight, std=0.05)  # the check can fail
        assert not torch.allclose(m(x, t, y, mask), out, atol=1e-4)


def test_text_padding_changes_nothing_and_cfg_tiles_mask():
    m = randomize_zero_inits(tiny()).eval()
    x, t, y, mask = inputs()
    y2 = y.clone()
    y2[1, 0, 5:] = torch.randn(L - 5, C_TEXT) * 10  # only padded tokens of sample 1
    with torch.no_grad():
        out, out2 = m(x, t, y, mask), m(x, t, y2, mask)
        torch.testing.assert_close(out, out2, rtol=0, atol=1e-6)
        assert not torch.allclose(m(x, t, y2), out, atol=1e-4)  # without the mask the padding does count
        # CFG: y has 2B rows, the mask B rows; it is tiled, not interleaved
        xx, tt = torch.cat([x, x]), torch.cat([t, t])
        yy = torch.cat([y, y2])
        torch.testing.assert_close(m(xx, tt, yy, mask), m(xx, tt, yy, torch.cat([mask, mask])), rtol=0, atol=0)
        torch.testing.assert_close(m(xx, tt, yy, mask)[:2], out, rtol=1e-5, atol=1e-6)
        # y given as (B, L, C_text) is the same as (B, 1, L, C_text)
        torch.testing.assert_close(m(x, t, y[:, 0], mask), out, rtol=0, atol=0)


def test_empty_mask_gives_no_nan():
    m = randomize_zero_inits(tiny())
    x, t, y, mask = inputs()
    mask[1] = 0
    out = m.eval()(x, t, y, mask)
    assert torch.isfinite(out).all()
    with torch.no_grad():  # the empty sample attends to nothing: its text does not matter
        torch.testing.assert_close(m(x, t, torch.randn_like(y), mask)[1], out[1], rtol=0, atol=1e-6)
    m.train()
    m.y_embedder.uncond_prob = 0.0
    m(x, t, y, mask).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_caption_dropout_train_mode():
    m = randomize_zero_inits(tiny(class_dropout_prob=1.0))
    x, t, y, mask = inputs()
    null = m.y_embedder.y_embedding[None, None].expand(2, 1, L, C_TEXT)
    with torch.no_grad():
        dropped = m.train()(x, t, y, mask)  # drop_path 0: train differs from eval only by caption dropout
        torch.testing.assert_close(dropped, m.eval()(x, t, null, mask), rtol=0, atol=0)
        assert not torch.allclose(dropped, m(x, t, y, mask), atol=1e-4)
        ye = m.y_embedder(y, train=False, force_drop_ids=torch.tensor([1, 0]))
        torch.testing.assert_close(ye[0], m.y_embedder.y_proj(null[0]))
        torch.testing.assert_close(ye[1], m.y_embedder.y_proj(y[1]))
    assert "y_embedder.y_embedding" not in dict(m.named_parameters())


def test_gradient_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = randomize_zero_inits(tiny(enable_grad_checkpoint=ckpt, class_dropout_prob=0.0)).train()
        x, t, y, mask = inputs()
        with mock.patch.object(stdit_mod, "checkpoint", wraps=stdit_mod.checkpoint) as spy:
            m(x, t, y, mask).square().mean().backward()
        assert spy.call_count == (len(m.blocks) if ckpt else 0)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)
    assert grads[0]["blocks.0.attn_temp.qkv.weight"].abs().sum() > 0


def test_eval_determinism_and_timestep_types():
    m1, m2 = tiny().eval(), tiny().eval()
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    randomize_zero_inits(m1)
    x, t, y, mask = inputs()
    with torch.no_grad():
        a, b = m1(x, t, y, mask), m1(x, t, y, mask)
        assert torch.equal(a, b)
        torch.testing.assert_close(m1(x, t.float(), y, mask), a, rtol=0, atol=0)  # int or float timesteps
        assert torch.isfinite(m1(x, torch.tensor([0.25, 999.5]), y, mask)).all()  # continuous times


def test_low_precision_model_returns_float32():
    m = randomize_zero_inits(tiny()).eval()
    x, t, y, mask = inputs()
    with torch.no_grad():
        ref = m(x, t, y, mask)
        m16 = m.to(torch.bfloat16)
        out = m16(x, t, y, mask)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=0.1, atol=0.1)
        # timesteps are cast to the model dtype before the sinusoid (Open-Sora v1.0, bf16: 999 -> 1000)
        torch.testing.assert_close(
            m16(x, torch.tensor([999, 999]), y, mask), m16(x, torch.tensor([1000, 1000]), y, mask), rtol=0, atol=0
        )


def test_attend_in_bf16_on_cpu_matches_fp32_attention():
    """bf16 on CPU takes the matmul path (no SDPA kernel), matches fp32 SDPA forward and backward,
    also under autocast."""
    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[1, ..., 8:] = False  # the second sample's last 8 keys are padding
    q, k, v = (t.bfloat16().requires_grad_() for t in (q32, k32, v32))
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kw):
        seen.append(args[0].dtype)
        return real_sdpa(*args, **kw)

    with mock.patch.object(layers_mod.F, "scaled_dot_product_attention", side_effect=spy):
        out = attend(q, k, v, attn_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not change what runs
            out_ac = attend(q, k, v, attn_mask=mask)
        attend(q32, k32, v32)  # fp32 goes to the SDPA kernel
    assert seen == [torch.float32]
    assert out.dtype == out_ac.dtype == torch.bfloat16
    ref32 = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    ref = real_sdpa(*ref32, attn_mask=mask)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=3e-2)
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0)
    out.float().square().sum().backward()
    ref.square().sum().backward()
    for low, high in zip((q, k, v), ref32):
        assert low.grad.dtype == torch.bfloat16
        torch.testing.assert_close(low.grad.float(), high.grad, rtol=0, atol=0.05 * high.grad.abs().max().item())
    assert k.grad[1, :, 8:].abs().max() == 0 and v.grad[1, :, 8:].abs().max() == 0  # padded keys get no gradient


def test_tanh_gelu_is_exact_in_fp32_and_within_bf16_rounding_in_bf16():
    """fp32 is Open-Sora's tanh-GELU bit for bit; bf16 on CPU (the erf kernel) is within one bf16 ulp
    where |output| >= 1/16, and within 5e-4 (the approximation's own error) below that."""
    x = torch.linspace(-8, 8, 20001)
    act = TanhGELU()
    torch.testing.assert_close(act(x), F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    xb = x.bfloat16()
    got, want = act(xb).float(), F.gelu(xb, approximate="tanh").float()
    ulp = torch.where(
        want == 0, torch.zeros_like(want), 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    )
    diff, large = (got - want).abs(), want.abs() >= 1 / 16
    assert (diff[large] <= ulp[large]).all() and (diff[~large] <= 5e-4).all()
    assert (got != want).any()  # the bf16 path really is the other kernel


# ---------------------------------------------------------------- config and checkpoints


def test_stdit_config_rebuilds_the_model():
    m = randomize_zero_inits(tiny(input_size=[4, 8, 8], space_scale=0.5, pred_sigma=False)).eval()
    cfg = stdit_config(m)
    assert json.loads(json.dumps(cfg)) == cfg and cfg["space_scale"] == 0.5 and cfg["input_size"] == [4, 8, 8]
    cfg["depth"] = 99
    assert m.config["depth"] == 4  # a copy: editing it leaves the model alone
    cfg["depth"] = 4
    rebuilt = STDiT(**cfg).eval()
    rebuilt.load_opensora_state_dict(m.state_dict())
    x, t, y, mask = inputs(latent=(4, 4, 8, 8))
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y, mask), m(x, t, y, mask))


def test_load_opensora_state_dict_recomputes_buffers_and_is_strict():
    src = randomize_zero_inits(tiny())
    sd = src.state_dict()
    sd["pos_embed"] = torch.zeros_like(sd["pos_embed"])  # stale values in a 550-key file are ignored
    dst = tiny(input_size=[4, 8, 8])  # another frame count: the temporal buffer differs in shape
    expect_pe, expect_tpe = dst.pos_embed.clone(), dst.pos_embed_temporal.clone()
    result = dst.load_opensora_state_dict({"ema": sd})  # an {"ema": ...} checkpoint is unwrapped
    assert set(result.missing_keys) == {"pos_embed", "pos_embed_temporal"} and not result.unexpected_keys
    assert torch.equal(dst.pos_embed, expect_pe) and torch.equal(dst.pos_embed_temporal, expect_tpe)
    assert torch.equal(dst.blocks[1].attn_temp.proj.weight, src.blocks[1].attn_temp.proj.weight)
    assert torch.equal(dst.y_embedder.y_embedding, src.y_embedder.y_embedding)  # the null caption is a saved buffer
    partial = drop_positional_buffers(sd)
    del partial["blocks.0.mlp.fc1.bias"]
    with pytest.raises(RuntimeError, match="blocks.0.mlp.fc1.bias"):
        dst.load_opensora_state_dict(partial)
    assert set(dst.load_opensora_state_dict(partial, strict=False).missing_keys) == {
        "pos_embed", "pos_embed_temporal", "blocks.0.mlp.fc1.bias"}
    with pytest.raises(RuntimeError, match="unexpected"):
        dst.load_opensora_state_dict({**sd, "extra.weight": torch.zeros(1)})


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    """Hugging Face folder conventions: model.safetensors (no positional buffers) + config.json kwargs."""
    from safetensors.torch import load_file
    from soraflow.models.stdit import POSITIONAL_BUFFERS

    torch.manual_seed(0)
    model = build_stdit("STDiT-Tiny", pred_sigma=False)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == model.config
    assert not set(POSITIONAL_BUFFERS) & set(load_file(str(tmp_path / "m" / "model.safetensors")))
    again = STDiT.from_pretrained(tmp_path / "m")
    assert not again.training and again.config == model.config
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    shorter = STDiT.from_pretrained(tmp_path / "m", input_size=[4, 8, 8])  # another clip length, same weights
    assert shorter.pos_embed_temporal.shape[1] == 4 and torch.equal(
        shorter.final_layer.linear.weight, model.final_layer.linear.weight
    )
    with pytest.raises(ValueError, match="do not fit config.json"):
        STDiT.from_pretrained(tmp_path / "m", hidden_size=64, num_heads=4)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        STDiT.from_pretrained(tmp_path / "nothing-here")
