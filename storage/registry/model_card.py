"""The model card: README.md in every model folder, as on the Hugging Face Hub.

Written once, by the register stage, when everything it shows is known (the dataset version,
the training and evaluation figures, example prompts from the model's own held-out captions),
before the folder becomes an MLflow model.
"""

from __future__ import annotations

import json
import shlex
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
                    version: str | None = None, prompts: list[str] | None = None) -> str:
    """The card's markdown; `prompts` are example prompts (the held-out captions of its data)."""
    name = cfg.registry.model_name
    text = redact_text(prompts[0]) if prompts else "a caption like the training data's"
    sh_prompt, py_prompt = shlex.quote(text), json.dumps(text)
    title = f"{name} v{version}" if version else name
    data = ModelCardData(library_name="soraflow", pipeline_tag="text-to-video", tags=["open-sora", "stdit", "soraflow"])
    t, m = cfg.train, cfg.model
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
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
        "* text encoder: "
        + ((cfg.text_encoder.path and redact_text(cfg.text_encoder.path)) or "the tiny T5 in text_encoder/"),
        "* VAE: " + ((cfg.vae.path and redact_text(cfg.vae.path)) or "the tiny VAE fitted on the same data, in vae/"),
        "",
        "## Evaluation",
        "",
        *(
            [
                "Example prompts, held-out captions of its data: "
                f"{', '.join(json.dumps(redact_text(p)) for p in prompts)}.",
                "",
            ]
            if prompts
            else []
        ),
        _metrics_table(metrics) if metrics else "Not evaluated.",
        "",
        "## How to generate",
        "",
        "```bash",
        f"soraflow generate --model {version or 'champion'} {sh_prompt}",
        f"soraflow generate --ckpt <this folder> {sh_prompt}",
        "```",
        "",
        "```python",
        "import mlflow",
        'mlflow.set_tracking_uri("sqlite:///<data root>/registry/mlflow.db")',
        f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        f"videos = model.predict([{py_prompt}])  # (prompts, T, H, W, 3) uint8",
        "```",
        "",
        'The parts load on their own too: `STDiT.from_pretrained("stdit")`, diffusers\' '
        '`AutoencoderKL.from_pretrained("vae")`, transformers\' `T5EncoderModel.from_pretrained("text_encoder")`.',
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
                     metrics: dict | None = None, version: str | None = None, prompts: list[str] | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, model_card_text(cfg, dataset_version, metrics, version, prompts))
    return path
