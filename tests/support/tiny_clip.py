"""A tiny open_clip model, registered by config, with seeded random weights saved as local safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file


def make_tiny_clip(folder: Path, name: str, text_cfg: dict):
    """(model, preprocess, config json, weights) of a 1-layer open_clip model named `name`."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": text_cfg,
    }
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    weights = folder / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return model.eval(), preprocess, config_path, weights
