"""Logging a model folder as an MLflow pyfunc model, and loading it back.

"Models from code": the python model is the file storage/registry/video_model.py, given to MLflow as a
path (MLflow copies and runs it at load time, nothing is pickled); the model folder (safetensors
+ JSON, storage/registry/model_folder.py) is the model's artifact `model_dir`; the signature says
prompts in, videos out. The model is an MLflow 3 LoggedModel of the training run, so it shows in
the run's "Logged models" and `mlflow.pyfunc.load_model("models:/<name>@<alias>")` loads it.

MLflow is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import tempfile
import warnings
from importlib import metadata
from pathlib import Path

MODEL_DIR_ARTIFACT = "model_dir"  # the artifact that holds the model folder
PYFUNC_CODE = Path(__file__).with_name("video_model.py")  # the "models from code" file
# Pinned in the model's requirements; listing them spares MLflow inferring them, which would load
# the model in a subprocess. SoraFlow itself must be installed where the model is loaded.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "safetensors",
    "huggingface_hub",
    "transformers",
    "diffusers",
    "numpy",
    "pandas",
    "av",
)


def video_signature():
    """Prompts (a list of strings) in; uint8 videos (B, T, H, W, 3) out; generation options as params."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import (
        ColSpec,
        DataType,
        ParamSchema,
        ParamSpec,
        Schema,
        TensorSpec,
    )

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),  # unnamed: predict(["a prompt", ...]) takes a plain list
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1, 3), "video")]),
        params=ParamSchema([
            ParamSpec("output", DataType.string, "arrays"),  # "paths": write mp4 files, return their paths
            ParamSpec("output_dir", DataType.string, ""),  # "" = a new temporary folder
            ParamSpec("steps", DataType.long, 0),  # 0 = the scheduler's num_sampling_steps
            ParamSpec("cfg_scale", DataType.double, -1.0),  # < 0 = the config's
            ParamSpec("seed", DataType.long, 42),
        ]),
    )


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_pyfunc_model(client, experiment_id: str, run_id: str, model_dir: Path, name: str):
    """Log `model_dir` as a pyfunc LoggedModel of run `run_id`; returns the READY LoggedModel."""
    import mlflow.pyfunc
    from mlflow.models import Model

    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="text-to-video")
    try:
        with tempfile.TemporaryDirectory(prefix="soraflow-mlmodel-") as tmp:
            local = Path(tmp) / name
            with warnings.catch_warnings():  # the signature is given; no type hints or input example needed
                warnings.filterwarnings(
                    "ignore", message=".*(type hints|input example|input_example).*", category=UserWarning
                )
                mlflow.pyfunc.save_model(
                    str(local),
                    python_model=str(PYFUNC_CODE),
                    artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                    signature=video_signature(),
                    mlflow_model=Model(run_id=run_id, model_id=model.model_id, artifact_path=name),
                    pip_requirements=requirements(),
                )
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    return client.finalize_logged_model(model.model_id, "READY")


def model_dir_in(local: str | Path) -> Path | None:
    """The model folder inside a downloaded pyfunc model (MLflow names it after the logged folder)."""
    mlmodel = Path(local) / "MLmodel"
    if not mlmodel.is_file():
        return None
    from mlflow.models import Model

    artifacts = Model.load(str(mlmodel)).flavors.get("python_function", {}).get("artifacts") or {}
    entry = artifacts.get(MODEL_DIR_ARTIFACT)
    return Path(local) / entry["path"] if entry else None


def load_pyfunc_pipeline(local: str | Path, base=None, num_frames: int | None = None):
    """The TextToVideo inside a downloaded pyfunc model, loaded as `mlflow.pyfunc.load_model` does.

    `base` (a SoraFlowConfig) keeps the caller's data and generate sections; `num_frames`
    rebuilds the pipeline for another clip length from the same folder.
    """
    import mlflow.pyfunc
    from soraflow.storage.registry.model_folder import load_model_folder

    python_model = mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
    if num_frames or base is not None:
        return load_model_folder(python_model.folder, base, num_frames)[0]
    return python_model.pipe
