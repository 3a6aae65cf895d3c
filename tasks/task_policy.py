"""What every SoraFlow Prefect task shares: which errors are worth a retry, and a safe cache key."""

from __future__ import annotations

import hashlib
import inspect
import json
import uuid
from datetime import timedelta
from pathlib import Path

from prefect.tasks import exponential_backoff
from soraflow.configs.loader import ConfigError
from soraflow.storage.faults import EnvironmentFault
from soraflow.storage.layout import UnsafePathError
from soraflow.storage.data.manifest import ManifestError

# Retrying these cannot help: the input itself is wrong. ValueError covers storage.checkpoints'
# CheckpointError too, which is not imported here: it would pull torch into every ingest command.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ManifestError,
    UnsafePathError,
    FileNotFoundError,
    ValueError,
)
RETRY_DELAYS = exponential_backoff(backoff_factor=2)  # 2, 4, 8 s
RETRY_JITTER = 0.5
# A cached stage result is trusted for at most this long (and only while its files exist: the
# ingest flow checks them, tasks/ingest/shard_tasks.checked_result); then the stage runs again.
STAGE_CACHE_EXPIRATION = timedelta(days=30)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry transient failures (network, worker loss) only.

    Not retried: bad input (already a rejected row, or a config error), and an EnvironmentFault
    (disk full, out of memory: storage.faults), which fails the run at once with its one-line
    message; it was never cached, so the rerun after the fault is fixed resumes."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read: treat as transient
        exc = e
    return not isinstance(exc, (*BAD_INPUT_ERRORS, EnvironmentFault))


def root_instance_id(root: str | Path) -> str:
    """A random id written once per data root, so a deleted and re-created root never hits old caches."""
    path = Path(root) / ".soraflow-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as f:
                f.write(uuid.uuid4().hex)
        except FileExistsError:
            pass
    return path.read_text().strip()


def _jsonable(value):
    """Config sections (pydantic models) by their field values, anything else by str()."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


def stage_cache_key(context, parameters: dict) -> str | None:
    """Cross-run cache key: the task's source + its inputs + the data root's instance id.

    Outputs are content-addressed manifests under the data root, so equal inputs give equal
    outputs; the root id guards against returning paths of a root that was wiped since.
    """
    root = parameters.get("data_root")
    if root is None:
        return None
    try:
        source = inspect.getsource(context.task.fn)
    except (OSError, TypeError):
        return None
    blob = json.dumps(parameters, sort_keys=True, default=_jsonable) + source + root_instance_id(root)
    return f"{context.task.name}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


# The options every learning-stage task shares: retried with backoff, never on bad input.
STAGE_RETRIES = dict(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=RETRY_JITTER,
                     retry_condition_fn=retry_unless_bad_input)
