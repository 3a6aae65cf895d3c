"""Scoring: Farneback motion against known pans, aesthetic scores from local open_clip + head files, filters."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from soraflow.configs.loader import ConfigError
from soraflow.configs.schema import ScoreConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import lineage, new_row, read_rows, write_manifest
from soraflow.storage.data.video_io import read_frames
from soraflow.tasks.ingest.score import (
    AES_SKIPPED,
    flow_pairs,
    motion_score,
    score_manifest,
    score_rows,
)
from tiny_clip import make_tiny_clip
from videos import make_panning_video, make_scene_video, make_static_video

TINY_CLIP = "SoraFlow-Test-Tiny-CLIP"


def _row(path, vid="v", **kw):
    return new_row(path=str(path), video_id=vid, clip_id=vid, source="hdvg", text="t", **kw)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("score-videos")
    return {
        "static": make_static_video(d / "static.mp4", num_frames=24),
        "slow": make_panning_video(d / "slow.mp4", 0.1),
        "fast": make_panning_video(d / "fast.mp4", 0.4, seed=1),
        "short": make_panning_video(d / "short.mp4", 0.4, num_frames=6, seed=2),
        "scenes": [make_scene_video(d / f"s{k}.mp4", [1.0], fps=12.0, seed=k).path for k in range(3)],
    }


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip architecture registered by config, and its (seeded random) weights as a local file."""
    model, preprocess, _, weights = make_tiny_clip(
        tmp_path_factory.mktemp("tiny-clip"),
        TINY_CLIP,
        {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    )
    return model, preprocess, weights


def _head(path, layers: dict[str, torch.Tensor]):
    save_file(layers, str(path))
    return path


def test_flow_pairs_follow_open_sora_frames():
    assert flow_pairs(31, 30.0) == [(0, 10), (10, 20), (20, 30)]  # Open-Sora's [0, 10, 20, 30]
    assert flow_pairs(61, 30.0) == [(0, 10), (25, 35), (50, 60)]
    assert flow_pairs(16, 8.0) == [(0, 3), (6, 9), (12, 15)]  # 1/3 s at 8 fps ~ 3 frames
    assert flow_pairs(5, 30.0) == [(0, 4)]
    with pytest.raises(ValueError):
        flow_pairs(1, 30.0)


@pytest.mark.parametrize("name, px_per_frame", [("slow", 0.1), ("fast", 0.4), ("short", 0.4)])
def test_motion_score_measures_a_pan(videos, name, px_per_frame):
    # A pan of p px/frame at 160x288 and 24 fps is 2p px/frame at 320x576: 16p per 1/3 s (8 frames).
    assert motion_score(videos[name]) == pytest.approx(16 * px_per_frame, rel=0.1)


def test_motion_filter_rejects_still_clips_and_keeps_scores(videos, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(3000))
    gone = {**_row(videos["fast"], "gone"), "status": "rejected", "error": "scene too short"}
    rows = [
        _row(videos["static"], "still"),
        _row(videos["fast"], "pan"),
        gone,
        _row(garbage, "bad"),
        _row(videos["slow"], "done", flow=9.5),
    ]

    out, notes = score_rows(rows, ScoreConfig(min_flow=0.3))

    assert notes == [AES_SKIPPED]
    still, pan, passed, bad, done = out
    assert still["status"] == "rejected" and still["flow"] < 0.05
    assert still["error"] == f"motion {still['flow']:.2f} < min_flow 0.3"
    assert pan["status"] == "ok" and pan["flow"] == pytest.approx(6.4, rel=0.1) and pan["aes"] is None
    assert passed == gone
    assert bad["status"] == "rejected" and str(garbage) in bad["error"]
    assert done["flow"] == 9.5 and done["status"] == "ok"  # already scored: kept, not recomputed
    assert rows[0]["flow"] is None  # inputs untouched


def test_aesthetic_score_uses_the_local_weights_and_head(videos, tiny_clip, tmp_path):
    model, preprocess, clip_path = tiny_clip
    torch.manual_seed(1)
    w, b = torch.randn(1, 16), torch.randn(1)
    head = _head(tmp_path / "head.safetensors", {"weight": w, "bias": b})
    cfg = ScoreConfig(aesthetic_clip_model=TINY_CLIP, aesthetic_clip_path=str(clip_path), aesthetic_head_path=str(head))
    rows = [_row(p, f"s{k}", num_frames=12) for k, p in enumerate(videos["scenes"])]

    out, notes = score_rows(rows, cfg)

    assert notes == []
    # Expected, from the saved model object itself: frames 1, 6 and 10 of 12 (10/50/90 %).
    for row, path in zip(out, videos["scenes"]):
        frames = read_frames(path, [1, 6, 10])
        with torch.no_grad():
            f = model.encode_image(torch.stack([preprocess(Image.fromarray(x)) for x in frames]))
            expected = ((f / f.norm(dim=-1, keepdim=True)) @ w.T + b).mean().item()
        assert row["aes"] == pytest.approx(expected, abs=1e-4)
        assert row["flow"] is not None and row["status"] == "ok"
    assert len({round(r["aes"], 4) for r in out}) == 3


def test_laion_mlp_head_and_aesthetic_filter(videos, tiny_clip, tmp_path):
    _, _, clip_path = tiny_clip
    # LAION's layout (layers.0/2/4/6/7; dropouts between hold no weights), here 16 -> 8 -> 4 -> 2 -> 2 -> 1,
    # with weights that make every score exactly 4.0: all zero but the last bias.
    dims = [(8, 16), (4, 8), (2, 4), (2, 2), (1, 2)]
    layers = {}
    for idx, (o, i) in zip((0, 2, 4, 6, 7), dims):
        layers[f"layers.{idx}.weight"], layers[f"layers.{idx}.bias"] = torch.zeros(o, i), torch.zeros(o)
    layers["layers.7.bias"] = torch.tensor([4.0])
    head = _head(tmp_path / "mlp.safetensors", layers)
    cfg = ScoreConfig(
        aesthetic_clip_model=TINY_CLIP,
        aesthetic_clip_path=str(clip_path),
        aesthetic_head_path=str(head),
        min_aes=4.5,
        min_flow=0.3,
    )
    out, _ = score_rows([_row(videos["fast"], "pan"), _row(videos["static"], "still")], cfg)
    assert [r["aes"] for r in out] == [pytest.approx(4.0), pytest.approx(4.0)]
    assert out[0]["error"] == "aesthetic 4.00 < min_aes 4.5"
    assert out[1]["error"] == f"motion {out[1]['flow']:.2f} < min_flow 0.3; aesthetic 4.00 < min_aes 4.5"


def test_bad_aesthetic_files_are_config_errors(tiny_clip, tmp_path, videos):
    _, _, clip_path = tiny_clip
    good_head = _head(tmp_path / "h.safetensors", {"weight": torch.zeros(1, 16), "bias": torch.zeros(1)})
    wrong_width = _head(tmp_path / "w.safetensors", {"weight": torch.zeros(1, 768)})
    rows = [_row(videos["fast"])]
    with pytest.raises(ConfigError, match="nowhere.safetensors"):
        score_rows(
            rows,
            ScoreConfig(
                aesthetic_clip_model=TINY_CLIP,
                aesthetic_clip_path=str(tmp_path / "nowhere.safetensors"),
                aesthetic_head_path=str(good_head),
            ),
        )
    with pytest.raises(ConfigError, match="takes 768 features, expected 16"):
        score_rows(
            rows,
            ScoreConfig(
                aesthetic_clip_model=TINY_CLIP, aesthetic_clip_path=str(clip_path), aesthetic_head_path=str(wrong_width)
            ),
        )
    with pytest.raises(ConfigError, match="ViT-B-32"):  # weights of another architecture
        score_rows(
            rows,
            ScoreConfig(
                aesthetic_clip_model="ViT-B-32", aesthetic_clip_path=str(clip_path), aesthetic_head_path=str(good_head)
            ),
        )


def test_score_manifest_records_the_skipped_note(videos, tmp_path):
    root = DataRoot(tmp_path / "data")
    src = write_manifest([_row(videos["fast"], "pan")], "caption", root)
    out = score_manifest(src, root, ScoreConfig())
    assert out.parent == root.manifest_dir("score")
    assert lineage(out)["notes"] == [AES_SKIPPED] and lineage(out)["inputs"] == [str(src)]
    (row,) = read_rows(out)
    assert row["flow"] == pytest.approx(6.4, rel=0.1) and row["aes"] is None
