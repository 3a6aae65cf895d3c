"""Scene split: one row per source video (or window of one) in, one row per scene clip out.

As Open-Sora v1.0 (tools/scenedetect): PySceneDetect `ContentDetector` at library defaults
(threshold 27, min_scene_len 15 frames), `start_in_scene=True`; scenes shorter than
`min_seconds` are dropped (here: kept as rejected rows), scenes longer than `max_seconds`
are truncated to their first `max_seconds`; clips are re-encoded at `fps` with the shorter
side scaled to `short_side`. Unlike Open-Sora's `ffmpeg -ss` (which can be off by up to
0.5 s, Open-Sora#567), cuts here are frame-accurate: detection (PySceneDetect's own OpenCV
reader, tasks.ingest.scene_detect) and cutting (PyAV) both number frames by timestamp
(round(t * fps), one fps), frames are addressed by index, and every clip's frame count is checked.

    row (path = source video, window [start_s, end_s) or whole file)
      -> detect: [(first_frame, end_frame), ...]   absolute source frame indices, end exclusive
      -> cut: clips/<source>/<split hash>/<video_id>/<clip_id>.mp4, (n_out, H', W', 3) at cfg.fps
      -> rows (path = clip, start_s/end_s = the clip's time range in the source file)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from scenedetect import AdaptiveDetector, ContentDetector
from scenedetect.video_stream import FrameRateUnavailable, VideoOpenFailure
from soraflow.configs.schema import SplitConfig
from soraflow.storage.faults import raise_if_environment
from soraflow.storage.layout import DataRoot, UnsafePathError, safe_id
from soraflow.storage.data.manifest import read_rows, reject, write_manifest
from soraflow.storage.data.video_io import (
    VideoError,
    VideoInfo,
    check_decode_bytes,
    check_geometry,
    probe_video,
    sha256_file,
)
from soraflow.tasks.ingest import scene_detect
from soraflow.tasks.ingest.clip_cut import cut_clips

# Errors that mean "this input is bad", as opposed to a shard-level failure (disk full), which raises.
_BAD_VIDEO = (VideoError, VideoOpenFailure, av.error.FFmpegError, UnsafePathError)


@dataclass
class ScenePlan:
    """One detected scene and the clip it becomes."""

    index: int  # k in "<id>-scene-<k>": position among the window's detected scenes
    first: int  # first source frame
    end: int  # one past the last source frame of the whole scene
    keep: int  # source frames kept after truncation to max_seconds
    num_out: int  # frames of the clip at cfg.fps
    clip_id: str
    path: Path

    def source_index(self, j: int, src_fps: float, out_fps: float) -> int:
        """Source frame shown as clip frame j: the nearest one, as ffmpeg's fps filter picks."""
        return self.first + min(self.keep - 1, math.floor(j * src_fps / out_fps + 0.5))


# ---------------------------------------------------------------- detection


def make_detector(cfg: SplitConfig):
    """ContentDetector (Open-Sora v1.0) or AdaptiveDetector (v1.1+); cfg.threshold overrides the default."""
    if cfg.detector == "adaptive":
        return AdaptiveDetector() if cfg.threshold is None else AdaptiveDetector(adaptive_threshold=cfg.threshold)
    return ContentDetector() if cfg.threshold is None else ContentDetector(threshold=cfg.threshold)


def detect_scenes(
    path: str | Path, cfg: SplitConfig, start_s: float | None = None, end_s: float | None = None
) -> tuple[list[tuple[int, int]], float]:
    """Scenes of the window [start_s, end_s) (None = file start / end) -> ([(first, end), ...], fps).

    (first, end) are absolute source frame indices, end exclusive, at `fps`, the frame rate
    PySceneDetect counts frames with; the cutter uses the same. The scenes are exactly those of
    `scenedetect.detect(path, detector, start_time=first frame, end_time=end frame,
    start_in_scene=True)`, computed in parallel time chunks (tasks.ingest.scene_detect; its
    docstring says why that is exact). With no cut, the window is one scene; an empty window gives [].
    """
    if start_s is not None and end_s is not None and end_s <= start_s:
        return [], 0.0
    try:
        scenes, rate = scene_detect.detect(path, make_detector(cfg), window=(start_s, end_s))
    except (OSError, VideoOpenFailure, FrameRateUnavailable) as e:  # missing, not a video, no frame rate
        raise VideoError(f"{path}: not a readable video: {e}") from e
    return [(a.frame_num, b.frame_num) for a, b in scenes], float(rate)


# ---------------------------------------------------------------- geometry and naming


def even(x: float) -> int:
    return max(2, 2 * math.floor(x / 2 + 0.5))


