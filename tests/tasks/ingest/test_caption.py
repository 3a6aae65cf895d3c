"""Captioning: source captions, Pexels slugs, a tiny offline LLaVA, the fallback order, rejections."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from soraflow.configs.loader import ConfigError
from soraflow.configs.schema import CaptionConfig
from soraflow.models.llava import LlavaCaptionModel, build_tiny_llava
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import lineage, new_row, read_rows, write_manifest
from soraflow.tasks.ingest.caption import (
    THREE_FRAMES_PROMPT,
    LlavaCaptioner,
    caption_manifest,
    caption_rows,
    pexels_slug_caption,
)
from videos import make_scene_video


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), seed=0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four one-scene clips of different content, and one three-scene clip of 10 frames per scene."""
    d = tmp_path_factory.mktemp("clips")
    paths = [make_scene_video(d / f"c{k}.mp4", [1.0], fps=12.0, seed=k).path for k in range(4)]
    tri = make_scene_video(d / "tri.mp4", [10 / 12, 10 / 12, 10 / 12], fps=12.0, seed=5)
    return paths, tri


def _row(path, source="inter4k", vid="v", **kw):
    return new_row(path=str(path), video_id=vid, source=source, clip_id=vid, num_frames=kw.pop("num_frames", 12), **kw)


def _llava_cfg(llava_dir, **kw):
    return CaptionConfig(
        **{"captioners": ["source", "llava"], "llava_path": str(llava_dir), "batch_size": 2, "max_new_tokens": 6, **kw}
    )


def test_three_frames_prompt_is_open_soras():
    assert THREE_FRAMES_PROMPT.startswith(
        "A video is given by providing three frames in chronological order. Describe this video"
    )
    assert "Do not reply with words like 'first frame'." in THREE_FRAMES_PROMPT
    assert (
        "with the cliff’s edges jutting out over the sea." in THREE_FRAMES_PROMPT
    )  # curly apostrophe, as in Open-Sora
    assert THREE_FRAMES_PROMPT.endswith("the rugged landscape of the Pacific Coast Highway.")
    assert len(THREE_FRAMES_PROMPT) == 1752 and "\n" not in THREE_FRAMES_PROMPT


@pytest.mark.parametrize(
    "url, caption",
    [
        ("https://www.pexels.com/video/a-red-circle-moving-left-12345/", "a red circle moving left"),
        ("https://www.pexels.com/video/drone-footage-of-a-beach-3571264", "drone footage of a beach"),
        ("https://pexels.com/de-de/video/wellen-am-strand-99/?utm=x", "wellen am strand"),
        ("https://www.pexels.com/video/4k-timelapse-2020-777/", "4k timelapse 2020"),
    ],
)
def test_pexels_slug_caption(url, caption):
    assert pexels_slug_caption(url) == caption


@pytest.mark.parametrize(
    "url",
    [
        None,
        "https://example.com/video/a-red-circle-1/",
        "https://www.pexels.com/photo/a-red-circle-1/",
        "https://www.pexels.com/video/12345/",
        "ftp://www.pexels.com/video/a-b-1/",
        "https://www.pexels.com.evil.test/video/a-b-1/",
        "https://www.pexels.com/video/a/b-1/",
    ],
)
def test_non_pexels_video_pages_give_no_slug(url):
    with pytest.raises(ValueError):
        pexels_slug_caption(url)


def test_source_captions_without_llava(clips):
    (p0, p1, p2, p3), _ = clips
    gone = {**_row(p3, vid="gone"), "status": "rejected", "error": "404"}
    rows = [
        _row(p0, "hdvg", "h", text="a red square slides right"),
        _row(p1, "pexels", "p", source_url="https://www.pexels.com/video/a-green-disc-moving-up-42/"),
        _row(p2, "pexels", "bad", source_url="https://www.pexels.com/photo/a-green-disc-42/"),
        _row(p3, "inter4k", "i"),
        gone,
    ]
    out = caption_rows(rows, CaptionConfig(captioners=["source"]), captioner_cache={})
    assert [(r["text"], r["caption_source"], r["status"]) for r in out[:2]] == [
        ("a red square slides right", "source", "ok"),
        ("a green disc moving up", "source", "ok"),
    ]
    assert (
        out[2]["status"] == "rejected"
        and "no caption: tried source (source: not a Pexels video page URL" in out[2]["error"]
    )
    assert (
        out[3]["status"] == "rejected"
        and out[3]["error"] == f"{p3}: no caption: tried source (source: source 'inter4k' gave no caption)"
    )
    assert out[4] == gone
    assert rows[1]["text"] is None  # the input rows are not modified


