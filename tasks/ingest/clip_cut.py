"""Cutting planned scenes out of one source video: one decoding pass, clips encoded alongside.

    plans (first source frame, frames kept, frames out)  ->  decode the source once, in order,
    seeking over stretches no clip needs  ->  per clip (num_out,) yuv420p frames at the clip size
    ->  H.264 mp4, encoded on a second thread while decoding goes on

Where the time went before (a 720p, 25 fps source cut to 256p 30 fps clips; bench/bench_split_vs_opensora.py):
scaling to RGB (1.2 ms a frame, as much as decoding), the encoder's RGB -> YUV conversion, and
decoding every written clip again to count its frames. Frames are now scaled straight into the
encoder's yuv420p (one swscale pass without a colour conversion: about 3x cheaper), a written
clip's frames are counted from its packets, and the encoder (which releases the GIL) works
while the next frames decode. Long scenes are truncated to max_seconds, so past a clip's last
frame the decoder seeks to the keyframe before the next clip when that skips frames
(indices come from timestamps, so a seek does not shift them).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import av
from soraflow.storage.data.video_io import VideoError, VideoInfo, encode_clip, stream_reformatter
from soraflow.storage.faults import raise_if_environment
from soraflow.storage.layout import UnsafePathError

_BAD_VIDEO = (VideoError, av.error.FFmpegError, UnsafePathError)
# Clips encoded or waiting for the encoder at once: bounds memory when encoding is the slower side.
MAX_QUEUED_CLIPS = 2
# Seek over a stretch no clip needs only when the keyframe before the next clip is at least this
# many frames past the last decoded one: a seek costs a demuxer reset and a decoder flush.
MIN_SKIP_FRAMES = 12


class Plan(Protocol):  # tasks.ingest.scene_split.ScenePlan
    index: int
    first: int
    keep: int
    num_out: int
    path: Path

    def source_index(self, j: int, src_fps: float, out_fps: float) -> int: ...


def indexed_frames(container, stream, start_frame: int, fps: float):
    """Yield (source frame index, frame) from start_frame on, seeking to the keyframe before it.

    The index comes from the timestamp, round((pts - stream start) * time_base * fps), as
    PySceneDetect's PyAV backend counts frames, so a seek does not shift the count.
    """
    t0 = stream.start_time or 0
    if start_frame > 0:
        container.seek(t0 + int(start_frame / fps / stream.time_base), stream=stream, backward=True)
    for frame in container.decode(stream):
        if frame.pts is None:
            raise VideoError(f"{container.name}: frame without a timestamp; cannot cut frame-accurately")
        tb = frame.time_base or stream.time_base
        start = int(t0 * stream.time_base / tb) if t0 and tb != stream.time_base else t0
        yield int(round(float((frame.pts - start) * tb) * fps)), frame


def keyframe_index(container, stream, frame: int, fps: float) -> int | None:
    """Index of the keyframe at or before source frame `frame` (from the index: nothing decoded)."""
    t0 = stream.start_time or 0
    try:
        container.seek(t0 + int(frame / fps / stream.time_base), stream=stream, backward=True)
        for packet in container.demux(stream):
            if packet.pts is not None:
                return int(round(float((packet.pts - t0) * stream.time_base) * fps))
    except av.error.FFmpegError:
        pass
    return None


def decode_groups(src: Path, plans: list, src_fps: float, out_fps: float) -> list[list]:
    """The plans (sorted by first frame) in runs decoded without a seek: a new run starts where the
    keyframe before a plan's first frame is MIN_SKIP_FRAMES or more past the previous run's last frame."""
    groups = [[plans[0]]]
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        last = plans[0].source_index(plans[0].num_out - 1, src_fps, out_fps)
        for p in plans[1:]:
            if p.first > last + MIN_SKIP_FRAMES:
                key = keyframe_index(container, stream, p.first, src_fps)
                if key is not None and key >= last + MIN_SKIP_FRAMES:
                    groups.append([p])
                    last = p.source_index(p.num_out - 1, src_fps, out_fps)
                    continue
            groups[-1].append(p)
            last = max(last, p.source_index(p.num_out - 1, src_fps, out_fps))
    return groups


def cut_clips(
    src: Path, plans: list, src_fps: float, out_fps: float, size: tuple[int, int]
) -> dict[int, VideoInfo | str]:
    """Write each planned clip; returns {scene index: probe of the clip, or the error}.

    Per clip: (keep,) source frames -> (num_out,) yuv420p frames of (H, W) at out_fps -> H.264 mp4.
    Only the clips being filled or encoded are held in memory (each at most max_seconds long).
    """
    results: dict[int, VideoInfo | str] = {}
    if not plans:
        return results
    plans = sorted(plans, key=lambda p: p.first)
    try:
        groups = decode_groups(src, plans, src_fps, out_fps)
    except _BAD_VIDEO as e:
        raise_if_environment(e, f"cutting clips of {src}")
        groups = [plans]  # the single pass reports the error per scene
    encoding: dict[int, Future] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="clip-encoder") as encoder:
        for group in groups:
            _cut_group(src, group, src_fps, out_fps, size, results, encoding, encoder)
        for index, future in encoding.items():
            results[index] = future.result()
    return results


def _cut_group(src, plans, src_fps, out_fps, size, results, encoding, encoder) -> None:
    """One decoding run over `plans` (sorted); finished clips go to `encoder`, failures to `results`."""
    # source frame -> [(plan, clip frame j)]; several when upsampling fps
    wanted: dict[int, list[tuple[object, int]]] = {}
    for p in plans:
        for j in range(p.num_out):
            wanted.setdefault(p.source_index(j, src_fps, out_fps), []).append((p, j))
    buffers: dict[int, list] = {}  # scene index -> its clip frames (VideoFrame or None), allocated at the first
    filled: dict[int, int] = {p.index: 0 for p in plans}
    last_needed = max(wanted)
    pending = list(plans)
    h, w = size
    try:
        with av.open(str(src)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            seen = plans[0].first - 1  # the last source frame index accounted for
            to_yuv = stream_reformatter()
            for idx, frame in indexed_frames(container, stream, plans[0].first, src_fps):
                # Variable frame rate: a frame that lasts longer than 1/src_fps covers the indices
                # its timestamp skipped; it fills them, as ffmpeg's fps filter repeats frames.
                for p, j in (pj for k in range(seen + 1, idx + 1) if k in wanted for pj in wanted[k]):
                    # A fresh frame per clip frame: the encoder stamps each with its own time.
                    small = to_yuv.reformat(frame, width=w, height=h, format="yuv420p", interpolation="AREA")
                    clip = buffers.setdefault(p.index, [None] * p.num_out)
                    filled[p.index] += clip[j] is None
                    clip[j] = small
                seen = max(seen, idx)
                # Encode every clip whose last frame has gone by; its frames leave with it.
                while pending and idx >= pending[0].source_index(pending[0].num_out - 1, src_fps, out_fps):
                    p = pending.pop(0)
                    _submit(encoder, encoding, results, p, buffers.pop(p.index, None), filled[p.index], out_fps, size)
                if idx >= last_needed:
                    break
    except _BAD_VIDEO as e:
        raise_if_environment(e, f"cutting clips of {src}")
        for p in pending:
            results[p.index] = f"{src}: decoding failed before scene {p.index} was cut: {e}"
        return
    for p in pending:  # the decoder ran out before these scenes' last frames
        results[p.index] = (
            f"{src}: video ended before frame {p.first + p.keep - 1} (scene {p.index}); "
            f"got {filled[p.index]}/{p.num_out} clip frames"
        )


def _submit(encoder, encoding, results, p, frames, filled, out_fps, size) -> None:
    """Queue one clip for encoding, first waiting for older clips while MAX_QUEUED_CLIPS are queued."""
    for index in [i for i, f in encoding.items() if f.done()]:
        results[index] = encoding.pop(index).result()
    while len(encoding) >= MAX_QUEUED_CLIPS:
        index = next(iter(encoding))
        results[index] = encoding.pop(index).result()
    encoding[p.index] = encoder.submit(finish_clip, p, frames, filled, out_fps, size)


def finish_clip(p, frames: list | None, filled: int, out_fps: float, size: tuple[int, int]) -> VideoInfo | str:
    """Encode one clip and check it: the probe, or why it failed (the source or the encoder)."""
    if frames is None or filled != p.num_out:
        return f"{p.path}: only {filled}/{p.num_out} frames decoded for scene {p.index} (timestamps not contiguous)"
    try:
        info = encode_clip(p.path, frames, out_fps)
    except _BAD_VIDEO as e:
        raise_if_environment(e, f"writing clip {p.path}")  # PyAV's ENOSPC is an FFmpegError: not a bad scene
        return f"{p.path}: encoding scene {p.index} failed: {e}"
    if info.num_frames != p.num_out or (info.height, info.width) != size:
        return (
            f"{p.path}: written clip has {info.num_frames} frames {info.height}x{info.width}, "
            f"expected {p.num_out} {size[0]}x{size[1]}"
        )
    return info
