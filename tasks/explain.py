"""`soraflow explain`: one generation (or one training step) traced through the live modules.

Every shape printed comes from a forward hook on the module that produced it (models/tracing.py),
found by its name in `named_modules()` (the names are fixed by Open-Sora's state-dict layout,
so they survive a reorganisation of the model code); the meanings are one line per kind of stage.

    explain_generation: prompt -> tokens + mask -> T5 -> noise -> STDiT x steps -> latents -> VAE decode
        writes denoising.png (the decoded x0 prediction at several steps, one row per step, frames
        left to right) and cross_attention.png (one block's attention over the prompt's tokens, per frame)
    explain_training: a sample-world clip of the prompt -> VAE encode -> timestep, noise, x_t, target
        -> STDiT -> loss terms -> backward -> gradient norm per block (the weights are not changed)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from soraflow.configs.schema import SoraFlowConfig
from soraflow.models.diffusion.iddpm import IDDPM
from soraflow.models.diffusion.rflow import RFlow, interpolate, velocity_target
from soraflow.models.noise import randn
from soraflow.models.text_encoder import preprocess
from soraflow.models.tracing import Call, Tracer, cross_attention_weights
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.video_io import to_uint8_frames
from soraflow.storage.registry.model_folder import load_pipeline

log = logging.getLogger(__name__)

# One line per kind of stage; the shapes beside them are measured.
MEANING = {
    "tokens": "T5 tokenizer: token ids padded to max_length, mask 1 = real token (the rest is padding)",
    "text": "T5 encoder: one feature vector per token; the video attends to these (cross attention)",
    "noise": "latent noise z (B, C, T, H/f, W/f): the VAE's latent grid, f = the VAE's downsampling",
    "patchify": "x_embedder: Conv3d, kernel = stride = patch (pt, ph, pw): "
                "every latent patch -> one token of D channels",
    "pos_spatial": "spatial sin-cos position embedding, added to every frame's S tokens (where in the frame)",
    "pos_temporal": "temporal sin-cos position embedding, added in block 0's temporal attention input "
                    "(which time step T')",
    "pos_temporal_stream": "temporal sin-cos position embedding, added to every token at the input "
                           "(which time step T')",
    "timestep": "t_embedder: sinusoid of the diffusion time t -> MLP -> one vector per sample",
    "adaln": "t_block (adaLN-single): t -> 6 vectors per sample: shift/scale/gate for attention and MLP in every block",
    "caption": "y_embedder: T5 features projected to D (in training, 10% of captions are swapped for the null caption)",
    "spatial": "spatial self-attention: the S tokens of each time step attend to each other (batch B*T')",
    "temporal": "temporal self-attention: each spatial position attends across the T' = T/pt time steps (batch B*S)",
    "cross": "cross attention: every video token attends to the caption's valid tokens (key-padding mask)",
    "block": "one STDiT block: spatial attn, temporal attn, cross attn, MLP, each added to the residual stream",
    "final": "final_layer: adaLN on raw t, then a linear map from each token back to a latent patch",
    "output": "STDiT output: the prediction on the latent grid (velocity for rflow, eps [+ variance] for IDDPM)",
    "latents": "denoised latents after the last sampling step",
    "decode": "VAE decoder, frame by frame: latents (B*T, C, H/f, W/f) -> pixels (B*T, 3, H, W)",
    "encode": "VAE encoder, frame by frame: the clip's pixels -> latent mean x0 (B*T, 2C moments)",
}

# STDiT submodules by attribute name, in the order data flows through them (outside the blocks).
_TOP = (("x_embedder", "patchify"), ("t_embedder", "timestep"), ("t_block", "adaln"), ("y_embedder", "caption"))


@dataclass
class Stage:
    stage: str  # short name shown first
    module: str  # where the shape was measured
    shape: str
    meaning: str


@dataclass
class ExplainResult:
    mode: str  # "generate" | "train"
    prompt: str
    weights: str  # where the weights came from, in words
    stages: list[Stage]
    facts: dict[str, int]  # B, C, T, h, w, grid_t, grid_h, grid_w, D, L, depth, ... from the live model
    numbers: dict[str, float] = field(default_factory=dict)  # train: t, loss terms, gradient norms
    images: dict[str, Path] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)  # the prompt's real tokens


def _fmt(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)


def _io(call: Call) -> str:
    return f"{_fmt(call.inputs)} -> {_fmt(call.output)}"


def load_models(cfg: SoraFlowConfig, root: DataRoot, model_ref: str | None = "champion", ckpt: str | None = None):
    """(pipeline, where its weights came from, trained?): --ckpt, else the registry's `model_ref`, else random."""
    if ckpt is None and model_ref:
        from soraflow.storage.registry.model_registry import ModelRegistry, RegistryError

        if not cfg.registry.tracking_uri and not (root.registry / "mlflow.db").exists():  # nothing trained here yet
            pipe, source = load_pipeline(cfg, root, None)
            return pipe, f"{source} (no registry under {root.registry}: untrained)", False
        try:  # through the version's MLflow model, as `soraflow generate --model` loads it
            pipe, source = ModelRegistry(root, cfg.registry).load_pipeline(model_ref, cfg)
        except (RegistryError, FileNotFoundError) as e:
            log.info("no registry model %r: %s", model_ref, e)
            pipe, source = load_pipeline(cfg, root, None)
            return pipe, f"{source} (registry has no {model_ref!r}: untrained)", False
        return pipe, f"{source} (trained)", True
    pipe, source = load_pipeline(cfg, root, ckpt)
    return pipe, source + (" (trained)" if ckpt else " (untrained)"), bool(ckpt)


