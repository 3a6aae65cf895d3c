"""The model card: README.md in every model folder, as on the Hugging Face Hub.

Written by every export (tasks/train/model_factory.export_model_dir) with what is known then,
and written again by the register stage once the evaluation figures and the dataset version
are known, before the folder becomes an MLflow model.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCardData
from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.layout import atomic_write_text
from soraflow.storage.redact import redact_config, redact_text

CARD_FILE = "README.md"


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def model_card_text(cfg: SoraFlowConfig, dataset_version: str | None = None, metrics: dict | None = None,
                    version: str | None = None) -> str:
    name = cfg.registry.model_name
    title = f"{name} v{version}" if version else name
    data = ModelCardData(library_name="soraflow", pipeline_tag="text-to-video", tags=["open-sora", "stdit", "soraflow"])
    t, m = cfg.train, cfg.model
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title}",
        "",
        f"An Open-Sora v1.0 STDiT ({m.preset}) text-to-video model trained with SoraFlow, "
        f"{cfg.video.num_frames} frames at {cfg.video.image_size[0]}x{cfg.video.image_size[1]}.",
        "",
        "## Data",
        "",
        f"* dataset version: `{dataset_version or 'not recorded at export; see the registered version'}`",
        "",
        "## Training",
        "",
        f"* {t.steps} steps, batch {t.batch_size}, lr {t.lr:g}, weight decay {t.weight_decay:g}, "
        f"{t.num_workers or 1} worker(s), scheduler {cfg.scheduler.type}",
        "* text encoder: " + ((cfg.text_encoder.path and redact_text(cfg.text_encoder.path)) or "the tiny T5 in text_encoder/"),
        "* VAE: " + ((cfg.vae.path and redact_text(cfg.vae.path)) or "the tiny VAE fitted on the same data, in vae/"),
        "",
        "## Evaluation",
        "",
        _metrics_table(metrics) if metrics else "Not evaluated yet (the register stage adds the figures).",
        "",
        "## How to generate",
        "",
        "```bash",
        f"soraflow generate --model {version or 'champion'} \"a red circle moving right\"",
        "soraflow generate --ckpt <this folder> \"a red circle moving right\"",
        "```",
        "",
        "```python",
        "import mlflow",
        "mlflow.set_tracking_uri(\"sqlite:///<data root>/registry/mlflow.db\")",
        f"model = mlflow.pyfunc.load_model(\"models:/{name}@champion\")",
        "videos = model.predict([\"a red circle moving right\"])  # (prompts, T, H, W, 3) uint8",
        "```",
        "",
        "The parts load on their own too: `STDiT.from_pretrained(\"stdit\")`, diffusers' "
        "`AutoencoderKL.from_pretrained(\"vae\")`, transformers' `T5EncoderModel.from_pretrained(\"text_encoder\")`.",
        "",
        "<details><summary>Full training config (soraflow.json)</summary>",
        "",
        "```json",
        json.dumps(redact_config(cfg.model_dump(mode="json")), indent=2),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, cfg: SoraFlowConfig, dataset_version: str | None = None,
                     metrics: dict | None = None, version: str | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, model_card_text(cfg, dataset_version, metrics, version))
    return path
