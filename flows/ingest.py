"""The ingest flow: download -> scene split -> caption -> score, each stage mapped over shards."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from soraflow.configs.loader import config_hash
from soraflow.configs.schema import SoraFlowConfig
from soraflow.flows.params import RunParams
from soraflow.storage.layout import DataRoot, file_lock
from soraflow.storage.data.manifest import (
    dataset_version,
    read_rows,
    shard_ranges,
    summarize,
)
from soraflow.tasks.ingest import STAGES
from soraflow.tasks.ingest.shard_tasks import (
    SHARD_TASKS,
    checked_result,
    download_shard,
    list_source,
    listing_len,
    merge_shards,
)
from soraflow.tasks.sample_world.plug import sample_source

DATASET_EVENT = "soraflow.dataset.updated"
RETRAIN_LABEL = "soraflow.retrain"  # event resource label the retrain trigger matches


def run_shards(stage: str, task_obj, calls: list[tuple]) -> list[str]:
    """Submit one task run per shard (named "split 3/20" in the UI), then collect their manifests
    in order while a progress artifact counts the finished shards."""
    n = len(calls)
    named = [task_obj.with_options(task_run_name=f"{stage} {i}/{n}") for i in range(1, n + 1)]
    futures = [t.submit(*args) for t, args in zip(named, calls)]
    progress = create_progress_artifact(
        0.0, key=f"soraflow-{stage}-progress", description=f"{stage}: shards done of {n}"
    )
    out = []
    for k, (t, future, args) in enumerate(zip(named, futures, calls), 1):
        out.append(checked_result(t, future, *args))
        update_progress_artifact(progress, 100.0 * k / n, description=f"{stage}: {k}/{n} shards done")
    return out


def download_stage(cfg: SoraFlowConfig, root: DataRoot) -> str:
    """List every source, download its items shard by shard, merge into one manifest."""
    http = cfg.ingest.http
    calls, listings = [], []
    for src in cfg.ingest.sources:
        listing = list_source(src, http, str(root.root))
        listings.append(listing)
        calls += [
            (src, listing, a, b, http, str(root.root))
            for a, b in shard_ranges(listing_len(listing), cfg.ingest.shard_size)
        ]
    shards = run_shards("download", download_shard, calls)
    return merge_shards(shards, "download", listings, config_hash(cfg), str(root.root))


def mapped_stage(stage: str, manifest: str, cfg: SoraFlowConfig, root: DataRoot) -> str:
    """Map one stage's shard task over the rows of `manifest`, then merge the shard outputs."""
    section = getattr(cfg.ingest, stage)  # the validated section (SplitConfig, CaptionConfig, ScoreConfig)
    n = len(read_rows(manifest))
    calls = [(manifest, a, b, section, str(root.root)) for a, b in shard_ranges(n, cfg.ingest.shard_size)]
    shards = run_shards(stage, SHARD_TASKS[stage], calls)
    return merge_shards(shards, stage, [manifest], config_hash(cfg), str(root.root))


def _published_marker(root: DataRoot, version: str) -> Path:
    """Exists once a dataset version has been announced under this data root."""
    return root.manifest_dir("published") / version


def publish(manifest: str, cfg: SoraFlowConfig, root: DataRoot, stages: dict[str, str], retrain: bool = True) -> dict:
    """Statistics as table artifacts, and the dataset event.

    The event always goes out (lineage: which run produced which dataset version); it carries
    the resource label `soraflow.retrain` = "true" only for a version this data root has not
    seen before and when the caller does not train on it itself: that is what the retrain
    deployment's trigger matches (flows/deploy.py).
    """
    from prefect.events import emit_event

    rows = read_rows(manifest)
    stats = summarize(rows)
    version = dataset_version(manifest)
    marker = _published_marker(root, version)
    new = not marker.exists()
    table = [
        {"stage": name, "manifest": path, **{k: summarize(read_rows(path))[k] for k in ("rows", "ok", "rejected")}}
        for name, path in stages.items()
    ]
    create_table_artifact(table, key="ingest-manifests", description=f"Ingest of {cfg.name}: dataset version {version}")
    create_table_artifact(
        [{"statistic": k, "value": str(v)} for k, v in stats.items()],
        key="manifest-statistics",
        description=f"Final manifest {manifest}",
    )
    emit_event(
        event=DATASET_EVENT,
        resource={"prefect.resource.id": f"soraflow.dataset.{cfg.name}", "prefect.resource.name": cfg.name,
                  RETRAIN_LABEL: "true" if (new and retrain) else "false"},
        payload={"manifest": manifest, "dataset_version": version, "ok": stats["ok"], "new_version": new},
    )
    if new:  # recorded only once announced: a run that fails before this announces it again
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return {"manifest": manifest, "dataset_version": version, "new_version": new, **stats, "stage_manifests": stages}


@flow(name="soraflow-ingest", log_prints=True)
def ingest_flow(params: RunParams | None = None, trigger_training: bool = True) -> dict:
    """download -> split -> caption -> score; returns the final manifest and its statistics.

    trigger_training=False (the pipeline, which trains right after) announces the dataset
    without asking the retrain deployment to train on it too."""
    params = params or RunParams()  # the local preset, made at call time: importing a flow reads no config
    log = get_run_logger()
    config, root = params.load()
    with ingest_lock(root):
        with sample_source(config, root) as cfg:
            stages = {"download": download_stage(cfg, root)}
            log.info("download manifest: %s", stages["download"])
        for stage in STAGES[1:]:
            previous = list(stages.values())[-1]
            stages[stage] = mapped_stage(stage, previous, cfg, root)
            log.info("%s manifest: %s", stage, stages[stage])
        return publish(stages["score"], cfg, root, stages, retrain=trigger_training)


def ingest_lock(root: DataRoot):
    """One ingest per data root at a time; a second one stops at once, naming the holder
    ("... is held by PID 123 on host since 2026-...") instead of racing it for files."""
    return file_lock(root.lock("ingest"), wait_s=0, what=f"ingest on data root {root.root}")


def with_task_runner(flow_obj, cfg: SoraFlowConfig):
    """The flow with Ray as its task runner when the config asks for it (threads otherwise)."""
    if cfg.ingest.task_runner == "ray":
        from prefect_ray.task_runners import RayTaskRunner

        return flow_obj.with_options(task_runner=RayTaskRunner(address=cfg.ingest.ray_address))
    from prefect.task_runners import ThreadPoolTaskRunner

    return flow_obj.with_options(task_runner=ThreadPoolTaskRunner(max_workers=cfg.ingest.max_workers))


def run_ingest(params: RunParams) -> dict:
    return with_task_runner(ingest_flow, params.load_config())(params)


def run_single_stage(name: str, params: RunParams, manifest: str | None) -> dict:
    """`soraflow stage NAME`: one stage as its own small flow, on a given manifest."""
    cfg, root = params.load()
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    if name != "download" and not manifest:
        raise ValueError(f"stage {name} needs --manifest (the output of the stage before it)")
    if manifest and not Path(manifest).exists():
        raise FileNotFoundError(f"--manifest {manifest}: no such file")

    @flow(name=f"stage-{name}", log_prints=True)
    def stage_flow() -> str:
        with ingest_lock(root):
            if name == "download":
                with sample_source(cfg, root) as c:
                    return download_stage(c, root)
            return mapped_stage(name, manifest, cfg, root)

    out = with_task_runner(stage_flow, cfg)()
    return {"stage": name, "manifest": out, "dataset_version": dataset_version(out), **summarize(read_rows(out))}
