"""Training throughput with and without the latent cache and batch threads, same data, same tiny model, in process.

    .venv/bin/python bench/bench_train.py [--clips 24] [--steps 40] [--batch 16]

Both runs use Ray Train's local mode (train.num_workers=0) on one set of synthetic clips
(coloured shapes, 16 frames at 32x32) and the local preset's tiny models; the VAE is fitted
once and shared. "cache" encodes every clip and caption once before training (time shown
separately); "online" decodes the mp4 and runs the VAE and T5 in every step, as Open-Sora
v1.0 does. Both split each batch over the local preset's train.batch_threads; "cache, 1 batch
thread" is the cache run with one batch on all torch threads instead. Prints a table and
writes bench/results/train.json.

Achieved rate: the FLOPs of one STDiT fwd+bwd step at this batch are counted once with
torch.utils.flop_counter (matmuls, convolutions, attention; bench/machine.py), divided by the
batch, times the measured samples/s. It is given as a fraction of this machine's own fp32 and bf16
2048x2048 matmul rates (measured at the start), so a figure from another machine compares.
In "online" mode the VAE and T5 run too; their FLOPs are not counted, so its fraction is a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))  # the synthetic clip writer the tests use

from machine import achieved, count_flops, describe, matmul_rates  # noqa: E402  (bench/ is sys.path[0])
from soraflow.configs.loader import load_config  # noqa: E402
from soraflow.storage.data.holdout import DatasetSplit  # noqa: E402
from soraflow.storage.layout import DataRoot  # noqa: E402
from training_data import make_clip_manifest  # noqa: E402


def stdit_step_flops(cfg, root, vae_dir, batch: int) -> int:
    """FLOPs of one training step's STDiT fwd+bwd at `batch`: the model the trainer builds, random inputs."""
    from soraflow.storage.model_parts import (
        build_model,
        latent_size,
        load_text_encoder,
        load_vae,
        scheduler_for,
        stdit_kwargs,
    )

    vae, _ = load_vae(cfg, root, vae_dir)
    te = load_text_encoder(cfg, root)
    c, t, h, w = latent_size(cfg, vae)
    model = build_model(cfg, stdit_kwargs(cfg, (c, t, h, w), te.output_dim)).train()
    L = cfg.text_encoder.max_length
    x0, y = torch.randn(batch, c, t, h, w), torch.randn(batch, 1, L, te.output_dim)
    scheduler = scheduler_for(cfg)
    step = (
        lambda: scheduler.training_loss(model, x0, {"y": y, "mask": torch.ones(batch, L, dtype=torch.long)})["loss"]
        .mean()
        .backward()
    )  # noqa: E731
    return count_flops(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from soraflow.tasks.train.driver import train
    from soraflow.tasks.train.vae_fit import fit_vae

    machine = matmul_rates()
    print(describe(machine))

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = DataRoot(Path(tmp) / "data")
        manifest = make_clip_manifest(Path(tmp) / "videos", root, n=args.clips, frames=16)
        base = {"data.root": str(root.root), "train.steps": args.steps, "train.batch_size": args.batch,
                "train.num_workers": 0, "train.log_every": 10, "train.ckpt_every": args.steps, "vae.fit.steps": 50}
        cfg = load_config("local", base)
        split = DatasetSplit.read(manifest, cfg.train.val_fraction)
        vae = fit_vae(cfg, split, root, progress=False)
        flops_per_sample = stdit_step_flops(cfg, root, vae.path, args.batch) / args.batch
        rows = []
        modes = (
            ("cache", {}),
            ("cache, 1 batch thread", {"train.batch_threads": 1}),
            ("online", {"train.use_latent_cache": False}),
        )
        for mode, extra in modes:
            cfg = load_config("local", {**base, **extra})
            t = time.perf_counter()
            result = train(cfg, split, root, run_name=f"bench-{len(rows)}", vae_dir=vae.path)
            m = result.metrics
            rows.append({
                "mode": mode,
                "batch_threads": cfg.train.batch_threads,
                "samples_per_s": round(m["samples_per_s"], 2),
                "fit_s": round(m["fit_s"], 1),
                "latent_cache_s": round(m.get("latent_cache_s", 0.0), 1),
                "total_s": round(time.perf_counter() - t, 1),
                "steps": m["steps"],
                "final_loss": round(m["final_loss"], 4),
                **{f"stdit_{k}": v for k, v in achieved(flops_per_sample * m["samples_per_s"], 1.0, machine).items()},
            })
    speedup = rows[0]["samples_per_s"] / rows[2]["samples_per_s"]
    threads_speedup = rows[0]["samples_per_s"] / rows[1]["samples_per_s"]
    print(f"\ntraining throughput, {cfg.model.preset}, {args.clips} clips of 16 frames at 32x32, batch {args.batch}, "
          f"{args.steps} steps, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"STDiT fwd+bwd: {flops_per_sample / 1e9:.3f} GFLOP per sample (flop counter)")
    print(
        f"{'mode':<24}{'samples/s':>11}{'train s':>9}{'cache s':>9}{'total s':>9}{'final loss':>12}"
        f"{'GFLOP/s':>9}{'of fp32':>8}{'of bf16':>8}"
    )
    for r in rows:
        print(
            f"{r['mode']:<24}{r['samples_per_s']:>11.1f}{r['fit_s']:>9.1f}{r['latent_cache_s']:>9.1f}"
            f"{r['total_s']:>9.1f}{r['final_loss']:>12.4f}"
            f"{r['stdit_gflops']:>9.1f}{r['stdit_of_fp32_matmul']:>8.2f}{r['stdit_of_bf16_matmul']:>8.2f}"
        )
    print(
        f"latent cache speed-up: {speedup:.2f}x; "
        f"{rows[0]['batch_threads']} batch threads against 1: {threads_speedup:.2f}x"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "train throughput with and without the latent cache",
                "preset": cfg.model.preset,
                "clips": args.clips,
                "frames": 16,
                "image_size": [32, 32],
                "batch_size": args.batch,
                "steps": args.steps,
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "arch": platform.machine(),
                "results": rows,
                "speedup": round(speedup, 2),
                "batch_threads_speedup": round(threads_speedup, 2),
                "machine": machine,
                "stdit_gflop_per_sample": round(flops_per_sample / 1e9, 4),
                "command": "python bench/bench_train.py " + " ".join(sys.argv[1:]),
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
