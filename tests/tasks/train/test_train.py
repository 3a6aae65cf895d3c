"""STDiT training through Ray Train: in process (local mode), resume, a process killed while it
saves a checkpoint, and a killed Ray worker.

Most run the TorchTrainer with num_workers=0 (Ray's local mode: no cluster); the Ray test
starts a local Ray instance with two DDP workers (gloo) and kills one mid-run through an
on_step hook.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from soraflow.storage.data.holdout import DatasetSplit, holdout_split
from soraflow.storage.data.manifest import ok_rows
from training_data import train_cfg


def _split(manifest, cfg):
    return DatasetSplit.read(manifest, cfg.train.val_fraction)


@pytest.fixture(scope="module")
def data(fitted_clips):
    """(root, manifest, VAE folder): the session's 10 clips and their fitted VAE (tests/tasks/conftest.py)."""
    return fitted_clips


def _history(checkpoint_dir):
    return json.loads((checkpoint_dir / "state.json").read_text())["meta"]["loss_history"]


def test_local_training_learns_and_checkpoints_without_pickles(data):
    from soraflow.storage.checkpoints import refuse_pickles
    from soraflow.tasks.train.driver import train
    from soraflow.storage.registry.model_folder import load_pipeline

    root, manifest, vae_dir = data
    cfg = train_cfg(root, **{"train.steps": 60})
    result = train(cfg, _split(manifest, cfg), root, run_name="local-a", vae_dir=vae_dir)
    assert result.resumed_from_step == 0 and result.metrics["steps"] == 60
    assert result.checkpoint_dir.name == "checkpoint_step_0000060"
    assert (result.checkpoint_dir / "state.safetensors").exists() and (result.checkpoint_dir / "state.json").exists()
    refuse_pickles(result.run_dir)
    losses = [v for _, v in _history(result.checkpoint_dir)]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert result.metrics["samples_per_s"] > 0
    assert result.loss_curve_png.exists() and result.loss_curve_png.read_bytes()[:4] == b"\x89PNG"
    # the held-out clips never trained
    train_rows, val_rows = holdout_split(ok_rows(manifest), cfg.train.val_fraction)
    assert result.metrics["train_clips"] == len(train_rows) and result.metrics["val_clips"] == len(val_rows) >= 1
    # the exported folder is self-contained and loads as a pipeline
    assert (result.model_dir / "vae").is_dir() and (result.model_dir / "text_encoder").is_dir()
    assert result.loss_history == [
        (s, v) for s, v in _history(result.checkpoint_dir)
    ]  # the history travels with the result
    pipe, source = load_pipeline(cfg, root, ckpt=result.model_dir)
    assert "model folder" in source
    assert pipe(["a red circle moving left"], steps=3).shape == (1, 3, 8, 32, 32)


def test_bf16_precision_learns_with_fp32_master_state(data):
    from safetensors import safe_open
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = data
    cfg = train_cfg(root, **{"train.steps": 40, "train.precision": "bf16"})
    result = train(cfg, _split(manifest, cfg), root, run_name="bf16", vae_dir=vae_dir)
    losses = [v for _, v in _history(result.checkpoint_dir)]
    assert len(losses) == 40 and sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    with safe_open(
        str(result.checkpoint_dir / "state.safetensors"), "pt"
    ) as f:  # master, EMA and AdamW state stay fp32
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float32 in dtypes and torch.bfloat16 not in dtypes and torch.float16 not in dtypes


def test_batch_split_over_threads_learns_and_restores_torch_threads(data):
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = data
    cfg = train_cfg(root, **{"train.steps": 40, "train.batch_threads": 2})
    before = torch.get_num_threads()
    result = train(cfg, _split(manifest, cfg), root, run_name="threads", vae_dir=vae_dir)
    assert torch.get_num_threads() == before
    losses = [v for _, v in _history(result.checkpoint_dir)]
    assert len(losses) == 40 and sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses


