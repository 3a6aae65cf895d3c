"""Prompt adherence for the synthetic sample data: does a video show the colour, shape and
motion its prompt names?

The sample source (tasks/sample_world/scenes.py) draws one coloured shape (circle, square,
triangle) moving in one direction (left, right, up, down) on a plain background, and
captions it. For such a video, the attributes can be read back from the pixels:

    frames (T, H, W, 3) uint8
      per frame: background = median of the border ring
                 contrast   = |pixel - background| (RGB, Euclidean)    (H, W)
                 object     = largest 8-connected region above half its own peak
                              contrast (where the sharp edge of a blurred shape was)
      colour    : the palette colour whose blend with the background comes nearest to
                  the median of the object's core pixels
      shape     : blur-invariant complex moments of the contrast: |c30| (3-fold symmetry,
                  triangle) and |c40| (4-fold, square); neither is a circle. Median over
                  frames; rotation does not matter
      direction : least-squares slope of the centroid track, dominant axis and sign
                  (image y grows downwards); "none" if it moves < 4% of the frame

`score_videos` compares that with what each prompt names and reports accuracy per
attribute, all three at once, and the chance level of each. Palette and vocabulary are
arguments; the defaults come from tasks/sample_world/scenes.py, imported only when needed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

ATTRIBUTES = ("color", "shape", "direction")
NO_MOTION = "none"
# Shape from complex moments c_pq = E[w z^p conj(z)^q] of the object's contrast (weights w,
# z = x + iy about the centroid). A shape with n-fold symmetry has c_pq = 0 unless n divides
# p - q, so a triangle has |c_30| > 0 = |c_40|, a square |c_40| > 0 = |c_30|, a circle
# neither. Both are unchanged by an isotropic blur (the kernel's E[b], E[b^2], E[b^3] and
# E[b^4] are 0), only their normaliser c_11 grows, so blur shrinks the invariants towards 0
# without mixing them up. Ideal values (equilateral triangle, square):
TRIANGLE_I3 = 0.8  # |c_30| / c_11^1.5
SQUARE_I4 = 0.6  # |c_40| / c_11^2
ROUND_BELOW = 0.32  # both invariants under this fraction of their ideal: a circle. Fitted once by
# `python bench/fit_round_below.py` on a fixed reference set: every colour x shape x direction x
# background rendered at 32x32 and round-tripped through an axis-aligned 8x8 grid, as the tiny VAE's
# latents are (circles 0.05-0.29 there, squares and triangles >= 0.35; sharp renders <= 0.17).
# Not re-fitted per run, so every run is scored by the same rule.
MIN_CONTRAST = 24.0  # RGB distance below which nothing counts as foreground
MIN_AREA = 4  # pixels; a smaller region is noise, not the object
STATIC_FRACTION = 0.04  # of min(H, W): a smaller centroid displacement is "none"
MIN_ALPHA = 0.5  # the object's core may be a blend down to half its colour with the background


@dataclass
class Detection:
    color: str | None  # nearest palette colour, None if no object was found
    shape: str | None
    direction: str  # left | right | up | down | none
    confidence: float  # in [0, 1]: found-fraction x colour and shape margins
    track: list[tuple[float, float] | None] = field(default_factory=list)  # (x, y) centroid per frame
    rgb: tuple[float, float, float] | None = None  # the measured colour of the object's core
    shape_features: tuple[float, float] | None = None  # (triangle-ness, square-ness), 1 = ideal
    displacement: tuple[float, float] = (0.0, 0.0)  # (dx, dy) in pixels, first to last frame


@dataclass(frozen=True)
class Vocab:
    """The words prompts use. `parse` maps a prompt to (color, shape, direction) or None;
    without it, each attribute is the first vocabulary word found in the prompt."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    directions: tuple[str, ...]
    parse: Callable[[str], tuple[str, str, str] | None] | None = None


def default_palette() -> dict[str, tuple[int, int, int]]:
    from soraflow.tasks.sample_world.scenes import COLORS

    return {k: tuple(int(c) for c in v) for k, v in COLORS.items()}


