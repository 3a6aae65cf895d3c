"""`soraflow generate` on the tiny preset: offline, random weights, mp4 + GIF with the configured shape."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
from soraflow.flows.cli import app
from typer.testing import CliRunner

PROMPT = "a red circle moving left"


def _paths(output: str, suffix: str) -> list[Path]:
    return [Path(tok) for tok in output.split() if tok.endswith(suffix)]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_generate_tiny_preset_writes_a_video_of_the_configured_shape(runner, tmp_path):
    result = runner.invoke(app, ["generate", PROMPT, "--root", str(tmp_path / "data"), "--steps", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "random" in result.output.lower(), "untrained weights must be announced"
    (mp4,) = _paths(result.output, ".mp4")
    (gif,) = _paths(result.output, ".gif")
    assert mp4.parent == tmp_path / "data" / "outputs" / "samples", mp4
    assert gif.exists() and gif.stat().st_size > 0
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
    assert len(frames) == 8  # configs/local.yaml video.num_frames
    assert (frames[0].width, frames[0].height) == (32, 32)  # video.image_size


def test_generate_num_frames_and_determinism(runner, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        result = runner.invoke(app, ["generate", PROMPT, "--root", str(tmp_path / "data"), "--steps", "3",
                                     "--seed", "11", "--num-frames", "4", "--out", str(out)])
        assert result.exit_code == 0, result.output
        (mp4,) = _paths(result.output, ".mp4")
        with av.open(str(mp4)) as container:
            outs.append([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(outs[0]) == 4
    assert all((a == b).all() for a, b in zip(*outs)), "the same seed must give the same video"


def test_generate_bad_weights_are_clear_errors(runner, tmp_path):
    root = ["--root", str(tmp_path / "data")]
    missing = tmp_path / "no-such-model"
    result = runner.invoke(app, ["generate", PROMPT, "--ckpt", str(missing), *root])
    assert result.exit_code != 0 and str(missing) in result.output, result.output

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    result = runner.invoke(app, ["generate", PROMPT, "--ckpt", str(garbage), *root])
    assert result.exit_code != 0 and "garbage.safetensors" in result.output, result.output

    result = runner.invoke(app, ["generate", PROMPT, "--model", "champion", *root])
    assert result.exit_code != 0 and "champion" in result.output, result.output

    result = runner.invoke(app, ["generate", "  ", *root])
    assert result.exit_code != 0 and "prompt" in result.output, result.output
