"""Scene split: exact cuts on generated videos, frame-accurate clips, windows, limits, bad input, resume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from soraflow.configs.schema import SplitConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import lineage, new_row, read_rows, write_manifest
from soraflow.storage.data.video_io import probe_video, read_frames, sha256_file
from soraflow.tasks.ingest.scene_split import (
    clip_size,
    detect_scenes,
    split_manifest,
    split_rows,
    split_variant,
)
from videos import make_scene_video


def _row(path, video_id="v", **kw):
    return new_row(path=str(path), video_id=video_id, source="hdvg", **kw)


def _levels(clip: str | Path) -> np.ndarray:
    """Background grey level of every frame: the median of the frame's border pixels."""
    f = read_frames(clip).astype(np.float32)  # (T, H, W, 3)
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # (T, 2W+2H, 3)
    return np.median(border.reshape(len(f), -1), axis=1)


@pytest.fixture
def root(tmp_path) -> DataRoot:
    return DataRoot(tmp_path / "data")


# Several videos, several frame rates, scenes of 1.5-2.5 s: detected cuts equal the generated ones.
@pytest.mark.parametrize("fps", [24.0, 30.0, 30000 / 1001])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_detected_cuts_equal_generated_cuts(tmp_path, fps, seed, detector):
    rng = np.random.default_rng(100 + seed)
    seconds = list(rng.uniform(1.5, 2.5, size=3 + seed % 2))
    video = make_scene_video(tmp_path / "v.mp4", seconds, fps=fps, seed=seed)
    scenes, detected_fps = detect_scenes(video.path, SplitConfig(detector=detector))
    assert detected_fps == pytest.approx(fps)
    assert [a for a, _ in scenes] == video.starts
    assert [b for _, b in scenes] == [*video.cuts, video.num_frames]


def test_clips_are_frame_accurate(root, tmp_path):
    video = make_scene_video(tmp_path / "v.mp4", [1.5, 2.25, 1.75], fps=24.0, seed=4)
    cfg = SplitConfig(fps=24.0, short_side=64, min_seconds=1.0, max_seconds=5.0)
    rows = split_rows([_row(video.path, text="shapes", caption_source="source")], root, cfg)

    assert [r["status"] for r in rows] == ["ok"] * 3
    assert [r["clip_id"] for r in rows] == ["v-scene-0", "v-scene-1", "v-scene-2"]
    for k, r in enumerate(rows):
        n = video.scene_frames[k]
        assert r["num_frames"] == n == probe_video(r["path"]).num_frames
        assert r["start_s"] == pytest.approx(video.starts[k] / 24.0)
        assert r["end_s"] == pytest.approx((video.starts[k] + n) / 24.0)
        # Every frame, first and last included, shows this scene's background: no frame of a neighbour.
        assert np.all(np.abs(_levels(r["path"]) - video.brightness[k]) < 12), k
        assert (r["height"], r["width"], r["fps"]) == (64, 96, 24.0)
        assert r["aspect_ratio"] == pytest.approx(64 / 96) and r["resolution"] == 64 * 96
        assert r["sha256"] == sha256_file(r["path"])
        assert (r["text"], r["caption_source"], r["video_id"], r["source"]) == ("shapes", "source", "v", "hdvg")
        assert Path(r["path"]) == root.clip("hdvg", "v", r["clip_id"], variant=split_variant(cfg))


def test_resampled_and_scaled_clips(root, tmp_path):
    video = make_scene_video(tmp_path / "v.mp4", [2.0, 1.6], fps=30.0, height=72, width=128, seed=5)
    cfg = SplitConfig(fps=8.0, short_side=36)
    rows = split_rows([_row(video.path)], root, cfg)
    assert [r["num_frames"] for r in rows] == [16, 13]  # round(60 * 8/30), round(48 * 8/30)
    for k, r in enumerate(rows):
        assert (r["height"], r["width"], r["fps"]) == (36, 64, 8.0)
        assert np.all(np.abs(_levels(r["path"]) - video.brightness[k]) < 12)


def test_clip_size_keeps_aspect_with_even_sides():
    assert clip_size(1080, 1920, 512) == (512, 910)
    assert clip_size(1920, 1080, 512) == (910, 512)
    assert clip_size(64, 96, 32) == (32, 48)
    assert clip_size(100, 100, 33) == (34, 34)


def test_window_is_cut_alone_and_times_are_in_the_source(root, tmp_path):
    video = make_scene_video(tmp_path / "v.mp4", [2.0, 2.0, 2.0, 2.0], fps=24.0, seed=6)
    # A window over scenes 1 and 2 (frames 48..143) and one inside scene 3 only.
    rows = split_rows(
        [
            _row(video.path, clip_id="v_0", start_s=2.0, end_s=6.0, text="two scenes"),
            _row(video.path, clip_id="v_1", start_s=6.5, end_s=7.75, text="one scene"),
        ],
        root,
        SplitConfig(fps=24.0, short_side=64, min_seconds=1.0),
    )
    assert [r["clip_id"] for r in rows] == ["v_0-scene-0", "v_0-scene-1", "v_1"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(2.0, 4.0), (4.0, 6.0), (6.5, 7.75)]
    assert [r["num_frames"] for r in rows] == [48, 48, 30]
    assert [r["text"] for r in rows] == ["two scenes", "two scenes", "one scene"]
    for r, k in zip(rows, (1, 2, 3)):
        assert np.all(np.abs(_levels(r["path"]) - video.brightness[k]) < 12)


