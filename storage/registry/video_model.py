"""The MLflow pyfunc model of a SoraFlow model folder: prompts in, videos out.

"Models from code": storage/registry/mlflow_model.py logs this file itself as the `python_model`
(`mlflow.pyfunc.save_model(python_model=<this file>, artifacts={"model_dir": <folder>})`) and
MLflow runs it again at load time, so nothing is pickled (never import this module: MLflow runs
it); the weights stay safetensors + JSON in the artifact `model_dir` (storage/registry/model_folder.py
reads it). Loading needs SoraFlow installed (pip install -e <repo>).

    model = mlflow.pyfunc.load_model("models:/soraflow-local@champion")
    videos = model.predict(["a red circle moving right"])                  # (B, T, H, W, 3) uint8
    paths = model.predict(["..."], params={"output": "paths", "output_dir": "out"})  # mp4 paths
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from soraflow.storage.registry.mlflow_model import MODEL_DIR_ARTIFACT

OUTPUTS = ("arrays", "paths")


def _prompts(model_input) -> list[str]:
    """The prompts from what pyfunc passes: a DataFrame (signature applied), a list, an array or a string."""
    if isinstance(model_input, str):
        prompts = [model_input]
    elif hasattr(model_input, "columns"):  # pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        prompts = model_input[column].tolist()
    else:
        prompts = list(np.asarray(model_input).reshape(-1))
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if not prompts or bad:
        raise ValueError(f"SoraFlow model: every prompt must be a non-empty string, got {bad or 'no prompts'}")
    return [str(p) for p in prompts]


class SoraFlowVideoModel(PythonModel):
    """Generates one video per prompt with the pipeline in the artifact `model_dir`."""

    def load_context(self, context) -> None:
        from soraflow.storage.registry.model_folder import load_model_folder

        self.folder = Path(context.artifacts[MODEL_DIR_ARTIFACT])
        self.pipe, self.cfg = load_model_folder(self.folder)

    def predict(self, context, model_input, params: dict | None = None):
        from soraflow.storage.data.video_io import to_uint8_frames, write_video

        params = params or {}
        output = params.get("output") or "arrays"
        if output not in OUTPUTS:
            raise ValueError(f"SoraFlow model: params output={output!r}; expected one of {OUTPUTS}")
        prompts = _prompts(model_input)
        cfg_scale = params.get("cfg_scale")
        videos = self.pipe(
            prompts,
            steps=int(params.get("steps") or 0) or self.cfg.generate.steps or None,
            cfg_scale=None if cfg_scale is None or cfg_scale < 0 else float(cfg_scale),
            seed=int(params.get("seed", self.cfg.generate.seed)),
        )  # (B, 3, T, H, W) in [-1, 1]
        frames = [to_uint8_frames(v) for v in videos]  # (T, H, W, 3) uint8 each
        if output == "arrays":
            return np.stack(frames)
        out = Path(params.get("output_dir") or tempfile.mkdtemp(prefix="soraflow-predict-"))
        out.mkdir(parents=True, exist_ok=True)
        return [str(write_video(out / f"{k}.mp4", f, fps=self.cfg.video.fps)) for k, f in enumerate(frames)]


set_model(SoraFlowVideoModel())
