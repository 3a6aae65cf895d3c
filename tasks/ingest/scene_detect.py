"""PySceneDetect's cuts, computed in parallel time chunks: exactly what `scenedetect.detect(path, detector)` returns.

`scenedetect.detect` (OpenCV backend) reads the video once, in order: per frame, BGR from
`cv2.VideoCapture`, downscaled by `SceneManager`'s auto-downscale (cv2 INTER_LINEAR), HSV, a
content score (mean absolute HSV change from the previous frame), then the detector's decision
(threshold + flash filter, or AdaptiveDetector's rolling ratio). The decision is sequential and
cheap; the scores are where the time goes, and a frame's score needs only itself and its
predecessor. So:

    plan:   window -> chunks [b0, b1], [b1, b2], ...   boundaries placed by the keyframe index (PyAV)
    scan:   each chunk in its own thread and its own `VideoStreamCv2` (cv2 releases the GIL while
            decoding): per frame (position, score); a chunk ends on the first frame at or after its
            end boundary, which the next chunk starts on (one frame of overlap)
    stitch: each boundary frame must be the same in both chunks (position and downscaled pixels),
            else the window is scanned again in one chunk
    decide: the detector's own `process_frame` on the scores, in frame order -> cuts -> scenes

Exact by construction, not by tolerance: frames come from the same reader class detect() uses
(`scenedetect.backends.opencv.VideoStreamCv2`: same decoder build, colour conversion, rotation
handling, positions, end-of-stream position), downscaled with SceneManager's own factor and
interpolation, scored with ContentDetector's arithmetic (checked bit for bit against its
`_calculate_frame_score` in tests), decided by the detector object itself. A chunk seeks with
OpenCV's own seek, which backs up 16 frames before its target and decodes forward: the boundary
frame is far enough past the keyframe for the decoder to be back in the sequential read's state,
and the overlap check proves it for that frame. Where a boundary does not match (a seek that
lands late, timestamps that differ after a seek), or frames change size mid-stream (SceneManager
skips those), the sequential scan is used: never a different answer, only a slower one.

Faster: up to one core per chunk (single-threaded decoders: no frame-threading overhead), no
decode thread and frame queue per frame, and a vectorised score (cv2.absdiff + sumElems on the
HSV image instead of three int32 numpy passes). What is left per frame is what detect() also
pays: decoding, the full-size BGR conversion and the resize (about nine tenths of our CPU time),
so on cores busy with other work the gain is the CPU ratio (about 1.1-1.4x), and it grows with
idle cores. A video with one keyframe (or too short to split) is read in one chunk.
bench/bench_scene_split.py measures the ratio to `scenedetect.detect`.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import cv2
import numpy as np
from scenedetect import ContentDetector, FrameTimecode
from scenedetect.common import Timecode
from scenedetect.backends.opencv import VideoStreamCv2
from scenedetect.scene_manager import SceneManager, compute_downscale_factor, get_scenes_from_cuts
from scenedetect.video_stream import VideoOpenFailure

# OpenCV's seek backs up 16 frames before its target and decodes forward; VideoStreamCv2.seek
# asks for one frame early; we ask two frames before a boundary. A boundary placed this many
# frames after a keyframe is reached by decoding from that keyframe.
SEEK_LEAD_FRAMES = 20
# Decoding a frame without converting, scaling and scoring it costs about this fraction of a
# fully processed frame (H.264, 270p-1080p), which is what frames decoded only to reach a chunk cost.
GRAB_COST = 0.75
# Chunks are used only when the estimated longest chunk is at most this fraction of one scan:
# a thread and a second decoder are not free, and the machine may be busy.
MIN_GAIN = 0.8
MIN_CHUNK_FRAMES = 48  # below this, opening and seeking another decoder does not pay


@dataclass
class Scan:
    """One chunk's frames: positions and content scores, with the frames at its two ends for stitching."""

    positions: list[FrameTimecode] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)  # None: the predecessor is in the previous chunk
    first: np.ndarray | None = None  # downscaled BGR of positions[0]
    last: np.ndarray | None = None  # downscaled BGR of positions[-1]
    at_boundary: bool = False  # stopped on its end boundary frame (the next chunk's first), not at the end
    # the reader's position when the scan stopped (SceneManager's last position)
    end_position: FrameTimecode | None = None
    # OpenCV's frame counter at positions[0] and where the scan stopped, and the timestamp there.
    # The counter counts grabs, but a seek sets it from the timestamp (avg-rate frames), and
    # VideoStreamCv2.position falls back on it where there is no timestamp (after the last frame):
    # stitching carries the first chunk's count across the chunks (variable frame rate).
    first_number: int | None = None
    end_number: int | None = None
    end_timecode: Timecode | None = None
    sizes: set[tuple[int, int]] = field(default_factory=set)  # decoded frame sizes (W, H)