def _watch_model(tracer: Tracer, pipe, cross_block: int, on_step=None) -> tuple[str, str]:
    """Hook the text encoder, the STDiT parts and every block's attentions; returns the q/kv names of `cross_block`."""
    tracer.watch(pipe.text_encoder.model, "t5")
    stdit = pipe.stdit
    tracer.watch(stdit, "stdit", on_call=on_step)
    names = dict(stdit.named_modules())
    for attr, _ in _TOP:
        tracer.watch(names[attr], attr)
    for name, module in names.items():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "blocks" or parts[-1] in ("attn", "attn_temp", "cross_attn", "final_layer"):
            tracer.watch(module, name)
    q_name, kv_name = f"blocks.{cross_block}.cross_attn.q_linear", f"blocks.{cross_block}.cross_attn.kv_linear"
    tracer.watch(names[q_name], q_name, record_calls=0, capture=True)
    tracer.watch(names[kv_name], kv_name, record_calls=0, capture=True)
    tracer.watch(names[f"blocks.{cross_block}.cross_attn"], "cross_inputs", record_calls=0, capture=True)
    vae = pipe.vae.module
    for attr in ("encoder", "decoder"):
        if hasattr(vae, attr):
            tracer.watch(getattr(vae, attr), f"vae.{attr}")
    return q_name, kv_name


def _model_stages(tracer: Tracer, stdit, facts: dict) -> list[Stage]:
    """Rows for the STDiT's first call: embeddings, every block's attentions, the output."""
    rows = []
    for attr, key in _TOP:
        rows.append(Stage(key, attr, _io(tracer.first(attr)), MEANING[key]))
        if key == "patchify":
            pe = dict(stdit.named_buffers())
            rows.append(Stage("pos_spatial", "pos_embed (buffer)", _fmt([tuple(pe["pos_embed"].shape)]),
                              MEANING["pos_spatial"]))
            meaning = MEANING["pos_temporal_stream" if stdit.temporal_pos == "stream" else "pos_temporal"]
            rows.append(Stage("pos_temporal", "pos_embed_temporal (buffer)",
                              _fmt([tuple(pe["pos_embed_temporal"].shape)]), meaning))
    for i in range(facts["depth"]):
        for suffix, key in (("attn", "spatial"), ("attn_temp", "temporal"), ("cross_attn", "cross")):
            rows.append(Stage(f"{key}[{i}]", f"blocks.{i}.{suffix}", _io(tracer.first(f"blocks.{i}.{suffix}")),
                              MEANING[key]))
    rows.append(Stage("final", "final_layer", _io(tracer.first("final_layer")), MEANING["final"]))
    rows.append(Stage("output", "stdit", _fmt(tracer.first("stdit").output), MEANING["output"]))
    return rows


