"""Wall time of the local small-sample flow, per stage, from an empty data root.

    .venv/bin/python bench/bench_local.py [--budget small|default|large] [--root DIR] [--set key=value ...]

Runs `soraflow run local` in this process (its start-up, then the flow) (ephemeral Prefect
server under a fresh PREFECT_HOME unless one is set): sample source -> ingest -> VAE fit ->
latent cache -> Ray Train -> evaluate -> register -> generate. The stage times are the flow's
own (its summary's "wall time (s)"). With no --root, a temporary data root is used and removed,
so every stage does its full work (nothing cached from an earlier run). Prints a table and
writes bench/results/local.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="default", help="small, default or large (flows/local.py BUDGETS)")
    ap.add_argument("--root", default=None, help="data root (default: a fresh temporary folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "local.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-local-"))
    root = Path(args.root) if args.root else tmp / "data"
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import soraflow.flows.cli  # noqa: F401  (the CLI's Prefect defaults: ephemeral server timeout, no telemetry)
    from soraflow.flows.local import local_flow, start_up
    from soraflow.flows.params import RunParams

    try:
        t = time.perf_counter()
        params = RunParams(config="local", overrides=args.overrides, data_root=str(root))
        start_up(params, budget=args.budget)  # as `soraflow run local` does
        summary = local_flow(params, budget=args.budget)
        total = time.perf_counter() - t
    finally:
        if not args.root:
            shutil.rmtree(tmp, ignore_errors=True)

    stages = dict(summary["wall time (s)"])
    accounted = stages.get("ingest", 0) + stages.get("train (all)", 0) + stages.get("generate", 0)
    stages["flow overhead (server, artifacts)"] = round(total - accounted, 1)
    stages["total"] = round(total, 1)
    width = max(map(len, stages))
    print(f"local flow, budget {args.budget!r}, {os.cpu_count()} CPUs")
    print(f"{'stage':<{width}} | seconds")
    for name, sec in stages.items():
        print(f"{name:<{width}} | {sec:7.1f}")
    results = {
        k: summary[k]
        for k in summary
        if k.startswith("adherence") or k in ("clips (ok)", "rejected rows", "training steps", "final loss")
    }
    for k, v in results.items():
        print(f"{k}: {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from machine import (
        matmul_rates,  # bench/ is sys.path[0] when a bench runs as a script
    )
    out.write_text(json.dumps({
        "bench": "local_flow", "budget": args.budget, "overrides": args.overrides, "stages_s": stages,
        "results": {k: str(v) for k, v in results.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "matmul_rates": matmul_rates(),  # bench/machine.py: this machine's fp32 / bf16 GFLOP/s
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
