"""STDiT: the spatial-temporal diffusion transformer of Open-Sora v1.0, in plain PyTorch.

Same maths, names and state-dict layout as Open-Sora v1.0.0 (`opensora/models/stdit/stdit.py`), so
its checkpoints load (548 keys; the two positional buffers are recomputed from the config).
Attention runs through `F.scaled_dot_product_attention` (plain matmuls in bf16 on CPU, models/layers.py's
`attend()`): no xformers, flash-attn, apex or colossalai.
The building blocks (embedders, attention, STDiTBlock, final layer) live in models/layers.py; this
module holds the STDiT class, the presets table and the checkpoint helpers.

Shapes: B batch, C latent channels, (T, H, W) latent video, patch (pt, ph, pw),
S = ceil(H/ph)*ceil(W/pw) tokens per frame, N = T'*S tokens, D hidden size, L text tokens.

    x (B, C, T, H, W) -> patches (B, N, D) + spatial pos embed
        (+ temporal pos embed when temporal_pos="stream"; v1.0 adds it in block 0's temporal attention only)
    timestep (B,) -> t (B, D) -> t0 = t_block(t) (B, 6D)          adaLN-single
    y (B, 1, L, C_text) -> caption tokens (B, L, D)
    depth x STDiTBlock: spatial attn (B*T, S, D), temporal attn (B*S, T, D), cross attn, MLP
    final layer (B, N, pt*ph*pw*C_out) -> unpatchify -> (B, C_out, T, H, W) float32
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from .layers import (
    CaptionEmbedder,
    PatchEmbed3D,
    STDiTBlock,
    T2IFinalLayer,
    TimestepEmbedder,
    spatial_pos_embed,
    temporal_pos_embed,
)

# One table for every model size. Keys name the preset; values override STDiT's constructor defaults.
STDIT_PRESETS: dict[str, dict] = {
    # Open-Sora v1.0, 759.6 M params
    "STDiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=[1, 2, 2]),
    "STDiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=[1, 2, 2]),
    "STDiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=[1, 2, 2]),
    "STDiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=[1, 2, 2]),
    # CPU preset for tests and smoke training: latent (4, 8, 8, 8), a 64-wide text encoder, 16 tokens
    "STDiT-Tiny": dict(depth=4, hidden_size=128, num_heads=4, patch_size=[1, 2, 2],
                       input_size=[8, 8, 8], caption_channels=64, model_max_length=16),
}


# Where the temporal position embedding enters: "attention" = block 0's temporal attention input
# only (Open-Sora v1.0); "stream" = the residual stream at the input, beside the spatial one.
TEMPORAL_POS = ("attention", "stream")

# Saved in every state dict, but recomputed from the config on load (opensora/utils/ckpt_utils.py).
POSITIONAL_BUFFERS = ("pos_embed", "pos_embed_temporal")


def build_stdit(preset: str, **kwargs) -> STDiT:
    """An STDiT of a named size; `kwargs` override the preset and the constructor defaults."""
    if preset not in STDIT_PRESETS:
        raise ValueError(f"unknown STDiT preset {preset!r}; known presets: {', '.join(STDIT_PRESETS)}")
    return STDiT(**{**STDIT_PRESETS[preset], **kwargs})


def stdit_config(model: STDiT) -> dict:
    """The constructor kwargs of `model` (JSON-serialisable): `STDiT(**stdit_config(m))` rebuilds it."""
    return json.loads(json.dumps(model.config))  # a deep copy with lists, not tuples


def drop_positional_buffers(state_dict: dict) -> dict:
    """A shallow copy of `state_dict` without pos_embed / pos_embed_temporal (as Open-Sora's loader does)."""
    return {k: v for k, v in state_dict.items() if k not in POSITIONAL_BUFFERS}


# ---------------------------------------------------------------- the model


class STDiT(nn.Module, PyTorchModelHubMixin, library_name="soraflow", pipeline_tag="text-to-video",
            tags=["open-sora", "stdit"], repo_url="https://github.com/hpcaitech/Open-Sora"):
    """Spatial-temporal DiT: denoises a latent video given timesteps and text-encoder features.

    Hugging Face folder conventions through `PyTorchModelHubMixin`: `save_pretrained(dir)` writes
    `model.safetensors` + `config.json` (the constructor kwargs), `STDiT.from_pretrained(dir, **overrides)`
    reads them back. Local folders only: SoraFlow never downloads weights.
    """

    def _save_pretrained(self, save_directory: Path) -> None:
        # Without the positional buffers: they are recomputed from the config on load (reference Q8),
        # so one folder serves any clip length. config.json is written here so it holds the
        # normalised kwargs (`self.config`), not the raw arguments the mixin captured.
        state = {
            k: v.detach().contiguous().clone() for k, v in self.state_dict().items() if k not in POSITIONAL_BUFFERS
        }
        save_file(state, str(Path(save_directory) / "model.safetensors"))
        (Path(save_directory) / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> "STDiT":
        """The model saved in a local folder; `overrides` replace config.json kwargs (e.g. input_size)."""
        if not (Path(folder) / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"STDiT.from_pretrained({str(folder)!r}): no model.safetensors in that local folder "
                "(SoraFlow never downloads weights)"
            )
        return super().from_pretrained(Path(folder), local_files_only=True, **overrides)

    @classmethod
    def _from_pretrained(
        cls, *, model_id: str, config: dict | None = None, map_location: str = "cpu", **kwargs
    ) -> "STDiT":
        folder = Path(model_id)
        for hub_arg in ("revision", "cache_dir", "force_download", "local_files_only", "token"):
            kwargs.pop(hub_arg, None)
        config = config or {}
        if "kwargs" in config and "preset" in config:  # the folder layout written before the HF convention
            model = build_stdit(config["preset"], **{**config["kwargs"], **kwargs})
        else:
            model = cls(**kwargs)
        state = drop_positional_buffers(load_file(str(folder / "model.safetensors"), device=map_location))
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"STDiT.from_pretrained({model_id!r}): weights do not fit config.json: {e}") from e
        missing = set(result.missing_keys) - set(POSITIONAL_BUFFERS)
        if missing or result.unexpected_keys:
            raise ValueError(f"STDiT.from_pretrained({model_id!r}): weights do not fit config.json: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
        return model.eval()

    def __init__(
        self,
        input_size=(1, 32, 32),
        in_channels: int = 4,
        patch_size=(1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        no_temporal_pos_emb: bool = False,  # stored but unused, as in Open-Sora v1.0
        caption_channels: int = 4096,
        model_max_length: int = 120,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        enable_grad_checkpoint: bool = False,
        temporal_pos: str = "attention",
    ):
        super().__init__()
        if temporal_pos not in TEMPORAL_POS:
            raise ValueError(f"temporal_pos must be one of {TEMPORAL_POS}, got {temporal_pos!r}")
        self.config = dict(
            input_size=[int(v) for v in input_size], in_channels=int(in_channels),
            patch_size=[int(v) for v in patch_size],
            hidden_size=int(hidden_size), depth=int(depth), num_heads=int(num_heads), mlp_ratio=float(mlp_ratio),
            class_dropout_prob=float(class_dropout_prob), pred_sigma=bool(pred_sigma), drop_path=float(drop_path),
            no_temporal_pos_emb=bool(no_temporal_pos_emb), caption_channels=int(caption_channels),
            model_max_length=int(model_max_length), space_scale=float(space_scale), time_scale=float(time_scale),
            enable_grad_checkpoint=bool(enable_grad_checkpoint), temporal_pos=temporal_pos,
        )
        self.input_size = tuple(self.config["input_size"])
        self.patch_size = tuple(self.config["patch_size"])
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size, self.num_heads, self.depth = hidden_size, num_heads, depth
        self.space_scale, self.time_scale = space_scale, time_scale
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.enable_grad_checkpoint = enable_grad_checkpoint
        self.temporal_pos = temporal_pos
        # token grid after right-padding (Open-Sora floors, which only differs when it would crash)
        self.grid_size = tuple(-(-i // p) for i, p in zip(self.input_size, self.patch_size))  # (T', H', W')
        self.num_temporal = self.grid_size[0]
        self.num_spatial = self.grid_size[1] * self.grid_size[2]

        # positional buffers: saved in the state dict, but always recomputed from the config
        # (opensora/utils/ckpt_utils.py)
        self.register_buffer("pos_embed", self.get_spatial_pos_embed())  # (1, S, D)
        self.register_buffer("pos_embed_temporal", self.get_temporal_pos_embed())  # (1, T', D)

        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(STDiTBlock(hidden_size, num_heads, mlp_ratio, rates[i]) for i in range(depth))
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)

        self.initialize_weights()

    def get_spatial_pos_embed(self) -> torch.Tensor:
        _, gh, gw = self.grid_size
        pe = spatial_pos_embed(self.hidden_size, gh, gw, self.space_scale)  # (S, D)
        return pe[None].to(torch.get_default_device())  # (1, S, D)

    def get_temporal_pos_embed(self) -> torch.Tensor:
        pe = temporal_pos_embed(self.hidden_size, self.num_temporal, self.time_scale)  # (T', D)
        return pe[None].to(torch.get_default_device())  # (1, T', D)

    def initialize_weights(self) -> None:
        # every Linear: xavier-uniform weight, zero bias
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # patch embed: xavier like a Linear on the flattened kernel; the conv bias keeps PyTorch's default
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        # timestep MLP, adaLN-single projection and caption MLP: normal(0, 0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        # zero the cross-attention output projections (Open-Sora's comment says "adaLN"; this is what it does)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # zero the output layer: the model predicts 0 at init
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # zero the temporal output projections: at init the model is PixArt-alpha applied frame by frame
        for block in self.blocks:
            nn.init.zeros_(block.attn_temp.proj.weight)
            nn.init.zeros_(block.attn_temp.proj.bias)

    def load_opensora_state_dict(self, state_dict: dict, strict: bool = True):
        """Load an Open-Sora v1.0 / SoraFlow state dict (548 keys, or 550 with the positional buffers).

        An `{"ema": ...}` wrapper is unwrapped. The positional buffers are dropped and keep the values
        computed from this model's config, so the same weights serve any video size. With strict=True
        every other key must be present with its shape; the result's missing_keys then is exactly
        ["pos_embed", "pos_embed_temporal"] and unexpected_keys is empty.
        """
        if "ema" in state_dict and isinstance(state_dict["ema"], dict):
            state_dict = state_dict["ema"]
        result = self.load_state_dict(drop_positional_buffers(state_dict), strict=False)
        if strict:
            missing = sorted(set(result.missing_keys) - set(POSITIONAL_BUFFERS))
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"STDiT state dict does not fit: missing {missing}, unexpected {sorted(result.unexpected_keys)}"
                )
        return result

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T, H, W), timestep (B,), y (B, 1, L, C_text) or (B, L, C_text), mask (B, L)
        -> (B, C_out, T, H, W) float32.

        force_drop_ids (B,): 1 = this sample gets the null caption. None: in train mode the caption
        dropout is drawn here from the global RNG; a caller that splits a batch over threads draws it first.
        """
        dtype = self.x_embedder.proj.weight.dtype
        b, _, t_in, h_in, w_in = x.shape
        x = x.to(dtype)
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        timestep = timestep.to(dtype)  # cast before the sinusoid, as opensora/models/stdit/stdit.py does
        y = y.to(dtype)
        if y.ndim == 3:
            y = y[:, None]  # (B, 1, L, C_text)

        # patches plus spatial positions
        x = self.x_embedder(x)  # (B, T'*S, D)
        grid = tuple(-(-i // p) for i, p in zip((t_in, h_in, w_in), self.patch_size))
        if grid != self.grid_size:
            raise ValueError(
                f"input (T, H, W) = {(t_in, h_in, w_in)} makes a token grid {grid}, but this model was "
                f"built for input_size {self.input_size} (grid {self.grid_size}); rebuild it with that input_size"
            )
        t_, s, d = self.num_temporal, self.num_spatial, self.hidden_size
        pos = self.pos_embed.to(dtype)[:, None]  # (1, 1, S, D): where in the frame
        tpe = self.pos_embed_temporal.to(dtype)  # (1, T', D): which time step
        if self.temporal_pos == "stream":  # every layer sees the time step, not only block 0's temporal attention
            pos, tpe = pos + tpe[:, :, None], None  # (1, T', S, D)
        x = (x.reshape(b, t_, s, d) + pos).reshape(b, t_ * s, d)  # (B, T', S, D) -> (B, T'*S, D)

        # timestep and caption conditioning
        t = self.t_embedder(timestep)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        y = self.y_embedder(y, self.training, force_drop_ids).squeeze(1)  # (B', L, D); B' = k*B under CFG
        if mask is not None:
            mask = mask.to(y.device) != 0  # (B_m, L) bool
            if mask.shape[0] != y.shape[0]:
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)  # tile rows: y is k*B_m under CFG
        if y.shape[0] != b:
            raise ValueError(f"x has {b} samples but y has {y.shape[0]}")

        for i, block in enumerate(self.blocks):
            args = (x, y, t0, mask, t_, tpe if i == 0 else None)
            if self.enable_grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)  # (B, T*S, D)

        x = self.final_layer(
            x, t
        )  # (B, T*S, pt*ph*pw*C_out), conditioned on the raw t (opensora/models/stdit/stdit.py)
        x = self.unpatchify(x)  # (B, C_out, T'*pt, H'*ph, W'*pw)
        return x[:, :, :t_in, :h_in, :w_in].float()  # crop the right padding: (B, C_out, T, H, W)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T'*H'*W', pt*ph*pw*C_out) with C_out fastest -> (B, C_out, T'*pt, H'*ph, W'*pw)."""
        b = x.shape[0]
        (nt, nh, nw), (pt, ph, pw), c = self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(b, nt, nh, nw, pt, ph, pw, c)  # (B, T', H', W', pt, ph, pw, C_out)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C_out, T', pt, H', ph, W', pw)
        return x.reshape(b, c, nt * pt, nh * ph, nw * pw)
