"""The latent cache: every clip through the VAE once, every caption through T5 once.

Open-Sora v1.0 runs the VAE and T5 inside every training step (scripts/train.py, v1.0.0).
Both are frozen, so SoraFlow can run them once per dataset version instead:

    ok clip (all its frames) --resize + crop--> (3, T_all, H, W) in [-1, 1]
        --VAE encode_moments--> mean, std        each (C, T_all, H/f, W/f), already scaled
    caption --T5--> y (1, L, C_text), mask (L,)

Stored per clip are the posterior *moments* of *all* frames, not one latent, so training
keeps v1.0's randomness: a random temporal window per item (frame_indices) and a fresh
posterior sample x0 = mean + std * eps every time the item is read. This is exact because
the v1.0 VAE encodes frame by frame (latent T == pixel T).

On disk, under <root>/cache/<key>/ (built in a temporary folder, then renamed):

    index.json                 key, what it was built from, one entry per clip
    latents-00000.safetensors  "<clip_id>.mean", "<clip_id>.std" for up to SHARD_CLIPS clips
    text.safetensors           "y" (N_captions, 1, L, C_text), "mask" (N_captions, L)

The key hashes the dataset version, the VAE's and text encoder's weights and settings, and
the video config, so a new manifest or a re-fitted VAE gives a new folder, never a stale one.

Both training datasets give the loss the same batch, {"x0": (B, C, T, h, w), "y": (B, 1,
L, C_text), "mask": (B, L)}: `LatentCacheDataset` directly, and the online path
(`VideoClipDataset` + `OnlineEncoder`, as v1.0 does) after encoding in the training step.

The held-out split lives in storage/data/holdout.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from soraflow.models.noise import randn
from soraflow.storage.data.dataset import VideoClipDataset, frame_indices, to_model_input
from soraflow.storage.layout import DataRoot, atomic_write_text
from soraflow.storage.data.manifest import dataset_version
from soraflow.storage.data.video_io import read_frames
from torch.utils.data import Dataset

INDEX = "index.json"
TEXT_SHARD = "text.safetensors"
SHARD_CLIPS = 64  # clips per latents shard
FORMAT_VERSION = 1  # bump when the layout changes: old caches then get new keys


class LatentCacheError(ValueError):
    """A cache folder that is missing, incomplete or does not match what was asked for."""


# ---------------------------------------------------------------- identities and the key


def folder_identity(path: str | Path, big_file: int = 256 << 20) -> str:
    """A content hash of a model folder: every file's relative name and bytes.

    Files over `big_file` bytes (a T5-XXL shard) are hashed by size plus their first and
    last 4 MiB, so keying a multi-GB encoder stays fast; any re-save changes those.
    """
    path = Path(path)
    if not path.is_dir():
        raise LatentCacheError(f"{path}: not a model folder")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= big_file:
                while block := fh.read(1 << 20):
                    h.update(block)
            else:
                h.update(fh.read(4 << 20))
                fh.seek(size - (4 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def cache_key(
    dataset: str,
    vae_id: str,
    text_id: str,
    num_frames: int,
    frame_interval: int,
    image_size: tuple[int, int],
) -> str:
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "dataset": dataset,
            "vae": vae_id,
            "text": text_id,
            "video": [int(num_frames), int(frame_interval), [int(s) for s in image_size]],
        },
        sort_keys=True,
    )
    return f"latents-{dataset[:8]}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# ---------------------------------------------------------------- building


@dataclass
class CacheInfo:
    path: Path
    key: str
    clips: int
    captions: int
    built: bool  # False when an existing cache was reused
    seconds: float
    skipped: list[dict[str, Any]]  # ok rows that could not be encoded, with the reason
    latent: tuple[int, int, int, int]  # (C, T, h, w) of one training item: what STDiT is built for
    caption_channels: int  # C_text of the cached T5 features


def read_clip_frames(row: dict[str, Any], image_size: tuple[int, int]) -> torch.Tensor:
    """All frames of one clip file, resized and cropped: (3, T_all, H, W) in [-1, 1]."""
    frames = read_frames(row["path"])  # (T_all, H0, W0, 3) uint8
    return to_model_input(frames, tuple(image_size))


@torch.no_grad()
def build_latent_cache(
    source: str | Path | list[dict[str, Any]],
    root: DataRoot,
    encoders: Callable[[], tuple[Any, Any]],
    vae_id: str,
    text_id: str,
    num_frames: int,
    frame_interval: int,
    image_size: tuple[int, int],
    dataset: str | None = None,
    progress: bool = False,
) -> CacheInfo:
    """Encode a manifest's usable ok clips and captions once into root.cache_dir(key).

    `encoders()` returns (models.vae.VideoVAE, T5TextEncoder): called only when the cache has to be
    built, so a reused cache loads neither.
    `vae_id` / `text_id` name their weights (e.g. folder_identity of their folders).
    `dataset` is the dataset version; taken from the manifest when `source` is a path.
    An existing complete cache for the same key is reused as is.
    """
    t0 = time.perf_counter()
    if dataset is None:
        if not isinstance(source, (str, Path)):
            raise ValueError("build_latent_cache: pass dataset=<version> when giving rows instead of a manifest path")
        dataset = dataset_version(source)
    key = cache_key(dataset, vae_id, text_id, num_frames, frame_interval, image_size)
    final = root.cache_dir(key)
    if (final / INDEX).exists():
        index = read_index(final)
        return CacheInfo(
            final,
            key,
            len(index["clips"]),
            index["num_captions"],
            False,
            time.perf_counter() - t0,
            index["skipped"],
            *cache_geometry(final, index),
        )

    # The same usability checks as the training dataset (file exists, caption, long enough).
    clips = VideoClipDataset(source, num_frames, frame_interval, image_size, train=False)
    if not clips.rows:
        raise LatentCacheError(f"{source if isinstance(source, (str, Path)) else 'rows'}: no usable ok clips to cache "
                               f"({len(clips.skipped)} skipped: {[s['reason'] for s in clips.skipped[:3]]})")
    final.parent.mkdir(parents=True, exist_ok=True)
    vae, text_encoder = encoders()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        captions = sorted({r["text"] for r in clips.rows})
        caption_index = {c: i for i, c in enumerate(captions)}
        ys, masks = [], []
        for i in range(0, len(captions), 32):
            enc = text_encoder.encode(captions[i : i + 32])  # y (b, 1, L, C), mask (b, L)
            ys.append(enc["y"].float().cpu())
            masks.append(enc["mask"].cpu())
        save_file(
            {"y": torch.cat(ys).contiguous(), "mask": torch.cat(masks).to(torch.int64).contiguous()},
            str(tmp / TEXT_SHARD),
        )

        entries, skipped, shard, shard_no = [], list(clips.skipped), {}, 0

        def flush() -> None:
            nonlocal shard, shard_no
            if shard:
                save_file(shard, str(tmp / f"latents-{shard_no:05d}.safetensors"))
                shard, shard_no = {}, shard_no + 1

        for n, row in enumerate(clips.rows):
            cid = row["clip_id"]
            try:
                video = read_clip_frames(row, image_size)  # (3, T_all, H, W)
            except Exception as e:  # a clip that decoded at probe time but not now: keep a reason
                skipped.append({"clip_id": cid, "path": row["path"], "reason": f"unreadable while caching: {e}"})
                continue
            mean, std = vae.encode_moments(video[None])  # each (1, C, T_all, h, w), scaled
            if mean.shape[2] != video.shape[1]:
                raise LatentCacheError(f"the VAE changes the frame count ({video.shape[1]} -> {mean.shape[2]}); "
                                       "the latent cache needs a frame-wise VAE (as Open-Sora v1.0's)")
            shard[f"{cid}.mean"] = mean[0].float().contiguous()
            shard[f"{cid}.std"] = std[0].float().contiguous()
            entries.append({"clip_id": cid, "text": row["text"], "caption": caption_index[row["text"]],
                            "frames": int(mean.shape[2]), "shard": f"latents-{shard_no:05d}.safetensors"})
            if len(shard) >= 2 * SHARD_CLIPS:
                flush()
            if progress and (n + 1) % 50 == 0:
                print(f"latent cache: {n + 1}/{len(clips.rows)} clips encoded", flush=True)
        flush()
        if not entries:
            raise LatentCacheError(
                f"no clip could be encoded ({len(skipped)} skipped: {[s['reason'] for s in skipped[:3]]})"
            )
        index = {
            "format": FORMAT_VERSION,
            "key": key,
            "dataset": dataset,
            "vae": vae_id,
            "text_encoder": text_id,
            "num_frames": int(num_frames),
            "frame_interval": int(frame_interval),
            "image_size": [int(s) for s in image_size],
            "latent_shape": [int(s) for s in mean.shape[1:2]] + [int(s) for s in mean.shape[3:]],  # (C, h, w)
            "num_captions": len(captions),
            "clips": entries,
            "skipped": skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(tmp / INDEX, json.dumps(index, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX).exists():  # not a lost race with an identical build
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return CacheInfo(final, key, len(entries), len(captions), True, time.perf_counter() - t0, skipped,
                     *cache_geometry(final, index))


def cache_geometry(cache_dir: Path, index: dict[str, Any]) -> tuple[tuple[int, int, int, int], int]:
    """((C, T, h, w) of a training item, C_text) from the index and the text shard's header (no tensor read)."""
    c, h, w = index["latent_shape"]
    with safe_open(str(Path(cache_dir) / TEXT_SHARD), "pt") as f:
        caption_channels = f.get_slice("y").get_shape()[-1]  # y (N_captions, 1, L, C_text)
    return (int(c), int(index["num_frames"]), int(h), int(w)), int(caption_channels)


