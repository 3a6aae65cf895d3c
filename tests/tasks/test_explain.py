"""`soraflow explain`: the traced shapes agree with the live model's config, and the PNGs are written."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from soraflow.configs.loader import load_config
from soraflow.storage.layout import DataRoot
from soraflow.tasks.explain import explain_generation, explain_training

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = DataRoot(tmp_path_factory.mktemp("explain") / "data")
    # the local preset at a quarter of its pixels (16x16, 4 frames): the same model, faster VAE passes
    return (
        load_config("local", {"data.root": str(root.root), "video.num_frames": 4, "video.image_size": [16, 16]}),
        root,
    )


def _shape(result, stage: str) -> list[tuple[int, ...]]:
    """The shapes printed for `stage`, as tuples, in order."""
    row = next(r for r in result.stages if r.stage == stage)
    return [tuple(int(v) for v in g.split(",") if v.strip()) for g in re.findall(r"\(([\d, ]*)\)", row.shape)]


def _check_model_shapes(r, batch: int):
    f = r.facts
    n, s, d, L = f["grid_t"] * f["grid_h"] * f["grid_w"], f["S"], f["D"], f["L"]
    # the config the model was built from: 4 frames of 16x16, STDiT-Tiny (D 128, depth 4), 16 text tokens
    assert (f["T"], f["H"], f["W"], f["D"], f["depth"], f["L"]) == (4, 16, 16, 128, 4, 16)
    assert (f["h"], f["w"]) == (16 // f["f"], 16 // f["f"]) and s == f["grid_h"] * f["grid_w"]
    assert (f["pt"], f["ph"], f["pw"]) == (2, 2, 2)  # configs/local.yaml model.patch_size
    assert (f["grid_t"], f["grid_h"], f["grid_w"]) == (f["T"] // 2, f["h"] // 2, f["w"] // 2)
    assert _shape(r, "patchify") == [(batch, f["C"], f["T"], f["h"], f["w"]), (batch, n, d)]
    assert _shape(r, "pos_spatial") == [(1, s, d)]
    assert _shape(r, "pos_temporal") == [(1, f["grid_t"], d)]
    assert _shape(r, "timestep") == [(batch,), (batch, d)]
    assert _shape(r, "adaln") == [(batch, d), (batch, 6 * d)]
    for i in range(f["depth"]):
        assert _shape(r, f"spatial[{i}]") == [(batch * f["grid_t"], s, d), (batch * f["grid_t"], s, d)]
        assert _shape(r, f"temporal[{i}]") == [(batch * s, f["grid_t"], d), (batch * s, f["grid_t"], d)]
        assert _shape(r, f"cross[{i}]") == [(batch, n, d), (batch, L, d), (batch, L), (batch, n, d)]
    assert _shape(r, "output") == [(batch, f["C_out"], f["T"], f["h"], f["w"])]
    assert _shape(r, "tokens")[:2] == [(1, L), (1, L)]
    assert r.tokens[-1] == "</s>" and len(r.tokens) <= L


def test_explain_generation_traces_every_stage(setup, tmp_path):
    cfg, root = setup
    r = explain_generation(cfg, root, PROMPT, tmp_path / "out", model_ref=None, steps=3)
    assert "untrained" in r.weights and "RANDOM" in r.weights
    f = r.facts
    _check_model_shapes(r, batch=2)  # [cond; uncond] rows under classifier-free guidance
    assert _shape(r, "noise") == [(1, f["C"], f["T"], f["h"], f["w"])]
    assert _shape(r, "latents") == [(1, f["C"], f["T"], f["h"], f["w"])]
    assert _shape(r, "decode") == [(f["T"], f["C"], f["h"], f["w"]), (f["T"], 3, f["H"], f["W"])]
    assert _shape(r, "video") == [(1, 3, f["T"], f["H"], f["W"])]
    assert r.numbers["steps"] == 3
    strip = Image.open(r.images["denoising"])
    # 3 snapshots (steps 0, 1, 2 of 3) + the final video, 4 frames each, 4x upscaled with 2-px gaps
    assert strip.size == (4 * (16 + 2) * 4, 4 * (16 + 2) * 4)
    assert Image.open(r.images["cross_attention"]).size[0] > 100


def test_explain_training_step(setup, tmp_path):
    cfg, root = setup
    r = explain_training(cfg, root, PROMPT, tmp_path / "out", model_ref=None)
    _check_model_shapes(r, batch=1)
    f = r.facts
    assert _shape(r, "x0") == _shape(r, "x_t") == _shape(r, "target") == [(1, f["C"], f["T"], f["h"], f["w"])]
    assert 0 <= r.numbers["t"] <= 1000 and r.numbers["loss.loss"] > 0
    norms = {k: v for k, v in r.numbers.items() if k.startswith("grad_norm.")}
    assert {f"grad_norm.blocks.{i}" for i in range(f["depth"])} <= set(norms)
    assert (
        all(v >= 0 for v in norms.values()) and norms["grad_norm.final_layer"] > 0
    )  # zero-init output layer gets a gradient
    grad_rows = [row for row in r.stages if row.stage.startswith("grad ")]
    assert grad_rows and all("untrained" in row.meaning for row in grad_rows)  # random weights, and it says so
    assert Image.open(r.images["training_step"]).size == (4 * 18 * 4, 4 * 18 * 4)  # clip, x0, x_t, prediction
    assert r.images["cross_attention"].exists()


def test_explain_training_rejects_an_unknown_caption(setup, tmp_path):
    cfg, root = setup
    with pytest.raises(ValueError, match="sample-world caption"):
        explain_training(cfg, root, "a dog on a beach", tmp_path / "out", model_ref=None)
