"""Captioning: give every ok row a `text`, trying the configured captioners in order.

    rows (clips; some with text from their source) -> rows with text + caption_source, or
    rejected "no caption: tried source, llava (...)" when no captioner produced one

Captioners (CaptionConfig.captioners, tried in order for rows that lack text; the first
non-empty caption wins and `caption_source` records its name):

* `source`: the caption the source gave. HD-VG rows already carry their BLIP-2 scene
  captions (kept as they are); a Pexels row's caption is its page slug,
  https://www.pexels.com/video/a-red-circle-moving-left-12345/ -> "a red circle moving left".
* `llava`: Open-Sora v1.0's tools/caption: three frames at 20/50/80 % of the clip and the
  "three_frames" prompt, through a local transformers LLaVA checkpoint (models/llava.py;
  all three frames are given as images, see there). Greedy decoding as Open-Sora v1.1+
  (v1.0 sampled at temperature 0.2), batched by cfg.batch_size, newlines -> spaces.

A llava captioner without a usable checkpoint is a configuration error: it raises
ConfigError (naming caption.llava_path) when it is constructed, i.e. before it captions any
row, rather than rejecting every row. It is constructed only when some row reaches it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from soraflow.configs.loader import ConfigError
from soraflow.configs.schema import CaptionConfig
from soraflow.storage.faults import raise_if_environment
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import read_rows, reject, write_manifest
from soraflow.storage.data.video_io import VideoError, probe_video, read_frames

# Open-Sora v1.0 tools/caption/utils.py `prompts`, verbatim.
NAIVE_PROMPT = "Describe the video"
THREE_FRAMES_PROMPT = (
    'A video is given by providing three frames in chronological order. Describe this video and its style '
    'to generate a description. Pay attention to all objects in the video. Do not describe each frame '
    "individually. Do not reply with words like 'first frame'. The description should be useful for AI to "
    're-generate the video. The description should be less than six sentences. Here are some examples of '
    'good descriptions: 1. A stylish woman walks down a Tokyo street filled with warm glowing neon and '
    'animated city signage. She wears a black leather jacket, a long red dress, and black boots, and '
    'carries a black purse. She wears sunglasses and red lipstick. She walks confidently and casually. '
    'The street is damp and reflective, creating a mirror effect of the colorful lights. Many pedestrians '
    'walk about. 2. Several giant wooly mammoths approach treading through a snowy meadow, their long '
    'wooly fur lightly blows in the wind as they walk, snow covered trees and dramatic snow capped '
    'mountains in the distance, mid afternoon light with wispy clouds and a sun high in the distance '
    'creates a warm glow, the low camera view is stunning capturing the large furry mammal with beautiful '
    'photography, depth of field. 3. Drone view of waves crashing against the rugged cliffs along Big '
    "Sur's garay point beach. The crashing blue waters create white-tipped waves, while the golden light "
    'of the setting sun illuminates the rocky shore. A small island with a lighthouse sits in the '
    "distance, and green shrubbery covers the cliff's edge. The steep drop from the road down to the "
    'beach is a dramatic feat, with the cliff’s edges jutting out over the sea. This is a view that '
    'captures the raw beauty of the coast and the rugged landscape of the Pacific Coast Highway.'
)
PROMPTS = {"naive": NAIVE_PROMPT, "three_frames": THREE_FRAMES_PROMPT}
FRAME_POINTS = (0.2, 0.5, 0.8)  # extract_frames(): int(num_frames * p)

Attempt = tuple[str | None, str | None]  # (caption, why there is none)


# ---------------------------------------------------------------- source


_PEXELS_HOSTS = {"pexels.com", "www.pexels.com"}
# /video/<slug>-<id>/, optionally behind a locale such as /de-de/
_PEXELS_PAGE = re.compile(r"^/(?:[a-z]{2}(?:-[a-z]{2})?/)?video/(?P<slug>[^/]+)/?$")


def pexels_slug_caption(url: str | None) -> str:
    """'https://www.pexels.com/video/a-red-circle-moving-left-12345/' -> 'a red circle moving left'.

    Raises ValueError saying why for anything that is not a Pexels video page with a slug.
    """
    if not url:
        raise ValueError("no source_url")
    parts = urlsplit(url)
    m = _PEXELS_PAGE.match(parts.path)
    if parts.scheme not in ("http", "https") or parts.hostname not in _PEXELS_HOSTS or not m:
        raise ValueError(f"not a Pexels video page URL: {url!r}")
    words = unquote(m["slug"]).split("-")
    if words and words[-1].isdigit():
        words = words[:-1]  # the trailing numeric video id
    words = [w for w in words if w]
    if not words:
        raise ValueError(f"Pexels URL has no slug to caption from: {url!r}")
    return " ".join(words)


class SourceCaptioner:
    """Captions that come with the source: only Pexels rows have one to derive (their page slug)."""

    name = "source"

    def caption(self, rows: list[dict[str, Any]]) -> list[Attempt]:
        out: list[Attempt] = []
        for row in rows:
            if row.get("source") != "pexels":
                out.append((None, f"source {row.get('source')!r} gave no caption"))
                continue
            try:
                out.append((pexels_slug_caption(row.get("source_url")), None))
            except ValueError as e:
                out.append((None, str(e)))
        return out


# ---------------------------------------------------------------- llava


class LlavaCaptioner:
    """Open-Sora v1.0's LLaVA captioner over a local checkpoint; the model loads on first use."""

    name = "llava"

    def __init__(self, cfg: CaptionConfig):
        if not cfg.llava_path:
            raise ConfigError(
                "caption.llava_path is not set: the 'llava' captioner needs a local LLaVA checkpoint directory "
                "(or drop 'llava' from caption.captioners)"
            )
        path = Path(cfg.llava_path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"caption.llava_path {str(path)!r}: no LLaVA checkpoint there "
                "(expected a transformers directory with config.json)"
            )
        self.path = path
        self.prompt = PROMPTS[cfg.prompt]
        self.batch_size = max(1, cfg.batch_size)
        self.max_new_tokens = cfg.max_new_tokens
        self._model = None
        self._lock = threading.Lock()  # one generate() at a time when shards share this captioner

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                from soraflow.models.llava import LlavaCaptionModel

                try:
                    self._model = LlavaCaptionModel(self.path)
                except (OSError, ValueError) as e:
                    raise ConfigError(
                        f"caption.llava_path {str(self.path)!r}: cannot load a LLaVA checkpoint: {e}"
                    ) from e
            return self._model

    def frames(self, row: dict[str, Any]):
        """(3, H, W, 3) uint8: the frames at 20/50/80 % of the clip."""
        n = row.get("num_frames") or probe_video(row["path"]).num_frames
        if n < len(FRAME_POINTS):
            raise VideoError(f"{row['path']}: {n} frame(s), fewer than the {len(FRAME_POINTS)} the prompt shows")
        return read_frames(row["path"], [int(n * p) for p in FRAME_POINTS])

    def caption(self, rows: list[dict[str, Any]]) -> list[Attempt]:
        out: list[Attempt] = [(None, "not tried")] * len(rows)
        model = self.model if rows else None
        for start in range(0, len(rows), self.batch_size):
            batch, videos = [], []
            for i in range(start, min(start + self.batch_size, len(rows))):
                try:
                    videos.append(self.frames(rows[i]))
                    batch.append(i)
                except VideoError as e:
                    out[i] = (None, str(e))
            if not batch:
                continue
            with self._lock:
                captions = model.caption(videos, self.prompt, self.max_new_tokens)
            for i, text in zip(batch, captions):
                out[i] = (text, None) if text else (None, "empty caption")
        return out


