"""The train flow: (VAE fit) -> latent cache -> Ray Train STDiT -> evaluate -> register."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.concurrency.sync import concurrency
from soraflow.flows.params import RunParams
from soraflow.storage.data.holdout import DatasetSplit
from soraflow.tasks.evaluate import evaluate_task
from soraflow.tasks.register import register_task
from soraflow.tasks.train.driver import run_name_for, train_task
from soraflow.tasks.train.encode import latent_cache_task
from soraflow.tasks.train.vae_fit import fit_vae_task

# One slot shared by every training run, so scheduled, triggered and manual runs never train at once.
TRAINING_LIMIT = "soraflow-training"


def ensure_training_limit() -> None:
    """Create the global training slot if it is missing (an existing one is left as its owner set it)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(TRAINING_LIMIT)
        except ObjectNotFound:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=TRAINING_LIMIT, limit=1))
            except Exception:  # created meanwhile by another run: fine if it exists now
                client.read_global_concurrency_limit_by_name(TRAINING_LIMIT)


@dataclass
class TrainFlowResult:
    """What one train flow run made, and where to look at it."""

    run_dir: str  # Ray Train storage and checkpoints
    model_dir: str  # the exported EMA model folder (registered as an MLflow model)
    steps: int
    final_loss: float
    resumed_from_step: int
    loss_curve: str | None  # PNG
    vae: dict  # the VAE fit's figures (empty when the VAE was configured, not fitted)
    metrics: dict  # evaluation: val_loss, sampling figures, each scorer's metrics
    eval_prompts: list[str]  # the held-out captions the samples were drawn for
    eval_grid: str | None  # GIF grid of the evaluation samples
    registered_version: int
    promoted: bool
    promotion_reason: str
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage

    def as_dict(self) -> dict:
        return asdict(self)


@flow(name="soraflow-train", log_prints=True)
def train_flow(manifest: str, params: RunParams | None = None) -> TrainFlowResult:
    """Train on `manifest` (an ingest output), evaluate, register; `champion` only if better."""
    params = params or RunParams()  # the local preset, made at call time: importing a flow reads no config
    log = get_run_logger()
    cfg, root = params.load()  # loaded when the parameters were made; not read again
    data_root = str(root.root)
    # The manifest is read, hashed and split here once; every stage gets the result.
    data = DatasetSplit.read(manifest, cfg.train.val_fraction)
    run_name = run_name_for(cfg, data.version)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    vae = fit_vae_task(cfg, data, data_root)
    timings["vae fit"] = time.perf_counter() - t
    cache = None
    if cfg.train.use_latent_cache:
        t = time.perf_counter()
        cache = latent_cache_task(cfg, data, str(vae.path), data_root)
        timings["latent cache"] = time.perf_counter() - t
        log.info("latent cache: %s (%d clips)", cache.path, cache.clips)

    t = time.perf_counter()
    ensure_training_limit()
    with concurrency(TRAINING_LIMIT, occupy=1, strict=True):
        trained = train_task(cfg, data, str(vae.path), data_root, run_name, cache)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluated = evaluate_task(cfg, data, str(trained.model_dir), data_root)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    registered = register_task(cfg, data, trained, evaluated, vae, data_root, run_name)  # also its markdown summary
    timings["register"] = time.perf_counter() - t

    create_table_artifact(
        [
            {"metric": k, "value": f"{v:.4f}" if isinstance(v, float) else str(v)}
            for k, v in {**trained.metrics, **evaluated.metrics}.items()
        ],
        key="eval-metrics",
        description=f"{cfg.registry.model_name} v{registered.version} on dataset {manifest}",
    )
    return TrainFlowResult(
        run_dir=str(trained.run_dir),
        model_dir=str(trained.model_dir),
        steps=int(trained.metrics.get("steps") or 0),
        final_loss=float(trained.metrics.get("final_loss") or 0.0),
        resumed_from_step=trained.resumed_from_step,
        loss_curve=str(trained.loss_curve_png) if trained.loss_curve_png else None,
        vae=vae.metrics,
        metrics=evaluated.metrics,
        eval_prompts=list(dict.fromkeys(row["prompt"] for row in evaluated.per_prompt)),
        eval_grid=str(evaluated.samples_gif) if evaluated.samples_gif else None,
        registered_version=registered.version,
        promoted=registered.promoted,
        promotion_reason=registered.reason,
        timings=timings,
    )
