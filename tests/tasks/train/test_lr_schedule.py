"""The learning-rate schedule: constant, or linear warm-up then cosine decay, from the step alone."""

import math

import pytest
import torch
from soraflow.configs.schema import TrainConfig
from soraflow.tasks.train.lr_schedule import lr_at, set_lr


def test_constant_is_train_lr_at_every_step():
    tc = TrainConfig(lr=3e-3, steps=100)
    assert {lr_at(tc, s) for s in (0, 1, 50, 99, 100)} == {3e-3}


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    tc = TrainConfig(lr=1e-3, steps=110, lr_schedule="cosine", warmup_steps=10, lr_min_ratio=0.1)
    assert lr_at(tc, 0) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(tc, 9) == pytest.approx(1e-3)  # the peak at the last warm-up step
    assert lr_at(tc, 10) == pytest.approx(1e-3)  # the decay starts at the peak
    assert lr_at(tc, 60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the midpoint of peak and floor
    assert lr_at(tc, 110) == pytest.approx(1e-4)  # the floor at train.steps ...
    assert lr_at(tc, 500) == pytest.approx(1e-4)  # ... and after it
    decay = [lr_at(tc, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_cosine_without_warmup_starts_at_the_peak():
    tc = TrainConfig(lr=2e-3, steps=4, lr_schedule="cosine")
    assert [lr_at(tc, s) for s in range(5)] == pytest.approx(
        [2e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    )


def test_set_lr_sets_every_param_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 5.0}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