# ---------------------------------------------------------------- scores


def content_score(hsv: np.ndarray, prev: np.ndarray) -> float:
    """ContentDetector's frame score of `hsv` after `prev`, both (H, W, 3) uint8 HSV, bit-identical.

    ContentDetector (default weights: hue, saturation, luma 1, edges 0) averages the per-channel
    mean absolute differences: sum(component * weight) / sum(|weight|), each component
    sum|a - b| / pixels. cv2 sums the absolute differences exactly (integers well below 2**53),
    so the floating-point operations, done in the same order, give the same double.
    """
    weights = ContentDetector.DEFAULT_COMPONENT_WEIGHTS
    pixels = float(hsv.shape[0] * hsv.shape[1])
    dh, ds, dv, _ = cv2.sumElems(cv2.absdiff(hsv, prev))
    components = (dh / pixels, ds / pixels, dv / pixels, 0.0)  # edges: weight 0, not computed
    return sum(c * w for c, w in zip(components, weights, strict=True)) / sum(abs(w) for w in weights)


# ---------------------------------------------------------------- scanning


def seek_before(video: VideoStreamCv2, t: float) -> bool:
    """Seek `video` (OpenCV's seek: from the keyframe >= 16 frames before, decoding forward) and grab
    a frame before t (or the first frame); False if the stream ended first.

    OpenCV maps time to frame numbers with the average frame rate; where timestamps are uneven
    (variable frame rate, dropped frames) it can land after t. Then it backs up further.
    """
    back = 2 / float(video.frame_rate)
    while True:
        target = max(0.0, t - back)
        video.seek(target)
        if not video.read(decode=False):
            return False
        if video.position.seconds < t or target == 0.0:
            return True
        back *= 4


def open_reader(video: VideoStreamCv2, decoder_threads: int) -> VideoStreamCv2:
    """Another PySceneDetect OpenCV reader on `video`'s file, from its start, whose capture decodes
    with `decoder_threads` FFmpeg threads (detect() leaves OpenCV's default, one per CPU).

    Chunks run side by side, one core each: frame-threaded decoding there only adds thread
    hand-offs (about a fifth more CPU per frame). FFmpeg's frame threading is bit-exact (its
    conformance tests run with and without threads), so the frames are the same. The reader is
    a copy of `video` (VideoStreamCv2 keeps its capture in `_cap`; everything else is its own
    code), which saves opening the file twice.
    """
    if video.capture.getBackendName() != "FFMPEG":
        return VideoStreamCv2(video.path)  # the thread count is an FFmpeg option
    reader = copy.copy(video)
    cap = cv2.VideoCapture(video.path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, decoder_threads])
    if not cap.isOpened():
        raise VideoOpenFailure(f"{video.path}: could not be opened again")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1.0)  # as VideoStreamCv2 opens it
    reader._cap = cap
    return reader


def scan(
    video: VideoStreamCv2, start_frame: int | None, end_frame: int | None, begin_s: float | None, end_s: float | None
) -> Scan:
    """Read the window's frames from the first at/after `begin_s` (None: the window start) to the
    first at/after `end_s` (None: the window end), as SceneManager reads them, and score them.
    `video`: a reader at the start of the file."""
    rate = video.frame_rate
    manager = SceneManager()  # only for detect()'s defaults: auto-downscale and its interpolation
    factor = compute_downscale_factor(max(video.frame_size)) if manager.auto_downscale else manager.downscale
    interpolation = manager.interpolation.value
    # detect(): seek to start_time, then stop after the frame for which `position + 1 < end_time` fails.
    end_time = video.base_timecode + FrameTimecode(end_frame, rate) if end_frame is not None else None
    out = Scan()
    grabbed = False  # a frame is grabbed and not yet looked at
    if begin_s is None:
        if start_frame is not None:
            video.seek(FrameTimecode(start_frame, rate))
    else:
        grabbed = seek_before(video, begin_s)
        if not grabbed:
            out.end_position = video.position
            return out
    frame_size = None
    prev = None
    while True:
        if not grabbed and not video.read(decode=False):  # grab: decode only (VideoStreamCv2 retries bad frames)
            break
        grabbed = False
        position = video.position
        if begin_s is not None and not out.positions and position.seconds < begin_s:
            continue  # before this chunk: the previous chunk's frame
        ok, image = video.capture.retrieve()  # the BGR VideoStreamCv2.read() returns
        if not ok:  # detect() fails too (SceneManager asserts it got an image)
            raise RuntimeError(f"{video.path}: frame at {position} decoded but could not be converted")
        size = (image.shape[1], image.shape[0])
        out.sizes.add(size)
        if frame_size is None:
            frame_size = size
        elif size != frame_size:
            continue  # SceneManager skips frames whose size changed (chunks seeing two sizes are not stitched)
        if factor > 1.0:
            image = cv2.resize(
                image, (max(1, round(size[0] / factor)), max(1, round(size[1] / factor))), interpolation=interpolation
            )
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        if prev is not None:
            score = content_score(hsv, prev)
        else:
            score = 0.0 if begin_s is None else None  # ContentDetector scores its first frame 0.0
            out.first = image
            out.first_number = video.frame_number
        out.positions.append(position)
        out.scores.append(score)
        out.last = image
        prev = hsv
        if end_s is not None and position.seconds >= end_s:
            out.at_boundary = True
            break
        if end_time is not None and not (position + 1) < end_time:
            break
    out.end_position, out.end_number, out.end_timecode = video.position, video.frame_number, video.timecode
    return out


