"""LLaVA for video captioning: the model wrapper the caption stage uses, and a tiny offline LLaVA.

`LlavaCaptionModel` loads any transformers-format LLaVA checkpoint from a local directory
(AutoProcessor + LlavaForConditionalGeneration; LLaVA-NeXT checkpoints such as
llava-v1.6-34b-hf through AutoModelForImageTextToText) and captions videos given as a few
frames each. `build_tiny_llava` writes a random LLaVA of a few hundred kilobytes in the very
same format, built without any download, so tests run the real loading and generation code.
It generates gibberish.

Frames and prompt (Open-Sora v1.0.0 `tools/caption/caption_llava.py`): Open-Sora's LLaVA script
put ONE image token in the prompt but encoded three frames, so only the 20 % frame reached
the model. Here every frame is its own image with its own `<image>` placeholder, in
chronological order, followed by the prompt, which is what the three_frames prompt ("three
frames in chronological order") describes and what Open-Sora's GPT-4V path sends.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# A LLaVA-1.5-style conversation ("USER: <image>\n...\nASSISTANT:"); real checkpoints ship their own.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{{ '\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Text the tiny tokenizer's BPE merges are learned from, so its gibberish is made of word pieces.
_TINY_CORPUS = (
    "A video is given by providing three frames in chronological order. Describe this video and its style. "
    "A red circle moves left across a dark background. A green square moves up on a bright background. "
    "A blue triangle moves right. A yellow disc moves down. The camera is still. Shapes, colours, motion."
)


def build_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA (config, safetensors weights, tokenizer, image processor, chat template).

    Vision: CLIP ViT, 32x32 images in 8x8 patches -> 16 patch tokens + CLS, 2 layers of width 32.
    Language: Llama, 2 layers of width 32, a byte-level BPE vocabulary of ~300 with `<image>`.
    The processor has num_additional_image_tokens=1 (the CLS token the "default" feature
    strategy drops), so each `<image>` expands to exactly the 16 features the projector emits.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )

    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
            initializer_range=0.3,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,  # the three_frames prompt + 3 x 16 image tokens + the answer
            initializer_range=0.3,  # larger than usual so that the (random) image features sway the output
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",  # drop CLS, keep the 16 patch features
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


class LlavaCaptionModel:
    """A local LLaVA checkpoint that turns a few frames per video into one caption per video."""

    def __init__(self, path: str | Path, device: str | None = None):
        from transformers import (
            AutoConfig,
            AutoModelForImageTextToText,
            AutoProcessor,
            LlavaForConditionalGeneration,
        )

        path = Path(path)
        self.path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_cls = LlavaForConditionalGeneration if config.model_type == "llava" else AutoModelForImageTextToText
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"{path}: the LLaVA processor has no chat template; save one with the checkpoint")
        self.processor.tokenizer.padding_side = "left"  # decoder-only batch generation: pad on the left
        self.model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype).to(self.device).eval()
        self.calls = 0  # generate() calls, one per batch

    def prompt_text(self, prompt: str, num_images: int) -> str:
        """The chat-formatted user turn: one image entry per frame, then the prompt."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    @torch.no_grad()
    def caption(self, videos: list[np.ndarray], prompt: str, max_new_tokens: int) -> list[str]:
        """One batch: videos as (F, H, W, 3) uint8 frames each -> one caption each (greedy, newlines -> spaces)."""
        if not videos:
            return []
        texts = [self.prompt_text(prompt, len(v)) for v in videos]
        images = [frame for v in videos for frame in v]  # (B*F) images, video by video, in frame order
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(
            self.device, dtype=self.model.dtype
        )
        # input_ids (B, L) with each <image> expanded to its feature tokens; pixel_values (B*F, 3, h, w)
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        self.calls += 1
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, <= max_new_tokens)
        decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [" ".join(s.replace("\r", "\n").split("\n")).strip() for s in decoded]
