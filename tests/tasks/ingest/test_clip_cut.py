"""The clip cutter: seeking over stretches no clip needs gives the same clips; shards read only their rows."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soraflow.tasks.ingest.clip_cut as clip_cut
from soraflow.configs.schema import SplitConfig
from soraflow.storage.data.manifest import new_row, read_rows, read_rows_range, write_manifest
from soraflow.storage.data.video_io import read_frames
from soraflow.storage.layout import DataRoot
from soraflow.tasks.ingest.scene_split import split_rows
from videos import render_scenes, scene_frames_for


def _write_with_keyframes(path: Path, frames: np.ndarray, fps: float, gop: int) -> Path:
    """H.264 with a keyframe every `gop` frames (write_video leaves x264's 250)."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "g": str(gop), "threads": "1"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


def test_seeking_over_unneeded_frames_gives_the_same_clips(tmp_path, monkeypatch):
    # Scenes of 4 s truncated to 1 s: 3 s of every scene is not needed, with keyframes every 0.5 s in it.
    fps = 24.0
    frames, _ = render_scenes(scene_frames_for([4.0, 4.0, 4.0], fps), 64, 96, 1.5, 0)
    video = _write_with_keyframes(tmp_path / "v.mp4", frames, fps, gop=12)
    cfg = SplitConfig(fps=12.0, short_side=32, min_seconds=0.5, max_seconds=1.0)
    row = new_row(path=str(video), video_id="v", source="hdvg")

    seen = []
    real = clip_cut.decode_groups
    monkeypatch.setattr(clip_cut, "decode_groups", lambda *a: seen.append(real(*a)) or seen[-1])
    seeking = split_rows([row], DataRoot(tmp_path / "a"), cfg)
    assert len(seen[0]) == 3, "each truncated scene should be reached by a seek"

    monkeypatch.setattr(clip_cut, "MIN_SKIP_FRAMES", 10**9)  # one pass over everything
    seen.clear()
    in_order = split_rows([row], DataRoot(tmp_path / "b"), cfg)
    assert len(seen[0]) == 1
    assert [r["status"] for r in seeking] == ["ok"] * 3
    def spans(rows):
        return [(r["start_s"], r["end_s"], r["num_frames"]) for r in rows]

    assert spans(seeking) == spans(in_order)
    for a, b in zip(seeking, in_order):
        np.testing.assert_array_equal(read_frames(a["path"]), read_frames(b["path"]))


@pytest.mark.parametrize("start, stop", [(0, 3), (2, 5), (4, 99), (7, 9)])
def test_read_rows_range_is_the_slice_of_read_rows(tmp_path, start, stop):
    root = DataRoot(tmp_path)
    rows = [new_row(path=f"/v{i}.mp4", video_id=f"v{i}", source="hdvg", num_frames=i) for i in range(7)]
    path = write_manifest(rows, "download", root)
    assert read_rows_range(path, start, stop) == read_rows(path)[start:stop]
