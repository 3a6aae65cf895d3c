"""bf16 vs fp32 training steps on CPU: step time, achieved GFLOP/s and the loss curve, per precision mode.

    .venv/bin/python bench/bench_precision.py [--steps 100] [--warmup 5] [--modes fp32 autocast bf16] [--sizes tiny 13m]
                                              [--sample-repeats 3]

Models (train mode, seed 0), rectified-flow training loss (models/diffusion/rflow.py), AdamW(lr 1e-3):
  tiny  STDiT-Tiny as configs/local.yaml builds it: 2x2x2 patches, latent (4, 8, 8, 8), 64-wide text x 16 tokens,
        batch 16
  13m   hidden 384, depth 4, 6 heads, latent (4, 8, 16, 16) = 512 tokens, 64-wide text x 16 tokens, batch 4
Modes (tasks/train/precision.py): fp32; autocast = torch.autocast("cpu", bfloat16) around forward and
backward; bf16 = a bf16 working copy of the model, weights cast once per step, fp32 master weights
and AdamW state. Every mode starts from the same weights and sees the same batch stream (batch i
is drawn from a generator seeded with i), so the loss curves are comparable step by step. Steps
are interleaved across modes (step i of every mode, then step i+1), so a load change on a shared
machine hits all of them; the time is the median over the steps after --warmup.
FLOPs of one fp32 fwd+bwd step are counted by torch.utils.flop_counter.FlopCounterMode (matmuls,
convolutions and attention; elementwise ops are not counted), and the achieved rate is given as a
fraction of this machine's fp32 and bf16 2048x2048 matmul rates (bench/machine.py).
Sampling (scheduler.sample_precision): the local preset's evaluation batch (24 prompts, cfg, so 48
rows a step; rectified flow, 50 Euler steps) plus the tiny VAE's decode, fp32 against autocast bf16,
interleaved, random weights (the time does not depend on them; whether trained samples score the
same is measured on trained models, README). Results go to bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from machine import describe, matmul_rates  # noqa: E402
from soraflow.models.diffusion.rflow import RFlow  # noqa: E402
from soraflow.models.stdit import build_stdit  # noqa: E402
from soraflow.tasks.train.precision import Precision  # noqa: E402

SIZES = {
    "tiny": dict(
        preset="STDiT-Tiny",
        kwargs=dict(
            input_size=[8, 8, 8], patch_size=[2, 2, 2], caption_channels=64, model_max_length=16, pred_sigma=False
        ),
        batch=16,
        latent=(4, 8, 8, 8),
    ),
    "13m": dict(
        preset="STDiT-S/2",
        kwargs=dict(
            depth=4,
            hidden_size=384,
            num_heads=6,
            input_size=[8, 16, 16],
            caption_channels=64,
            model_max_length=16,
            pred_sigma=False,
        ),
        batch=4,
        latent=(4, 8, 16, 16),
    ),
}


def batch_for(i: int, size: dict) -> dict:
    """Batch i of the fixed stream: latents, text features + mask, rflow times and noise."""
    g = torch.Generator().manual_seed(1000 + i)
    b, (c, t, h, w) = size["batch"], size["latent"]
    L, ct = size["kwargs"]["model_max_length"], size["kwargs"]["caption_channels"]
    mask = torch.ones(b, L, dtype=torch.long)
    mask[:, L // 2 + i % (L // 2) :] = 0  # captions of varying length
    return {"x0": torch.randn(b, c, t, h, w, generator=g), "y": torch.randn(b, 1, L, ct, generator=g), "mask": mask,
            "t": torch.sigmoid(torch.randn(b, generator=g)) * 1000, "noise": torch.randn(b, c, t, h, w, generator=g)}


def make_runner(size: dict, mode: str):
    torch.manual_seed(0)
    model = build_stdit(size["preset"], **size["kwargs"]).train()
    model.y_embedder.uncond_prob = 0.0  # no random caption dropout: every mode sees the same inputs
    prec = Precision(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = RFlow()

    def step(batch: dict) -> float:
        opt.zero_grad(set_to_none=True)
        with prec.step() as m:
            loss = scheduler.training_loss(
                m, batch["x0"], {"y": batch["y"], "mask": batch["mask"]}, t=batch["t"], noise=batch["noise"]
            )["loss"].mean()
            loss.backward()
        opt.step()
        return float(loss.detach())

    return model, step


def count_flops(size: dict) -> int:
    model, step = make_runner(size, "fp32")
    with FlopCounterMode(display=False) as counter:
        step(batch_for(0, size))
    return counter.get_total_flops()


def run_size(name: str, size: dict, modes: list[str], steps: int, warmup: int, machine: dict) -> dict:
    runners = {m: make_runner(size, m) for m in modes}
    params = sum(p.numel() for p in runners[modes[0]][0].parameters())
    flops = count_flops(size)
    times = {m: [] for m in modes}
    losses = {m: [] for m in modes}
    for i in range(steps):
        batch = batch_for(i, size)
        for m in modes:
            t0 = time.perf_counter()
            losses[m].append(runners[m][1](batch))
            times[m].append(time.perf_counter() - t0)
    res = {
        "size": name,
        "params_M": round(params / 1e6, 2),
        "batch": size["batch"],
        "tokens": runners[modes[0]][0].num_temporal * runners[modes[0]][0].num_spatial,
        "gflop_per_step": round(flops / 1e9, 2),
        "modes": {},
    }
    base = statistics.median(times["fp32"][warmup:]) if "fp32" in modes else None
    for m in modes:
        med = statistics.median(times[m][warmup:])
        gflops = flops / med / 1e9
        tail = losses[m][-10:]
        res["modes"][m] = {
            "step_ms": round(med * 1e3, 1),
            "speedup_vs_fp32": round(base / med, 2) if base else None,
            "gflops": round(gflops, 1),
            "of_fp32_matmul": round(gflops / machine["fp32_gflops"], 2),
            "of_bf16_matmul": round(gflops / machine["bf16_gflops"], 2),
            "loss_first": round(losses[m][0], 4),
            "loss_last10_mean": round(sum(tail) / len(tail), 4),
            "max_abs_loss_diff_vs_fp32": (
                round(max(abs(a - b) for a, b in zip(losses[m], losses["fp32"])), 4) if "fp32" in modes else None
            ),
            "losses": [round(v, 5) for v in losses[m]],
        }
    return res


def run_sampling(repeats: int, prompts: int = 24, steps: int = 50) -> dict:
    """Median seconds of one evaluation batch (denoise + decode) per sampling precision."""
    from soraflow.configs.loader import load_config
    from soraflow.models.text_to_video import TextToVideo
    from soraflow.models.vae import VideoVAE, build_tiny_vae

    cfg = load_config("local", {})
    size = SIZES["tiny"]
    torch.manual_seed(0)
    stdit = build_stdit(size["preset"], **size["kwargs"]).eval()
    vae = VideoVAE(build_tiny_vae(**cfg.vae.tiny.model_dump(), seed=0).eval())
    s = cfg.scheduler
    scheduler = RFlow(num_sampling_steps=steps, cfg_scale=s.cfg_scale, shift=s.shift)

    class TextStub:  # the sampler only needs y and mask; T5 time is not part of the comparison
        def encode(self, texts):
            g = torch.Generator().manual_seed(len(texts))
            return {
                "y": torch.randn(len(texts), 1, 16, 64, generator=g),
                "mask": torch.ones(len(texts), 16, dtype=torch.long),
            }

    pipe = TextToVideo(stdit, vae, TextStub(), scheduler, cfg.video.num_frames, tuple(cfg.video.image_size))
    times, videos = {"fp32": [], "bf16": []}, {}
    for _ in range(repeats + 1):  # the first round warms up
        for precision in times:
            pipe.precision = precision
            t0 = time.perf_counter()
            videos[precision] = pipe(["p"] * prompts, steps=steps, seed=0)  # (B, 3, T, H, W)
            times[precision].append(time.perf_counter() - t0)
    fp32, bf16 = statistics.median(times["fp32"][1:]), statistics.median(times["bf16"][1:])
    return {
        "prompts": prompts,
        "rows_per_step": 2 * prompts,
        "steps": steps,
        "fp32_s": round(fp32, 2),
        "bf16_s": round(bf16, 2),
        "speedup": round(fp32 / bf16, 2),
        "max_abs_pixel_diff": round(float((videos["fp32"] - videos["bf16"]).abs().max()), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["fp32", "autocast", "bf16"])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, = the cores)")
    ap.add_argument(
        "--sample-repeats", type=int, default=3, help="timed rounds of the sampling comparison (0: skip it)"
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "precision.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a machine shared with other jobs, fewer threads can win
    if "fp32" not in args.modes:
        args.modes = ["fp32", *args.modes]  # the baseline of every ratio
    machine = matmul_rates()
    print(describe(machine))
    results = [
        run_size(n, SIZES[n], args.modes, args.steps, min(args.warmup, args.steps - 1), machine) for n in args.sizes
    ]
    print(
        f"\n{'size':<6}{'params':>8}{'GFLOP/step':>11} {'mode':<9}{'step ms':>9}{'vs fp32':>8}"
        f"{'GFLOP/s':>9}{'of fp32':>8}{'of bf16':>8}"
        f"{'loss[0]':>9}{'loss last10':>12}{'max |dloss|':>12}"
    )
    for r in results:
        for m, v in r["modes"].items():
            print(
                f"{r['size']:<6}{r['params_M']:>7.1f}M{r['gflop_per_step']:>11.2f} {m:<9}{v['step_ms']:>9.1f}"
                f"{v['speedup_vs_fp32']:>7.2f}x"
                f"{v['gflops']:>9.1f}{v['of_fp32_matmul']:>8.2f}{v['of_bf16_matmul']:>8.2f}{v['loss_first']:>9.4f}"
                f"{v['loss_last10_mean']:>12.4f}{v['max_abs_loss_diff_vs_fp32']:>12.4f}"
            )
    sampling = run_sampling(args.sample_repeats) if args.sample_repeats > 0 else None
    if sampling:
        print(
            f"\nsampling {sampling['prompts']} prompts x {sampling['steps']} Euler steps + decode: "
            f"fp32 {sampling['fp32_s']} s, bf16 {sampling['bf16_s']} s ({sampling['speedup']}x; "
            f"max pixel difference {sampling['max_abs_pixel_diff']} on [-1, 1])"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "bf16 vs fp32 training step",
                "machine": machine,
                "steps": args.steps,
                "warmup": args.warmup,
                "results": results,
                "sampling": sampling,
                "command": "python bench/bench_precision.py " + " ".join(sys.argv[1:]),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
