"""Reading, writing and probing video files with PyAV (its wheels carry their own FFmpeg).

Frames are numpy uint8 arrays shaped (T, H, W, 3) in RGB throughout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from soraflow.storage.layout import atomic_output


class VideoError(ValueError):
    """A file that is not a readable video; the message names the file and what is wrong."""


# Caps checked before any decode buffer is sized from a file's own header: a hostile or broken
# file (e.g. 4096x2 pixels for hours) must not make us allocate hundreds of GB.
MAX_PIXELS = 8192 * 8192
MAX_ASPECT = 32.0  # longer side / shorter side
MAX_DURATION_S = 24 * 3600.0
MAX_DECODE_BYTES = 8 << 30  # frames x H x W x 3 of one decoded array


def check_geometry(
    path: str | Path, height: int, width: int, fps: float | None = None, num_frames: int | None = None
) -> None:
    """VideoError unless the frame size, aspect and duration are within the caps above."""
    if not height or not width or height < 0 or width < 0:
        raise VideoError(f"{path}: no frame size in the header")
    if height * width > MAX_PIXELS:
        raise VideoError(f"{path}: frames of {width}x{height} are over the limit of {MAX_PIXELS} pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise VideoError(f"{path}: frames of {width}x{height} have an aspect ratio over {MAX_ASPECT:g}:1")
    if fps and num_frames and num_frames / fps > MAX_DURATION_S:
        raise VideoError(f"{path}: {num_frames} frames at {fps:g} fps is longer than the limit of {MAX_DURATION_S:g} s")


def check_decode_bytes(path: str | Path, frames: int, height: int, width: int) -> None:
    """VideoError if (frames, height, width, 3) uint8 would be over MAX_DECODE_BYTES."""
    need = int(frames) * int(height) * int(width) * 3
    if need > MAX_DECODE_BYTES:
        raise VideoError(
            f"{path}: decoding {frames} frames of {width}x{height} needs {need / 2**30:.1f} GiB, "
            f"over the limit of {MAX_DECODE_BYTES / 2**30:.0f} GiB"
        )


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def first_video_stream(container, path: str | Path, threads: bool = True):
    """The container's first video stream, decoded on FFmpeg's frame threads when `threads`;
    VideoError naming `path` when it has none."""
    if not container.streams.video:
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    if threads:
        stream.thread_type = "AUTO"
    return stream


def probe_video(path: str | Path, count_frames: bool = True) -> VideoInfo:
    """Frame count, fps and size. Counts frames by demuxing (exact) unless count_frames=False."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        raise VideoError(f"{path}: missing or empty file")
    try:
        with av.open(str(path)) as container:
            stream = first_video_stream(container, path, threads=False)
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            height, width = stream.codec_context.height, stream.codec_context.width
            check_geometry(path, height, width, fps, int(stream.frames or 0))
            if count_frames:
                n = sum(1 for _ in container.decode(stream))
            else:
                n = int(stream.frames or 0)
    except VideoError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"{path}: not a readable video: {e}") from e
    if n == 0 or not fps or not height or not width:
        raise VideoError(f"{path}: video has no decodable frames")
    return VideoInfo(num_frames=n, fps=fps, height=height, width=width)


def stream_reformatter() -> VideoReformatter:
    """A frame converter to reuse for every frame of one stream.

    `frame.reformat()` / `frame.to_ndarray(format=...)` build a new swscale context on every call:
    5-8 ms a frame even at 32x32 (PyAV 18), more than decoding. A reused reformatter keeps its
    context and converts the same pixels about 8x faster.
    """
    return VideoReformatter()


