"""T5 text encoder (Open-Sora v1.0: T5-v1.1-XXL, 120 tokens, 4096 wide) from a local folder.

    texts (B strings) -> lowercase, strip -> tokens (B, L) padded to max_length, EOS added
                      -> T5 encoder last_hidden_state (B, L, C) -> y (B, 1, L, C), mask (B, L) int64

Open-Sora cleans captions with DeepFloyd-IF's `clean_caption` (URLs, HTML, CJK, ...); SoraFlow's
captions are already plain, so only its lowercase + strip core is applied.

`build_tiny_t5` makes a small T5 (random weights, a unigram tokenizer trained here, offline) saved
in the same format as the real one, so both load through `T5TextEncoder`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import unicodedata
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5Tokenizer


def _resolve(path: str | Path) -> Path:
    """The model folder: `path` itself, or Open-Sora's layout `<path>/t5-v1_1-xxl`."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"T5 text encoder: {p} is not a local directory (SoraFlow never downloads weights)")
    if not (p / "config.json").exists() and (p / "t5-v1_1-xxl" / "config.json").exists():
        p = p / "t5-v1_1-xxl"
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"T5 text encoder: no config.json in {p}")
    return p


def preprocess(text: str) -> str:
    """NFKC, lowercase, strip: the core of Open-Sora's caption cleaning."""
    return unicodedata.normalize("NFKC", text).lower().strip()


