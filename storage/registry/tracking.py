"""What a training run records in MLflow besides params and the model: the per-step metric
history (so `mlflow ui` draws the loss curve), the dataset version as an MLflow dataset input,
and the redaction every logged config goes through.

Functions take an `MlflowClient` (storage/registry/model_registry.py's `ModelRegistry.client`) and a run id.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from soraflow.storage.redact import redact_url


def read_loss_history(checkpoint_dir: str | Path) -> list[tuple[int, float]]:
    """[(step, loss)] from a training checkpoint's state.json (`meta.loss_history`), without its tensors."""
    path = Path(checkpoint_dir) / "state.json"
    try:
        meta = json.loads(path.read_text())["meta"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: no readable training state with a loss history: {e}") from e
    return [(int(step), float(loss)) for step, loss in meta.get("loss_history", [])]


def log_history(client, run_id: str, series: dict[str, list[tuple[int, float]]]) -> int:
    """Log each series as one metric with a value per step; returns how many points were logged."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, int(step)) for key, points in series.items() for step, value in points]
    for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=items[i : i + 1000])
    return len(items)


def log_dataset_input(client, run_id: str, manifest: str | Path, name: str, version: str,
                      context: str = "training", profile: dict | None = None) -> None:
    """The manifest as the run's dataset input: its name, digest = the dataset version, source = the
    manifest's path (MLflow's "local" source type), `profile` (e.g. clip counts) shown beside it."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=name, digest=version[:36], source_type="local",
                      source=json.dumps({"uri": str(Path(manifest).resolve())}),
                      profile=json.dumps(profile) if profile else None)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def run_url(tracking_uri: str, experiment_id: str, run_id: str, ui_url: str | None = None) -> str:
    """The run's page in the MLflow UI: the tracking server itself, else `ui_url`, else `mlflow ui`'s default."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else (ui_url or DEFAULT_UI)
    return f"{redact_url(base).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