def test_a_non_finite_gradient_skips_its_update_and_a_diverged_run_stops(data, monkeypatch, capsys):
    import soraflow.tasks.train.loop as loop
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = data
    real = loop.clip_grads
    nan_at = {"steps": {3}}  # the third step's gradient is NaN; then (None) every step's
    calls = []

    def clip(model, max_norm, fmt):
        calls.append(1)
        norm = real(model, max_norm, fmt)
        if nan_at["steps"] is None or len(calls) in nan_at["steps"]:
            for q in model.parameters():
                if q.grad is not None:
                    q.grad.fill_(float("nan"))
            return torch.tensor(float("nan"))
        return norm

    monkeypatch.setattr(loop, "clip_grads", clip)
    cfg = train_cfg(root, **{"train.steps": 6})
    result = train(cfg, _split(manifest, cfg), root, run_name="nan-once", vae_dir=vae_dir)
    assert "step 3: gradient norm nan, update skipped (1 in a row)" in capsys.readouterr().out
    state = result.checkpoint_dir / "state.safetensors"
    from safetensors import safe_open

    with safe_open(str(state), "pt") as f:  # the skipped step left no NaN in the weights, EMA or AdamW state
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())

    nan_at["steps"] = None
    with pytest.raises(Exception, match="5 steps in a row up to step 5 had non-finite gradients"):
        train(cfg, _split(manifest, cfg), root, run_name="nan-always", vae_dir=vae_dir)


def test_each_step_runs_at_the_scheduled_learning_rate(data):
    from soraflow.tasks.train.driver import train
    from soraflow.tasks.train.lr_schedule import lr_at

    root, manifest, vae_dir = data
    cfg = train_cfg(
        root, **{"train.steps": 12, "train.lr_schedule": "cosine", "train.warmup_steps": 3, "train.lr_min_ratio": 0.1}
    )
    seen: list[tuple[int, float]] = []
    train(
        cfg,
        _split(manifest, cfg),
        root,
        run_name="cosine",
        vae_dir=vae_dir,
        on_step=[lambda info: seen.append((info.step, info.lr))],
    )
    assert [s for s, _ in seen] == list(range(1, 13))
    assert [lr for _, lr in seen] == [lr_at(cfg.train, s - 1) for s in range(1, 13)]
    assert seen[2][1] == cfg.train.lr and seen[-1][1] < 0.2 * cfg.train.lr  # warmed up, then decayed


def test_resume_continues_step_and_loss_history(data):
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = data
    split = _split(manifest, train_cfg(root))
    every = {"train.ckpt_every": 2, "train.log_every": 2}  # bookkeeping, not learning: a few steps are enough
    first = train(train_cfg(root, **{"train.steps": 4, **every}), split, root, run_name="resume", vae_dir=vae_dir)
    assert first.resumed_from_step == 0
    hist_a = _history(first.checkpoint_dir)
    second = train(train_cfg(root, **{"train.steps": 6, **every}), split, root, run_name="resume", vae_dir=vae_dir)
    assert second.resumed_from_step == 4 and second.metrics["steps"] == 6
    hist_b = _history(second.checkpoint_dir)
    assert [s for s, _ in hist_b] == list(range(1, 7))
    assert hist_b[:4] == hist_a  # the first run's history is kept as it was
    meta = json.loads((second.checkpoint_dir / "state.json").read_text())["meta"]
    assert [seg["start_step"] for seg in meta["segments"]] == [0, 4]
    # asking for no more steps than done trains nothing and exports the same checkpoint
    third = train(train_cfg(root, **{"train.steps": 6, **every}), split, root, run_name="resume", vae_dir=vae_dir)
    assert third.resumed_from_step == 6 and third.checkpoint_dir == second.checkpoint_dir


def test_online_path_trains_too(data):
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = data
    cfg = train_cfg(root, **{"train.steps": 4, "train.use_latent_cache": False, "train.log_every": 2})
    result = train(cfg, _split(manifest, cfg), root, run_name="online", vae_dir=vae_dir)
    assert result.metrics["steps"] == 4 and len(_history(result.checkpoint_dir)) == 4


def test_batch_larger_than_data_is_a_clear_error(data):
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = data
    with pytest.raises(Exception, match="train.batch_size=64"):
        cfg = train_cfg(root, **{"train.steps": 2, "train.batch_size": 64})
        train(cfg, _split(manifest, cfg), root, run_name="toobig", vae_dir=vae_dir)