def default_vocab() -> Vocab:
    from soraflow.tasks.sample_world import scenes

    return Vocab(tuple(scenes.COLORS), tuple(scenes.SHAPES), tuple(scenes.DIRECTIONS), scenes.parse_caption)


# ---------------------------------------------------------------- one frame


@dataclass
class _FrameObject:
    centroid: tuple[float, float]  # (x, y), contrast-weighted
    rgb: np.ndarray  # (3,) median colour of the core
    background: np.ndarray  # (3,)
    features: tuple[float, float]  # (|c30| / c11^1.5 / TRIANGLE_I3, |c40| / c11^2 / SQUARE_I4)


def _largest_region(mask: np.ndarray) -> np.ndarray | None:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < MIN_AREA:
        return None
    region = (labels == k).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(region, contours, -1, 1, thickness=cv2.FILLED)  # fill holes
    return region.astype(bool)


def find_object(frame: np.ndarray) -> _FrameObject | None:
    """The largest region that differs from the background in an (H, W, 3) uint8 frame."""
    f = frame.astype(np.float32)
    h, w = f.shape[:2]
    b = max(1, min(h, w) // 16)
    ring = np.concatenate(
        [f[:b].reshape(-1, 3), f[-b:].reshape(-1, 3), f[:, :b].reshape(-1, 3), f[:, -b:].reshape(-1, 3)]
    )
    bg = np.median(ring, axis=0)  # (3,)
    dist = np.sqrt(((f - bg) ** 2).sum(axis=-1))  # (H, W) contrast
    ring_dist = np.sqrt(((ring - bg) ** 2).sum(axis=-1))
    floor = max(MIN_CONTRAST, 3.0 * float(np.percentile(ring_dist, 90)))
    first = _largest_region(dist > floor)
    if first is None:
        return None
    peak = float(np.percentile(dist[first], 90))
    mask = _largest_region(dist > max(floor, 0.5 * peak))  # half contrast: the sharp edge
    if mask is None:
        return None
    core = mask & (dist >= 0.8 * peak)
    rgb = np.median(f[core if core.sum() >= 3 else mask], axis=0)

    # moments of the contrast over the region and its blur tails, above the noise level
    region = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    wgt = np.clip(dist - float(np.median(ring_dist)), 0, None) * region
    ys, xs = np.mgrid[0:h, 0:w]
    total = float(wgt.sum())
    cx, cy = float((wgt * xs).sum()) / total, float((wgt * ys).sum()) / total
    z = (xs - cx) + 1j * (ys - cy)
    c11 = float((wgt * np.abs(z) ** 2).sum()) / total
    c30 = abs(complex((wgt * z**3).sum())) / total
    c40 = abs(complex((wgt * z**4).sum())) / total
    feats = (c30 / max(c11, 1e-6) ** 1.5 / TRIANGLE_I3, c40 / max(c11, 1e-6) ** 2 / SQUARE_I4)
    return _FrameObject((cx + 0.5, cy + 0.5), rgb, bg, feats)


def classify_shape(features: tuple[float, float], round_below: float = ROUND_BELOW) -> tuple[str, float]:
    """(triangle-ness, square-ness) -> shape and a margin in [0, 1]; a circle if both < round_below."""
    tri, sq = features
    top = max(tri, sq)
    if top < round_below:
        return "circle", float(1 - top / round_below)
    margin = min(1.0, (top - round_below) / round_below) * (1 - min(tri, sq) / top)
    return ("triangle" if tri > sq else "square"), float(margin)


def calibrate_round_below(features: Sequence[tuple[float, float] | None], shapes: Sequence[str | None]) -> float:
    """The circle threshold that best separates labelled examples: `features` as analyze_video
    reports them (None where nothing was found), `shapes` the true shape of each (None: unknown).

    Scans the cut points between consecutive values of max(triangle-ness, square-ness) and
    returns the middle one of those with the fewest errors (circles at or above it, other
    shapes below it). ROUND_BELOW unless there are both circles and other shapes to separate.
    """
    if len(features) != len(shapes):
        raise ValueError(f"calibrate_round_below: {len(features)} feature pairs but {len(shapes)} shapes")
    pairs = [(max(f), s == "circle") for f, s in zip(features, shapes) if f is not None and s is not None]
    if not any(c for _, c in pairs) or all(c for _, c in pairs):
        return ROUND_BELOW
    values = sorted({v for v, _ in pairs})
    cuts = [(a + b) / 2 for a, b in zip(values, values[1:])] or values
    errors = [sum((v >= t) if c else (v < t) for v, c in pairs) for t in cuts]
    best = [t for t, e in zip(cuts, errors) if e == min(errors)]
    return float(best[len(best) // 2])


def nearest_color(rgb: np.ndarray, background: np.ndarray, palette: dict[str, Sequence[int]]) -> tuple[str, float]:
    """The palette colour whose blend with the background (alpha in [MIN_ALPHA, 1]) comes
    nearest to `rgb` (a small blurred shape never shows its full colour), and a margin in [0, 1]."""
    names = list(palette)
    d = []
    for name in names:
        p = np.asarray(palette[name], np.float64)
        seg = p - background
        alpha = float(np.clip(np.dot(rgb - background, seg) / max(np.dot(seg, seg), 1e-9), MIN_ALPHA, 1.0))
        d.append(float(np.linalg.norm(background + alpha * seg - rgb)))
    order = np.argsort(d)
    if len(names) < 2:
        return names[order[0]], 1.0
    best, second = d[order[0]], d[order[1]]
    return names[order[0]], (float(1.0 - best / second) if second > 0 else 0.0)


# ---------------------------------------------------------------- one video


def analyze_video(frames: np.ndarray, palette: dict[str, Sequence[int]] | None = None,
                  round_below: float = ROUND_BELOW) -> Detection:
    """Read the colour, shape and direction of the one moving shape in (T, H, W, 3) uint8 frames."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"analyze_video: expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype} "
                         "(a (3, T, H, W) tensor in [-1, 1] converts with storage.video_io.to_uint8_frames)")
    palette = default_palette() if palette is None else palette
    t, h, w, _ = frames.shape
    objects = [find_object(frame) for frame in frames]
    track = [o.centroid if o else None for o in objects]
    found = [o for o in objects if o is not None]
    if not found:
        return Detection(None, None, NO_MOTION, 0.0, track)

    rgb = np.median(np.stack([o.rgb for o in found]), axis=0)
    bg = np.median(np.stack([o.background for o in found]), axis=0)
    color, color_margin = nearest_color(rgb, bg, palette)
    feats = np.median(np.array([o.features for o in found]), axis=0)
    shape, shape_margin = classify_shape((float(feats[0]), float(feats[1])), round_below)

    pts = [(i, p) for i, p in enumerate(track) if p is not None]
    dx = dy = 0.0
    if len(pts) >= 2:
        ts = np.array([i for i, _ in pts], np.float64)
        xy = np.array([p for _, p in pts], np.float64)  # (N, 2)
        slope = np.polyfit(ts, xy, 1)[0]  # (2,) pixels per frame, least squares
        dx, dy = (slope * (ts[-1] - ts[0])).tolist()
    if math.hypot(dx, dy) < max(1.0, STATIC_FRACTION * min(h, w)):
        direction = NO_MOTION
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"  # image y grows downwards

    confidence = len(found) / t * min(1.0, 2 * color_margin) * min(1.0, 2 * shape_margin)
    return Detection(color, shape, direction, float(confidence), track, tuple(float(c) for c in rgb),
                     (float(feats[0]), float(feats[1])), (float(dx), float(dy)))


# ---------------------------------------------------------------- prompts and scores


def parse_prompt(text: str, vocab: Vocab) -> dict[str, str | None]:
    """The colour, shape and direction a prompt names (None for any it does not)."""
    if vocab.parse is not None:
        got = vocab.parse(text)
        return dict(zip(ATTRIBUTES, got)) if got else {a: None for a in ATTRIBUTES}
    low = text.lower()
    out: dict[str, str | None] = {}
    for attr, words in zip(ATTRIBUTES, (vocab.colors, vocab.shapes, vocab.directions)):
        hits = []
        for word in sorted(words, key=len, reverse=True):  # "light blue" before "blue"
            m = re.search(rf"\b{re.escape(word.lower())}\b", low)
            if m:
                hits.append((m.start(), word))
        out[attr] = min(hits)[1] if hits else None
    return out


def score_videos(
    videos: Sequence[np.ndarray],
    prompts: Sequence[str],
    palette: dict[str, Sequence[int]] | None = None,
    vocab: Vocab | None = None,
    round_below: float = ROUND_BELOW,
) -> dict:
    """Accuracy of each attribute over the videos whose prompt names it, and of all three
    (`round_below`: the circle threshold of classify_shape, e.g. from calibrate_round_below).

    Returns {"accuracy": {color, shape, direction, all}, "chance": {...}, "counts":
    {attr: {"correct", "scored"}}, "n_videos", "unparsed" (prompts naming none of the
    three), "rows": one dict per video (prompt, expected, predicted, correct, confidence)}.
    An attribute no prompt names has accuracy NaN; "all" counts prompts that name all three.
    """
    if len(videos) != len(prompts):
        raise ValueError(f"score_videos: {len(videos)} videos but {len(prompts)} prompts")
    if not videos:
        raise ValueError("score_videos: no videos")
    palette = default_palette() if palette is None else palette
    vocab = default_vocab() if vocab is None else vocab
    counts = {a: {"correct": 0, "scored": 0} for a in (*ATTRIBUTES, "all")}
    rows, unparsed = [], 0
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        expected = parse_prompt(prompt, vocab)
        det = analyze_video(video, palette, round_below)
        predicted = {"color": det.color, "shape": det.shape, "direction": det.direction}
        correct: dict[str, bool | None] = {}
        for a in ATTRIBUTES:
            if expected[a] is None:
                correct[a] = None
                continue
            correct[a] = predicted[a] == expected[a]
            counts[a]["scored"] += 1
            counts[a]["correct"] += int(correct[a])
        if all(expected[a] is not None for a in ATTRIBUTES):
            correct["all"] = all(correct[a] for a in ATTRIBUTES)
            counts["all"]["scored"] += 1
            counts["all"]["correct"] += int(correct["all"])
        else:
            correct["all"] = None
            unparsed += all(expected[a] is None for a in ATTRIBUTES)
        rows.append({"index": i, "prompt": prompt, "expected": expected, "predicted": predicted, "correct": correct,
                     "confidence": det.confidence, "displacement": det.displacement})
    if not any(counts[a]["scored"] for a in ATTRIBUTES):
        raise ValueError(f"score_videos: none of the {len(prompts)} prompts names a colour, shape or direction "
                         f"from the vocabulary (e.g. {prompts[0]!r})")
    sizes = {"color": len(vocab.colors), "shape": len(vocab.shapes), "direction": len(vocab.directions)}
    chance = {a: 1.0 / n for a, n in sizes.items()}
    chance["all"] = chance["color"] * chance["shape"] * chance["direction"]
    accuracy = {a: (c["correct"] / c["scored"] if c["scored"] else float("nan")) for a, c in counts.items()}
    return {
        "accuracy": accuracy,
        "chance": chance,
        "counts": counts,
        "n_videos": len(videos),
        "unparsed": unparsed,
        "rows": rows,
    }


def flat_metrics(result: dict, prefix: str = "adherence_", chance_prefix: str | None = "chance_") -> dict[str, float]:
    """score_videos' accuracies ("adherence_color", ...) and chance levels ("chance_color", ...;
    none if chance_prefix is None) as flat floats, the metric names evaluation logs to MLflow."""
    out = {f"{prefix}{a}": float(v) for a, v in result["accuracy"].items()}
    if chance_prefix is not None:
        out.update({f"{chance_prefix}{a}": float(v) for a, v in result["chance"].items()})
    return out
