"""Prompt adherence against training steps: how long the local preset has to train.

    .venv/bin/soraflow ingest --config local --root /tmp/sf/data      # once: the sample manifest
    .venv/bin/python bench/bench_adherence.py --manifest <manifest.parquet> --root /tmp/sf/data \
        [--steps 300,600,900,1200] [--train-prompts] [--set key=value ...]

Trains one run of the local preset (Ray Train workers as configured) up to each step count in
turn, resuming from the previous one (the learning rate is constant, so this is the same run as
training straight through), and evaluates the EMA weights after each: validation loss and prompt
adherence per attribute on the held-out prompts. Prints a table and writes
bench/results/adherence.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from soraflow.configs.loader import load_config, parse_override  # noqa: E402
from soraflow.storage.layout import DataRoot  # noqa: E402

ATTRS = ("color", "shape", "direction", "all")


def score_training_captions(cfg, split, model_dir, root) -> dict:
    """Adherence of a model folder on the first eval.num_prompts distinct *training* captions
    (eval.samples_per_prompt seeds each), scored as evaluation scores held-out prompts."""
    from soraflow.storage.data.dataset import VideoClipDataset
    from soraflow.tasks.eval_scorers import run_scorers
    from soraflow.tasks.evaluate import sample_prompts
    from soraflow.storage.registry.model_folder import load_pipeline

    pipe, _ = load_pipeline(cfg, root, ckpt=model_dir)
    v = cfg.video
    clips = lambda rows: VideoClipDataset(
        rows, v.num_frames, v.frame_interval, tuple(v.image_size), train=False
    )  # noqa: E731
    _, prompts, frames, _ = sample_prompts(cfg, pipe, split.train)
    return run_scorers(cfg, pipe, frames, prompts, clips(split.val), lambda: clips(split.train)).metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, help="an ingest output (e.g. soraflow ingest --config local)")
    ap.add_argument("--root", required=True, help="the data root the manifest was written under")
    ap.add_argument("--config", default="local")
    ap.add_argument("--steps", default="300,600,900,1200", help="comma-separated step counts to evaluate at")
    ap.add_argument("--run-name", default="bench-adherence")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument(
        "--train-prompts",
        action="store_true",
        help="also score the model on captions it trained on (as many prompts and seeds): "
        "not learnt vs not generalised",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "adherence.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from soraflow.storage.data.holdout import DatasetSplit
    from soraflow.tasks.evaluate import evaluate
    from soraflow.tasks.train.driver import train
    from soraflow.tasks.train.vae_fit import fit_vae

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    overrides = dict(parse_override(kv) for kv in args.overrides)  # values parsed as YAML, as the CLI's --set
    root = DataRoot(args.root)
    cfg = load_config(args.config, {**overrides, "data.root": str(root.root)})
    split = DatasetSplit.read(args.manifest, cfg.train.val_fraction)
    vae = fit_vae(cfg, split, root, progress=True)
    rows, elapsed = [], 0.0
    for n in steps:
        cfg = load_config(args.config, {**overrides, "data.root": str(root.root), "train.steps": n})
        t = time.perf_counter()
        result = train(cfg, split, root, run_name=args.run_name, vae_dir=vae.path)
        elapsed += time.perf_counter() - t
        ev = evaluate(cfg, split, result.model_dir, root, result.run_dir / f"eval-{n}", progress=True)
        m = ev.metrics
        rows.append({"steps": result.metrics["steps"], "train_seconds": round(elapsed, 1),
                     "final_loss": round(result.metrics["final_loss"], 4), "val_loss": round(m["val_loss"], 4),
                     **{a: round(m[f"adherence_{a}"], 3) for a in ATTRS},
                     "samples": m["num_samples"], "grid": str(ev.samples_gif)})
        if args.train_prompts:
            got = score_training_captions(cfg, split, result.model_dir, root)
            rows[-1]["on_training_captions"] = {a: round(got[f"adherence_{a}"], 3) for a in ATTRS}
            print("on training captions: " + " / ".join(f"{a} {got[f'adherence_{a}']:.2f}" for a in ATTRS), flush=True)
    chance = {a: round(m[f"chance_{a}"], 3) for a in ATTRS}
    ceiling = {a: round(m[f"recon_adherence_{a}"], 3) for a in ATTRS}

    cols = ["steps", "train_seconds", "final_loss", "val_loss", *ATTRS]
    print(" | ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>13}" for c in cols))
    print(" | ".join(f"{x:>13}" for x in ["chance", "", "", "", *(chance[a] for a in ATTRS)]))
    print(" | ".join(f"{x:>13}" for x in ["VAE ceiling", "", "", "", *(ceiling[a] for a in ATTRS)]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from machine import (
        matmul_rates,  # bench/ is sys.path[0] when a bench runs as a script
    )
    out.write_text(json.dumps({
        "bench": "adherence", "config": args.config, "overrides": overrides, "manifest": args.manifest,
        "workers": cfg.train.num_workers, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
        "rows": rows, "chance": chance, "vae_ceiling": ceiling,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "matmul_rates": matmul_rates(),  # bench/machine.py: this machine's fp32 / bf16 GFLOP/s
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
