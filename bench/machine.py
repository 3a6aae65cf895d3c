"""This machine's own matmul rates, so a speed figure from one machine can be compared with another's.

    .venv/bin/python bench/machine.py

`matmul_rates()` times a 2048x2048 @ 2048x2048 torch matmul (2 * 2048^3 FLOPs) in fp32 and in
bf16, a few repeats each, interleaved, and returns the median GFLOP/s of each with the thread
count and CPU name. Every bench writes it into its JSON ("machine") and states achieved rates as
a fraction of it: on a CPU with AVX512-BF16 / AMX the bf16 rate is several times the fp32 one.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The bf16-relevant ISA flags of this CPU (avx512_bf16, amx_bf16, ...), as /proc/cpuinfo lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})


def matmul_rates(n: int = 2048, repeats: int = 5) -> dict:
    """{"fp32_gflops", "bf16_gflops", ...}: median GFLOP/s of an n x n matmul in each dtype."""
    flops = 2.0 * n**3
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    mats = {"fp32": (a32, b32), "bf16": (a32.bfloat16(), b32.bfloat16())}
    times: dict[str, list[float]] = {k: [] for k in mats}
    with torch.inference_mode():
        for a, b in mats.values():  # warm-up: oneDNN / BLAS kernel selection and thread pool start
            torch.mm(a, b)
        for _ in range(repeats):
            for k, (a, b) in mats.items():  # interleaved, so a load change on a shared machine hits both
                t = time.perf_counter()
                torch.mm(a, b)
                times[k].append(time.perf_counter() - t)
    rates = {f"{k}_gflops": round(flops / statistics.median(v) / 1e9, 1) for k, v in times.items()}
    return {
        **rates,
        "bf16_over_fp32": round(rates["bf16_gflops"] / rates["fp32_gflops"], 2),
        "matmul": f"{n}x{n}, median of {repeats}",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def describe(m: dict) -> str:
    """One line for a bench's printed header."""
    return (f"machine: {m['cpu']}, {m['torch_threads']} torch threads; matmul {m['matmul']}: "
            f"fp32 {m['fp32_gflops']:.0f} GFLOP/s, bf16 {m['bf16_gflops']:.0f} GFLOP/s ({m['bf16_over_fp32']:.1f}x)")


if __name__ == "__main__":
    print(describe(matmul_rates()))


def count_flops(fn) -> int:
    """FLOPs of one call of fn() as torch.utils.flop_counter counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def achieved(flops: float, seconds: float, machine: dict) -> dict:
    """An achieved rate and its fraction of this machine's fp32 and bf16 matmul rates."""
    gflops = flops / seconds / 1e9
    return {"gflops": round(gflops, 1), "of_fp32_matmul": round(gflops / machine["fp32_gflops"], 3),
            "of_bf16_matmul": round(gflops / machine["bf16_gflops"], 3)}
