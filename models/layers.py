"""STDiT's building blocks, in plain PyTorch: sin-cos positional embeddings, the embedders
(patches, timestep, caption), attention (self and masked cross), the STDiT block and the final layer.

They follow Open-Sora v1.0.0's `opensora/models/layers/blocks.py` and the block class of
`opensora/models/stdit/stdit.py`, with the same parameter names, so the state-dict keys of
models/stdit.py's `STDiT` match the official checkpoints. Attention runs through `attend()`:
`F.scaled_dot_product_attention` (no xformers), or plain matmuls in bf16 on CPU. Shapes as in
models/stdit.py: D hidden size, S tokens per frame, T frames, N = T*S, L text tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------- sin-cos embeddings and helpers


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim) float64: [sin(p*omega_k) for k, then cos(p*omega_k)], omega_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))  # (dim/2,)
    out = pos.double().reshape(-1)[:, None] * omega[None]  # (P, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def spatial_pos_embed(dim: int, grid_h: int, grid_w: int, scale: float = 1.0) -> torch.Tensor:
    """(grid_h*grid_w, dim) float32, row-major tokens; w/scale in dims [0, dim/2), h/scale in [dim/2, dim)."""
    h = torch.arange(grid_h, dtype=torch.float32, device="cpu") / scale  # float32 positions, as Open-Sora's numpy grid
    w = torch.arange(grid_w, dtype=torch.float32, device="cpu") / scale
    hh, ww = torch.meshgrid(h, w, indexing="ij")  # (gh, gw) each
    return torch.cat([sincos_1d(dim // 2, ww), sincos_1d(dim // 2, hh)], dim=1).float()


def temporal_pos_embed(dim: int, length: int, scale: float = 1.0) -> torch.Tensor:
    """(length, dim) float32 embedding of positions t/scale (computed in float64)."""
    return sincos_1d(dim, torch.arange(length, dtype=torch.float64, device="cpu") / scale).float()


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TanhGELU(nn.Module):
    """GELU's tanh approximation (Open-Sora's MLPs); in bf16 on CPU computed as the exact (erf) GELU.

    The two differ by at most 4.7e-4 (at x = 2.7), below bf16's resolution there (2^-6 for
    values in [2, 4)): in bf16, outputs of magnitude 1/16 or more differ by at most one unit in
    the last place, as rounding alone would, and smaller ones by at most 5e-4. PyTorch's CPU
    tanh-GELU kernel is 3-6x slower than its erf kernel (0.7 against 0.12 ms for STDiT-Tiny's
    (16, 64, 512) activations), about 9% of a bf16 training step. fp32 keeps the tanh form, so fp32
    outputs match Open-Sora's exactly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            return F.gelu(x)
        return F.gelu(x, approximate="tanh")


class Mlp(nn.Module):
    """timm-style MLP: fc1, tanh-GELU, fc2 (key names fc1/fc2 as in Open-Sora checkpoints)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = TanhGELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------- embedders


class PatchEmbed3D(nn.Module):
    """Video to patch tokens: right-pad to the patch grid, Conv3d with kernel = stride = patch."""

    def __init__(self, patch_size=(1, 2, 2), in_chans: int = 4, embed_dim: int = 1152):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape  # (B, C, T, H, W)
        pt, ph, pw = self.patch_size
        # zero-pad W, H, T on the right up to a multiple of the patch (F.pad lists the last dim first)
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))
        x = self.proj(x)  # (B, D, T', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, T'*H'*W', D), t-major then row-major


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to vectors: 256 sinusoidal features [cos, sin], then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """(B,) -> (B, dim) float32: [cos(t*f_k), sin(t*f_k)], f_k = exp(-ln(max_period) k / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cosine first (unlike the pos embed)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class CaptionEmbedder(nn.Module):
    """Text-encoder features to hidden size; in training, drops whole captions to the stored null caption."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        # the null caption for classifier-free guidance: a saved, untrained buffer (L, C_text)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def draw_drop_ids(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """(n,) int64, 1 = use the null caption, each with prob uncond_prob (global RNG without
        `generator`); None if it is 0."""
        if self.uncond_prob <= 0:
            return None
        where = generator.device if generator is not None else device
        return (torch.rand(n, generator=generator, device=where) < self.uncond_prob).long().to(device)

    def token_drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace the captions of dropped samples (prob uncond_prob, or force_drop_ids == 1) by the null caption."""
        if force_drop_ids is None:
            force_drop_ids = self.draw_drop_ids(caption.shape[0], caption.device)
        drop = torch.as_tensor(force_drop_ids, device=caption.device) == 1
        null = self.y_embedding.to(caption.dtype)  # (L, C_text)
        return torch.where(drop[:, None, None, None], null, caption)  # (B, 1, L, C_text)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if caption.shape[2:] != self.y_embedding.shape:
                raise ValueError(
                    f"caption dropout needs captions (B, 1, {', '.join(map(str, self.y_embedding.shape))}), "
                    f"got {tuple(caption.shape)}"
                )
            caption = self.token_drop(
                caption, force_drop_ids
            )  # the mask is left as is (opensora/models/layers/blocks.py)
        return self.y_proj(caption)  # (B, 1, L, D)


# ---------------------------------------------------------------- attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention (scale Dh^-0.5); q (..., Nq, Dh), k and v (..., Nk, Dh) -> (..., Nq, Dh).

    attn_mask: bool, True = attend, broadcast to (..., Nq, Nk). On CPU in bf16/fp16 it runs as
    plain matmuls: PyTorch's CPU flash-attention kernel is 3-15x slower in bf16 than in fp32 at
    STDiT-Tiny's sizes (4-64 tokens, Dh 32), and even its fp32 kernel is slower there than two
    bf16 matmuls around an fp32 softmax (a local-preset step 1.16x, interleaved in one process; README).
    The scores are rounded to bf16 once, as the matmul writes them; the softmax runs in fp32.
    Autocast is off inside, so that it does not pick the precision of the softmax itself.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (..., Nq, Nk) fp32
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            return scores.softmax(dim=-1).to(q.dtype) @ v  # (..., Nq, Dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    """Multi-head self-attention over the middle axis of (batch, tokens, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [q; k; v], each head-major
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B', N', D)
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B', heads, N', Dh)
        out = attend(qkv[0], qkv[1], qkv[2])  # (B', heads, N', Dh), scale Dh^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B', N', D)