def stitch(scans: list[Scan]) -> Scan | None:
    """The chunks joined into one sequential scan, or None if two chunks disagree on a boundary frame."""
    if len(set().union(*(s.sizes for s in scans))) > 1:
        return None  # frames change size: which ones SceneManager skips depends on the window's first frame
    whole = Scan(positions=list(scans[0].positions), scores=list(scans[0].scores), first=scans[0].first)
    done = scans[0]
    count = done.end_number  # OpenCV's frame counter as a sequential read would have it
    for nxt in scans[1:]:
        if not done.at_boundary:
            break  # the window ended in an earlier chunk; later chunks read past it
        head, tail = nxt.positions[:1], done.positions[-1:]  # the frame both chunks must have read
        if not head or [(p.pts, p.time_base) for p in head] != [(p.pts, p.time_base) for p in tail]:
            return None
        if not np.array_equal(nxt.first, done.last):
            return None
        whole.positions += nxt.positions[1:]
        whole.scores += nxt.scores[1:]
        count += nxt.end_number - nxt.first_number  # its grabs after the boundary frame
        done = nxt
    if done.at_boundary:
        return None  # the last chunk cannot stop at a boundary; defensive
    # Where a sequential read would have stopped: VideoStreamCv2's own position property on the
    # last chunk's timestamp there and the carried frame count.
    stopped = SimpleNamespace(timecode=done.end_timecode, frame_number=count, frame_rate=done.end_position.frame_rate)
    try:
        whole.end_position = VideoStreamCv2.position.fget(stopped)
    except AttributeError:  # a PySceneDetect whose position needs more of the reader: read in one chunk
        return None
    return whole


# ---------------------------------------------------------------- planning


def keyframe_time(container, stream, t: float, backward: bool) -> float | None:
    """Time (s, from the stream start) of the keyframe at/before (backward) or at/after t, from the index."""
    t0 = stream.start_time or 0
    try:
        container.seek(t0 + max(0, int(t / stream.time_base)), stream=stream, backward=backward)
        for packet in itertools.islice(container.demux(stream), 16):
            if packet.pts is not None:
                return float((packet.pts - t0) * stream.time_base)
    except (av.error.FFmpegError, StopIteration):
        pass
    return None


def plan(path: str, rate: Fraction, start_s: float, end_s: float | None, workers: int) -> list[float]:
    """Chunk boundaries (s) splitting [start_s, end_s) into up to `workers` chunks of about equal
    cost, or [] where one scan would be about as fast.

    A chunk's cost: its frames, plus GRAB_COST per frame decoded only to reach its start (from
    the keyframe its seek lands on). Near each even split, a boundary can sit at the split itself
    (decoding from the keyframe before it) or SEEK_LEAD_FRAMES after the keyframe before or after
    it (little decoded for nothing); left to right, the one with the shortest longest chunk wins.
    """
    lead = SEEK_LEAD_FRAMES / float(rate)
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if end_s is None:
                if stream.duration is not None:
                    end_s = float(stream.duration * stream.time_base)
                elif container.duration is not None:
                    end_s = container.duration / av.time_base
                else:
                    return []
            span = end_s - start_s
            bounds, last, reach, longest = [], start_s, 0.0, 0.0  # reach: decode-only cost of the current chunk
            for i in range(1, workers):
                ideal = start_s + span * i / workers
                options = []  # (boundary, seconds decoded to reach it)
                before = keyframe_time(container, stream, ideal - lead, backward=True)
                if before is not None:
                    options += [(ideal, ideal - before), (before + lead, lead)]
                after = keyframe_time(container, stream, ideal - lead, backward=False)
                if after is not None:
                    options.append((after + lead, lead))
                options = [(b, w) for b, w in options if last + lead < b < end_s - lead]
                if not options:
                    continue
                rest = workers - i  # chunks after this boundary

                def longest_with(option):
                    b, w = option
                    return max(b - last + reach, (end_s - b) / rest + GRAB_COST * w)

                b, w = min(options, key=longest_with)
                longest = max(longest, b - last + reach)
                bounds.append(b)
                last, reach = b, GRAB_COST * w
    except (av.error.FFmpegError, OSError, IndexError):
        return []
    longest = max(longest, end_s - last + reach)
    return bounds if bounds and longest <= MIN_GAIN * span else []


