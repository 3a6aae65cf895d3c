"""Synthetic scenes with known captions: one coloured shape moving in one direction on a plain
background, and the seeded plan of which videos the sample source serves.

Vocabulary (the one place it is defined; tasks/sample_world/adherence.py and the tests read it from here):

    COLORS      red, green, blue, yellow -> RGB
    SHAPES      circle, square, triangle
    DIRECTIONS  left, right, up, down            (image y grows downwards: "up" = y decreases)
    caption     "a red circle moving left"       parse_caption inverts it

Frames are (T, H, W, 3) uint8 RGB. A scene is a SceneSpec: its shape's size is fixed by the
frame (radius ~20% of the short side), its centre starts at `start_xy` (pixel coordinates,
pixel i covers [i - 0.5, i + 0.5]) and moves `speed_px` pixels per frame in `direction`,
staying fully inside the frame (the plan makes it cross about half the frame in a scene).

Cuts: PySceneDetect's ContentDetector weighs hue, saturation and luma equally, so a cut that
changes only the hue can be missed. Consecutive scenes of a video therefore alternate dark and
light backgrounds (luma ~21 vs ~241), and make_video refuses neighbours whose backgrounds are
closer than MIN_CUT_LUMA in luma. Every shape colour differs from both kinds of background
by >= MIN_SHAPE_LUMA in luma (motion scores use grey frames) and clearly in colour.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
from soraflow.storage.data.video_io import write_video

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),  # luma  94
    "green": (40, 190, 60),  # luma 130
    "blue": (50, 90, 230),  # luma  94
    "yellow": (225, 185, 10),  # luma 177
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(product(COLORS, SHAPES, DIRECTIONS))  # 48

# Backgrounds: dark (luma ~21-25) and light (luma ~240); a slight tint varies per scene.
DARK_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((20, 20, 30), (28, 22, 18), (16, 28, 24))
LIGHT_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((242, 242, 235), (236, 240, 246), (246, 240, 232))
MIN_CUT_LUMA = 80.0  # consecutive scenes' backgrounds differ at least this much in luma
MIN_SHAPE_LUMA = 50.0  # every colour vs every background

SIZE_FRACTION = 0.2  # circle radius = this x min(H, W)
# Size of each shape relative to the circle's radius: square half-side, triangle circumradius.
SHAPE_SCALE = {"circle": 1.0, "square": 0.9, "triangle": 1.25}
TRAVEL_FRACTION = 0.5  # a planned scene crosses about this fraction of the frame along its axis

_UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_CAPTION = re.compile(r"[a-z]+")


def luma(rgb) -> float:
    """Rec. 601 luma of an (r, g, b) triple (what a grey conversion sees)."""
    r, g, b = (float(c) for c in rgb)
    return 0.299 * r + 0.587 * g + 0.114 * b


def caption(color: str, shape: str, direction: str) -> str:
    """("red", "circle", "left") -> "a red circle moving left"."""
    if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"caption: unknown attribute in {(color, shape, direction)!r}")
    return f"a {color} {shape} moving {direction}"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(color, shape, direction) named in `text`, or None unless each is named exactly once.

    Case and punctuation do not matter ("A red circle, moving left." parses; so does a Pexels
    slug "a-red-circle-moving-left-1000"); two different colours (etc.) give None.
    """
    if not isinstance(text, str):
        return None
    words = _CAPTION.findall(text.lower())
    found = []
    for vocab in (COLORS, SHAPES, DIRECTIONS):
        hits = {w for w in words if w in vocab}
        if len(hits) != 1:
            return None
        found.append(hits.pop())
    return found[0], found[1], found[2]


@dataclass(frozen=True)
class SceneSpec:
    color: str
    shape: str
    direction: str
    background: tuple[int, int, int]
    n_frames: int
    start_xy: tuple[float, float]  # centre (x, y) at frame 0, pixels
    speed_px: float  # pixels per frame along `direction`; 0 = static

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.direction)


@dataclass(frozen=True)
class VideoPlan:
    video_id: str | int  # hdvg "hdvg0000", pexels int 1000+k, inter4k "1".."N"
    scenes: list[SceneSpec]

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.scenes]

    @property
    def n_frames(self) -> int:
        return sum(s.n_frames for s in self.scenes)


def shape_extent(shape: str, width: int, height: int) -> float:
    """Largest distance (pixels) from the shape's centre to its edge, for a WxH frame."""
    return SIZE_FRACTION * min(width, height) * SHAPE_SCALE[shape]


def _max_extent(width: int, height: int) -> float:
    return max(shape_extent(s, width, height) for s in SHAPES)


