"""Open-Sora's two-script scene cut (v1.1/v1.2 tools/scene_cut), reimplemented for the comparison bench.

    python bench/opensora_scene_cut.py detect IN.csv OUT.csv [--workers 2]
    python bench/opensora_scene_cut.py cut OUT.csv CLIPS_DIR [--workers 2] [--target-fps 30] [--shorter-size 256]
                                       [--min-seconds 1] [--max-seconds 5] [--fps1-timestamps]

What users run today, step for step (written from Open-Sora's documented behaviour, not copied):
  detect  per video: scenedetect.detect(path, AdaptiveDetector(adaptive_threshold=3.0),
          start_in_scene=True); the scenes become a `timestamp` column, a list of
          ('HH:MM:SS.mmm', 'HH:MM:SS.mmm'); one video per worker process. Open-Sora maps rows over
          pandarallel workers; here a multiprocessing Pool of --workers processes does the same
          (pandarallel is not installed here; it forks workers the same way).
  cut     per video (one per worker), per scene: skip it if shorter than --min-seconds, truncate
          it to --max-seconds, then one ffmpeg process:
              ffmpeg -nostdin -y -ss S -i VIDEO -t D [-r FPS] [-vf scale=<shorter side>] -map 0:v OUT.mp4
          (-ss before -i: fast keyframe seek; ffmpeg's default encoder settings, libx264 preset
          medium crf 23, its own threads). A video whose shorter side is already <= --shorter-size
          is not scaled (Open-Sora's rule, from the height/width columns). Clips are named
          <video>_scene-<k>.mp4, k the scene's index among all detected scenes.
Open-Sora v1.1/v1.2 parse the timestamps with FrameTimecode(t, fps=1), which rounds every cut to a
whole second (Open-Sora#567; later releases parse at 1000 fps). By default the times are used
as written (millisecond precision, the later fix), so both sides cut the same scenes;
--fps1-timestamps reproduces the rounding. ffmpeg is the one on PATH.
"""

from __future__ import annotations

import argparse
import ast
import csv
import subprocess
import sys
from multiprocessing import Pool
from pathlib import Path


def timecode(seconds: float) -> str:
    """'HH:MM:SS.mmm', as FrameTimecode.get_timecode() writes it."""
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def seconds_of(tc: str, fps1: bool) -> float:
    h, m, s = tc.split(":")
    t = int(h) * 3600 + int(m) * 60 + float(s)
    return float(round(t)) if fps1 else t  # FrameTimecode(tc, fps=1) keeps whole frames of 1 s


def detect_one(path: str) -> str:
    import logging

    import scenedetect
    from scenedetect import AdaptiveDetector

    logging.getLogger("pyscenedetect").setLevel(logging.WARNING)
    try:
        scenes = scenedetect.detect(path, AdaptiveDetector(adaptive_threshold=3.0), start_in_scene=True)
    except Exception:  # noqa: BLE001 - Open-Sora writes an empty timestamp for a failed video
        return "[]"
    return str([(timecode(a.seconds), timecode(b.seconds)) for a, b in scenes])


def cut_one(job: tuple) -> int:
    """All scenes of one video, one ffmpeg process each; returns the number of clips written."""
    path, stamps, height, width, out_dir, target_fps, shorter, min_s, max_s, fps1 = job
    if shorter is not None and height and width and min(height, width) <= shorter:
        shorter = None  # never upscale
    stem = Path(path).stem
    made = 0
    for k, (a, b) in enumerate(ast.literal_eval(stamps)):
        s, t = seconds_of(a, fps1), seconds_of(b, fps1)
        if min_s is not None and t - s < min_s:
            continue
        duration = t - s if max_s is None else min(max_s, t - s)
        cmd = ["ffmpeg", "-nostdin", "-y", "-ss", str(s), "-i", path, "-t", str(duration)]
        if target_fps is not None:
            cmd += ["-r", str(target_fps)]
        if shorter is not None:
            cmd += ["-vf", f"scale='if(gt(iw,ih),-2,{shorter})':'if(gt(iw,ih),{shorter},-2)'"]
        cmd += ["-map", "0:v", str(Path(out_dir) / f"{stem}_scene-{k}.mp4")]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        made += proc.returncode == 0
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    d = sub.add_parser("detect")
    d.add_argument("inp")
    d.add_argument("out")
    d.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("cut")
    c.add_argument("inp")
    c.add_argument("clips")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--target-fps", type=float, default=30.0)
    c.add_argument("--shorter-size", type=int, default=256)
    c.add_argument("--min-seconds", type=float, default=None)
    c.add_argument("--max-seconds", type=float, default=None)
    c.add_argument("--fps1-timestamps", action="store_true", help="round cuts to whole seconds, as v1.1/v1.2 did")
    args = ap.parse_args()
    with open(args.inp, newline="") as f:
        rows = list(csv.DictReader(f))
    with Pool(args.workers) as pool:
        if args.step == "detect":
            for row, stamps in zip(rows, pool.map(detect_one, [r["path"] for r in rows], chunksize=1)):
                row["timestamp"] = stamps
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            return
        Path(args.clips).mkdir(parents=True, exist_ok=True)
        settings = (args.clips, args.target_fps, args.shorter_size, args.min_seconds, args.max_seconds,
                    args.fps1_timestamps)
        jobs = [(r["path"], r["timestamp"], int(r.get("height") or 0), int(r.get("width") or 0), *settings)
                for r in rows]
        made = sum(pool.map(cut_one, jobs, chunksize=1))
    print(f"{made} clips", file=sys.stderr)


if __name__ == "__main__":
    main()
