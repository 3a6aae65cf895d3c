"""Ingest throughput on the loopback sample source: wall time per stage and clips per second.

    .venv/bin/python bench/bench_ingest.py [--hdvg-videos 12] [--pexels-videos 24] [--scenes-per-video 3]
                                           [--shard-size 8] [--max-workers 2] [--no-rerun]

Runs flows.ingest.run_ingest (preset "local", thread task runner) on a fresh data root, with the
sample source's sizes given here (defaults: the local preset's). Rows of the table:
  prefect start  a no-op flow run first: the ephemeral Prefect API server starting (not ingest)
  sample source  generating the synthetic videos (cached per data root) and starting the loopback server
  download       listing the sources and fetching every video (HD-VG: full video -> span file), merged
  split          scene detection, then cutting, resampling to 8 fps, scaling and encoding every clip
  caption        captions from the sources (HD-VG metadata, Pexels page slugs)
  score          Farneback motion score of every clip
  flow total     the whole flow run, with Prefect's own work (task runs, results, artifacts, event)
"rerun" runs the flow again on the same data root (as after a restart): nothing is fetched or
encoded again, but every stage still reads its input and checks its outputs (with the sample
source, HD-VG rows carry the loopback server's URL, whose port changes per run: so the rerun's
manifests, and dataset version, differ from the cold run's and no stage is a Prefect cache hit;
score recomputes every motion score). "true captions"
counts final ok clips whose caption is their scene's planned one. Results go to bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGES = ("sample source", "download", "split", "caption", "score")


def isolate_prefect(verbose: bool) -> None:
    """A throw-away Prefect home (ephemeral API server, result cache) unless a server is configured."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bench-ingest-prefect-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


