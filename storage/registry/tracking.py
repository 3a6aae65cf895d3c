"""What a training run records in MLflow besides the model: the run itself with its params,
metrics and artifacts (`RunLog`, the runs half of storage/registry/model_registry.py's
`ModelRegistry`), the per-step metric history (so `mlflow ui` draws the loss curve), the dataset
version as an MLflow dataset input, and the run's page in the UI.

Functions take an `MlflowClient` (`ModelRegistry.client`) and a run id.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

from soraflow.storage.redact import redact_url


def flatten_params(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, f"{key}."))
        else:
            out[key] = v
    return out


class RunLog:
    """Runs of one MLflow experiment; the subclass provides `client`, `experiment_id` and `name`."""

    def start_run(self, run_name: str, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> str:
        """Open a run in the experiment and log its params (nested dicts flattened to a.b.c)."""
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}
        )
        flat = flatten_params(params or {})
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def run(
        self, run_name: str, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None
    ) -> Iterator[str]:
        """`with registry.run(...) as run_id:`; the run ends FINISHED, or FAILED if the block raises."""
        run_id = self.start_run(run_name, params, tags)
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        log_history(self.client, run_id, {k: [(int(step or 0), v)] for k, v in metrics.items()})

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (loss-curve PNG, sample mp4/gif) or a whole folder, under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"{self.name}: cannot log {path}: no such file or folder")

    def run_artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri


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