def _facts(pipe, batch: int, length: int) -> dict[str, int]:
    s = pipe.stdit
    c, t, h, w = pipe.latent_shape
    return {"B": batch, "C": c, "T": t, "h": h, "w": w, "f": pipe.vae.downsample,
            "H": pipe.image_size[0], "W": pipe.image_size[1],
            "grid_t": s.grid_size[0], "grid_h": s.grid_size[1], "grid_w": s.grid_size[2], "S": s.num_spatial,
            "pt": s.patch_size[0], "ph": s.patch_size[1], "pw": s.patch_size[2],
            "D": s.hidden_size, "heads": s.num_heads, "depth": len(s.blocks), "L": length, "C_out": s.out_channels}


def _attention_map(tracer: Tracer, q_name: str, kv_name: str, call: int, row: int, heads: int,
                   grid_t: int) -> np.ndarray:
    """(frames, L) attention of one sample's video tokens over text tokens, mean over heads and each frame's tokens."""
    q = tracer.captured[q_name][call][2]  # (B', N, D)
    kv = tracer.captured[kv_name][call][2]  # (B', L, 2D)
    args, kwargs, _ = tracer.captured["cross_inputs"][call]
    mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
    w = cross_attention_weights(q[row : row + 1], kv[row : row + 1], heads,
                                None if mask is None else mask[row : row + 1])
    w = w[0].mean(0)  # (N, L)
    return w.reshape(grid_t, -1, w.shape[-1]).mean(1).numpy()  # (T', L)


