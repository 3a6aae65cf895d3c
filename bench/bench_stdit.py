"""STDiT training-step cost on CPU: forward + backward time and peak memory per preset.

    .venv/bin/python bench/bench_stdit.py [--presets STDiT-Tiny STDiT-S/2 STDiT-B/2] [--latent 4 8 8 8] [--batch 2]

Each preset runs in a fresh subprocess (so its memory peak is its own): build the model (train mode,
seed 0), random latent x (B, C, T, H, W), integer timesteps, random text features (B, 1, L, C_text) with
a mask that keeps half the tokens of every other sample, loss = mean(out^2), backward.
  fwd+bwd s     median of --reps timed steps after --warmup untimed ones (grads zeroed between steps)
  peak RSS MiB  resource.getrusage(RUSAGE_SELF).ru_maxrss of that subprocess: the whole process
                (Python + torch + weights + grads + activations); PyTorch has no allocator peak
                statistics for CPU tensors, so this is the OS figure
  base RSS MiB  ru_maxrss right after `import torch`, before the model is built (the fixed cost)
Text width and length are each preset's constructor values unless --caption-channels / --text-len
(Tiny: 64 x 16; the others Open-Sora's T5-XXL 4096 x 120). STDiT-XL/2 (760 M params) needs about
7.5 GiB and ~50 s at the default size on 2 cores; a preset whose weights + grads (+ a third) would not
fit in MemAvailable is skipped before it is built, and --timeout bounds every preset (a preset that runs
past it, or is killed for memory, is reported, not fatal). Results go to bench/results/stdit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESETS = ["STDiT-Tiny", "STDiT-S/2", "STDiT-B/2", "STDiT-XL/2"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def mem_available_mib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def worker(args) -> dict:
    """One preset, in this (fresh) process; prints one JSON line."""
    base = rss_mib()
    import torch
    from soraflow.models.stdit import build_stdit

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    base = max(base, rss_mib())
    kw = {}
    if args.caption_channels:
        kw["caption_channels"] = args.caption_channels
    if args.text_len:
        kw["model_max_length"] = args.text_len
    c, t, h, w = args.latent
    # memory pre-check on the meta device (no allocation): weights + grads in float32, plus a third for
    # activations and the allocator, against what the OS says is available now
    with torch.device("meta"):
        n_params = sum(
            p.numel() for p in build_stdit(args.worker, input_size=[t, h, w], in_channels=c, **kw).parameters()
        )
    need_mib, avail_mib = n_params * 4 * 3 / 2**20, mem_available_mib()
    if avail_mib is not None and need_mib > avail_mib:
        return {"preset": args.worker, "params_M": n_params / 1e6,
                "error": f"skipped: needs ~{need_mib:.0f} MiB, {avail_mib:.0f} MiB available"}
    t0 = time.perf_counter()
    model = build_stdit(args.worker, input_size=[t, h, w], in_channels=c, **kw).train()
    build_s = time.perf_counter() - t0
    cfg = model.config
    b, ln, ct = args.batch, cfg["model_max_length"], cfg["caption_channels"]
    x = torch.randn(b, c, t, h, w)
    ts = torch.randint(0, 1000, (b,))
    y = torch.randn(b, 1, ln, ct)
    mask = torch.ones(b, ln, dtype=torch.long)
    mask[1::2, ln // 2:] = 0

    def step():
        model.zero_grad(set_to_none=True)
        model(x, ts, y, mask).square().mean().backward()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "preset": args.worker,
        "params_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "tokens": model.num_temporal * model.num_spatial,
        "batch": b, "latent": [c, t, h, w], "text": [ln, ct],
        "build_s": build_s, "fwd_bwd_s_median": statistics.median(times), "fwd_bwd_s_all": times,
        "peak_rss_MiB": rss_mib(), "base_rss_MiB": base,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, help="keys of models.stdit.STDIT_PRESETS")
    ap.add_argument("--latent", nargs=4, type=int, default=[4, 8, 8, 8], metavar=("C", "T", "H", "W"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--caption-channels", type=int, default=None)
    ap.add_argument("--text-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per preset before it is reported as timed out")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stdit.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    for preset in args.presets:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            preset,
            "--latent",
            *map(str, args.latent),
            "--batch",
            str(args.batch),
            "--reps",
            str(args.reps),
            "--warmup",
            str(args.warmup),
        ]
        for flag, val in (
            ("--caption-channels", args.caption_channels),
            ("--text-len", args.text_len),
            ("--threads", args.threads),
        ):
            if val:
                cmd += [flag, str(val)]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            row = (
                json.loads(r.stdout.strip().splitlines()[-1])
                if r.returncode == 0
                else {"preset": preset, "error": r.stderr.strip()[-500:] or f"exit {r.returncode} (killed for memory?)"}
            )
        except subprocess.TimeoutExpired:
            row = {"preset": preset, "error": f"timed out after {args.timeout:.0f} s"}
        row["subprocess_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"  {preset}: {'ok' if 'error' not in row else row['error']} ({row['subprocess_wall_s']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    c, t, h, w = args.latent
    print(f"STDiT forward+backward on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"latent (C,T,H,W)=({c},{t},{h},{w}), batch {args.batch}, median of {args.reps} after {args.warmup} warm-up")
    print(
        f"{'preset':<12} {'params M':>9} {'tokens':>7} {'text LxC':>9} {'fwd+bwd s':>10} "
        f"{'peak RSS MiB':>13} {'base RSS MiB':>13}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<12} {r['error'][:80]}")
        else:
            print(f"{r['preset']:<12} {r['params_M']:>9.1f} {r['tokens']:>7} {r['text'][0]:>4}x{r['text'][1]:<4} "
                  f"{r['fwd_bwd_s_median']:>10.3f} {r['peak_rss_MiB']:>13.0f} {r['base_rss_MiB']:>13.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from machine import (
        matmul_rates,  # bench/ is sys.path[0] when a bench runs as a script
    )
    out.write_text(
        json.dumps(
            {
                "what": "STDiT train step (forward + backward, loss mean(out^2)) on CPU; "
                "memory = ru_maxrss of a fresh subprocess per preset",
                "latent": args.latent,
                "batch": args.batch,
                "reps": args.reps,
                "warmup": args.warmup,
                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                "matmul_rates": matmul_rates(),  # bench/machine.py: this machine's fp32 / bf16 GFLOP/s
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