def test_llava_captions_what_the_source_cannot(llava_dir, clips):
    (p0, p1, p2, p3), tri = clips
    rows = [
        _row(p0, "hdvg", "h", text="kept as it is", caption_source="source"),
        _row(p1, "inter4k", "i1"),
        _row(p2, "pexels", "p", source_url="https://www.pexels.com/video/blue-disc-7/"),
        _row(p3, "inter4k", "i2"),
        _row(tri.path, "inter4k", "i3", num_frames=30),
    ]
    cache: dict = {}
    out = caption_rows(rows, _llava_cfg(llava_dir), captioner_cache=cache)

    assert [r["status"] for r in out] == ["ok"] * 5
    assert [r["caption_source"] for r in out] == ["source", "llava", "source", "llava", "llava"]
    assert out[0]["text"] == "kept as it is" and out[2]["text"] == "blue disc"
    for r in (out[1], out[3], out[4]):
        assert isinstance(r["text"], str) and r["text"].strip() and "\n" not in r["text"]
    (captioner,) = [c for c in cache.values() if isinstance(c, LlavaCaptioner)]
    assert captioner.model.calls == 2  # 3 rows for llava in batches of 2


def test_batched_equals_unbatched_and_every_frame_counts(llava_dir, clips, monkeypatch):
    (p0, p1, p2, p3), tri = clips
    rows = [_row(p, vid=f"i{k}") for k, p in enumerate((p0, p1, p2, p3))]
    batched = caption_rows(rows, _llava_cfg(llava_dir, batch_size=4), captioner_cache={})
    single = caption_rows(rows, _llava_cfg(llava_dir, batch_size=1), captioner_cache={})
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    assert len({r["text"] for r in batched}) > 1  # the tiny model's output depends on the frames

    # All three frames reach the model: 3 images per clip, 3 x 16 image tokens per prompt.
    from transformers import LlavaForConditionalGeneration

    seen = {}
    original_caption, original_generate = LlavaCaptionModel.caption, LlavaForConditionalGeneration.generate

    def spy_caption(self, videos, prompt, max_new_tokens):
        seen["videos"] = [v.copy() for v in videos]
        return original_caption(self, videos, prompt, max_new_tokens)

    def spy_generate(self, **kw):
        seen["pixel_values"] = tuple(kw["pixel_values"].shape)
        seen["image_tokens"] = (kw["input_ids"] == self.config.image_token_index).sum(dim=1).tolist()
        seen["do_sample"], seen["max_new_tokens"] = kw["do_sample"], kw["max_new_tokens"]
        return original_generate(self, **kw)

    monkeypatch.setattr(LlavaCaptionModel, "caption", spy_caption)
    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", spy_generate)
    caption_rows([_row(tri.path, vid="t", num_frames=30), _row(p0, vid="x")], _llava_cfg(llava_dir), captioner_cache={})
    assert seen["pixel_values"] == (6, 3, 32, 32)
    assert seen["image_tokens"] == [48, 48]
    assert (seen["do_sample"], seen["max_new_tokens"]) == (False, 6)
    # Frames at 20/50/80 % of a 30-frame clip are 6, 15 and 24: one from each of its 10-frame scenes.
    levels = [float(np.median(f[0])) for f in seen["videos"][0]]
    assert np.allclose(levels, tri.brightness, atol=12)

    # The last (80 %) frame reaches the language model (in Open-Sora v1.0 only the first did):
    # changing it alone changes the next-token logits; the same input gives the same logits.
    model = LlavaCaptionModel(llava_dir)
    frames = np.stack(seen["videos"][1])
    other = frames.copy()
    other[2] = 255 - other[2]

    def next_token_logits(video):
        enc = model.processor(images=list(video), text=[model.prompt_text(THREE_FRAMES_PROMPT, 3)], return_tensors="pt")
        with torch.no_grad():
            return model.model(**enc).logits[0, -1]  # (vocab,)

    base = next_token_logits(frames)
    assert torch.equal(base, next_token_logits(frames.copy()))
    assert (base - next_token_logits(other)).abs().max() > 1e-3


