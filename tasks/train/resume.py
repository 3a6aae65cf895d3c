"""Training checkpoints of one run folder: writing them, where they are, which one to resume from, pruning.

A run folder holds `checkpoint_step_<step>` training states (storage.checkpoints). Only a
complete one counts: `load_training_state` checks the completion marker and the content hash
of its files, and resume falls back from the newest folder to older ones, saying which it
skipped and why (a save that was killed, a truncated copy, an unreadable file).

`RunPosition` is what a resumed run carries on: step, epoch and data position, samples seen,
the loss history and the segments (one per start or restart).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from soraflow.storage.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    load_training_state,
    save_training_state,
    verify_training_state,
)

CKPT_PREFIX = "checkpoint_step_"
KEEP_CHECKPOINTS = 3


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def folder_step(folder: str | Path) -> int | None:
    """The step in a checkpoint folder's name, or None for anything else (e.g. a temporary folder)."""
    name = Path(folder).name
    if not name.startswith(CKPT_PREFIX) or not name[len(CKPT_PREFIX) :].isdigit():
        return None
    return int(name[len(CKPT_PREFIX) :])


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every checkpoint_step_* folder of a run, newest step first (complete or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(s, d) for d in run_dir.glob(f"{CKPT_PREFIX}*") if d.is_dir() and (s := folder_step(d)) is not None]
    return [d for _, d in sorted(found, key=lambda x: x[0], reverse=True)]


def newest_valid_state(folders: Iterable[Path], log=print) -> tuple[Path | None, dict[str, Any] | None]:
    """(folder, state) of the first folder that loads and matches its completion marker, else (None, None).

    `folders` newest first; each one skipped is logged with the reason.
    """
    seen: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        try:
            return folder, load_training_state(folder)
        except CheckpointError as e:
            log(f"train: skipping checkpoint {folder}: {e}")
    return None, None


def resume_state(
    run_dir: str | Path, ray_checkpoint_dir: str | Path | None = None, log=print
) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest valid training state: Ray's checkpoint (worker restart) or the run folder's newest."""
    folders = checkpoint_folders(run_dir)
    if ray_checkpoint_dir is not None and Path(ray_checkpoint_dir).exists():
        folders.append(Path(ray_checkpoint_dir))
    folders.sort(key=lambda d: folder_step(d) or 0, reverse=True)
    return newest_valid_state(folders, log)


def latest_step(run_dir: str | Path) -> int:
    """The step of the newest valid checkpoint of a run (0 when there is none); loads no tensors."""
    for folder in checkpoint_folders(run_dir):
        try:
            verify_training_state(folder)
            return int(json.loads((folder / "state.json").read_text())["meta"]["step"])
        except (CheckpointError, OSError, ValueError, KeyError, TypeError):
            continue
    return 0


def prune_checkpoints(run_dir: str | Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the newest `keep` complete checkpoints; delete every checkpoint folder older than those."""
    folders = checkpoint_folders(run_dir)
    complete = [d for d in folders if (d / COMPLETE_MARKER).exists()]
    if len(complete) <= keep:
        return
    oldest_kept = folder_step(complete[keep - 1])
    for d in folders:
        if folder_step(d) < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, local_mode: bool, states: tuple[dict, dict, dict], meta: dict, metrics: dict,
                    rank: int) -> None:
    """Write the training state (model, EMA, optimizer) and report it to Ray with `metrics`.

    Every rank calls this; rank 0 writes. In local mode nothing copies the folder for us, so it is
    written in place (a temporary name, then a rename); on Ray workers Ray persists it as
    <storage_path>/<name>/<checkpoint_dir_name>.
    """
    import ray.train  # not at the top: the driver imports this module before any run needs Ray
    from ray.train import Checkpoint

    name = checkpoint_name(meta["step"])
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    if local_mode:
        run_dir = Path(run_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
        save_training_state(tmp, *states, meta)
        final = run_dir / name
        if final.exists():  # a leftover from an attempt that died after saving
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run_dir)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(final)), checkpoint_dir_name=name)
        prune_checkpoints(run_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="soraflow-ckpt-") as tmp:
            save_training_state(tmp, *states, meta)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


@dataclass
class RunPosition:
    """Where a run stands; saved in every checkpoint's meta and carried on by a resumed run."""

    start_step: int
    step: int
    epoch: int
    batch_in_epoch: int
    samples_seen: int
    loss_history: list[list[float]]  # [step, loss averaged over ranks]
    segments: list[dict[str, Any]]  # one per (re)start: start_step, world_size, from

    @classmethod
    def resume(cls, meta: dict[str, Any], world: int, state_dir: Path | None) -> "RunPosition":
        start = int(meta.get("step", 0))
        # The data position only means something for the same number of ranks.
        batch_in_epoch = int(meta.get("batch_in_epoch", 0)) if int(meta.get("world_size", world)) == world else 0
        segment = {"start_step": start, "world_size": world, "from": str(state_dir) if state_dir else None}
        return cls(start, start, int(meta.get("epoch", 0)), batch_in_epoch, int(meta.get("samples_seen", 0)),
                   [list(x) for x in meta.get("loss_history", [])], list(meta.get("segments", [])) + [segment])

    def advance(self, loss: float, samples: int) -> None:
        self.step += 1
        self.batch_in_epoch += 1
        self.samples_seen += samples
        self.loss_history.append([self.step, loss])

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def meta(self, batch_size: int, world: int) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "sample_start_index": self.batch_in_epoch * batch_size, "world_size": world,
                "samples_seen": self.samples_seen, "loss_history": self.loss_history, "segments": self.segments}