def _save_attention_png(weights: np.ndarray, tokens: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(tokens), 1.2 + 0.3 * weights.shape[0]))
    im = ax.imshow(weights[:, : len(tokens)], aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right")
    ax.set_ylabel("frame (latent)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _save_strip_png(rows: list[np.ndarray], path: Path, scale: int = 4) -> Path:
    """rows of (T, H, W, 3) uint8 -> one PNG: a row per entry, frames left to right, 2-px gaps, upscaled."""
    from PIL import Image

    t, h, w, _ = rows[0].shape
    canvas = np.full((len(rows) * (h + 2), t * (w + 2), 3), 255, np.uint8)
    for r, frames in enumerate(rows):
        for k in range(t):
            canvas[r * (h + 2) : r * (h + 2) + h, k * (w + 2) : k * (w + 2) + w] = frames[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return path


def predicted_x0(scheduler, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The clean latents implied by one model output: rflow x0 = x_t + tau v; IDDPM x0 from eps."""
    c = x_t.shape[1]
    if isinstance(scheduler, RFlow):
        tau = (t.float() / scheduler.num_timesteps).view(-1, *([1] * (x_t.ndim - 1)))
        return x_t + tau * out[:, :c]
    if isinstance(scheduler, IDDPM):
        return scheduler.diffusion.predict_x0_from_eps(x_t, t.long(), out[:, :c])
    raise TypeError(f"explain knows rflow and IDDPM, not {type(scheduler).__name__}")


def _text_stages(tracer: Tracer, pipe, prompt: str) -> tuple[list[Stage], list[str], int]:
    call = tracer.first("t5")
    tokenizer = pipe.text_encoder.tokenizer  # as T5TextEncoder.encode calls it, without the padding
    ids = tokenizer(preprocess(prompt), max_length=pipe.text_encoder.max_length, truncation=True)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    length = call.inputs[0][1]
    return [
        Stage("tokens", "tokenizer",
              f"ids {_fmt(call.inputs[:1])}, mask {_fmt(call.inputs[1:2])}; {len(tokens)} real: {' '.join(tokens)}",
              MEANING["tokens"]),
        Stage("text", "text_encoder (T5)", _io(call), MEANING["text"]),
    ], tokens, length


@torch.no_grad()
def explain_generation(cfg: SoraFlowConfig, root: DataRoot, prompt: str, out_dir: str | Path,
                       model_ref: str | None = "champion", ckpt: str | None = None, steps: int = 8, seed: int = 0,
                       cfg_scale: float | None = None, snapshots: int = 4) -> ExplainResult:
    """One generation of `prompt`, traced; writes denoising.png and cross_attention.png under out_dir."""
    if not prompt.strip():
        raise ValueError("explain: the prompt is empty")
    pipe, source, _ = load_models(cfg, root, model_ref, ckpt)
    stdit, scheduler, out = pipe.stdit.eval(), pipe.scheduler, Path(out_dir)
    cfg_scale = cfg_scale if cfg_scale is not None else (cfg.generate.cfg_scale if cfg.generate.cfg_scale is not None
                                                         else scheduler.cfg_scale)
    steps_seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (x_t, t, output) per model call
    last = len(stdit.blocks) - 1
    with Tracer() as tracer:
        q_name, kv_name = _watch_model(
            tracer, pipe, last, on_step=lambda a, k, o: steps_seen.append((a[0].detach(), a[1].detach(), o.detach())))
        # The pipeline's own parts, called as TextToVideo.__call__ calls them, so each result can be shown.
        generator = torch.Generator().manual_seed(seed)
        cond = pipe.text_encoder.encode([prompt])  # y (1, 1, L, C_text), mask (1, L)
        z = randn((1, *pipe.latent_shape), generator, "cpu")  # (1, C, T, h, w)
        latents = scheduler.sample(stdit, z, {"y": cond["y"], "mask": cond["mask"]}, y_null=pipe.null_caption(1),
                                   cfg_scale=cfg_scale, num_steps=steps, generator=generator)
        video = pipe.vae.decode(latents).clamp(-1, 1)  # (1, 3, T, H, W)
        text_rows, tokens, length = _text_stages(tracer, pipe, prompt)
        facts = _facts(pipe, 1, length)
        rows = text_rows + [Stage("noise", "torch.randn", _fmt([tuple(z.shape)]), MEANING["noise"])]
        first = tracer.first("stdit")
        rows.append(Stage("stdit input", "stdit", f"x, t, y, mask {_fmt(first.inputs)}",
                          f"one denoising step: x and t doubled to (cond, uncond) rows for classifier-free guidance "
                          f"(scale {cfg_scale:g}), {len(steps_seen)} steps"))
        rows += _model_stages(tracer, stdit, facts)
        rows.append(Stage("latents", "scheduler.sample", _fmt([tuple(latents.shape)]), MEANING["latents"]))
        rows.append(Stage("decode", "vae.decoder", _io(tracer.first("vae.decoder")), MEANING["decode"]))
        rows.append(Stage("video", "VideoVAE.decode", _fmt([tuple(video.shape)]),
                          "the video (B, 3, T, H, W) in [-1, 1]"))
        attention = _attention_map(tracer, q_name, kv_name, len(steps_seen) - 1, 0, facts["heads"], facts["grid_t"])
    picks = sorted({round(i * (len(steps_seen) - 1) / max(1, snapshots - 1)) for i in range(snapshots)})
    x0s = []
    for i in picks:  # the guided x0 prediction of step i (cond row 0, uncond row 1)
        x_t, t, o = steps_seen[i]
        guided = o[1:2] + cfg_scale * (o[0:1] - o[1:2]) if o.shape[0] == 2 else o[:1]
        x0s.append(predicted_x0(scheduler, x_t[:1], t[:1], guided))
    strip = [to_uint8_frames(v) for v in pipe.vae.decode(torch.cat(x0s)).clamp(-1, 1)] + [to_uint8_frames(video[0])]
    images = {
        "denoising": _save_strip_png(strip, out / "denoising.png"),
        "cross_attention": _save_attention_png(attention, tokens, out / "cross_attention.png",
                                               f"block {last} cross attention, last step: '{prompt}'"),
    }
    numbers = {"steps": float(len(steps_seen)), "snapshot_steps": float(len(picks))}
    return ExplainResult("generate", prompt, source, rows, facts, numbers, images, tokens)


def render_prompt_clip(prompt: str, num_frames: int, image_size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8: the sample world's clip of a caption such as "a red circle moving left"."""
    from soraflow.tasks.sample_world.scenes import (
        SceneSpec,
        parse_caption,
        render_scene,
    )

    parsed = parse_caption(prompt)
    if parsed is None:
        raise ValueError(f"explain --train: {prompt!r} is not a sample-world caption "
                         "('a <colour> <shape> moving <direction>')")
    color, shape, direction = parsed
    h, w = image_size
    spec = SceneSpec(color, shape, direction, (20, 20, 30), num_frames, (w / 2, h / 2),
                     min(h, w) * 0.25 / max(1, num_frames))
    return render_scene(spec, w, h)


def explain_training(cfg: SoraFlowConfig, root: DataRoot, prompt: str, out_dir: str | Path,
                     model_ref: str | None = "champion", ckpt: str | None = None, seed: int = 0) -> ExplainResult:
    """One training step on the sample-world clip of `prompt`, traced; the weights are not changed."""
    pipe, source, trained = load_models(cfg, root, model_ref, ckpt)
    stdit, scheduler, out = pipe.stdit.train(), pipe.scheduler, Path(out_dir)
    torch.manual_seed(seed)  # caption dropout draws from the global RNG
    generator = torch.Generator().manual_seed(seed)
    clip = render_prompt_clip(prompt, pipe.num_frames, pipe.image_size)  # (T, H, W, 3)
    pixels = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W) in [-1, 1]
    seen: list[torch.Tensor] = []
    with Tracer() as tracer:
        q_name, kv_name = _watch_model(tracer, pipe, len(stdit.blocks) - 1,
                                       on_step=lambda a, k, o: seen.append(o.detach()))
        with torch.no_grad():
            x0 = pipe.vae.encode(pixels, sample=False)  # (1, C, T, h, w), the latent mean
            cond = pipe.text_encoder.encode([prompt])
        t = scheduler.sample_timesteps(1, generator=generator)  # (1,)
        noise = randn(x0.shape, generator, x0.device)
        if isinstance(scheduler, RFlow):
            x_t, target, kind = (interpolate(x0, noise, t / scheduler.num_timesteps), velocity_target(x0, noise),
                                 "velocity x0 - noise")
        else:
            x_t, target, kind = scheduler.diffusion.q_sample(x0, t.long(), noise), noise, "eps (the noise)"
        terms = scheduler.training_loss(stdit, x0, {"y": cond["y"], "mask": cond["mask"]}, t=t, noise=noise)
        stdit.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        text_rows, tokens, length = _text_stages(tracer, pipe, prompt)
        facts = _facts(pipe, 1, length)
        rows = text_rows + [
            Stage("encode", "vae.encoder", _io(tracer.first("vae.encoder")), MEANING["encode"]),
            Stage("x0", "VideoVAE.encode", _fmt([tuple(x0.shape)]),
                  "the clip's latents x0 (B, C, T, H/f, W/f), scaled by the VAE's scaling factor"),
            Stage("t", "scheduler.sample_timesteps", f"t = {float(t[0]):.1f}",
                  f"sampled diffusion time ({type(scheduler).__name__}: 0 = data, {scheduler.num_timesteps} = noise)"),
            Stage("x_t", "scheduler", _fmt([tuple(x_t.shape)]), "x0 noised to time t: the model's input"),
            Stage("target", "scheduler", _fmt([tuple(target.shape)]), f"what the model must predict: {kind}"),
        ]
        rows += _model_stages(tracer, stdit, facts)
        attention = _attention_map(tracer, q_name, kv_name, 0, 0, facts["heads"], facts["grid_t"])
    numbers = {"t": float(t[0])}
    for name, value in terms.items():
        numbers[f"loss.{name}"] = float(value.detach().mean())
        rows.append(Stage(f"loss.{name}", "scheduler.training_loss", f"{numbers[f'loss.{name}']:.4f}",
                          "loss term, mean over the batch"))
    grad_meaning = "gradient norm of this part's parameters" + (
        "" if trained else " (untrained: only the zero-initialised final layer gets one)")
    for name, module in stdit.named_children():
        parts = ([(f"{name}.{i}", m) for i, m in enumerate(module)] if isinstance(module, torch.nn.ModuleList)
                 else [(name, module)])
        for label, m in parts:
            grads = [p.grad.norm() ** 2 for p in m.parameters() if p.grad is not None]
            if grads:
                numbers[f"grad_norm.{label}"] = float(torch.stack(grads).sum().sqrt())
                rows.append(Stage(f"grad {label}", label, f"|g| = {numbers[f'grad_norm.{label}']:.3e}", grad_meaning))
    stdit.zero_grad(set_to_none=True)
    stdit.eval()
    with torch.no_grad():
        pred = predicted_x0(scheduler, x_t, t, seen[0])
        strip = [clip] + [to_uint8_frames(v) for v in pipe.vae.decode(torch.cat([x0, x_t, pred])).clamp(-1, 1)]
    images = {
        "training_step": _save_strip_png(strip, out / "training_step.png"),
        "cross_attention": _save_attention_png(attention, tokens, out / "cross_attention_train.png",
                                               f"block {facts['depth'] - 1} cross attention, "
                                               f"training step at t={float(t[0]):.0f}"),
    }
    return ExplainResult("train", prompt, source, rows, facts, numbers, images, tokens)
