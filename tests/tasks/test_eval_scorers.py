"""Evaluation scorers chosen by eval.scorers: the registry, the champion-metric check, and
open_clip text-video similarity against a tiny open_clip model built here (no downloads)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file
from soraflow.configs.loader import ConfigError, load_config
from soraflow.configs.schema import SCORER_METRICS
from soraflow.tasks.eval_scorers import SCORERS, ClipSimilarity, run_scorers
from tiny_clip import make_tiny_clip

TINY = "SoraFlow-Test-Tiny-CLIP-Text"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip model registered by config; its seeded weights as local safetensors."""
    # the stock BPE tokenizer's ids go up to 49407: the embedding table must hold them
    _, _, config, weights = make_tiny_clip(
        tmp_path_factory.mktemp("tiny-clip"),
        TINY,
        {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    )
    return config, weights


def _video(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)


def test_clip_similarity_is_the_cosine_of_the_local_model(tiny_clip):
    config, weights = tiny_clip
    scorer = ClipSimilarity(TINY, str(weights))
    videos, texts = [_video(0), _video(1)], ["a red ball", "a dog running on a beach"]
    got = scorer.score(videos, texts)
    assert got == scorer.score(videos, texts)  # deterministic
    assert all(-100.0 <= s <= 100.0 for s in got)
    # by hand, from a fresh load of the same file
    model, _, pre = open_clip.create_model_and_transforms(TINY, pretrained=None)
    open_clip.load_checkpoint(model, str(weights))
    model.eval()
    from PIL import Image

    with torch.no_grad():
        v = videos[1]
        img = model.encode_image(torch.stack([pre(Image.fromarray(v[i])) for i in (0, 4, 7)])).float()
        img = torch.nn.functional.normalize(torch.nn.functional.normalize(img, dim=-1).mean(0), dim=0)
        txt = torch.nn.functional.normalize(
            model.encode_text(open_clip.get_tokenizer(TINY)([texts[1]])).float()[0], dim=0
        )
    assert got[1] == pytest.approx(100 * float(img @ txt), abs=1e-3)
    # a model config given as a path works too
    assert ClipSimilarity(str(config), str(weights)).score(videos, texts) == pytest.approx(got, abs=1e-4)


def test_clip_similarity_bad_files_are_config_errors(tiny_clip, tmp_path):
    _, weights = tiny_clip
    with pytest.raises(ConfigError, match="eval.clip_path .*no such file"):
        ClipSimilarity(TINY, str(tmp_path / "missing.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="eval.clip_path"):
        ClipSimilarity(TINY, str(tmp_path / "other.safetensors"))


class _Clips:
    def __init__(self, videos, texts):
        self.videos, self.rows = videos, [{"text": t} for t in texts]

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):  # (3, T, H, W) in [-1, 1], as VideoClipDataset serves
        return {"video": torch.from_numpy(self.videos[i]).permute(3, 0, 1, 2).float() / 127.5 - 1}


def test_run_scorers_runs_only_what_is_configured(tiny_clip):
    _, weights = tiny_clip
    identity_vae = SimpleNamespace(encode_moments=lambda x: (x, None), decode=lambda x: x)
    pipe = SimpleNamespace(vae=identity_vae)
    clips = _Clips([_video(2), _video(3)], ["a cat", "a car"])
    frames, prompts = [_video(0), _video(1)], ["a red ball", "a dog"]
    none = run_scorers(load_config(None, {"eval.scorers": []}), pipe, frames, prompts, clips, lambda: clips)
    assert none.metrics == {} and none.per_sample == [{"prompt": "a red ball"}, {"prompt": "a dog"}]
    cfg = load_config(
        None,
        {
            "eval.scorers": ["clip_similarity"],
            "eval.clip_path": str(weights),
            "eval.clip_model": TINY,
            "eval.metric": "clip_score",
            "eval.higher_is_better": True,
        },
    )
    got = run_scorers(cfg, pipe, frames, prompts, clips, lambda: pytest.fail("adherence is not configured"))
    assert set(got.metrics) == set(SCORER_METRICS["clip_similarity"])
    assert [r["prompt"] for r in got.per_sample] == prompts and all("clip_score" in r for r in got.per_sample)
    assert got.metrics["clip_score"] == pytest.approx(np.mean([r["clip_score"] for r in got.per_sample]))
    assert "CLIP similarity" in got.summary[0]


def test_config_refuses_a_champion_metric_no_scorer_produces():
    assert set(SCORERS) == set(SCORER_METRICS)
    with pytest.raises(
        ConfigError, match="champion metric 'adherence_all' is not produced.*add 'adherence' to eval.scorers"
    ):
        load_config(None, {"eval.metric": "adherence_all"})
    with pytest.raises(ConfigError, match="'clip_score'.*add 'clip_similarity'"):
        load_config(None, {"eval.metric": "clip_score"})
    with pytest.raises(ConfigError, match="'fvd'.*use one of val_loss"):
        load_config(None, {"eval.metric": "fvd"})
    with pytest.raises(ConfigError, match="needs eval.clip_path"):
        load_config(None, {"eval.scorers": ["clip_similarity"]})
    assert load_config("local").eval.scorers == ["adherence"]
    assert load_config("local").eval.metric == "adherence_all"
    assert (
        load_config("opensora-v1-16x256x256").eval.scorers == []
        and load_config("opensora-v1-16x256x256").eval.metric == "val_loss"
    )
    assert load_config(None).eval.scorers == []


def test_adherence_on_captions_outside_the_vocabulary_says_what_to_configure():
    from soraflow.tasks.eval_scorers import adherence

    cfg = load_config("local")
    with pytest.raises(ValueError, match="remove it from eval.scorers and set eval.metric to val_loss"):
        adherence(
            cfg,
            None,
            [_video(0)],
            ["a blurry man talking on a phone in a car"],
            None,
            lambda: pytest.fail("not reached"),
        )
    with pytest.raises(ConfigError, match="every source here is your own footage"):
        load_config(
            "local", {"ingest.sample_source.enabled": False, "ingest.sources": [{"kind": "folder", "path": "/tmp"}]}
        )
