"""The held-out split: which clips never train, one rule for training and evaluation.

`DatasetSplit` is a manifest read once -- its version (content hash), its ok rows in manifest
order and the held-out clip ids -- so the train flow reads, hashes and splits it one time and
hands the result to every stage (VAE fit, latent cache, training, evaluation, registration).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from soraflow.storage.data.manifest import ok_rows, read_rows, rows_hash


def clip_fraction(clip_id: str) -> float:
    """A stable number in [0, 1) per clip id (sha256), the same on every machine and run."""
    return int(hashlib.sha256(str(clip_id).encode()).hexdigest()[:12], 16) / float(16**12)


def holdout_split(rows: list[dict[str, Any]], val_fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows): a clip is held out when clip_fraction(clip_id) < val_fraction.

    The rule looks at each clip alone, so adding clips never moves an old clip across the
    split. Two guards for small data: with val_fraction > 0 and at least two clips, at least
    one clip is held out (the one with the smallest fraction) and at least one trains.
    Both lists keep the order of `rows`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"train.val_fraction must be in [0, 1), got {val_fraction}")
    for r in rows:
        if not r.get("clip_id"):
            raise ValueError(f"row with path {r.get('path')!r} has no clip_id: the held-out split needs one")
    keyed = sorted(rows, key=lambda r: clip_fraction(r["clip_id"]))
    n_val = sum(1 for r in keyed if clip_fraction(r["clip_id"]) < val_fraction)
    if val_fraction > 0 and len(keyed) >= 2:
        n_val = min(max(n_val, 1), len(keyed) - 1)
    held = {r["clip_id"] for r in keyed[:n_val]}
    return [r for r in rows if r["clip_id"] not in held], [r for r in rows if r["clip_id"] in held]


def distinct_captions(rows: list[dict[str, Any]], n: int) -> list[str]:
    """Up to n distinct captions of `rows`, in a fixed order (by clip hash): evaluation's prompts."""
    prompts: list[str] = []
    for r in sorted(rows, key=lambda r: clip_fraction(r["clip_id"])):
        text = (r.get("text") or "").strip()
        if text and text not in prompts:
            prompts.append(text)
    return prompts[:n]


class DatasetSplit(BaseModel):
    """A manifest read once: its version, its ok rows (manifest order) and which of them are held out.

    A pydantic model so Prefect can hand it to tasks and hash it for their cache keys.
    """

    manifest: str
    version: str  # the manifest's dataset version (storage/data/manifest.py content hash)
    rows: list[dict[str, Any]]  # the ok rows, in manifest order
    held_out: list[str]  # clip ids of the held-out rows

    @classmethod
    def read(cls, manifest: str | Path, val_fraction: float) -> "DatasetSplit":
        every = read_rows(manifest)  # the one read: the version is hashed from the same rows
        rows = ok_rows(every)
        _, val = holdout_split(rows, val_fraction)
        return cls(manifest=str(manifest), version=rows_hash(every), rows=rows, held_out=[r["clip_id"] for r in val])

    @property
    def train(self) -> list[dict[str, Any]]:
        held = set(self.held_out)
        return [r for r in self.rows if r["clip_id"] not in held]

    @property
    def val(self) -> list[dict[str, Any]]:
        held = set(self.held_out)
        return [r for r in self.rows if r["clip_id"] in held]

    def held_out_captions(self, n: int) -> list[str]:
        """Up to n distinct captions of held-out clips (the first prompts evaluation samples)."""
        return distinct_captions(self.val, n)
