"""Resume picks the newest *valid* checkpoint: truncated or unfinished newer ones are skipped, with the reason."""

from __future__ import annotations

import torch
from soraflow.storage.checkpoints import COMPLETE_MARKER, save_training_state
from soraflow.tasks.train.resume import (
    checkpoint_folders,
    checkpoint_name,
    latest_step,
    prune_checkpoints,
    resume_state,
)


def _save(run_dir, step):
    lin = torch.nn.Linear(2, 2)
    return save_training_state(
        run_dir / checkpoint_name(step), lin.state_dict(), lin.state_dict(), None, {"step": step}
    )


def test_truncated_and_unmarked_newer_checkpoints_fall_back_to_an_intact_older_one(tmp_path):
    _save(tmp_path, 10)
    truncated = _save(tmp_path, 20)
    data = (truncated / "state.safetensors").read_bytes()
    (truncated / "state.safetensors").write_bytes(data[:-7])
    unmarked = _save(tmp_path, 30)
    (unmarked / COMPLETE_MARKER).unlink()
    (tmp_path / ".checkpoint_step_0000040.tmp1234").mkdir()  # a save's temporary folder is not a checkpoint
    assert [d.name for d in checkpoint_folders(tmp_path)] == [checkpoint_name(s) for s in (30, 20, 10)]

    said: list[str] = []
    folder, state = resume_state(tmp_path, log=said.append)
    assert folder.name == checkpoint_name(10) and state["meta"]["step"] == 10
    assert len(said) == 2
    assert checkpoint_name(30) in said[0] and "no complete.json" in said[0]
    assert checkpoint_name(20) in said[1] and "does not match the sha256" in said[1]
    assert latest_step(tmp_path) == 10
    # Ray's checkpoint of a restarted worker counts too, newest first
    newer = _save(tmp_path / "ray", 25)
    folder, state = resume_state(tmp_path, newer, log=said.append)
    assert folder == newer and state["meta"]["step"] == 25


def test_nothing_valid_means_a_fresh_start(tmp_path):
    assert resume_state(tmp_path / "none") == (None, None)
    (_save(tmp_path, 5) / COMPLETE_MARKER).unlink()
    assert resume_state(tmp_path, log=lambda _m: None) == (None, None)
    assert latest_step(tmp_path) == 0


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step)
    (tmp_path / checkpoint_name(50) / COMPLETE_MARKER).unlink()  # unfinished: does not count as kept
    prune_checkpoints(tmp_path, keep=2)
    assert [d.name for d in checkpoint_folders(tmp_path)] == [checkpoint_name(s) for s in (50, 40, 30)]
