"""Ingest and training as the work grows: N source videos, one long video, a 10k-clip latent cache.

    .venv/bin/python bench/bench_scale.py [--sizes 10,100,1000] [--long-minutes 20] [--train-clips 10000]

Every case runs in its own Python process (so its peak RSS, from getrusage of the process and of
its ffmpeg children, is its own), on a fresh data root, with the local preset:
  folder N   N generated videos (64x64, 8 fps, 3 scenes of 2 s: ffmpeg's testsrc2 with a hue
             jump per scene and a hue of its own per video, so none is a duplicate), made by
             ffmpeg 2 at a time before the timed run, in a folder source
  sample N   the loopback sample source with N HD-VG videos of 3 scenes (no Pexels videos)
  long       one video of --long-minutes at 1280x720, 2 fps (LONG_FPS), a hue jump (a new scene)
             every 30 s, a keyframe every 10 s, cheaply encoded (libx264 ultrafast), folder source
  train K    a K-clip latent cache built by storage.latent_cache.build_latent_cache from K
             manifest rows (over a few short clip files; a pooling "VAE" and a fixed "text
             encoder" stand in for the models, so the cache's own cost is measured), then
             LatentCacheDataset through a DataLoader (batch 32) for a number of samples, and
             VideoClipDataset's construction over the same K rows.
Reported per case: ingest wall time (the flow run, Prefect's server start excluded: a no-op flow
runs first), time per video, the manifest merges' time (every stage's merge_shards, summed), and
peak RSS. Results: bench/results/scale.json and bench/results/scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENES, SCENE_S, FPS, SIDE = 3, 2.0, 8.0, 64  # 16 frames a scene: PySceneDetect keeps no scene under 15
LONG_FPS = 2.0  # frames per second of the long 720p video


def rss_split_mb() -> dict[str, float]:
    """This process's resident memory now, anonymous (heap, tensors) vs file-backed (mmapped
    files such as the latent cache's safetensors shards: page cache the kernel can drop)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[f"{key}_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set size of this process and of its largest waited-for child (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_child_rss_mb": round(kids, 1)}


# ---------------------------------------------------------------- inputs


def make_videos(folder: Path, n: int, seed: int = 0, jobs: int = 2) -> None:
    """n distinct small videos of SCENES scenes, made by ffmpeg processes `jobs` at a time.

    Each is lavfi's testsrc2 (moving patterns) at SIDE x SIDE, FPS, with a hue jump of 120 degrees
    every SCENE_S seconds (a hard cut the content detector sees) and a hue offset of its own, so no
    two files are the same. libx264 ultrafast: making 1000 of them takes about a minute.
    """
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        src = (f"testsrc2=s={SIDE}x{SIDE}:r={FPS:g}:d={SCENES * SCENE_S:g},"
               f"hue=H=floor(t/{SCENE_S:g})*2.0944+{(i * 0.618 + seed) % 6.28:.4f}"
               f":b=if(eq(mod(floor(t/{SCENE_S:g})\\,2)\\,0)\\,-3\\,3)")
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i", src, "-c:v", "libx264",
                        "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(folder / f"v{i:05d}.mp4")], check=True)
        (folder / f"v{i:05d}.txt").write_text(f"moving test patterns, video {i}\n")

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, range(n)))