class MultiHeadCrossAttention(nn.Module):
    """Video tokens attend to their own sample's valid text tokens (key-padding mask per sample)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        assert d_model % num_heads == 0, f"hidden size {d_model} is not divisible by {num_heads} heads"
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, 2 * d_model)  # rows [k; v], each head-major
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), y (B, L, D), mask (B, L) bool (True = real token) or None (all real)."""
        b, n, d = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, Dh)
        kv = (
            self.kv_linear(y).view(b, y.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (2, B, heads, L, Dh)
        attn_mask, empty = None, None
        if mask is not None:
            # A sample with no valid token attends to nothing: give it a full mask (no NaN) and zero its output.
            empty = ~mask.any(dim=1)  # (B,)
            attn_mask = (mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = attend(q, kv[0], kv[1], attn_mask=attn_mask)  # (B, heads, N, Dh)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)  # no `if empty.any()`: no host sync
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


# ---------------------------------------------------------------- blocks


class STDiTBlock(nn.Module):
    """adaLN-single block: spatial attention, temporal attention, cross attention to text, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        # registration order fixes the state-dict key order: table, attn, cross_attn, mlp, attn_temp
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn_temp = Attention(hidden_size, num_heads)

    def forward(self, x, y, t0, mask, num_frames: int, tpe: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T*S, D), y (B, L, D), t0 (B, 6D), mask (B, L) bool or None, tpe (1, T, D) in block 0 only."""
        b, n, d = x.shape
        t_, s = num_frames, n // num_frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(b, 6, d)
        ).chunk(6, dim=1)  # each (B, 1, D)

        # spatial attention on the modulated norm: tokens of one frame attend to each other
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T*S, D)
        x_s = self.attn(x_m.reshape(b * t_, s, d))  # (B*T, S, D)
        x = x + self.drop_path(gate_msa * x_s.reshape(b, n, d))  # (B, T*S, D)

        # temporal attention on the raw residual stream, reusing gate_msa (opensora/models/stdit/stdit.py)
        x_t = x.reshape(b, t_, s, d).transpose(1, 2).reshape(b * s, t_, d)  # (B*S, T, D)
        if tpe is not None:
            x_t = x_t + tpe  # temporal pos embed enters the attention input only, never the stream
        x_t = self.attn_temp(x_t)  # (B*S, T, D)
        x_t = x_t.reshape(b, s, t_, d).transpose(1, 2).reshape(b, n, d)  # (B, T*S, D)
        x = x + self.drop_path(gate_msa * x_t)

        # cross attention to the caption: no norm, no modulation, no gate (opensora/models/stdit/stdit.py)
        x = x + self.cross_attn(x, y, mask)  # (B, T*S, D)

        # MLP on the modulated norm
        x = x + self.drop_path(gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x  # (B, T*S, D)


class T2IFinalLayer(nn.Module):
    """Final adaLN-single layer (conditioned on the raw t) projecting tokens to patches of C_out channels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # each (B, 1, D)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))  # (B, N, pt*ph*pw*C_out)
