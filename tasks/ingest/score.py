"""Scoring: motion (`flow`) and aesthetics (`aes`) for every ok clip, then threshold filters.

    rows (clips) -> rows with flow (and aes), or rejected "motion 0.12 < min_flow 0.3" keeping their scores

* Motion, Open-Sora's `flow` (v1.1+: UniMatch on frames [0, 10, 20, 30] of ~30 fps clips, at
  320x576, mean |flow|). Here: OpenCV Farneback dense flow on pairs of frames 1/3 s apart
  (10 frames at 30 fps, so pairs (0,10), (10,20), (20,30) of a 31-frame 30 fps clip; three
  pairs spread over longer clips; the whole clip when it is shorter), computed at 160x288 and
  reported in pixels of a 320x576 frame per 1/3 s, so thresholds read on Open-Sora's scale
  (its "motion < 0.3" filter). Farneback is not UniMatch: the scale matches, the values do not;
  and it sees luminance only, so an object as bright as its background does not count as motion.
* Aesthetics, the LAION improved aesthetic predictor as Open-Sora (v1.1 tools/scoring): CLIP
  image features, L2-normalised, through a head of linear layers (LAION's MLP has no
  activations), mean over frames at 10/50/90 %. Both the open_clip weights file
  (cfg.aesthetic_clip_path, for `cfg.aesthetic_clip_model`; OpenAI's ViT-L/14 weights need
  "ViT-L-14-quickgelu") and the head (cfg.aesthetic_head_path, safetensors) are local files;
  without both, `aes` stays None and the stage returns the note AES_SKIPPED.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from soraflow.configs.loader import ConfigError
from soraflow.configs.schema import ScoreConfig
from soraflow.storage.faults import raise_if_environment
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import read_rows, reject, write_manifest
from soraflow.storage.data.video_io import VideoError, probe_video, read_frames

FLOW_SIZE = (160, 288)  # (H, W) where flow is computed: half of Open-Sora's 320x576
FLOW_SCALE = 320 / FLOW_SIZE[0]  # pixels at FLOW_SIZE -> pixels at 320x576
FLOW_GAP_S = 1 / 3  # time between the two frames of a pair: Open-Sora's 10 frames at 30 fps
FLOW_PAIRS = 3
AES_POINTS = (0.1, 0.5, 0.9)
AES_BATCH_ROWS = 32  # clips per CLIP forward pass (3 frames each)
AES_SKIPPED = "aesthetic scoring skipped: no weights configured"
MOTION_OFF = "motion scoring disabled (score.motion = false)"


# ---------------------------------------------------------------- motion


def flow_pairs(num_frames: int, fps: float) -> list[tuple[int, int]]:
    """The (a, b) frame pairs compared: FLOW_GAP_S apart (or the whole clip), up to FLOW_PAIRS, spread over the clip."""
    if num_frames < 2:
        raise VideoError(f"{num_frames} frame(s): motion needs at least 2")
    gap = min(max(1, round(fps * FLOW_GAP_S)), num_frames - 1)
    starts = sorted({int(round(s)) for s in np.linspace(0, num_frames - 1 - gap, FLOW_PAIRS)})
    return [(s, s + gap) for s in starts]


def motion_score(path: str | Path, num_frames: int | None = None, fps: float | None = None) -> float:
    """Mean dense optical-flow magnitude, in pixels of a 320x576 frame per FLOW_GAP_S."""
    if not num_frames or not fps:
        info = probe_video(path)
        num_frames, fps = num_frames or info.num_frames, fps or info.fps
    pairs = flow_pairs(num_frames, fps)
    idx = sorted({i for p in pairs for i in p})
    frames = read_frames(path, idx, size=FLOW_SIZE)  # (K, 160, 288, 3) uint8
    gray = {i: cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for i, f in zip(idx, frames)}
    mags = []
    for a, b in pairs:
        # (160, 288, 2) per-pixel displacement; 5 pyramid levels follow motions of tens of pixels
        flow = cv2.calcOpticalFlowFarneback(gray[a], gray[b], None, 0.5, 5, 15, 3, 5, 1.2, 0)
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()) * (fps * FLOW_GAP_S) / (b - a))  # per FLOW_GAP_S
    return float(np.mean(mags)) * FLOW_SCALE


# ---------------------------------------------------------------- aesthetics


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_head(path: str | Path, in_features: int):
    """A safetensors head -> nn.Sequential of its Linear layers, in key order, ending in one output.

    Accepts a single linear layer ("weight", "bias") or LAION's MLP ("layers.0.weight" ...
    "layers.7.bias": 768 -> 1024 -> 128 -> 64 -> 16 -> 1).
    """
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    modules = sorted({k.rsplit(".", 1)[0] if "." in k else "" for k in state}, key=_natural_key)
    layers, dim = [], in_features
    for m in modules:
        prefix = f"{m}." if m else ""
        w, b = state.get(f"{prefix}weight"), state.get(f"{prefix}bias")
        if w is None or w.ndim != 2:
            raise ConfigError(
                f"score.aesthetic_head_path {str(path)!r}: '{prefix}weight' is not a linear layer's weight"
            )
        if w.shape[1] != dim:
            raise ConfigError(
                f"score.aesthetic_head_path {str(path)!r}: layer '{m}' takes {w.shape[1]} features, expected {dim}"
            )
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        layer.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
        layers.append(layer)
        dim = w.shape[0]
    if dim != 1:
        raise ConfigError(f"score.aesthetic_head_path {str(path)!r}: the head ends in {dim} outputs, expected 1")
    return torch.nn.Sequential(*layers).eval()


class AestheticScorer:
    """open_clip image encoder + aesthetic head, both from local files."""

    def __init__(self, cfg: ScoreConfig, device: str | None = None):
        import open_clip
        import torch

        for key in ("aesthetic_clip_path", "aesthetic_head_path"):
            if not Path(getattr(cfg, key)).is_file():
                raise ConfigError(f"score.{key} {getattr(cfg, key)!r}: no such file")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(cfg.aesthetic_clip_model, pretrained=None)
            open_clip.load_checkpoint(model, cfg.aesthetic_clip_path)
        except (RuntimeError, AssertionError, KeyError, ValueError) as e:  # unknown model, or another architecture
            raise ConfigError(
                f"score.aesthetic_clip_path {cfg.aesthetic_clip_path!r} for {cfg.aesthetic_clip_model!r}: {e}"
            ) from e
        self.model = model.to(self.device).eval()
        embed_dim = self.model.visual.output_dim
        self.head = load_head(cfg.aesthetic_head_path, embed_dim).to(self.device)
        self._lock = threading.Lock()

    def frames(self, row: dict[str, Any]) -> np.ndarray:
        """(3, H, W, 3) uint8: the frames at 10/50/90 % of the clip."""
        n = row.get("num_frames") or probe_video(row["path"]).num_frames
        return read_frames(row["path"], [min(n - 1, int(n * p)) for p in AES_POINTS])

    def score_frames(self, videos: list[np.ndarray]) -> list[float]:
        """Videos of (F, H, W, 3) frames -> one score each: the mean over its frames."""
        import torch
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.fromarray(f)) for v in videos for f in v]).to(
            self.device
        )  # (sum F, 3, S, S)
        with self._lock, torch.no_grad():
            feats = self.model.encode_image(pixels).float()  # (sum F, D)
            feats = feats / feats.norm(dim=-1, keepdim=True)
            per_frame = self.head(feats).squeeze(-1).cpu().numpy()  # (sum F,)
        out, i = [], 0
        for v in videos:
            out.append(float(per_frame[i : i + len(v)].mean()))
            i += len(v)
        return out


_SCORERS: dict[tuple, AestheticScorer] = {}
_SCORERS_LOCK = threading.Lock()


def get_aesthetic_scorer(cfg: ScoreConfig) -> AestheticScorer:
    """One scorer per (model, weights, head) per process, shared by the shards it runs."""
    key = (cfg.aesthetic_clip_model, cfg.aesthetic_clip_path, cfg.aesthetic_head_path)
    with _SCORERS_LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = AestheticScorer(cfg)
        return _SCORERS[key]


# ---------------------------------------------------------------- stage


def score_rows(rows: list[dict[str, Any]], cfg: ScoreConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows in -> (rows out in the same order, notes for the manifest lineage).

    Rows that already carry a score keep it (a re-run computes only what is missing).
    """
    notes: list[str] = []
    scorer = None
    if cfg.aesthetic_clip_path and cfg.aesthetic_head_path:
        scorer = get_aesthetic_scorer(cfg)
    else:
        notes.append(AES_SKIPPED)
    if not cfg.motion:
        notes.append(MOTION_OFF)
    for name, enabled in (("min_flow", cfg.motion), ("min_aes", scorer is not None)):
        if getattr(cfg, name) is not None and not enabled:
            notes.append(f"{name} not applied: its score is not computed")

    out = [dict(r) for r in rows]
    errors: dict[int, str] = {}
    for i, row in enumerate(out):
        if row["status"] != "ok" or not cfg.motion or row.get("flow") is not None:
            continue
        try:
            row["flow"] = motion_score(row["path"], row.get("num_frames"), row.get("fps"))
        except Exception as e:  # noqa: BLE001 - one row's failure is its rejection
            raise_if_environment(e, f"motion score of {row['path']}")
            why = str(e) if isinstance(e, VideoError) else f"{type(e).__name__}: {e}"
            errors[i] = f"{row['path']}: motion score: {why}" if row["path"] not in why else why
    if scorer is not None:
        todo = [i for i, r in enumerate(out) if r["status"] == "ok" and r.get("aes") is None and i not in errors]
        for start in range(0, len(todo), AES_BATCH_ROWS):
            batch, videos = [], []
            for i in todo[start : start + AES_BATCH_ROWS]:
                try:
                    videos.append(scorer.frames(out[i]))
                    batch.append(i)
                except Exception as e:  # noqa: BLE001 - one row's failure is its rejection
                    raise_if_environment(e, f"aesthetic frames of {out[i]['path']}")
                    errors[i] = (
                        str(e)
                        if isinstance(e, VideoError)
                        else f"{out[i]['path']}: aesthetic score: {type(e).__name__}: {e}"
                    )
            if batch:
                for i, score in zip(batch, scorer.score_frames(videos)):
                    out[i]["aes"] = score
    for i, row in enumerate(out):
        if row["status"] != "ok":
            continue
        if i in errors:
            out[i] = reject(row, errors[i])
            continue
        reasons = []
        if cfg.min_flow is not None and row.get("flow") is not None and row["flow"] < cfg.min_flow:
            reasons.append(f"motion {row['flow']:.2f} < min_flow {cfg.min_flow:g}")
        if cfg.min_aes is not None and row.get("aes") is not None and row["aes"] < cfg.min_aes:
            reasons.append(f"aesthetic {row['aes']:.2f} < min_aes {cfg.min_aes:g}")
        if reasons:
            out[i] = reject(row, "; ".join(reasons))
    return out, notes


def score_manifest(in_path: str | Path, root: DataRoot, cfg: ScoreConfig) -> Path:
    """Read a manifest, score and filter its rows, write manifests/score/<hash>.parquet (notes in lineage)."""
    rows, notes = score_rows(read_rows(in_path), cfg)
    return write_manifest(rows, "score", root, inputs=[in_path], extra={"notes": notes})