def centre_track(spec: SceneSpec, width: int, height: int) -> np.ndarray:
    """(T, 2) float centre (x, y) per frame; clamped so the shape stays fully in frame."""
    e = shape_extent(spec.shape, width, height)
    ux, uy = _UNIT[spec.direction]
    t = np.arange(spec.n_frames, dtype=np.float64)
    x = spec.start_xy[0] + ux * spec.speed_px * t
    y = spec.start_xy[1] + uy * spec.speed_px * t
    # the shape's edge lies within e of the centre, and stays half a pixel off the frame's edge
    # (so the outermost pixel ring stays pure background)
    lo_x, hi_x = e + 0.5, width - 1.5 - e
    lo_y, hi_y = e + 0.5, height - 1.5 - e
    x = np.clip(x, lo_x, max(lo_x, hi_x))
    y = np.clip(y, lo_y, max(lo_y, hi_y))
    return np.stack([x, y], axis=1)


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of pixel centres at offsets (dx, dy) from the centre."""
    if shape == "circle":
        return np.hypot(dx, dy) - size
    if shape == "square":
        qx, qy = np.abs(dx) - size, np.abs(dy) - size
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if shape == "triangle":  # equilateral, apex up, circumradius `size` (inradius size / 2)
        c, s = math.cos(math.pi / 6), 0.5
        planes = np.maximum(np.maximum(dy, c * dx - s * dy), -c * dx - s * dy) - size / 2  # exact inside
        corners = [(0.0, -size), (c * size, s * size), (-c * size, s * size)]
        outside = None
        for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):  # distance to the edges
            ex, ey = bx - ax, by - ay
            t = np.clip(((dx - ax) * ex + (dy - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            d = np.hypot(dx - ax - t * ex, dy - ay - t * ey)
            outside = d if outside is None else np.minimum(outside, d)
        return np.where(planes <= 0, planes, outside)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(spec: SceneSpec, width: int, height: int) -> np.ndarray:
    """(T, H, W, 3) uint8: spec.shape in spec.color moving over spec.background, 1-px anti-aliased edge."""
    if spec.color not in COLORS:
        raise ValueError(f"unknown colour {spec.color!r}; expected one of {tuple(COLORS)}")
    if spec.direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {spec.direction!r}; expected one of {DIRECTIONS}")
    if spec.n_frames < 1:
        raise ValueError(f"a scene needs at least one frame, got n_frames={spec.n_frames}")
    size = shape_extent(spec.shape, width, height)
    track = centre_track(spec, width, height)  # (T, 2)
    bg = np.asarray(spec.background, np.float32)
    fg = np.asarray(COLORS[spec.color], np.float32)
    out = np.empty((spec.n_frames, height, width, 3), np.uint8)
    out[:] = np.asarray(spec.background, np.uint8)
    reach = size + 2.0  # the shape and its anti-aliased edge lie within this box around the centre
    for t, (cx, cy) in enumerate(track):
        x0, x1 = max(0, int(math.floor(cx - reach))), min(width, int(math.ceil(cx + reach)) + 1)
        y0, y1 = max(0, int(math.floor(cy - reach))), min(height, int(math.ceil(cy + reach)) + 1)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # pixel centres of the box
        alpha = np.clip(0.5 - _sdf(spec.shape, xs - cx, ys - cy, size), 0.0, 1.0)[..., None]  # (h, w, 1) coverage
        out[t, y0:y1, x0:x1] = np.rint(bg + (fg - bg) * alpha)
    return out


def scale_spec(spec: SceneSpec, k: float) -> SceneSpec:
    """The same scene for a frame k times larger (positions and speed scale; sizes follow the frame)."""
    x, y = spec.start_xy
    return replace(spec, start_xy=((x + 0.5) * k - 0.5, (y + 0.5) * k - 0.5), speed_px=spec.speed_px * k)


def padding_background(neighbour: tuple[int, int, int]) -> tuple[int, int, int]:
    """A plain background with the opposite brightness to `neighbour` (for padding next to it)."""
    return LIGHT_BACKGROUNDS[0] if luma(neighbour) < 128 else DARK_BACKGROUNDS[0]


def render_video(scenes: list[SceneSpec], width: int, height: int, pad_frames: tuple[int, int] = (0, 0)) -> np.ndarray:
    """All scenes back to back (hard cuts), with optional plain padding frames before and after."""
    if not scenes:
        raise ValueError("a video needs at least one scene")
    for k in range(1, len(scenes)):
        a, b = scenes[k - 1].background, scenes[k].background
        if abs(luma(a) - luma(b)) < MIN_CUT_LUMA:
            raise ValueError(
                f"scenes {k - 1} and {k}: backgrounds {a} and {b} differ by {abs(luma(a) - luma(b)):.0f} in luma "
                f"(< {MIN_CUT_LUMA:.0f}); a scene detector would miss the cut"
            )
    parts = []
    if pad_frames[0] > 0:
        parts.append(
            np.broadcast_to(
                np.array(padding_background(scenes[0].background), np.uint8), (pad_frames[0], height, width, 3)
            )
        )
    parts += [render_scene(s, width, height) for s in scenes]
    if pad_frames[1] > 0:
        parts.append(
            np.broadcast_to(
                np.array(padding_background(scenes[-1].background), np.uint8), (pad_frames[1], height, width, 3)
            )
        )
    return np.concatenate(parts)


def make_video(
    path: str | Path, scenes: list[SceneSpec], width: int, height: int, fps: float, pad_frames: tuple[int, int] = (0, 0)
) -> list[tuple[int, int, str]]:
    """Write the scenes as one mp4 with hard cuts -> [(start_frame, end_frame_exclusive, caption)].

    Frame indices count from the file's first frame; `pad_frames` = (before, after) adds plain
    frames of the opposite brightness around the scenes (they get no entry in the result).
    """
    write_video(path, render_video(scenes, width, height, pad_frames), fps)
    out, start = [], pad_frames[0]
    for s in scenes:
        out.append((start, start + s.n_frames, s.caption))
        start += s.n_frames
    return out


# ---------------------------------------------------------------- the plan

KINDS = ("hdvg", "pexels", "inter4k")


def scene_frames(cfg) -> int:
    return max(2, int(round(cfg.scene_seconds * cfg.fps)))


def _combination(seed: int, index: int) -> tuple[str, str, str]:
    """The index-th combination of one endless stream: each block of 48 is a seeded shuffle of all."""
    cycle, k = divmod(index, len(COMBINATIONS))
    order = np.random.default_rng([seed, 7919, cycle]).permutation(len(COMBINATIONS))
    return COMBINATIONS[int(order[k])]


def _counts(cfg) -> dict[str, tuple[int, int]]:
    """kind -> (videos, scenes per video)."""
    return {
        "hdvg": (cfg.hdvg_videos, cfg.scenes_per_video),
        "pexels": (cfg.pexels_videos, 1),
        "inter4k": (cfg.inter4k_videos, cfg.scenes_per_video),
    }


def _video_id(kind: str, k: int) -> str | int:
    return {"hdvg": f"hdvg{k:04d}", "pexels": 1000 + k, "inter4k": str(k + 1)}[kind]


def _scene(cfg, combo: tuple[str, str, str], background, rng: np.random.Generator) -> SceneSpec:
    color, shape, direction = combo
    w, h = cfg.width, cfg.height
    n = scene_frames(cfg)
    e = _max_extent(w, h)  # plan for the largest shape, so any shape fits the same track
    ux, uy = _UNIT[direction]
    along, across = (w, h) if ux else (h, w)
    free = along - 2 - 2 * e  # the centre may lie in [e + 0.5, along - 1.5 - e] (centre_track)
    travel = max(0.0, min(TRAVEL_FRACTION * along, free - 0.5))
    jitter = rng.uniform(0, max(0.0, free - 0.5 - travel))
    p_along = e + 0.75 + jitter  # starting at the trailing side
    if ux < 0 or uy < 0:
        p_along = along - 1 - p_along
    p_across = rng.uniform(e + 0.75, max(e + 0.75, across - 1.75 - e))
    start = (p_along, p_across) if ux else (p_across, p_along)
    return SceneSpec(
        color,
        shape,
        direction,
        tuple(int(c) for c in background),
        n,
        (float(start[0]), float(start[1])),
        travel / max(1, n - 1),
    )


def plan_videos(cfg, kind: str) -> list[VideoPlan]:
    """The videos of one kind ("hdvg" | "pexels" | "inter4k"), deterministic from cfg.seed.

    hdvg and inter4k videos have cfg.scenes_per_video scenes, pexels videos one. Scenes draw
    (colour, shape, direction) from one seeded stream shared by the kinds in the order hdvg,
    pexels, inter4k, in which every block of 48 holds each combination once: so all scenes
    together (and each kind's own scenes) cover the combinations evenly. Backgrounds alternate
    dark / light within a video; the first scene's alternates from video to video.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    counts = _counts(cfg)
    offset = 0
    for other in KINDS:
        if other == kind:
            break
        offset += counts[other][0] * counts[other][1]
    n_videos, per_video = counts[kind]
    plans = []
    for v in range(n_videos):
        rng = np.random.default_rng([cfg.seed, KINDS.index(kind), v])
        scenes = []
        for k in range(per_video):
            combo = _combination(cfg.seed, offset + v * per_video + k)
            palette = DARK_BACKGROUNDS if (k + v) % 2 == 0 else LIGHT_BACKGROUNDS
            scenes.append(_scene(cfg, combo, palette[int(rng.integers(len(palette)))], rng))
        plans.append(VideoPlan(_video_id(kind, v), scenes))
    return plans
