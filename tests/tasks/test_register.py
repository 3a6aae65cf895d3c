"""The register stage: the MLflow run holds the per-step history, the dataset input, the redacted
config, the evaluation artifacts; the version is a pyfunc model with its model card; the Prefect
task leaves a link to the run and a markdown summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_folder import make_model_folder
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import dataset_version
from training_data import make_clip_manifest


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from soraflow.storage.data.holdout import DatasetSplit
    from soraflow.tasks.evaluate import EvalResult
    from soraflow.tasks.register import register_model
    from soraflow.tasks.train.driver import TrainResult
    from soraflow.tasks.train.vae_fit import VaeFitResult

    base = tmp_path_factory.mktemp("register")
    root = DataRoot(base / "data")
    manifest = make_clip_manifest(base / "clips", root, n=2, frames=8)
    secret_url = "https://alice:s3cret@videos.example/list.json?token=abc123&page=2"
    folder, cfg = make_model_folder(
        root, base / "run" / "model", **{"ingest.sources": [{"kind": "hdvg", "url": secret_url}]}
    )
    ckpt = base / "run" / "checkpoint_step_0000006"
    ckpt.mkdir()
    loss = [[1, 0.9], [2, 0.8], [3, 0.75], [4, 0.7], [5, 0.65], [6, 0.6]]
    (ckpt / "state.json").write_text(json.dumps({"structure": {}, "meta": {"loss_history": loss}}))
    curve, grid = base / "run" / "loss_curve.png", base / "eval" / "grid.gif"
    grid.parent.mkdir()
    curve.write_bytes(b"\x89PNG fake")
    grid.write_bytes(b"GIF89a fake")
    trained = TrainResult(run_dir=base / "run", checkpoint_dir=ckpt, model_dir=Path(folder), loss_curve_png=curve,
                          metrics={"steps": 6, "final_loss": 0.6, "train_clips": 2, "val_clips": 0},
                          loss_history=[(int(a), b) for a, b in loss])
    evaluated = EvalResult(metrics={"val_loss": 0.4, "adherence_all": 0.5}, samples_gif=grid)
    data = DatasetSplit.read(manifest, cfg.train.val_fraction)
    out = register_model(
        cfg, data, trained, evaluated, VaeFitResult(path=base, metrics={"recon_mse": 0.01}), str(root.root), "run-a"
    )
    return out, cfg, root, manifest, folder, secret_url


def test_run_has_per_step_history_dataset_input_and_artifacts(registered):
    from soraflow.storage.registry.model_registry import ModelRegistry

    out, cfg, root, manifest, _, _ = registered
    registry = ModelRegistry(root, cfg.registry)
    history = registry.client.get_metric_history(out.run_id, "train_loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [
        (1, 0.9),
        (2, 0.8),
        (3, 0.75),
        (4, 0.7),
        (5, 0.65),
        (6, 0.6),
    ]
    lr = registry.client.get_metric_history(out.run_id, "learning_rate")
    assert [m.step for m in lr] == [1, 2, 3, 4, 5, 6] and {m.value for m in lr} == {cfg.train.lr}
    assert [m.step for m in registry.client.get_metric_history(out.run_id, "val_loss")] == [6]
    run = registry.client.get_run(out.run_id)
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == dataset_version(manifest)[:36] and str(Path(manifest).resolve()) in ds.dataset.source
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    arts = {a.path for a in registry.client.list_artifacts(out.run_id, "evaluation")}
    assert arts == {"evaluation/loss_curve.png", "evaluation/grid.gif"}
    assert out.run_url.endswith(f"/#/experiments/{out.experiment_id}/runs/{out.run_id}")


def test_logged_config_and_card_are_redacted(registered):
    from soraflow.storage.registry.model_registry import ModelRegistry

    out, cfg, root, _, folder, secret_url = registered
    params = ModelRegistry(root, cfg.registry).client.get_run(out.run_id).data.params
    logged = " ".join(params.values())
    assert "s3cret" not in logged and "abc123" not in logged and "videos.example/list.json" in logged
    card = (folder / "README.md").read_text()
    assert "s3cret" not in card and "abc123" not in card
    saved = (folder / "soraflow.json").read_text()
    assert "s3cret" not in saved and "abc123" not in saved and "videos.example/list.json" in saved
    assert dataset_version(registered[3]) in card and "val_loss" in card and "0.4" in card


def test_version_loads_as_the_champion(registered):
    from soraflow.storage.registry.model_registry import ModelRegistry

    out, cfg, root, _, _, _ = registered
    assert out.promoted and out.version == 1
    local = ModelRegistry(root, cfg.registry).download("champion", root.tmp / "dl")
    assert (local / "README.md").read_text().count("val_loss") >= 1 and (local.parent.parent / "MLmodel").is_file()
