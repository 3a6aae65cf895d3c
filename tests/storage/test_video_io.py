"""storage/data/video_io.py: frames read through one reused swscale context are the frames PyAV's
per-frame conversion gives, on a real clip (H.264, yuv420p) and on noise."""

from __future__ import annotations

import av
import numpy as np
import pytest
from footage import copy_real, write_noise_video
from soraflow.storage.data.video_io import read_frames


def _per_frame(path, size=None, limit: int = 12) -> np.ndarray:
    """The conversion read_frames used to do: a new context for every frame (the first `limit` frames)."""
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if len(out) == limit:
                break
            if size is not None:
                frame = frame.reformat(width=size[1], height=size[0])
            out.append(frame.to_ndarray(format="rgb24"))
    return np.stack(out)


@pytest.mark.parametrize("size", [None, (32, 48), (17, 23)])
def test_reused_reformatter_gives_the_same_pixels(tmp_path, size):
    noise = write_noise_video(tmp_path / "noise.mp4", frames=6, height=40, width=56)
    real = copy_real("bikes.mp4", tmp_path / "bikes.mp4")
    for path in (noise, real):
        expected = _per_frame(path, size)
        got = read_frames(path, indices=list(range(len(expected))), size=size)
        assert got.shape == expected.shape and np.array_equal(got, expected), path.name