def test_short_scenes_rejected_long_scenes_truncated(root, tmp_path):
    video = make_scene_video(tmp_path / "v.mp4", [2.5, 1.5, 2.5], fps=24.0, seed=7)
    cfg = SplitConfig(fps=24.0, short_side=64, min_seconds=2.0, max_seconds=1.25)
    rows = split_rows([_row(video.path)], root, cfg)
    assert [r["status"] for r in rows] == ["ok", "rejected", "ok"]
    assert rows[1]["error"].endswith("scene too short: 1.5 s < min 2.0 s")
    assert str(video.path) in rows[1]["error"]
    assert (
        rows[1]["clip_id"] == "v-scene-1"
        and not root.clip("hdvg", "v", "v-scene-1", variant=split_variant(cfg)).exists()
    )
    # Truncated to the first 1.25 s = 30 frames of each long scene.
    assert [r["num_frames"] for r in (rows[0], rows[2])] == [30, 30]
    assert (rows[2]["start_s"], rows[2]["end_s"]) == (4.0, 4.0 + 1.25)


def test_bad_inputs_become_rejected_rows(root, tmp_path):
    good = make_scene_video(tmp_path / "good.mp4", [1.5, 1.5], fps=24.0)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4000))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.path.read_bytes()[: good.path.stat().st_size // 2])
    missing = tmp_path / "missing.mp4"
    already = {**_row(good.path, "old"), "status": "rejected", "error": "404 from source"}
    rows = [_row(garbage, "g"), _row(good.path, "ok"), already, _row(truncated, "t"), _row(missing, "m")]

    out = split_rows(rows, root, SplitConfig(fps=24.0, short_side=32))

    by_id = {}
    for r in out:
        by_id.setdefault(r["video_id"], []).append(r)
    assert [r["status"] for r in by_id["ok"]] == ["ok", "ok"]
    assert by_id["old"] == [already]  # passes through unchanged
    for vid, path in (("g", garbage), ("t", truncated), ("m", missing)):
        (r,) = by_id[vid]
        assert r["status"] == "rejected" and str(path) in r["error"], r


def test_rerun_keeps_valid_clips_and_redoes_damaged_ones(root, tmp_path):
    video = make_scene_video(tmp_path / "v.mp4", [1.5, 1.5, 1.5], fps=24.0, seed=8)
    cfg = SplitConfig(fps=12.0, short_side=32)
    first = split_rows([_row(video.path)], root, cfg)
    stamps = {r["path"]: os.stat(r["path"]).st_mtime_ns for r in first}
    damaged = first[1]["path"]
    Path(damaged).write_bytes(Path(damaged).read_bytes()[:300])

    second = split_rows([_row(video.path)], root, cfg)

    # Same rows; only the re-encoded clip's hash may differ (x264 output can vary with decoder threading).
    assert [dict(r, sha256=None) for r in second] == [dict(r, sha256=None) for r in first]
    assert [r["sha256"] for r in second] == [sha256_file(r["path"]) for r in second]
    for r in second:
        changed = os.stat(r["path"]).st_mtime_ns != stamps[r["path"]]
        assert changed == (r["path"] == damaged), r["path"]


def test_split_manifest_writes_a_new_manifest(root, tmp_path):
    video = make_scene_video(tmp_path / "v.mp4", [1.5, 1.5], fps=24.0, seed=9)
    src = write_manifest([_row(video.path, text="t", caption_source="source")], "download", root)
    out = split_manifest(src, root, SplitConfig(fps=8.0, short_side=32))
    assert out.parent == root.manifest_dir("split")
    rows = read_rows(out)
    assert [r["num_frames"] for r in rows] == [12, 12]
    assert lineage(out)["inputs"] == [str(src)]
    assert split_manifest(src, root, SplitConfig(fps=8.0, short_side=32)) == out  # same rows, same version


def test_threshold_override_changes_what_is_a_cut(tmp_path):
    video = make_scene_video(tmp_path / "v.mp4", [1.5, 1.5, 1.5], fps=24.0, seed=10)
    assert len(detect_scenes(video.path, SplitConfig(threshold=27.0))[0]) == 3
    assert detect_scenes(video.path, SplitConfig(threshold=255.0))[0] == [(0, video.num_frames)]
    # A window is detected alone: frames [12, 60) hold the cut at 36 only.
    assert detect_scenes(video.path, SplitConfig(), start_s=0.5, end_s=2.5)[0] == [(12, 36), (36, 60)]
    assert detect_scenes(video.path, SplitConfig(), start_s=2.0, end_s=2.0)[0] == []