class StageClock:
    """Wraps the ingest flow's stage functions (module globals of flows.ingest) to time each call."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def install(self, ingest) -> None:
        real_source, real_download, real_mapped = ingest.sample_source, ingest.download_stage, ingest.mapped_stage
        clock = self

        @contextlib.contextmanager
        def sample_source(cfg, root):
            t = time.perf_counter()
            with real_source(cfg, root) as c:
                clock.seconds["sample source"] = time.perf_counter() - t
                yield c

        def download_stage(cfg, root):
            t = time.perf_counter()
            try:
                return real_download(cfg, root)
            finally:
                clock.seconds["download"] = time.perf_counter() - t

        def mapped_stage(stage, manifest, cfg, root):
            t = time.perf_counter()
            try:
                return real_mapped(stage, manifest, cfg, root)
            finally:
                clock.seconds[stage] = time.perf_counter() - t

        ingest.sample_source, ingest.download_stage, ingest.mapped_stage = sample_source, download_stage, mapped_stage


def run_once(label: str, params, clock: StageClock, truth: dict[str, str]) -> tuple[list[dict], dict]:
    from soraflow.flows.ingest import run_ingest
    from soraflow.storage.data.manifest import read_rows

    clock.seconds.clear()
    t = time.perf_counter()
    result = run_ingest(params)
    total = time.perf_counter() - t
    rows_by_stage = {s: read_rows(p) for s, p in result["stage_manifests"].items()}
    final = [r for r in rows_by_stage["score"] if r["status"] == "ok"]
    true = sum(1 for r in final if truth.get(r["clip_id"]) == r["text"])
    out = []
    for stage in STAGES:
        rows = rows_by_stage.get(stage)
        ok = None if rows is None else sum(r["status"] == "ok" for r in rows)
        sec = clock.seconds.get(stage)
        out.append(
            {
                "run": label,
                "stage": stage,
                "seconds": None if sec is None else round(sec, 3),
                "rows": None if rows is None else len(rows),
                "ok": ok,
                "ok_per_s": None if ok is None or not sec else round(ok / sec, 2),
            }
        )
    out.append(
        {
            "run": label,
            "stage": "flow total",
            "seconds": round(total, 3),
            "rows": len(rows_by_stage["score"]),
            "ok": len(final),
            "ok_per_s": round(len(final) / total, 2),
        }
    )
    summary = {
        "run": label,
        "seconds": round(total, 3),
        "clips": len(final),
        "clips_per_s": round(len(final) / total, 3),
        "true_captions": true,
        "rejected": result["rejected"],
        "dataset_version": result["dataset_version"],
    }
    return out, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hdvg-videos", type=int, default=None, help="HD-VG videos (default: the local preset's)")
    ap.add_argument(
        "--pexels-videos", type=int, default=None, help="Pexels videos, one scene each (default: the local preset's)"
    )
    ap.add_argument(
        "--scenes-per-video", type=int, default=None, help="scenes per HD-VG video (default: the local preset's)"
    )
    ap.add_argument("--scene-seconds", type=float, default=None, help="seconds per scene (default: the local preset's)")
    ap.add_argument("--shard-size", type=int, default=None, help="rows per Prefect task (default: the local preset's)")
    ap.add_argument("--max-workers", type=int, default=None, help="task runner threads (default: the local preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rerun", action="store_true", help="skip the second run on the same data root")
    ap.add_argument("--keep", action="store_true", help="keep the data root (its path is printed)")
    ap.add_argument("--verbose", action="store_true", help="Prefect's INFO logs")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.json"))
    args = ap.parse_args()

    isolate_prefect(args.verbose)
    import prefect
    import soraflow.flows.ingest as ingest
    from prefect import flow
    from soraflow.flows.params import RunParams

    if not args.verbose:  # PySceneDetect logs a line per video at INFO (its import sets the level: import it first)
        import scenedetect  # noqa: F401

        logging.getLogger("pyscenedetect").setLevel(logging.WARNING)
    from soraflow.tasks.sample_world.server import SampleServer

    overrides = [f"ingest.sample_source.seed={args.seed}"]
    for key, value in (
        ("sample_source.hdvg_videos", args.hdvg_videos),
        ("sample_source.pexels_videos", args.pexels_videos),
        ("sample_source.scenes_per_video", args.scenes_per_video),
        ("sample_source.scene_seconds", args.scene_seconds),
        ("shard_size", args.shard_size),
        ("max_workers", args.max_workers),
    ):
        if value is not None:
            overrides.append(f"ingest.{key}={value}")
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    params = RunParams(config="local", overrides=overrides, data_root=str(work / "data"))
    cfg = params.load_config()
    src = cfg.ingest.sample_source
    truth = SampleServer(work / "unused", src).truth()  # the plan only: nothing is generated or served
    load_before = os.getloadavg()

    @flow(name="bench-noop")
    def noop() -> int:
        return 0

    t = time.perf_counter()
    noop()
    prefect_start = time.perf_counter() - t

    clock = StageClock()
    clock.install(ingest)
    results, summaries = [], []
    try:
        for label in ("cold", *(() if args.no_rerun else ("rerun",))):
            rows, summary = run_once(label, params, clock, truth)
            results += rows
            summaries.append(summary)
    finally:
        if args.keep:
            print(f"data root kept: {work / 'data'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    scenes = src.hdvg_videos * src.scenes_per_video + src.pexels_videos
    print(
        f"\ningest on the sample source: {src.hdvg_videos} HD-VG videos x {src.scenes_per_video} scenes "
        f"+ {src.pexels_videos} Pexels videos = {scenes} scenes of {src.scene_seconds:g} s "
        f"at {src.width}x{src.height} {src.fps:g} fps -> clips at {cfg.ingest.split.fps:g} fps, "
        f"short side {cfg.ingest.split.short_side}"
    )
    print(f"shard size {cfg.ingest.shard_size}, {cfg.ingest.max_workers} threads, {os.cpu_count()} CPU cores, "
          f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after, prefect {prefect.__version__}")
    print(f"prefect start (no-op flow): {prefect_start:.1f} s\n")
    def cell(v, width: int, spec: str) -> str:
        return f"{'-' if v is None else format(v, spec):>{width}}"

    print(f"{'run':<6} {'stage':<14} {'time s':>7} {'rows':>5} {'ok':>5} {'ok/s':>7}")
    for r in results:
        print(
            f"{r['run']:<6} {r['stage']:<14} {cell(r['seconds'], 7, '.2f')} {cell(r['rows'], 5, 'd')} "
            f"{cell(r['ok'], 5, 'd')} {cell(r['ok_per_s'], 7, '.1f')}"
        )
    for s in summaries:
        print(
            f"{s['run']}: {s['clips']} clips in {s['seconds']:.1f} s = {s['clips_per_s']:.2f} clips/s; "
            f"true captions {s['true_captions']}/{s['clips']}; rejected {s['rejected']}; "
            f"dataset version {s['dataset_version']}"
        )

    from machine import (
        matmul_rates,  # bench/ is sys.path[0] when a bench runs as a script
    )
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "sample_source": src.model_dump(),
        "split": cfg.ingest.split.model_dump(),
        "shard_size": cfg.ingest.shard_size,
        "max_workers": cfg.ingest.max_workers,
        "scenes": scenes,
        "prefect_start_s": round(prefect_start, 3),
        "command": "python bench/bench_ingest.py " + " ".join(sys.argv[1:]),
        "matmul_rates": matmul_rates(),  # bench/machine.py: this machine's fp32 / bf16 GFLOP/s
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"benchmark": "ingest flow on the sample source", "meta": meta, "results": results, "runs": summaries},
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
