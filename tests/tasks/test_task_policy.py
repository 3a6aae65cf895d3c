from types import SimpleNamespace

import pytest
from prefect.states import Failed
from soraflow.configs.schema import ConfigError
from soraflow.storage.layout import UnsafePathError
from soraflow.tasks.task_policy import (
    retry_unless_bad_input,
    root_instance_id,
    stage_cache_key,
)


@pytest.mark.parametrize(
    "exc, retry",
    [
        (ConnectionError("network down"), True),
        (TimeoutError("slow"), True),
        (OSError(28, "No space left on device"), True),
        (RuntimeError("worker died"), True),
        (ConfigError("bad.yaml: key 'x': unknown key"), False),
        (UnsafePathError("unsafe id '../x'"), False),
        (ValueError("not a video"), False),
        (FileNotFoundError("vae.path"), False),
    ],
)
def test_retry_only_transient(exc, retry):
    assert retry_unless_bad_input(None, None, Failed(data=exc)) is retry


def _task_fn(a, data_root):
    return a


def test_cache_key_depends_on_inputs_source_and_root_instance(tmp_path):
    ctx = SimpleNamespace(task=SimpleNamespace(fn=_task_fn, name="t"))
    root = tmp_path / "root"
    k1 = stage_cache_key(ctx, {"a": 1, "data_root": str(root)})
    assert k1 == stage_cache_key(ctx, {"a": 1, "data_root": str(root)})
    assert k1 != stage_cache_key(ctx, {"a": 2, "data_root": str(root)})
    # a wiped and re-created root gets a new instance id, so old cache entries never match
    first_id = root_instance_id(root)
    (root / ".soraflow-id").unlink()
    assert root_instance_id(root) != first_id
    assert stage_cache_key(ctx, {"a": 1, "data_root": str(root)}) != k1
    assert stage_cache_key(ctx, {"a": 1}) is None  # no data root: no cross-run caching


def test_cache_key_hashes_pydantic_arguments_by_their_json(tmp_path):
    from soraflow.configs.schema import load_config

    ctx = SimpleNamespace(task=SimpleNamespace(fn=_task_fn, name="t"))
    root = str(tmp_path / "root")
    key = stage_cache_key(ctx, {"a": load_config("local"), "data_root": root})
    assert key == stage_cache_key(ctx, {"a": load_config("local"), "data_root": root})  # equal configs, one key
    assert key == stage_cache_key(ctx, {"a": load_config("local").model_dump(mode="json"), "data_root": root})
    assert key != stage_cache_key(ctx, {"a": load_config("local", {"train.steps": 7}), "data_root": root})