def read_index(cache_dir: str | Path) -> dict[str, Any]:
    cache_dir = Path(cache_dir)
    path = cache_dir / INDEX
    if not path.exists():
        raise LatentCacheError(f"{cache_dir}: not a latent cache (no {INDEX}; was it built to the end?)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LatentCacheError(f"{path}: not valid JSON: {e}") from e
    if index.get("format") != FORMAT_VERSION:
        raise LatentCacheError(
            f"{path}: cache format {index.get('format')}, this code reads {FORMAT_VERSION}; rebuild it"
        )
    return index


# ---------------------------------------------------------------- training datasets


class LatentCacheDataset(Dataset):
    """Training items from a latent cache.

    item -> {"x0": (C, T, h, w) posterior sample, "y": (1, L, C_text), "mask": (L,),
             "index": int, "clip_id": str, "text": str}

    Per item and epoch, as the video dataset does: a numpy/torch RNG seeded from
    (seed, epoch, index) picks Open-Sora's temporal window (frame_indices) and the
    posterior noise, so an item is the same in any worker and after a resume.
    train=False: the centred window and the posterior mean (nothing random).
    `clip_ids` restricts the items (e.g. to the training split), in cache order.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        num_frames: int,
        frame_interval: int,
        seed: int = 0,
        train: bool = True,
        clip_ids: Iterable[str] | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        index = read_index(self.cache_dir)
        self.num_frames, self.frame_interval = int(num_frames), int(frame_interval)
        self.seed, self.train, self.epoch = int(seed), bool(train), 0
        entries = index["clips"]
        if clip_ids is not None:
            wanted = set(clip_ids)
            entries = [e for e in entries if e["clip_id"] in wanted]
        too_short = [e["clip_id"] for e in entries if e["frames"] < self.num_frames]
        if too_short:
            raise LatentCacheError(
                f"{self.cache_dir}: clips {too_short[:5]} have fewer than num_frames={num_frames} frames"
            )
        self.entries = entries
        self.index = index
        text = self._open(TEXT_SHARD)
        self._y = text.get_tensor("y")  # (N_captions, 1, L, C_text)
        self._mask = text.get_tensor("mask")  # (N_captions, L)
        self._handles: dict[str, Any] = {}

    def _open(self, name: str):
        path = self.cache_dir / name
        if not path.exists():
            raise LatentCacheError(f"{path}: missing shard of the latent cache")
        return safe_open(str(path), framework="pt")

    def __getstate__(self):  # safetensors handles do not pickle; DataLoader workers reopen them
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def moments(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (mean, std) of all frames of item i, each (C, T_all, h, w)."""
        e = self.entries[i]
        handle = self._handles.get(e["shard"])
        if handle is None:
            handle = self._handles[e["shard"]] = self._open(e["shard"])
        return handle.get_tensor(f"{e['clip_id']}.mean"), handle.get_tensor(f"{e['clip_id']}.std")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.entries):
            raise IndexError(f"index {i} out of range for {len(self.entries)} cached clips")
        e = self.entries[i]
        mean, std = self.moments(i)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            idx = frame_indices(e["frames"], self.num_frames, self.frame_interval, rng)
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            mean, std = mean[:, idx], std[:, idx]  # (C, T, h, w)
            x0 = mean + std * randn(mean.shape, g, mean.device, mean.dtype)
        else:
            idx = frame_indices(e["frames"], self.num_frames, self.frame_interval, None)
            x0 = mean[:, idx]
        return {"x0": x0, "y": self._y[e["caption"]], "mask": self._mask[e["caption"]], "index": i,
                "clip_id": e["clip_id"], "text": e["text"]}


class OnlineEncoder:
    """Open-Sora v1.0's in-step encoding: video batch -> the same batch the cache gives.

    {"video": (B, 3, T, H, W), "text": [B]} -> {"x0": (B, C, T, h, w), "y": (B, 1, L, C_text), "mask": (B, L)}
    """

    def __init__(self, vae, text_encoder):
        self.vae, self.text_encoder = vae, text_encoder

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        mean, std = self.vae.encode_moments(batch["video"])  # each (B, C, T, h, w), scaled
        x0 = mean + std * randn(mean.shape, generator, mean.device, mean.dtype)
        enc = self.text_encoder.encode(list(batch["text"]))  # y (B, 1, L, C), mask (B, L)
        return {
            **{k: v for k, v in batch.items() if k != "video"},
            "x0": x0,
            "y": enc["y"].float(),
            "mask": enc["mask"],
        }
