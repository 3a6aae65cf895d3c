"""CLI conventions: one-line errors with exit 2 (usage) or 1 (run failure), parser-checked
choices, --json, --version, presets before working-directory names, --debug tracebacks."""

from __future__ import annotations

import json

import pytest
from soraflow.flows.cli import Budget, app
from soraflow.flows.console import one_line
from typer.testing import CliRunner


@pytest.fixture()
def runner(monkeypatch) -> CliRunner:
    monkeypatch.delenv("SORAFLOW_DEBUG", raising=False)
    return CliRunner()


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith("(run with --debug")]
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert (
        "Traceback" not in output and "validation error" not in output and "For further information" not in output
    ), output
    return lines[0]


def test_bad_config_key_and_value_exit_2_in_one_line(runner, tmp_path):
    root = ["--root", str(tmp_path / "d")]
    out = runner.invoke(app, ["registry", "list", "--set", "train.stepz=3", *root])
    assert out.exit_code == 2
    line = _one_error_line(out.output)
    assert "train.stepz" in line and "unknown key" in line and "local.yaml" in line and "--set" in line

    out = runner.invoke(app, ["ingest", "--set", "train.steps=many", *root])
    assert out.exit_code == 2 and "train.steps" in _one_error_line(out.output)

    out = runner.invoke(app, ["ingest", "--set", "eval.metric=clip_score", *root])
    assert out.exit_code == 2 and "add 'clip_similarity' to eval.scorers" in _one_error_line(out.output)

    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  sources:\n    - kind: folder\n")
    out = runner.invoke(app, ["ingest", "--config", str(bad), *root])
    assert out.exit_code == 2
    line = _one_error_line(out.output)
    assert str(bad) in line and "ingest.sources.0" in line and "needs path" in line and "Value error" not in line


def test_missing_files_are_usage_errors(runner, tmp_path):
    missing = tmp_path / "nope.parquet"
    for args in (["train", "--manifest", str(missing)], ["stage", "score", "--manifest", str(missing)],
                 ["export", "--manifest", str(missing), "--out", str(tmp_path / "x.csv")]):
        out = runner.invoke(app, [*args, "--root", str(tmp_path / "d")] if args[0] != "export" else args)
        assert out.exit_code == 2, (args, out.output)
        assert _one_error_line(out.output) == f"error: --manifest {missing}: no such file"
    out = runner.invoke(app, ["ingest", "--config", str(tmp_path / "my.yaml")])
    assert out.exit_code == 2 and "my.yaml: no such config file" in _one_error_line(out.output)
    out = runner.invoke(app, ["stage", "split", "--root", str(tmp_path / "d")])
    assert out.exit_code == 2 and "needs --manifest" in _one_error_line(out.output)


def test_choices_are_checked_by_the_parser(runner):
    from soraflow.flows.local import BUDGETS

    assert [b.value for b in Budget] == list(BUDGETS)
    for args in (
        ["run", "local", "--budget", "tiny"],
        ["stage", "transcode"],
        ["export", "--manifest", "m", "--out", "o", "--format", "webvid"],
    ):
        out = runner.invoke(app, args)
        assert out.exit_code == 2, (args, out.output)
        assert "Invalid value" in out.output


def test_no_champion_is_a_run_failure_in_one_line(runner, tmp_path):
    out = runner.invoke(app, ["registry", "show", "champion", "--root", str(tmp_path / "d")])
    assert out.exit_code == 1
    assert "has no alias 'champion'" in out.output and "Traceback" not in out.output
    assert [ln for ln in out.output.splitlines() if ln.startswith("error:")] != []


def test_debug_shows_the_traceback(runner, tmp_path, monkeypatch):
    out = runner.invoke(app, ["--debug", "registry", "show", "champion", "--root", str(tmp_path / "d")])
    assert out.exit_code == 1 and out.exception is not None and type(out.exception).__name__ == "RegistryError"
    monkeypatch.setenv("SORAFLOW_DEBUG", "1")
    out = CliRunner().invoke(app, ["registry", "show", "champion", "--root", str(tmp_path / "d")])
    assert type(out.exception).__name__ == "RegistryError"


def test_json_version_and_presets_before_cwd(runner, tmp_path, monkeypatch):
    out = runner.invoke(app, ["registry", "list", "--root", str(tmp_path / "d"), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout) == {"model": "soraflow-local", "versions": []}
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.stdout.startswith("soraflow ")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()  # a folder named like the preset must not shadow it
    out = runner.invoke(app, ["registry", "list", "--config", "local", "--root", str(tmp_path / "d"), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["model"] == "soraflow-local", out.output
    out = runner.invoke(app, ["registry", "list", "--config", "./local", "--root", str(tmp_path / "d")])
    assert out.exit_code == 2 and "is a folder, not a config file" in _one_error_line(out.output)


def test_one_line_unwraps_ray_and_pydantic_wrappers():
    from pydantic import BaseModel, field_validator

    class M(BaseModel):
        x: int

        @field_validator("x")
        @classmethod
        def _v(cls, v):
            raise ValueError("x is wrong: use 3")

    with pytest.raises(Exception) as info:
        M(x=1)
    assert one_line(info.value) == "x is wrong: use 3"

    worker = (
        'Training failed.\nTraceback (most recent call last):\n  File "driver.py", line 295, in loop\n'
        "    raise ValueError(...)\n"
        "ValueError: train.batch_size=8 is larger than the 3 training clips: lower train.batch_size or add data\n"
    )
    assert (
        one_line(RuntimeError(worker))
        == "train.batch_size=8 is larger than the 3 training clips: lower train.batch_size or add data"
    )
    assert one_line(ValueError("a\nb")) == "a; b"