# ---------------------------------------------------------------- detection


def decide(detector, whole: Scan) -> list[FrameTimecode]:
    """The detector's own decision on the scanned scores: its `process_frame`, with the score it
    would compute from the frame handed to it (ContentDetector and AdaptiveDetector both get
    their content score from `_calculate_frame_score`)."""
    scores = iter(whole.scores)
    detector._calculate_frame_score = lambda timecode, frame_img: next(scores)
    cuts: list[FrameTimecode] = []
    for position in whole.positions:
        cuts += detector.process_frame(position, None)
    cuts += detector.post_process(whole.end_position)
    return cuts


def first_frame_at(t: float, fps: float) -> int:
    """Index of the first frame whose timestamp k/fps is >= t (tolerating float noise)."""
    return max(0, math.ceil(t * fps - 1e-3))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chunk_bounds(
    video: VideoStreamCv2, path: str, start_frame: int | None, end_frame: int | None, workers: int | None = None
) -> list[float]:
    """Where detect() splits the window of the opened `video` at `path`: boundaries in seconds, [] for one scan."""
    rate = video.frame_rate
    last_frame = video.duration.frame_num if end_frame is None else end_frame  # OpenCV's frame count: an estimate
    workers = min(workers or usable_cpus(), (last_frame - (start_frame or 0)) // MIN_CHUNK_FRAMES)
    if workers < 2:
        return []
    start_s = (video.base_timecode + FrameTimecode(start_frame or 0, rate)).seconds
    end_s = FrameTimecode(end_frame, rate).seconds if end_frame is not None else None
    return plan(path, rate, start_s, end_s, workers)


def detect(path: str | Path, detector, window: tuple[float | None, float | None] = (None, None),
           workers: int | None = None, bounds: list[float] | None = None):
    """Scenes of the window [start_s, end_s) (None: file start / end), as `scenedetect.detect(path,
    detector, start_time=start_frame, end_time=end_frame, start_in_scene=True)` returns them,
    where start_frame / end_frame are the first frames at/after start_s / end_s; and the frame
    rate frames are counted in.

    `detector`: a fresh ContentDetector or AdaptiveDetector with default weights (the score is
    computed here). `workers`: chunks at most (default: the usable CPUs). `bounds`: chunk
    boundaries (s) to use instead of planned ones (tests). A window without frames gives []
    (detect() would give one empty scene).
    """
    path = str(path)
    video = VideoStreamCv2(path)  # raises as detect() does for a missing or unreadable file
    rate = video.frame_rate
    start_frame, end_frame = (None if t is None else first_frame_at(t, float(rate)) for t in window)
    if bounds is None:
        bounds = chunk_bounds(video, path, start_frame, end_frame, workers)
    whole = None
    if bounds:
        chunks = list(zip([None, *bounds], [*bounds, None]))
        with ThreadPoolExecutor(len(chunks) - 1) as pool:
            try:
                readers = [open_reader(video, 1) for _ in chunks]  # one decoding thread each
                later = [pool.submit(scan, r, start_frame, end_frame, *c) for r, c in zip(readers[1:], chunks[1:])]
                whole = stitch([scan(readers[0], start_frame, end_frame, *chunks[0]), *(f.result() for f in later)])
            except Exception:  # noqa: BLE001
                # a chunk failed (after its seek): the one-chunk read decides, and raises if detect() would
                whole = None
        video.capture.release()
        if whole is None:  # or the chunks disagree on a boundary frame: read the window as detect() does
            video = VideoStreamCv2(path)
    if whole is None:
        whole = scan(video, start_frame, end_frame, None, None)
    if not whole.positions:
        return [], rate
    cuts = decide(detector, whole)
    scenes = get_scenes_from_cuts(
        cut_list=sorted(set(cuts)), start_pos=whole.positions[0], end_pos=whole.end_position + 1
    )
    return sorted(scenes), rate
