"""Fit the adherence detector's circle threshold once, on a fixed reference set.

    .venv/bin/python bench/fit_round_below.py      # prints ROUND_BELOW for tasks/sample_world/adherence.py

The reference set is built here, deterministically, without training anything: every
colour x shape x direction x background of the sample world (tasks/sample_world/scenes.py),
rendered at the local preset's 32x32 and then sent through an axis-aligned round trip on the
tiny VAE's 8x8 latent grid (area-averaged 4x4 blocks, bilinear back up). That grid is what gives
a VAE's circles their 4-fold part; a fixed threshold fitted on it no longer depends on one
run's own reconstructions. The printed value is the cut with the fewest errors
(calibrate_round_below), rounded to two decimals.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
from soraflow.tasks.sample_world import scenes
from soraflow.tasks.sample_world.adherence import analyze_video, calibrate_round_below

SIZE = 32  # the local preset's image_size
GRID = 8  # its latent grid (4x downsampling)
FRAMES = 8


def grid_round_trip(video: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the same after area-downsampling to grid x grid and bilinear upsampling."""
    h, w = video.shape[1:3]
    out = [cv2.resize(cv2.resize(f, (grid, grid), interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
           for f in video]
    return np.stack(out)


def reference_set() -> list[tuple[np.ndarray, str]]:
    """(video, true shape) for every combination; positions and speeds fixed by the index."""
    backgrounds = scenes.DARK_BACKGROUNDS + scenes.LIGHT_BACKGROUNDS
    out = []
    for k, (color, shape, direction, bg) in enumerate(itertools.product(
            scenes.COLORS, scenes.SHAPES, scenes.DIRECTIONS, backgrounds)):
        ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        offset = (k % 5 - 2) * 0.7  # sub-pixel starts: the grid sees the shape at several phases
        start = (SIZE / 2 - ux * 6 + offset, SIZE / 2 - uy * 6 - offset)
        spec = scenes.SceneSpec(color, shape, direction, bg, FRAMES, start, 12 / FRAMES)
        out.append((grid_round_trip(scenes.render_scene(spec, SIZE, SIZE)), shape))
    return out


def fit() -> float:
    ref = reference_set()
    feats = [analyze_video(v).shape_features for v, _ in ref]
    return round(calibrate_round_below(feats, [s for _, s in ref]), 2)


if __name__ == "__main__":
    print(f"ROUND_BELOW = {fit()}")
