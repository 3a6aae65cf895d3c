"""A registered version is an MLflow pyfunc model: plain `mlflow.pyfunc.load_model("models:/...@champion")`
loads it (models from code, nothing pickled) and `.predict(prompts)` returns videos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from model_folder import make_model_folder
from soraflow.configs.schema import RegistryConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.registry.model_registry import ModelRegistry

PROMPTS = ["a red circle moving right", "a blue square moving left"]


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A registry with one tiny untrained version as champion: (registry, cfg, model folder)."""
    base = tmp_path_factory.mktemp("mlflow-model")
    root = DataRoot(base / "data")
    folder, cfg = make_model_folder(root, base / "model")
    registry = ModelRegistry(root, RegistryConfig(model_name="tiny-video", experiment="tests"))
    with registry.run("tiny", params={"train": {"steps": 1}}) as run_id:
        info = registry.register(
            run_id, folder, {"val_loss": 0.5}, {"dataset_version": "test-data-v1", "config_hash": "c"}
        )
    assert registry.promote_if_better(info.version, "val_loss", higher_is_better=False)[0]
    return registry, cfg, folder


def test_folder_follows_hf_conventions_with_a_model_card(champion):
    from soraflow.models.stdit import STDiT

    _, cfg, folder = champion
    stdit = STDiT.from_pretrained(folder / "stdit")
    assert stdit.config["depth"] == 4 and stdit.config["input_size"][0] == 8  # STDiT-Tiny, 8 frames / VAE 1:1 in time
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-to-video" in card
    for needed in (
        "test-data-v1",
        "val_loss",
        "| 0.5 |",
        "soraflow generate --model",
        "mlflow.pyfunc.load_model",
        '"steps"',
    ):
        assert needed in card, needed


def test_version_is_a_pyfunc_model_with_signature_and_logged_model(champion):
    registry, _, folder = champion
    info = registry.get("champion")
    run = registry.client.get_run(info.run_id)
    model_id = run.data.tags["soraflow.model_id"]
    logged = registry.client.get_logged_model(model_id)
    assert logged.source_run_id == info.run_id and str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert info.source == logged.artifact_location
    local = registry.download("champion", registry.root.tmp / "dl")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in folder.iterdir())
    mlmodel = (local.parent.parent / "MLmodel").read_text()
    assert (
        "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
        and '"type": "string"' in mlmodel
        and "uint8" in mlmodel
    )
    assert not [p for p in local.parent.parent.rglob("*") if p.suffix in (".pkl", ".pt", ".bin")]


def test_registry_load_pipeline_goes_through_the_mlflow_model(champion):
    registry, cfg, _ = champion
    pipe, source = registry.load_pipeline("champion")
    assert "MLflow model" in source and "v1" in source
    videos = pipe(PROMPTS[:1], steps=2, seed=1)
    assert tuple(videos.shape) == (1, 3, cfg.video.num_frames, *cfg.video.image_size)
    pipe4, _ = registry.load_pipeline("champion", cfg, num_frames=4)
    assert pipe4(PROMPTS[:1], steps=2, seed=1).shape[2] == 4


def test_plain_mlflow_loads_the_champion_and_predicts(champion, tmp_path):
    """In a fresh process, as a user would: only mlflow, the tracking URI and the models:/ URI."""
    registry, cfg, _ = champion
    code = textwrap.dedent(f"""
        import json, mlflow, numpy as np
        mlflow.set_tracking_uri({registry.tracking_uri!r})
        model = mlflow.pyfunc.load_model("models:/tiny-video@champion")
        videos = model.predict({PROMPTS!r}, params={{"steps": 2, "seed": 3}})
        again = model.predict({PROMPTS!r}, params={{"steps": 2, "seed": 3}})
        paths = model.predict({PROMPTS[:1]!r},
                              params={{"output": "paths", "output_dir": {str(tmp_path / "out")!r}, "steps": 2}})
        print(json.dumps({{"shape": list(videos.shape), "dtype": str(videos.dtype),
                           "same": bool((videos == again).all()), "paths": paths,
                           "inputs": [t.name for t in model.metadata.get_input_schema().input_types()]}}))
    """)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, cfg.video.num_frames, *cfg.video.image_size, 3] and result["dtype"] == "uint8"
    assert result["same"], "a fixed seed gives the same videos"
    assert result["inputs"] == ["string"], result["inputs"]
    (mp4,) = result["paths"]
    assert Path(mp4).is_file() and Path(mp4).parent == tmp_path / "out"


def test_predict_rejects_bad_prompts_and_options(champion):
    import mlflow

    registry, _, _ = champion
    local = registry.download("champion", registry.root.tmp / "dl-bad").parent.parent
    model = mlflow.pyfunc.load_model(str(local))
    with pytest.raises(Exception, match="non-empty string"):
        model.predict(["  "])
    with pytest.raises(Exception, match="output="):
        model.predict(PROMPTS[:1], params={"output": "gifs"})
    assert isinstance(model.predict(PROMPTS[:1], params={"steps": 1}), np.ndarray)
    torch.set_num_threads(torch.get_num_threads())  # the model leaves the process usable


def test_a_version_registered_before_mlflow_models_still_loads_and_competes(champion, tmp_path):
    """Versions registered as a plain run-artifact folder, with the {"preset", "kwargs"} STDiT config."""
    import shutil

    registry, cfg, folder = champion
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    kwargs = json.loads((old / "stdit" / "config.json").read_text())
    from soraflow.models.stdit import STDIT_PRESETS

    # the old layout left out what the preset (or a constructor default) already said, kept the rest
    preset, tiny = {
        "depth",
        "hidden_size",
        "num_heads",
        "patch_size",
        "mlp_ratio",
        "no_temporal_pos_emb",
    }, STDIT_PRESETS["STDiT-Tiny"]
    legacy = {
        "preset": "STDiT-Tiny",
        "kwargs": {k: v for k, v in kwargs.items() if k not in preset or (k in tiny and tiny[k] != v)},
    }
    (old / "stdit" / "config.json").write_text(json.dumps(legacy))
    with registry.run("legacy") as run_id:  # what register() did before
        registry.client.log_artifacts(run_id, str(old), "model")
        source = f"{registry.run_artifact_uri(run_id)}/model"
        registry._ensure_registered_model()
        mv = registry.client.create_model_version(
            registry.name,
            source=source,
            run_id=run_id,
            tags={"dataset_version": "d", "config_hash": "c", "metric.val_loss": "0.1"},
        )
    promoted, reason = registry.promote_if_better(mv.version, "val_loss", higher_is_better=False)
    assert promoted and "0.1" in reason and "0.5" in reason
    local = registry.download("champion", tmp_path / "dl")
    assert (local / "soraflow.json").is_file() and not (local / "MLmodel").exists()
    pipe, source = registry.load_pipeline("champion")
    assert "model folder" in source and pipe(PROMPTS[:1], steps=1).shape[2] == cfg.video.num_frames
    registry.promote(1)  # the MLflow-model version is champion again for the other tests
