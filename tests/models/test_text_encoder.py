"""Tiny T5: offline build, save, load through T5TextEncoder (the real T5-XXL code path), encode."""

import json

import pytest
import torch
from safetensors.torch import load_file
from soraflow.models.text_encoder import (
    T5TextEncoder,
    build_tiny_t5,
    default_corpus,
    train_unigram_vocab,
)

L = 12


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny", d_model=32, num_layers=2, num_heads=2, d_ff=64,
                         vocab_size=384, corpus=["a zebra crossing a river"])


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return T5TextEncoder(t5_dir, max_length=L)


def test_build_writes_hf_folders_without_pickles(t5_dir):
    names = {p.name for p in t5_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    cfg = json.loads((t5_dir / "config.json").read_text())
    assert (cfg["d_model"], cfg["num_layers"], cfg["num_heads"], cfg["d_ff"], cfg["vocab_size"]) == (32, 2, 2, 64, 384)
    assert cfg["feed_forward_proj"] == "gated-gelu"  # the T5-v1.1 layout of T5-XXL


def test_tokenizer_is_t5_style_and_word_level(encoder):
    tok = encoder.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok("a red circle moving left")["input_ids"]) == [
        "▁a",
        "▁red",
        "▁circle",
        "▁moving",
        "▁left",
        "</s>",
    ]
    for word in (
        "green",
        "blue",
        "yellow",
        "white",
        "purple",
        "orange",
        "square",
        "triangle",
        "right",
        "up",
        "down",
        "zebra",
    ):
        assert tok.tokenize(word) == ["▁" + word], word  # built-in words and the extra corpus's words are one token
    # unseen words are spelled out, not <unk>
    pieces = tok.tokenize("quixotic")
    assert len(pieces) > 1 and tok.unk_token not in pieces and "".join(pieces) == "▁quixotic"


def test_encode_shapes_mask_and_preprocessing(encoder):
    out = encoder.encode(["a red circle moving left", "  A BLUE Square moving UP  ", " ".join(["red"] * 30)])
    assert out["y"].shape == (3, 1, L, 32) and out["y"].dtype == torch.float32
    assert out["mask"].dtype == torch.int64 and out["mask"].shape == (3, L)
    assert out["mask"].sum(1).tolist() == [6, 6, L]  # 5 words + </s>; the long caption is truncated
    assert out["mask"][0].tolist() == [1] * 6 + [0] * (L - 6)  # padding on the right
    assert not out["y"].requires_grad and encoder.output_dim == 32
    same = encoder.encode(["a blue square moving up"])
    torch.testing.assert_close(same["y"][0], out["y"][1], rtol=0, atol=0)  # lowercase + strip
    assert not torch.allclose(out["y"][0, 0, :5], out["y"][1, 0, :5])  # different captions, different features


def test_build_is_deterministic_and_seeded(tmp_path, t5_dir):
    kw = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, vocab_size=384, corpus=["a zebra crossing a river"])
    state = torch.get_rng_state()
    again = build_tiny_t5(tmp_path / "again", **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert (again / "tokenizer.json").read_text() == (t5_dir / "tokenizer.json").read_text()
    a, b = load_file(str(t5_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(str(build_tiny_t5(tmp_path / "other", seed=1, **kw) / "model.safetensors"))
    assert not torch.equal(a["shared.weight"], other["shared.weight"])


def test_vocab_budget():
    vocab = train_unigram_vocab(default_corpus(), 200)
    assert len(vocab) <= 200 and [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"]
    assert all(ch in dict(vocab) for ch in "abcxyz019.,!")
    with pytest.raises(ValueError, match="vocab_size"):
        train_unigram_vocab(default_corpus(), 40)


def test_identity_and_missing_path(t5_dir, encoder, tmp_path):
    assert encoder.identity() == T5TextEncoder(t5_dir, max_length=L).identity()
    assert encoder.identity() != T5TextEncoder(t5_dir, max_length=L + 1).identity()
    assert len(encoder.identity()) == 12
    with pytest.raises(FileNotFoundError, match="no-such-t5"):
        T5TextEncoder(tmp_path / "no-such-t5")


def test_open_sora_folder_layout(t5_dir, tmp_path):
    """Open-Sora's from_pretrained points at a folder holding t5-v1_1-xxl/."""
    (tmp_path / "t5_ckpts").mkdir()
    (tmp_path / "t5_ckpts" / "t5-v1_1-xxl").symlink_to(t5_dir, target_is_directory=True)
    enc = T5TextEncoder(tmp_path / "t5_ckpts", max_length=L)
    assert enc.encode(["a red circle"])["mask"].sum().item() == 4