def test_captioner_order_decides(llava_dir, clips):
    (p0, *_), _ = clips
    row = _row(p0, "pexels", "p", source_url="https://www.pexels.com/video/a-red-square-5/")
    (first_source,) = caption_rows([row], _llava_cfg(llava_dir, captioners=["source", "llava"]), captioner_cache={})
    (first_llava,) = caption_rows([row], _llava_cfg(llava_dir, captioners=["llava", "source"]), captioner_cache={})
    assert (first_source["text"], first_source["caption_source"]) == ("a red square", "source")
    assert first_llava["caption_source"] == "llava" and first_llava["text"] != "a red square"


def test_no_caption_from_anyone_is_a_rejected_row(llava_dir, clips, tmp_path, monkeypatch):
    (p0, p1, *_), _ = clips
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(2000))
    rows = [_row(garbage, vid="g"), _row(p0, vid="ok")]
    out = caption_rows(rows, _llava_cfg(llava_dir), captioner_cache={})
    assert out[1]["status"] == "ok" and out[1]["caption_source"] == "llava"
    assert out[0]["status"] == "rejected"
    assert out[0]["error"].startswith(
        f"{garbage}: no caption: tried source, llava (source: source 'inter4k' gave no caption; llava: "
    )
    assert str(garbage) in out[0]["error"].split("llava: ", 1)[1]

    monkeypatch.setattr(LlavaCaptionModel, "caption", lambda self, videos, prompt, n: ["\n  \n"] * len(videos))
    (empty,) = caption_rows([_row(p1, vid="e")], _llava_cfg(llava_dir), captioner_cache={})
    assert empty["status"] == "rejected" and empty["error"].endswith("llava: empty caption)")


def test_llava_without_a_checkpoint_is_a_config_error(tmp_path, clips):
    (p0, *_), _ = clips
    missing = tmp_path / "no-such-llava"
    with pytest.raises(ConfigError, match=str(missing)):
        caption_rows(
            [_row(p0)], CaptionConfig(captioners=["source", "llava"], llava_path=str(missing)), captioner_cache={}
        )
    # The schema refuses llava without a path; the stage still checks a config built around it.
    with pytest.raises(ValueError, match="needs caption.llava_path"):
        CaptionConfig(captioners=["llava"])
    with pytest.raises(ConfigError, match="caption.llava_path is not set"):
        caption_rows(
            [_row(p0)], CaptionConfig.model_construct(captioners=["llava"], llava_path=None), captioner_cache={}
        )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot load a LLaVA checkpoint"):
        caption_rows(
            [_row(p0)], CaptionConfig(captioners=["llava"], llava_path=str(tmp_path / "broken")), captioner_cache={}
        )
    # Not needed, not built: every row already has its caption.
    (kept,) = caption_rows(
        [_row(p0, text="given")], CaptionConfig(captioners=["llava"], llava_path=str(missing)), captioner_cache={}
    )
    assert kept["text"] == "given"


def test_caption_manifest(llava_dir, clips, tmp_path):
    (p0, p1, *_), _ = clips
    root = DataRoot(tmp_path / "data")
    src = write_manifest(
        [_row(p0, "pexels", "p", source_url="https://www.pexels.com/video/red-5/"), _row(p1, vid="i")], "split", root
    )
    out = caption_manifest(src, root, _llava_cfg(llava_dir), captioner_cache={})
    assert out.parent == root.manifest_dir("caption") and lineage(out)["inputs"] == [str(src)]
    assert [(r["caption_source"], r["status"]) for r in read_rows(out)] == [("source", "ok"), ("llava", "ok")]


def test_tiny_llava_reloads_with_the_real_loading_code(llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(llava_dir, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True)
    assert "<image>" in processor.tokenizer.get_vocab() and processor.num_additional_image_tokens == 1
    assert processor.chat_template and model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids(
        "<image>"
    )
    again = build_tiny_llava(llava_dir.parent / "again", seed=0)
    a = LlavaForConditionalGeneration.from_pretrained(again, local_files_only=True).state_dict()
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())  # the seed fixes the weights