def make_long_video(path: Path, minutes: float) -> None:
    """720p at LONG_FPS, a hue jump every 30 s (scene changes the content detector sees), a keyframe
    every 10 s, libx264 ultrafast: cheap to encode, and every frame still a 720p decode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    src = f"testsrc2=s=1280x720:r={LONG_FPS:g}:d={minutes * 60:g},hue=H=floor(t/30)*2.0944"
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i", src, "-c:v", "libx264", "-preset",
                    "ultrafast",
                    "-g", str(int(10 * LONG_FPS)), "-pix_fmt", "yuv420p", str(path)], check=True)
    path.with_suffix(".txt").write_text("moving test patterns, a new hue every 30 seconds\n")


# ---------------------------------------------------------------- one case (child process)


def ingest_case(kind: str, n: int, work: Path, minutes: float) -> dict:
    import bench_ingest  # bench/ is sys.path[0]: its Prefect isolation and stage clock

    bench_ingest.isolate_prefect(False)
    import logging

    import scenedetect  # noqa: F401  (its import sets its log level: quiet it after)

    logging.getLogger("pyscenedetect").setLevel(logging.WARNING)
    import soraflow.flows.ingest as ingest
    from prefect import flow
    from soraflow.flows.params import RunParams

    overrides = ["ingest.sample_source.pexels_videos=0", f"ingest.sample_source.scenes_per_video={SCENES}",
                 f"ingest.sample_source.scene_seconds={SCENE_S}", f"ingest.sample_source.hdvg_videos={n}"]
    if kind != "sample":
        folder = work / "videos"
        make_long_video(folder / "long.mp4", minutes) if kind == "long" else make_videos(folder, n)
        overrides = ["ingest.sample_source.enabled=false", f'ingest.sources=[{{"kind": "folder", "path": "{folder}"}}]',
                     "eval.scorers=[]", "eval.metric=val_loss", "eval.higher_is_better=false"]
    params = RunParams(config="local", overrides=overrides, data_root=str(work / "data"))

    @flow(name="bench-noop")
    def noop() -> int:
        return 0

    noop()  # the ephemeral Prefect server starts here, not inside the timed run
    merges = []
    real_merge = ingest.merge_shards

    def merge_shards(*args):
        t = time.perf_counter()
        try:
            return real_merge(*args)
        finally:
            merges.append(time.perf_counter() - t)

    ingest.merge_shards = merge_shards
    clock = bench_ingest.StageClock()
    clock.install(ingest)
    t = time.perf_counter()
    result = ingest.run_ingest(params)
    wall = time.perf_counter() - t
    source_s = clock.seconds.get("sample source", 0.0) if kind == "sample" else 0.0  # rendering the videos
    videos = 1 if kind == "long" else n
    return {"case": kind, "n": videos, "minutes": minutes if kind == "long" else None,
            "wall_s": round(wall - source_s, 2),
            "per_video_s": round((wall - source_s) / videos, 4), "source_render_s": round(source_s, 2),
            "merge_s": round(sum(merges), 3), "stages_s": {k: round(v, 2) for k, v in clock.seconds.items()},
            "clips": result["ok"], "rejected": result["rejected"], "reject_reasons": result["reject_reasons"],
            **peak_rss_mb()}


class PoolVAE:
    """Stands in for the VAE: 4x4 average pooling of the first 4 channels (frame-wise, as v1.0's)."""

    def encode_moments(self, video):
        import torch

        x = torch.nn.functional.avg_pool3d(video, (1, 4, 4))  # (B, 3, T, h, w)
        mean = torch.cat([x, x[:, :1]], 1)  # (B, 4, T, h, w)
        return mean, torch.full_like(mean, 0.1)


class FixedText:
    def encode(self, captions):
        import torch

        n = len(captions)
        return {"y": torch.zeros(n, 1, 16, 32), "mask": torch.ones(n, 16, dtype=torch.int64)}


def train_case(k: int, work: Path, samples: int) -> dict:
    import torch
    from soraflow.storage.data.dataset import VideoClipDataset
    from soraflow.storage.data.latent_cache import LatentCacheDataset, build_latent_cache
    from soraflow.storage.layout import DataRoot
    from soraflow.storage.data.manifest import new_row
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    files = work / "clips"
    make_videos(files, 8, seed=1)
    per = SCENES * int(SCENE_S * FPS)
    rows = [new_row(clip_id=f"c{i:06d}", video_id=f"v{i % 8}", source="bench", path=str(files / f"v{i % 8:05d}.mp4"),
                    text=f"caption {i % 50}", num_frames=per, height=SIDE, width=SIDE, fps=FPS, status="ok")
            for i in range(k)]
    t = time.perf_counter()
    clips = VideoClipDataset(rows, 8, 2, (32, 32))
    dataset_s = time.perf_counter() - t
    rss_dataset = peak_rss_mb()["peak_rss_mb"]
    t = time.perf_counter()
    info = build_latent_cache(rows, DataRoot(work / "data"), PoolVAE(), FixedText(), "pool", "fixed", 8, 2, (32, 32),
                              dataset=f"bench-{k}")
    build_s = time.perf_counter() - t
    rss_build = peak_rss_mb()["peak_rss_mb"]
    ds = LatentCacheDataset(info.path, 8, 2)
    loader = DataLoader(ds, batch_size=32, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    seen, t = 0, time.perf_counter()
    for epoch in range(1 + samples // max(1, len(ds))):
        ds.set_epoch(epoch)
        for batch in loader:
            seen += batch["x0"].shape[0]
            if seen >= samples:
                break
        if seen >= samples:
            break
    load_s = time.perf_counter() - t
    rss_loading = rss_split_mb()  # after reading `samples` items through the cache's DataLoader
    video_seen, t = 0, time.perf_counter()
    for batch in DataLoader(clips, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
        video_seen += batch["video"].shape[0]
        if video_seen >= 256:
            break
    video_s = time.perf_counter() - t
    return {"case": "train", "n": k, "video_dataset_init_s": round(dataset_s, 3),
            "rss_after_video_dataset_mb": rss_dataset,
            "cache_build_s": round(build_s, 2), "rss_after_cache_build_mb": rss_build, "cache_samples": seen,
            "cache_samples_per_s": round(seen / load_s, 1), "video_samples_per_s": round(video_seen / video_s, 1),
            "rss_after_cache_loading": rss_loading, "rss_after_video_loading": rss_split_mb(),
            **peak_rss_mb()}


# ---------------------------------------------------------------- the whole bench (parent process)


def run_case(argv: list[str], timeout: float) -> dict:
    """One case in a fresh process; its last stdout line is its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench case {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out), flush=True)
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, mark in (("folder", "o-"), ("sample", "s-")):
        pts = sorted((r["n"], r["per_video_s"], r["peak_rss_mb"]) for r in results if r["case"] == kind)
        if pts:
            n, per, rss = zip(*pts)
            a.plot(n, per, mark, label=f"{kind} source")
            b.plot(n, rss, mark, label=f"{kind} source")
    for ax, label in ((a, "ingest time per video (s)"), (b, "peak RSS of the ingest process (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("source videos N")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SoraFlow ingest as N grows (local preset, 2 threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="numbers of source videos, comma-separated")
    ap.add_argument("--sources", default="folder,sample", help="which of folder, sample to ingest at each size")
    ap.add_argument("--long-minutes", type=float, default=20.0, help="length of the long 720p video (0: skip it)")
    ap.add_argument("--train-clips", default="10000", help="latent-cache sizes for the training case ('' skips)")
    ap.add_argument("--train-samples", type=int, default=20000, help="samples read from the latent cache per size")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case:
        work = Path(args.work)
        out = train_case(args.n, work, args.train_samples) if args.case == "train" else \
            ingest_case(args.case, args.n, work, args.long_minutes)
        print(json.dumps(out))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    cases = [[kind, n] for n in sizes for kind in args.sources.split(",") if kind]
    if args.long_minutes > 0:
        cases.append(["long", 1])
    cases += [["train", int(k)] for k in args.train_clips.split(",") if k]
    load_before = os.getloadavg()
    results, t0 = [], time.perf_counter()
    for kind, n in cases:
        work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{kind}-{n}-"))
        try:
            argv = ["--case", kind, "--n", str(n), "--work", str(work), "--long-minutes", str(args.long_minutes),
                    "--train-samples", str(args.train_samples)]
            results.append(run_case(argv, timeout=1800))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    from machine import matmul_rates  # bench/ is sys.path[0] when a bench runs as a script

    flat = {}
    for kind in ("folder", "sample"):
        per = {r["n"]: r["per_video_s"] for r in results if r["case"] == kind}
        if len(per) > 1:
            flat[kind] = round(per[max(per)] / per[min(per)], 3)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
            "python": platform.python_version(),
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]},
            "video": {"side": SIDE, "fps": FPS, "scenes": SCENES,
                      "scene_s": SCENE_S}, "bench_s": round(time.perf_counter() - t0, 1),
            "per_video_ratio_largest_to_smallest_n": flat,
            "command": "python bench/bench_scale.py " + " ".join(sys.argv[1:]), "matmul_rates": matmul_rates()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "ingest and training as the work grows", "meta": meta,
                               "results": results}, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"per-video time, largest N / smallest N: {flat}\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