def read_frames(path: str | Path, indices: list[int] | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode frames (all, or the given indices in order) as (T, H, W, 3) uint8 RGB.

    `size` = (H, W) resizes while decoding. Missing indices (past the end) raise VideoError.
    """
    path = Path(path)
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            stream = first_video_stream(container, path)
            height, width = stream.codec_context.height, stream.codec_context.width
            check_geometry(path, height, width)
            out_h, out_w = size if size is not None else (height, width)
            if wanted is not None:
                check_decode_bytes(path, len(indices), out_h, out_w)
            last = wanted[-1] if wanted else None
            wanted_set = set(wanted) if wanted is not None else None
            resize, to_rgb = (
                stream_reformatter(),
                stream_reformatter(),
            )  # one each: a change of settings rebuilds the context
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None:
                    check_decode_bytes(path, len(got) + 1, out_h, out_w)  # all frames: counted as they come
                if wanted_set is None or i in wanted_set:
                    if size is not None:
                        frame = resize.reformat(frame, width=size[1], height=size[0])
                    got[i] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                if last is not None and i >= last:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoError(f"{path}: not a readable video: {e}") from e
    if not got:
        raise VideoError(f"{path}: video has no decodable frames")
    if indices is None:
        return np.stack([got[i] for i in sorted(got)])
    missing = [i for i in indices if int(i) not in got]
    if missing:
        raise VideoError(f"{path}: frame(s) {missing[:5]} past the end ({len(got)} decoded)")
    return np.stack([got[int(i)] for i in indices])


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4, atomically. H and W are padded to even."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video({path}): expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    path = Path(path)
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {
                "crf": str(crf),
                "preset": "veryfast",
                "threads": "1",
            }  # one thread: identical frames give identical bytes
            for arr in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def encode_clip(path: str | Path, frames: list[av.VideoFrame], fps: float, crf: int = 18,
                preset: str = "superfast") -> VideoInfo:
    """Encode yuv420p frames of one (even) size as an H.264 mp4, atomically; the written clip's probe.

    The scene cutter's writer: frames arrive already scaled into the encoder's pixel format (no RGB
    round trip), and the clip's frames are counted from its packets, one per frame with x264's
    defaults, checked against the file's own sample count, instead of decoding it again.
    x264's superfast preset: encoding was the largest part of a split (veryfast 2.2 ms a 456x256
    frame here, superfast 1.0 ms, medium 5.5 ms); at the same crf the picture is close and the
    file about a third larger (bench/results/split_vs_opensora.json has the bytes).
    """
    if not frames:
        raise ValueError(f"encode_clip({path}): no frames")
    h, w = frames[0].height, frames[0].width
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    packets = 0
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            # one thread: identical frames give identical bytes
            stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
            for j, frame in enumerate(frames):
                if (frame.height, frame.width, frame.format.name) != (h, w, "yuv420p"):
                    raise ValueError(f"encode_clip({path}): frame {j} is {frame.width}x{frame.height} "
                                     f"{frame.format.name}")
                frame.pts, frame.time_base = j, 1 / rate
                for packet in stream.encode(frame):
                    container.mux(packet)
                    packets += 1
            for packet in stream.encode():
                container.mux(packet)
                packets += 1
    info = probe_video(path, count_frames=False)  # the file's own header: its sample count, rate and size
    if info.num_frames != packets:
        raise VideoError(f"{path}: {packets} packets written but the file lists {info.num_frames} frames")
    return info


def write_gif(path: str | Path, frames: np.ndarray, fps: float, scale: int = 1) -> Path:
    """A looping GIF preview of (T, H, W, 3) uint8 frames, optionally upscaled by an integer factor."""
    from PIL import Image

    frames = np.asarray(frames)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    with atomic_output(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=max(1, int(1000 / fps)), loop=0
        )
    return path


def tile_grid(videos: list[np.ndarray], cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile several (T, H, W, 3) videos of one size into one (T, H', W', 3) grid video."""
    n = len(videos)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    t, h, w, _ = videos[0].shape
    grid = np.full((t, rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, v in enumerate(videos):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = v[:t]
    return grid


def to_uint8_frames(x) -> np.ndarray:
    """A (3, T, H, W) tensor in [-1, 1] -> (T, H, W, 3) uint8, as Open-Sora's save_sample does."""
    import torch

    x = x.detach().float().clamp(-1, 1).add(1).div(2)  # (3, T, H, W) in [0, 1]
    x = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
