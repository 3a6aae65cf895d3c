"""The training dataset: clips from a manifest's ok rows, sampled and cropped as Open-Sora v1.0.

Per item (Open-Sora v1.0.0 `opensora/datasets/datasets.py`: `DatasetFromCSV` + `get_transforms_video`):

    row --frame_indices--> [i_0 .. i_{T-1}]        T = num_frames, spread over
                                                   num_frames * frame_interval frames
        --read_frames-->   (T, H0, W0, 3) uint8    PyAV, decoding stops at i_{T-1}
        --to float-->      (T, 3, H0, W0) in [0, 1]
        --resize-->        (T, 3, H1, W1)          short side to the target, bilinear,
                                                   align_corners=False (UCFCenterCropVideo)
        --centre crop-->   (T, 3, H, W)
        --normalize-->     (3, T, H, W) in [-1, 1] (mean 0.5, std 0.5)

Differences from Open-Sora, on purpose:

* No random horizontal flip. Our captions say "moving left" / "on the right"; a flipped
  clip would teach the model the opposite of its caption.
* Clips with fewer than num_frames frames are not read (Open-Sora asserts mid-epoch). The
  constructor leaves them out and lists them in `self.skipped` with the reason, as it does
  for ok rows whose file is missing or has no caption.
* Non-square targets: the resize covers both sides (scale = max(H/H0, W/W0)); for square
  targets this is Open-Sora's short-side scale. Sizes are computed, then passed to
  `interpolate(size=...)`, so float rounding never leaves a side one pixel short.
* Images (png/jpg/...) go through the same transform as one-frame videos: (3, 1, H, W)
  when num_frames == 1, else that frame repeated num_frames times, as Open-Sora does.
* A row's clip is the whole file at `path`, `num_frames` its frame count (probed when
  missing). After the scene split, start_s/end_s say where the clip came from in the
  source video; they are lineage, not a range to cut again.
* Randomness is per item: a numpy Generator seeded from (seed, epoch, index), so an item
  is the same whichever worker or process loads it; call `set_epoch` every epoch.
  With train=False the window is the centred one and nothing is random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from soraflow.storage.data.manifest import ok_rows, read_rows
from soraflow.storage.data.video_io import VideoError, probe_video, read_frames
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def frame_indices(
    total: int, num_frames: int, frame_interval: int, rng: np.random.Generator | None = None
) -> list[int]:
    """Open-Sora v1.0 temporal sampling: which `num_frames` frames of a `total`-frame clip to read.

    window = num_frames * frame_interval; begin is uniform in [0, max(0, total - window - 1)]
    (Open-Sora's TemporalRandomCrop) when `rng` is given, else the centred window's start;
    end = min(begin + window, total); indices = linspace(begin, end - 1, num_frames)
    truncated to int. Raises ValueError if the clip has fewer than num_frames frames.
    """
    if num_frames < 1 or frame_interval < 1:
        raise ValueError(f"num_frames and frame_interval must be >= 1, got {num_frames}, {frame_interval}")
    if total < num_frames:
        raise ValueError(f"clip has {total} frames, fewer than num_frames={num_frames}")
    window = num_frames * frame_interval
    last_begin = max(0, total - window - 1)
    if rng is None:
        begin = min(max(0, (total - window) // 2), last_begin)
    else:
        begin = int(rng.integers(0, last_begin + 1))
    end = min(begin + window, total)
    return np.linspace(begin, end - 1, num_frames, dtype=int).tolist()


def resize_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, C, H0, W0) float -> (T, C, H, W): scale so the target is covered, then centre crop."""
    th, tw = size
    h0, w0 = frames.shape[-2:]
    scale = max(th / h0, tw / w0)
    h1, w1 = max(th, round(h0 * scale)), max(tw, round(w0 * scale))
    if (h1, w1) != (h0, w0):
        frames = F.interpolate(frames, size=(h1, w1), mode="bilinear", align_corners=False)
    i, j = int(round((h1 - th) / 2.0)), int(round((w1 - tw) / 2.0))
    return frames[..., i : i + th, j : j + tw]


def to_model_input(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(T, H0, W0, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:
        frames = frames.copy()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (T, 3, H0, W0)
    x = resize_crop(x, size)  # (T, 3, H, W)
    x = x.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class VideoClipDataset(Dataset):
    """A torch Dataset over the usable ok rows of a manifest.

    item -> {"video": (3, T, H, W) float32 in [-1, 1], "text": str, "index": int, "clip_id": str}

    `self.rows` are the rows served (item i is rows[i]); `self.skipped` lists the ok rows
    left out, as {"clip_id", "path", "reason"}; `self.num_rejected` counts rejected rows.
    """

    def __init__(
        self,
        source: str | Path | list[dict[str, Any]],
        num_frames: int,
        frame_interval: int,
        image_size: tuple[int, int] | int,
        seed: int = 0,
        train: bool = True,
    ):
        all_rows = read_rows(source) if isinstance(source, (str, Path)) else list(source)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.num_frames = int(num_frames)
        self.frame_interval = int(frame_interval)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.train = bool(train)
        self.epoch = 0
        ok = ok_rows(all_rows)
        self.num_rejected = len(all_rows) - len(ok)
        self.rows: list[dict[str, Any]] = []
        self._totals: list[int] = []  # frames in each served file
        self.skipped: list[dict[str, Any]] = []
        for row in ok:
            reason, total = self._check(row)
            if reason:
                self.skipped.append(
                    {"clip_id": row.get("clip_id") or "", "path": row.get("path") or "", "reason": reason}
                )
            else:
                self.rows.append(row)
                self._totals.append(total)

    def _check(self, row: dict[str, Any]) -> tuple[str | None, int]:
        """Why this ok row cannot be served (None if it can), and its frame count."""
        if not row.get("path"):
            return "no path", 0
        path = Path(row["path"])
        if not path.is_file():
            return f"file not found: {path}", 0
        if not (row.get("text") or "").strip():
            return "no caption (text is empty)", 0
        if is_image(path):
            return None, 1
        total = row.get("num_frames")
        if total is None:
            try:
                total = probe_video(path).num_frames
            except VideoError as e:
                return f"unreadable video: {e}", 0
        if total < self.num_frames:
            return f"too short: {total} frames < num_frames={self.num_frames}", 0
        return None, int(total)

    def set_epoch(self, epoch: int) -> None:
        """Use a new random window per item each epoch (like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def indices_for(self, index: int) -> list[int]:
        """The frame numbers of the clip file that item `index` reads this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        return frame_indices(self._totals[index], self.num_frames, self.frame_interval, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} clips")
        row = self.rows[index]
        path = Path(row["path"])
        if is_image(path):
            from PIL import Image

            with Image.open(path) as im:
                frames = np.asarray(im.convert("RGB"))[None]  # (1, H0, W0, 3)
            video = to_model_input(frames, self.image_size)  # (3, 1, H, W)
            if self.num_frames > 1:
                video = video.repeat(1, self.num_frames, 1, 1)  # (3, T, H, W), a still clip
        else:
            try:
                frames = read_frames(path, self.indices_for(index))  # (T, H0, W0, 3)
            except VideoError as e:
                raise VideoError(f"clip {row.get('clip_id')!r}: {e}") from e
            video = to_model_input(frames, self.image_size)  # (3, T, H, W)
        return {"video": video, "text": row["text"], "index": index, "clip_id": row.get("clip_id") or ""}
