"""The MLflow model registry on a sqlite backend under a temporary data root."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from soraflow.configs.schema import RegistryConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.registry.model_registry import ModelRegistry, RegistryError


def _model_dir(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 3), value)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"preset": "STDiT-Tiny", "value": value}))
    return folder


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """One registry for the module (creating the sqlite schema takes about a second)."""
    root = DataRoot(tmp_path_factory.mktemp("root"))
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # so a stray ./mlruns or ./mlflow.db would be seen
    try:
        yield ModelRegistry(root, RegistryConfig(model_name="tiny-test", experiment="tests"))
    finally:
        os.chdir(cwd)


def _register(reg, tmp_path, name, value, val_loss):
    with reg.run(
        name, params={"model": {"preset": "STDiT-Tiny", "depth": 2}, "lr": 1e-3}, tags={"flow": "test"}
    ) as run_id:
        reg.log_metrics(run_id, {"train_loss": 1.0}, step=1)
        curve = tmp_path / f"{name}-loss.png"
        curve.write_bytes(b"\x89PNG fake")
        reg.log_artifact(run_id, curve, "plots")
        metrics = {} if val_loss is None else {"val_loss": val_loss}
        info = reg.register(
            run_id,
            _model_dir(tmp_path / name, value),
            metrics=metrics,
            tags={"dataset_version": "abc123", "config_hash": "cfg42"},
        )
    return info


def test_register_promote_download(reg, tmp_path):
    v1 = _register(reg, tmp_path, "first", 1.0, 0.50)
    assert v1.version == 1 and v1.status == "READY" and v1.metrics == {"val_loss": 0.5}
    for key in ("dataset_version", "config_hash", "code_version"):
        assert v1.tags[key]
    assert v1.tags["dataset_version"] == "abc123" and v1.tags["config_hash"] == "cfg42"

    promoted, reason = reg.promote_if_better(v1.version, "val_loss", higher_is_better=False)
    assert promoted and "no champion" in reason and reg.get("champion").version == 1

    worse = _register(reg, tmp_path, "worse", 2.0, 0.70)
    promoted, reason = reg.promote_if_better(worse.version, "val_loss", higher_is_better=False)
    assert not promoted and "0.7" in reason and "0.5" in reason
    assert reg.get("champion").version == 1

    equal = _register(reg, tmp_path, "equal", 2.5, 0.50)
    assert reg.promote_if_better(equal.version, "val_loss", higher_is_better=False)[0] is False  # strictly better only

    nometric = _register(reg, tmp_path, "nometric", 4.0, None)
    promoted, reason = reg.promote_if_better(nometric.version, "val_loss", higher_is_better=False)
    assert not promoted and "no finite 'val_loss'" in reason

    better = _register(reg, tmp_path, "better", 3.0, 0.30)
    promoted, reason = reg.promote_if_better(better.version, "val_loss", higher_is_better=False)
    assert promoted and "0.3" in reason and "0.5" in reason
    champ = reg.get("champion")
    assert champ.version == better.version and "champion" in champ.aliases
    assert champ.tags["champion_decision"] == reason
    # higher_is_better flips the comparison: 0.5 > 0.3, so v1 would win there
    assert reg.promote_if_better(v1.version, "val_loss", higher_is_better=True)[0] is True
    reg.promote(better.version)

    # download round-trips the files, by alias and by number
    local = reg.download("champion", tmp_path / "dl")
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((local / "config.json").read_text())["value"] == 3.0
    assert torch.equal(load_file(str(local / "model.safetensors"))["w"], torch.full((2, 3), 3.0))
    local2 = reg.download("2", tmp_path / "dl2")
    assert json.loads((local2 / "config.json").read_text())["value"] == 2.0

    # one run, one version: a second register would overwrite the files a version points at
    with pytest.raises(RegistryError, match="already holds"):
        reg.register(
            better.run_id,
            _model_dir(tmp_path / "again", 9.0),
            {"val_loss": 0.1},
            {"dataset_version": "d", "config_hash": "c"},
        )

    # look-ups
    assert reg.get("latest").version == better.version
    assert reg.get("v2").version == reg.get(2).version == 2
    versions = reg.list_versions()
    assert [v.version for v in versions] == [1, 2, 3, 4, 5]
    assert [v.aliases for v in versions if v.aliases] == [["champion"]]
    assert versions[4].aliases == ["champion"]

    # manual promotion with another alias
    reg.promote(1, alias="baseline")
    assert reg.get("baseline").version == 1 and "baseline" in reg.list_versions()[0].aliases

    # artifacts live under the data root, never in ./mlruns of the working directory
    assert v1.source.startswith((reg.root.registry / "artifacts").as_uri())
    assert (reg.root.registry / "mlflow.db").exists()
    assert not Path("mlruns").exists() and not Path("mlflow.db").exists()
    runs = reg.client.search_runs([reg.experiment_id])
    assert {r.data.params["model.preset"] for r in runs} == {"STDiT-Tiny"}
    assert all(r.info.status == "FINISHED" for r in runs)
    art = reg.client.list_artifacts(v1.run_id, "plots")
    assert [a.path for a in art] == ["plots/first-loss.png"]
    from mlflow.telemetry import get_telemetry_client

    assert get_telemetry_client() is None


def test_unknown_refs_name_model_and_ref(reg, tmp_path):
    _register(reg, tmp_path, "some", 1.0, 0.9)
    with pytest.raises(RegistryError, match=r"tiny-test.*'nosuch'"):
        reg.get("nosuch")
    with pytest.raises(RegistryError, match=r"tiny-test.*'99'"):
        reg.get("99")
    with pytest.raises(RegistryError, match="99"):
        reg.download("99", tmp_path / "x")
    with pytest.raises(RegistryError, match="cannot be an alias"):
        reg.promote(1, alias="latest")


def test_refuses_pickles_and_bad_folders(reg, tmp_path):
    folder = _model_dir(tmp_path / "pickled", 1.0)
    torch.save({"w": torch.zeros(1)}, folder / "extra.pt")
    with reg.run("pickled") as run_id:
        with pytest.raises(RegistryError, match=r"pickle.*extra\.pt"):
            reg.register(run_id, folder, {"val_loss": 0.1}, {"dataset_version": "d", "config_hash": "c"})
        with pytest.raises(RegistryError, match="does not exist"):
            reg.register(run_id, tmp_path / "missing", {}, {"dataset_version": "d", "config_hash": "c"})
        nojson = tmp_path / "nojson"
        nojson.mkdir()
        save_file({"w": torch.zeros(1)}, str(nojson / "model.safetensors"))
        with pytest.raises(RegistryError, match="JSON config"):
            reg.register(run_id, nojson, {}, {"dataset_version": "d", "config_hash": "c"})
        with pytest.raises(RegistryError, match="dataset_version"):
            reg.register(run_id, _model_dir(tmp_path / "ok", 1.0), {}, {"config_hash": "c"})
    assert reg.client.get_run(run_id).info.status == "FINISHED"


def test_failed_block_marks_run_failed(reg):
    with pytest.raises(RuntimeError):
        with reg.run("crashes") as run_id:
            raise RuntimeError("boom")
    assert reg.client.get_run(run_id).info.status == "FAILED"


def test_empty_registry(tmp_path):
    reg = ModelRegistry(DataRoot(tmp_path), RegistryConfig(model_name="empty"))
    assert reg.list_versions() == []
    with pytest.raises(RegistryError, match=r"'empty'.*'champion'"):
        reg.get("champion")
    with pytest.raises(RegistryError, match="no versions"):
        reg.get("latest")


def test_import_is_cheap_and_offline():
    code = (
        "import sys, storage.registry.model_registry, os; assert 'mlflow' not in sys.modules; "
        "print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "true"