def clip_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the shorter side = short_side, aspect kept, both even (Open-Sora's scale=-2)."""
    if width >= height:
        h = even(short_side)
        return h, even(width * h / height)
    w = even(short_side)
    return even(height * w / width), w


def frames_out(keep: int, src_fps: float, out_fps: float) -> int:
    """Frames of a clip of `keep` source frames after resampling to out_fps (at least 1)."""
    return max(1, math.floor(keep * out_fps / src_fps + 0.5))


def scene_clip_id(row: dict[str, Any], index: int, n_scenes: int) -> str:
    base = row.get("clip_id") or row["video_id"]
    return safe_id(base if n_scenes == 1 else f"{base}-scene-{index}", "clip id")


# ---------------------------------------------------------------- cutting (tasks.ingest.clip_cut)


def valid_clip(path: Path, num_frames: int, size: tuple[int, int]) -> VideoInfo | None:
    """The probe of an existing clip with the expected frame count and size, else None."""
    if not path.exists():
        return None
    try:
        info = probe_video(path)
    except VideoError:
        return None
    return info if info.num_frames == num_frames and (info.height, info.width) == size else None


# ---------------------------------------------------------------- rows


def split_row(row: dict[str, Any], root: DataRoot, cfg: SplitConfig) -> list[dict[str, Any]]:
    """One input row -> one row per detected scene (ok clip, or rejected with the reason)."""
    if row["status"] != "ok":
        return [row]
    src = Path(row["path"])
    try:
        info = probe_video(src, count_frames=False)
        check_window(row.get("start_s"), row.get("end_s"))
        scenes, fps = detect_scenes(src, cfg, row.get("start_s"), row.get("end_s"))
    except _BAD_VIDEO as e:
        raise_if_environment(e, f"scene detection of {src}")
        return [reject(row, f"{src}: {e}" if str(src) not in str(e) else str(e))]
    if not scenes:
        return [reject(row, f"{src}: no frames in window start_s={row.get('start_s')} end_s={row.get('end_s')}")]

    size = clip_size(info.height, info.width, cfg.short_side)
    try:  # one clip's frames are held in memory: bound them before anything is allocated
        check_geometry(src, *size)
        check_decode_bytes(src, frames_out(max(1, round(cfg.max_seconds * fps)), fps, cfg.fps), *size)
    except VideoError as e:
        return [reject(row, str(e))]
    max_keep = max(1, round(cfg.max_seconds * fps))
    min_frames = round(cfg.min_seconds * fps)  # Open-Sora: skip if duration < round(min_seconds * fps)
    slots: list[dict[str, Any] | ScenePlan] = []  # per scene: a rejected row, or the clip to make
    for k, (a, b) in enumerate(scenes):
        base = dict(row, start_s=a / fps, end_s=b / fps, aes=None, flow=None, match=None)
        try:
            clip_id = scene_clip_id(row, k, len(scenes))
            clip_path = root.clip(row["source"], row["video_id"], clip_id, variant=split_variant(cfg))
        except UnsafePathError as e:
            slots.append(reject(base, f"{src}: scene {k}: {e}"))
            continue
        if b - a < min_frames:
            slots.append(
                reject(
                    dict(base, clip_id=clip_id),
                    f"{src}: scene too short: {(b - a) / fps:.1f} s < min {cfg.min_seconds:.1f} s",
                )
            )
            continue
        keep = min(b - a, max_keep)
        slots.append(ScenePlan(k, a, b, keep, frames_out(keep, fps, cfg.fps), clip_id, clip_path))

    plans = [p for p in slots if isinstance(p, ScenePlan)]
    # Idempotent: a clip already on disk with the expected frame count and size is not re-encoded.
    done: dict[int, VideoInfo | str] = {p.index: info for p in plans if (info := valid_clip(p.path, p.num_out, size))}
    done.update(cut_clips(src, [p for p in plans if p.index not in done], fps, cfg.fps, size))

    result = []
    for p in slots:
        if isinstance(p, dict):
            result.append(p)
            continue
        base = dict(
            row,
            clip_id=p.clip_id,
            start_s=p.first / fps,
            end_s=(p.first + p.keep) / fps,
            aes=None,
            flow=None,
            match=None,
        )
        got = done[p.index]
        result.append(reject(base, got) if isinstance(got, str) else clip_row(base, p.path, got))
    return result


def clip_row(base: dict[str, Any], clip: Path, info: VideoInfo) -> dict[str, Any]:
    """`base` with the clip's path, probed shape and hash."""
    return dict(
        base,
        path=str(clip),
        num_frames=info.num_frames,
        height=info.height,
        width=info.width,
        aspect_ratio=info.height / info.width,
        resolution=info.height * info.width,
        fps=info.fps,
        sha256=sha256_file(clip),
        status="ok",
        error=None,
    )


def split_rows(rows: list[dict[str, Any]], root: DataRoot, cfg: SplitConfig) -> list[dict[str, Any]]:
    """A shard of rows -> the rows of all their scenes, in input order (rejected rows pass through).

    Any error while splitting one row becomes that row's rejection, naming the error; a fault
    of the machine (disk full, out of memory: storage.faults) raises instead."""
    out: list[dict[str, Any]] = []
    for row in rows:
        try:
            out.extend(split_row(row, root, cfg))
        except Exception as e:  # noqa: BLE001 - one row's failure is its rejection, never the shard's
            raise_if_environment(e, f"splitting {row.get('path')}")
            out.append(reject(row, f"{row.get('path')}: scene split failed: {type(e).__name__}: {e}"))
    return out


def split_variant(cfg: SplitConfig) -> str:
    """A short hash of the split settings: clips made with other settings live in another folder."""
    blob = json.dumps(cfg.model_dump(), sort_keys=True)
    return "split-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def check_window(start_s: Any, end_s: Any) -> None:
    """A row's [start_s, end_s) must be finite, non-negative numbers (or None), before any arithmetic."""
    for name, v in (("start_s", start_s), ("end_s", end_s)):
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1e7):
            raise VideoError(f"window {name}={v!r} is not a finite time in seconds")


def split_manifest(in_path: str | Path, root: DataRoot, cfg: SplitConfig) -> Path:
    """Read a manifest, split every row, write manifests/split/<hash>.parquet."""
    rows = split_rows(read_rows(in_path), root, cfg)
    return write_manifest(rows, "split", root, inputs=[in_path])
