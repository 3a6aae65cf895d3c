"""Test videos with known scene cuts: moving coloured shapes, hard cuts between scenes.

Each scene has its own background brightness (adjacent scenes differ by at least 90 grey
levels, because PySceneDetect's ContentDetector misses cuts that change only the hue) and
its own shape, colour and direction of motion. The generator returns the frame index of
every cut, so a test can compare detected cuts with the truth frame for frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from soraflow.storage.data.video_io import write_video

# Background grey levels; consecutive entries differ by >= 90, so any two adjacent scenes do.
_BRIGHTNESS = (30, 200, 90, 235, 60, 170)
_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 200, 30), (200, 50, 200), (30, 200, 210))


@dataclass(frozen=True)
class SceneVideo:
    path: Path
    fps: float
    scene_frames: tuple[int, ...]  # frames per scene, in order
    brightness: tuple[int, ...]  # background grey level of each scene
    height: int
    width: int

    @property
    def cuts(self) -> list[int]:
        """Frame index of the first frame of every scene after the first."""
        return [int(c) for c in np.cumsum(self.scene_frames)[:-1]]

    @property
    def starts(self) -> list[int]:
        return [0, *self.cuts]

    @property
    def num_frames(self) -> int:
        return int(sum(self.scene_frames))


def scene_frames_for(seconds: list[float], fps: float) -> list[int]:
    return [int(round(s * fps)) for s in seconds]


def render_scenes(
    scene_frames: list[int],
    height: int = 64,
    width: int = 96,
    speed: float = 1.5,
    seed: int = 0,
    brightness: tuple[int, ...] = _BRIGHTNESS,
) -> tuple[np.ndarray, list[int]]:
    """(T, H, W, 3) uint8 frames, T = sum(scene_frames), and each scene's background level.

    In scene k a filled square (even k) or disc (odd k) of colour _COLOURS[k] moves in a
    seeded direction at `speed` pixels per frame, bouncing off the borders.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames, levels = [], []
    for k, n in enumerate(scene_frames):
        level = brightness[k % len(brightness)]
        levels.append(level)
        colour = np.array(_COLOURS[(k + seed) % len(_COLOURS)], dtype=np.uint8)
        if abs(float(colour @ (0.299, 0.587, 0.114)) - level) < 60:
            colour = 255 - colour  # keep the shape visible in luminance (optical flow uses grey frames)
        r = max(3, min(height, width) // 6)
        y0, x0 = rng.uniform(r, height - r), rng.uniform(r, width - r)
        angle = rng.uniform(0, 2 * np.pi)
        vy, vx = speed * np.sin(angle), speed * np.cos(angle)
        for t in range(n):
            # Bounce: reflect the unbounded position into [r, size - r].
            cy = _bounce(y0 + vy * t, r, height - r)
            cx = _bounce(x0 + vx * t, r, width - r)
            frame = np.full((height, width, 3), level, dtype=np.uint8)
            if k % 2 == 0:
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            frame[mask] = colour
            frames.append(frame)
    return np.stack(frames), levels


def _bounce(p: float, lo: float, hi: float) -> float:
    span = hi - lo
    if span <= 0:
        return lo
    q = (p - lo) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


def make_scene_video(
    path: str | Path,
    scene_seconds: list[float],
    fps: float = 24.0,
    height: int = 64,
    width: int = 96,
    speed: float = 1.5,
    seed: int = 0,
) -> SceneVideo:
    """Write an H.264 mp4 whose scenes last `scene_seconds` (rounded to whole frames)."""
    frames_per_scene = scene_frames_for(scene_seconds, fps)
    frames, levels = render_scenes(frames_per_scene, height, width, speed, seed)
    write_video(path, frames, fps)
    return SceneVideo(Path(path), fps, tuple(frames_per_scene), tuple(levels), height, width)


def make_static_video(
    path: str | Path, num_frames: int = 24, fps: float = 24.0, height: int = 64, width: int = 96
) -> Path:
    """One scene, nothing moves: a grey frame with a fixed square."""
    frames, _ = render_scenes([num_frames], height, width, speed=0.0, seed=3)
    write_video(path, frames, fps)
    return Path(path)


def make_panning_video(
    path: str | Path,
    px_per_frame: float,
    num_frames: int = 31,
    height: int = 160,
    width: int = 288,
    fps: float = 24.0,
    seed: int = 0,
) -> Path:
    """A smooth random texture sliding left by `px_per_frame` pixels per frame (a camera pan)."""
    import cv2

    rng = np.random.default_rng(seed)
    pad = int(abs(px_per_frame) * num_frames) + 8
    big = cv2.GaussianBlur((rng.random((height, width + 2 * pad)) * 255).astype(np.uint8), (0, 0), 3)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX)
    frames = []
    for t in range(num_frames):
        shift = np.float32([[1, 0, -px_per_frame * t], [0, 1, 0]])
        moved = cv2.warpAffine(big, shift, (big.shape[1], height), flags=cv2.INTER_LINEAR)
        frames.append(np.repeat(moved[:, pad : pad + width, None], 3, axis=2))
    write_video(path, np.stack(frames), fps)
    return Path(path)