# ---------------------------------------------------------------- stage


CAPTIONERS = {"source": SourceCaptioner, "llava": LlavaCaptioner}
# Captioners (and the LLaVA weights they hold) shared by the shards a process runs.
_PROCESS_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def get_captioner(name: str, cfg: CaptionConfig, cache: dict | None = None):
    """The captioner `name`, from `cache` when one with the same settings was built before."""
    cache = _PROCESS_CACHE if cache is None else cache
    key = (name,) if name == "source" else (name, cfg.llava_path, cfg.prompt, cfg.batch_size, cfg.max_new_tokens)
    with _CACHE_LOCK:
        if key not in cache:
            cache[key] = SourceCaptioner() if name == "source" else CAPTIONERS[name](cfg)
        return cache[key]


def has_text(row: dict[str, Any]) -> bool:
    return bool(row.get("text") and row["text"].strip())


def caption_isolated(captioner, rows: list[dict[str, Any]]) -> list[Attempt]:
    """captioner.caption(rows); if the batch fails, each row alone, so one row's failure becomes
    only its own reason. Config errors and faults of the machine raise."""
    try:
        return captioner.caption(rows)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - isolate the row that fails
        raise_if_environment(e, f"captioning with {captioner.name}")
    out: list[Attempt] = []
    for row in rows:
        try:
            out.extend(captioner.caption([row]))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - this row's reason
            raise_if_environment(e, f"captioning {row.get('path')}")
            out.append((None, f"{type(e).__name__}: {e}"))
    return out


def caption_rows(
    rows: list[dict[str, Any]], cfg: CaptionConfig, captioner_cache: dict | None = None
) -> list[dict[str, Any]]:
    """Rows in, rows out (same order and count): text + caption_source set, or rejected with the reasons.

    Rows that already have text keep it (caption_source "source" unless set). `captioner_cache`
    holds built captioners between calls; None = this process's shared cache.
    """
    out = [dict(r) for r in rows]
    pending = []
    for i, row in enumerate(out):
        if row["status"] != "ok":
            continue
        if has_text(row):
            row["caption_source"] = row.get("caption_source") or "source"
        else:
            pending.append(i)
    reasons: dict[int, list[str]] = {i: [] for i in pending}
    for name in cfg.captioners:
        if not pending:
            break
        captioner = get_captioner(name, cfg, captioner_cache)
        attempts = caption_isolated(captioner, [out[i] for i in pending])
        still = []
        for i, (text, why) in zip(pending, attempts):
            if text and text.strip():
                out[i]["text"], out[i]["caption_source"] = text.strip(), name
            else:
                reasons[i].append(f"{name}: {why or 'empty caption'}")
                still.append(i)
        pending = still
    for i in pending:
        tried = ", ".join(cfg.captioners) or "none configured"
        out[i] = reject(out[i], f"{out[i]['path']}: no caption: tried {tried} ({'; '.join(reasons[i])})")
    return out


def caption_manifest(
    in_path: str | Path, root: DataRoot, cfg: CaptionConfig, captioner_cache: dict | None = None
) -> Path:
    """Read a manifest, caption its rows, write manifests/caption/<hash>.parquet."""
    rows = caption_rows(read_rows(in_path), cfg, captioner_cache)
    return write_manifest(rows, "caption", root, inputs=[in_path])
