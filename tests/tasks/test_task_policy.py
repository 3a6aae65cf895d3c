from types import SimpleNamespace

import pytest
from prefect.states import Failed
from soraflow.configs.loader import ConfigError
from soraflow.storage.faults import EnvironmentFault
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
        (EnvironmentFault("writing clip x.mp4: environment fault (ENOSPC)"), False),  # fails at once; the rerun resumes
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


def test_stage_results_expire_and_are_json():
    from soraflow.tasks.ingest.shard_tasks import (
        download_shard,
        list_source,
        merge_shards,
        split_shard,
    )
    from soraflow.tasks.task_policy import STAGE_CACHE_EXPIRATION

    for t in (download_shard, split_shard, merge_shards):
        assert t.cache_expiration == STAGE_CACHE_EXPIRATION and t.result_serializer == "json", t.name
    assert list_source.result_serializer == "json" and list_source.cache_key_fn is None


def test_cache_key_reads_config_sections_by_value(tmp_path):
    from soraflow.configs.schema import SplitConfig

    ctx = SimpleNamespace(task=SimpleNamespace(fn=_task_fn, name="t"))
    root = str(tmp_path / "root")
    k = stage_cache_key(ctx, {"a": SplitConfig(fps=24.0), "data_root": root})
    assert k == stage_cache_key(ctx, {"a": SplitConfig(fps=24.0), "data_root": root})
    assert k != stage_cache_key(ctx, {"a": SplitConfig(fps=30.0), "data_root": root})


def test_cache_key_hashes_pydantic_arguments_by_their_json(tmp_path):
    from soraflow.configs.loader import load_config

    ctx = SimpleNamespace(task=SimpleNamespace(fn=_task_fn, name="t"))
    root = str(tmp_path / "root")
    key = stage_cache_key(ctx, {"a": load_config("local"), "data_root": root})
    assert key == stage_cache_key(ctx, {"a": load_config("local"), "data_root": root})  # equal configs, one key
    assert key == stage_cache_key(ctx, {"a": load_config("local").model_dump(mode="json"), "data_root": root})
    assert key != stage_cache_key(ctx, {"a": load_config("local", {"train.steps": 7}), "data_root": root})