_SAVE_THEN_HANG = """
import json, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[5])  # tests/support
from soraflow.storage import checkpoints
from soraflow.storage.data.holdout import DatasetSplit
from soraflow.storage.layout import DataRoot
from soraflow.tasks.train.driver import train
from training_data import train_cfg

root, manifest, vae_dir, hang_file = DataRoot(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if hang_file:  # the test's hook: the step-2 save writes its state files, then hangs before its marker
    write_marker = checkpoints.write_complete_marker

    def hang_at_step_2(folder):
        if json.loads((Path(folder) / "state.json").read_text())["meta"]["step"] == 2:
            Path(hang_file).write_text(str(folder))
            time.sleep(600)
        return write_marker(folder)

    checkpoints.write_complete_marker = hang_at_step_2
cfg = train_cfg(root, **{"train.steps": 3, "train.ckpt_every": 1, "train.log_every": 1})
train(cfg, DatasetSplit.read(manifest, cfg.train.val_fraction), root, vae_dir, run_name="kill9")
"""


@pytest.mark.slow
def test_training_killed_mid_checkpoint_save_resumes_from_the_last_valid_one(data, tmp_path):
    """kill -9 while step 2's checkpoint is half written; the rerun resumes from step 1 and finishes all 3 steps.

    (A checkpoint every step, 3 steps: the claim is about which checkpoint survives a kill, not about
    learning, and most of each run is the child's start-up.)"""
    root, manifest, vae_dir = data
    script = tmp_path / "run.py"
    script.write_text(_SAVE_THEN_HANG)
    hang = tmp_path / "hanging"
    support = str(Path(__file__).resolve().parents[2] / "support")

    def run(hang_file: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(root.root), str(manifest), str(vae_dir), hang_file, support],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    proc = run(str(hang))
    deadline = time.monotonic() + 600
    while not hang.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hang.exists(), proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "no save at step 2"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_dir = root.run_dir("kill9")
    assert Path(hang.read_text()).is_dir()  # the half-written state is on disk ...
    assert not (run_dir / "checkpoint_step_0000002").exists()  # ... but never under a checkpoint's name

    rerun = run("")
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming from step 1 (" in out, out[-3000:]
    meta = json.loads((run_dir / "checkpoint_step_0000003" / "state.json").read_text())["meta"]
    assert meta["step"] == 3 and [seg["start_step"] for seg in meta["segments"]] == [0, 1]
    assert [s for s, _ in meta["loss_history"]] == [1, 2, 3]  # no step twice, none missing


def _kill_last_rank_after(step: int, marker: Path):
    """An on_step hook: the last-rank Ray worker exits right after `step`, once (the marker file says it did)."""

    def hook(info) -> None:
        if not info.local_mode and info.step == step and info.rank == info.world_size - 1 and not marker.exists():
            marker.write_text(f"killed rank {info.rank} after step {info.step}\n")
            print(f"train: test hook: rank {info.rank} exits now", flush=True)
            os._exit(1)

    return hook


@pytest.mark.slow
def test_ray_two_workers_survive_a_killed_worker(data, tmp_path):
    """DDP over gloo with 2 Ray workers; the last rank dies after step 5; FailureConfig restarts from step 3."""
    from soraflow.tasks.train.driver import train

    root, manifest, vae_dir = data
    marker = tmp_path / "killed"
    cfg = train_cfg(root, **{"train.steps": 6, "train.num_workers": 2, "train.batch_size": 2, "train.ckpt_every": 3,
                             "train.log_every": 3, "train.max_failures": 1})
    result = train(
        cfg,
        _split(manifest, cfg),
        root,
        run_name="ray-kill",
        vae_dir=vae_dir,
        on_step=[_kill_last_rank_after(5, marker)],
    )
    assert marker.exists()  # the worker really died
    assert result.metrics["steps"] == 6 and result.metrics["world_size"] == 2
    meta = json.loads((result.checkpoint_dir / "state.json").read_text())["meta"]
    assert [seg["start_step"] for seg in meta["segments"]] == [0, 3]  # restarted from the step-3 checkpoint
    assert [s for s, _ in meta["loss_history"]] == list(range(1, 7))
    assert (result.run_dir / "checkpoint_manager_snapshot.json").exists()  # Ray Train's own bookkeeping


def _fsdp_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One of two CPU processes: FSDP model + EMA sharded alike, 3 steps, full state out, resume, same next step."""
    import copy
    import os

    import torch
    import torch.distributed as dist
    from soraflow.models.stdit import build_stdit
    from soraflow.storage.checkpoints import load_training_state, save_training_state
    from soraflow.tasks.train.distributed import clip_grads, full_states, load_optimizer
    from soraflow.tasks.train.ema import ema_pairs
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    kw = dict(use_orig_params=False, device_id=torch.device("cpu"))  # as wrap_for_strategy, minus Ray's GPU check

    def build():
        torch.manual_seed(0)
        return build_stdit(
            "STDiT-Tiny",
            input_size=[8, 8, 8],
            in_channels=4,
            caption_channels=64,
            model_max_length=16,
            class_dropout_prob=0.0,
        )

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 4, 8, 8, 8, generator=g), torch.randn(4, 1, 16, 64, generator=g)
    t, mask = torch.randint(0, 1000, (4,), generator=g), torch.ones(4, 16, dtype=torch.long)
    part = slice(2 * rank, 2 * rank + 2)

    def step(model, opt):
        loss = (model(x[part], t[part], y[part], mask[part]) - x[part].repeat(1, 2, 1, 1, 1)).square().mean()
        opt.zero_grad()
        loss.backward()
        clip_grads(model, 1.0, "fsdp")
        opt.step()
        return loss.item()

    plain = build()
    ema_ref = copy.deepcopy(plain).requires_grad_(False)
    model, ema = FSDP(copy.deepcopy(plain), **kw), FSDP(copy.deepcopy(ema_ref), **kw)
    ema_list, model_list = ema_pairs(model, ema, "fsdp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        step(model, opt)
        with torch.no_grad():
            torch._foreach_lerp_(ema_list, [p.detach().float() for p in model_list], 0.5)
    model_sd, ema_sd, optim_sd = full_states(model, ema, opt, "fsdp")
    if rank == 0:
        assert set(model_sd) == set(plain.state_dict()) == set(ema_sd)
        assert any(not torch.equal(model_sd[k], ema_sd[k]) for k in model_sd)  # the EMA lags the model
        save_training_state(folder, model_sd, ema_sd, optim_sd, {"step": 3})
    dist.barrier()
    state = load_training_state(folder)
    resumed = build()
    resumed.load_state_dict(state["model"])
    resumed = FSDP(resumed, **kw)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    load_optimizer(resumed, opt2, state["optimizer"], "fsdp")
    assert step(resumed, opt2) == step(model, opt)  # the weights came back
    assert abs(step(resumed, opt2) - step(model, opt)) < 1e-6  # and the AdamW moments (the update matched)
    dist.destroy_process_group()


def test_fsdp_checkpoint_helpers_round_trip(tmp_path):
    """FSDP itself needs GPUs under Ray; its state-dict, EMA and optimizer helpers are checked here on CPU (gloo)."""
    import random

    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, random.randint(20000, 40000), str(tmp_path / "ckpt")), nprocs=2)


def test_quieted_ray_loggers_stay_quiet_after_trains_logging_config():
    """Train's controller runs logging.config.dictConfig on `ray.train` after our set-up hook;
    that resets the levels of existing child loggers, so the hook must still hold afterwards."""
    import logging
    import logging.config

    from soraflow.tasks.train.ray_runtime import quiet_local_ray_logs

    name = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
    parent = logging.getLogger("ray.train")
    saved = (parent.level, list(parent.handlers), parent.propagate)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    try:
        quiet_local_ray_logs()
        logging.config.dictConfig({  # the shape of Train's controller config
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"keep": {"()": Keep}},
            "loggers": {"ray.train": {"level": "DEBUG", "handlers": ["keep"], "propagate": False}},
        })
        assert logging.getLogger(name).level == logging.NOTSET  # what dictConfig does to a child
        logging.getLogger(name).warning("harmless timeout")
        logging.getLogger(name).error("real failure")
        logging.getLogger("ray.train.v2._internal.execution.controller.controller").warning("other warning")
        assert seen == ["real failure", "other warning"]
    finally:
        parent.setLevel(saved[0])
        parent.handlers[:] = saved[1]
        parent.propagate = saved[2]


def test_local_ray_instance_binds_loopback_and_imports_no_private_ray_module(monkeypatch, data):
    import ast
    import inspect

    from soraflow.tasks.train import ray_runtime

    calls = []
    monkeypatch.setattr(ray_runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_runtime.ray, "init", lambda **kw: calls.append(kw))
    root, _, _ = data
    assert ray_runtime.start_ray(train_cfg(root, **{"train.num_workers": 2}))
    assert calls[0]["_node_ip_address"] == "127.0.0.1" and calls[0]["include_dashboard"] is False
    assert calls[0]["runtime_env"]["worker_process_setup_hook"].endswith("ray_runtime.quiet_local_ray_logs")
    tree = ast.parse(inspect.getsource(ray_runtime))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert imported and not [m for m in imported if "_internal" in m]