class T5TextEncoder:
    """A frozen T5 encoder and its tokenizer, loaded from a local folder."""

    def __init__(self, path: str | Path, max_length: int = 120, device="cpu", dtype: torch.dtype = torch.float32):
        self.path = _resolve(path)
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = (
            T5EncoderModel.from_pretrained(str(self.path), local_files_only=True, dtype=dtype).to(self.device).eval()
        )
        self.model.requires_grad_(False)

    @property
    def output_dim(self) -> int:
        return self.model.config.d_model

    def identity(self) -> str:
        """A short hash of the model config, the folder and max_length: a cache key for encoded captions."""
        cfg = {
            k: v for k, v in self.model.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")
        }
        blob = json.dumps({"config": cfg, "path": str(self.path.resolve()), "max_length": self.max_length,
                           "dtype": str(self.dtype)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """B captions -> {"y": (B, 1, L, C) in the model dtype, "mask": (B, L) int64, 1 = real token}."""
        tokens = self.tokenizer(
            [preprocess(t) for t in texts],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,  # the EOS </s>
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (B, L)
        mask = tokens["attention_mask"].to(self.device).long()  # (B, L)
        y = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.detach()  # (B, L, C)
        return {"y": y[:, None], "mask": mask}  # y (B, 1, L, C)


# ---------------------------------------------------------------- the tiny T5, built offline

# Words of the synthetic sample captions ("a red circle moving left") and a little general video
# vocabulary, so that common words become single tokens.
_COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "purple",
    "orange",
    "pink",
    "cyan",
    "magenta",
    "grey",
    "gray",
    "brown",
]
_SHAPES = ["circle", "square", "triangle", "disc", "ball", "box", "star", "shape", "object"]
_DIRECTIONS = ["left", "right", "up", "down"]
_VERBS = [
    "moving",
    "moves",
    "drifting",
    "drifts",
    "sliding",
    "slides",
    "rolling",
    "floating",
    "bouncing",
    "still",
    "static",
]
_EXTRA = ("the a an on in of to and with is are camera background plain dark light bright slowly quickly fast slow "
          "video scene frame shot clip of people person man woman city street car sky water tree dog cat walking "
          "running flying sea beach mountain road night day sun cloud snow forest building room table hand face "
          "close view top bottom across from towards center small large big").split()


def default_corpus() -> list[str]:
    """Caption-like sentences covering every colour x shape x direction, plus the extra words."""
    lines = []
    for c in _COLOURS:
        for s in _SHAPES:
            for d in _DIRECTIONS:
                lines.append(f"a {c} {s} moving {d}")
                lines.append(f"A {c} {s} {_VERBS[len(lines) % len(_VERBS)]} {d} on a plain background.")
    for i in range(0, len(_EXTRA), 6):
        lines.append(" ".join(_EXTRA[i : i + 6]))
    lines.append(" ".join(_VERBS + _DIRECTIONS + _SHAPES + _COLOURS))
    return lines


def train_unigram_vocab(texts: list[str], vocab_size: int) -> list[tuple[str, float]]:
    """A T5-style unigram vocabulary [(piece, log-prob)]: <pad>, </s>, <unk>, then pieces by score.

    Two parts, both unigram log-probabilities:
      * every word of `texts` as one piece "▁word", scored by its relative frequency, so captions
        tokenize word by word (tokenizers' UnigramTrainer only seeds substrings that occur twice
        among the *distinct* words, so on a small corpus it would never keep a whole word);
      * the pieces of a UnigramTrainer trained on the same words (SentencePiece pre-tokenization),
        which spell out words the corpus never had, plus every ASCII letter, digit and punctuation
        mark (with and without "▁") at the lowest score, so plain text never needs <unk>.
    When both exceed `vocab_size`, the lowest-scored multi-character pieces are dropped.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<pad>", "</s>", "<unk>"]
    texts = [preprocess(t) for t in texts]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # the trainer's EM sums floats in hash-map order, so scores vary in the last bits from run to run:
    # rounding makes the saved tokenizer byte-identical for the same corpus
    scores = {
        piece: round(float(score), 6)
        for piece, score in json.loads(tok.to_str())["model"]["vocab"]
        if piece not in specials
    }

    words = Counter(w for t in texts for w in re.findall(r"[^\W_]+", t))  # letters/digits runs, punctuation apart
    total = sum(words.values())
    for w, n in words.items():
        scores["▁" + w] = max(scores.get("▁" + w, -math.inf), round(math.log(n / total), 6))

    floor = round(min(scores.values()) - 1.0, 6)
    for ch in string.ascii_lowercase + string.digits + string.punctuation:  # spell any plain-ASCII word
        scores.setdefault(ch, floor)
        scores.setdefault("▁" + ch, floor)

    pieces = sorted(scores, key=lambda p: (-scores[p], p))  # best first; ties by name, so the order is deterministic
    budget = vocab_size - len(specials)
    if len(pieces) > budget:
        keep = {p for p in pieces if len(p.lstrip("▁")) <= 1}  # single characters: every text stays spellable
        for p in pieces:
            if len(keep) >= budget:
                break
            keep.add(p)
        pieces = [p for p in pieces if p in keep]
    if len(pieces) > budget:
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold the {len(pieces)} single characters of the corpus "
            "plus 3 special tokens"
        )
    return [(s, 0.0) for s in specials] + [(p, scores[p]) for p in pieces]


def build_tiny_t5(out_dir: str | Path, d_model: int = 64, num_layers: int = 2, num_heads: int = 2, d_ff: int = 128,
                  vocab_size: int = 512, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Build and save a small random T5 encoder and a unigram tokenizer trained on `corpus` (+ the built-in one).

    Same layout as T5-v1.1 (gated-GELU FFN, RMSNorm, relative position buckets) and the same special
    tokens (<pad> 0, </s> 1, <unk> 2). Deterministic for a given seed and corpus. Returns out_dir.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")

    # T5's pre-tokenization (split on whitespace, "▁" marks a word start) and special tokens come with T5Tokenizer
    t5_tok = T5Tokenizer(
        vocab=train_unigram_vocab(default_corpus() + list(corpus or []), vocab_size), extra_ids=0, model_max_length=512
    )
    t5_tok.save_pretrained(str(out_dir))

    # encoder: T5-v1.1 layout, random weights from a fixed seed (the global RNG is left as it was)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
