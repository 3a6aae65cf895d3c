"""The local small-sample flow: the whole life cycle on a laptop CPU, in minutes, with no downloads.

    sample source on 127.0.0.1 -> ingest -> (VAE fit) -> cache -> train -> evaluate
    -> register -> generate -> summary
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import get_run_context
from soraflow.flows.params import RunParams
from soraflow.flows.pipeline import ingest_then_train
from soraflow.tasks.generate import generate_task

# Extra overrides per training budget, on top of configs/local.yaml (its values are "default").
BUDGETS: dict[str, list[str]] = {
    "small": ["train.steps=300", "vae.fit.steps=150", "eval.num_prompts=4",
              "ingest.sample_source.hdvg_videos=12", "ingest.sample_source.pexels_videos=24"],
    "default": [],
    # More steps need more clips: on the default 156, the validation loss rises after ~80 k samples.
    "large": ["train.steps=4000", "ingest.sample_source.hdvg_videos=72", "ingest.sample_source.pexels_videos=96"],
}


def with_budget(params: RunParams, budget: str) -> RunParams:
    """The run's parameters with the budget's overrides (flows/local.py BUDGETS) after them."""
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r}: expected one of {sorted(BUDGETS)}")
    return params.with_overrides(*BUDGETS[budget])


def start_up(params: RunParams, budget: str = "default") -> None:
    """Before the flow: render the sample source's videos while Prefect's temporary server starts.

    Each takes 10-14 s on mostly one core, so together they take the time of one. The server is
    started the way Prefect starts it on first use (no PREFECT_API_URL: a temporary one), and
    the flow reuses it; the sample server later finds its videos on disk."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect import get_client
    from soraflow.tasks.sample_world.plug import render_sample_videos

    cfg, data_root = with_budget(params, budget).load()
    with ThreadPoolExecutor(1) as pool:
        rendering = pool.submit(render_sample_videos, cfg, data_root)
        with get_client(sync_client=True):
            pass
        rendering.result()


def scorer_lines(metrics: dict) -> dict[str, str]:
    """One summary line per scored figure the evaluation produced: each attribute's adherence next to
    its chance level, then any other scorer's numbers (none when eval.scorers is empty)."""
    lines = {f"adherence {key.removeprefix('chance_')}": f"{metrics['adherence_' + key.removeprefix('chance_')]:.2f} "
             f"(chance {value:.2f})" for key, value in metrics.items() if key.startswith("chance_")}
    if "clip_score" in metrics:
        lines["CLIP similarity"] = f"{metrics['clip_score']:.1f}"
    return {**lines, "validation loss": f"{metrics['val_loss']:.4f}"}


@flow(name="soraflow-local", log_prints=True)
def local_flow(params: RunParams | None = None, budget: str = "default", prompts: list[str] | None = None) -> dict:
    """Sample source -> ingest -> train -> evaluate -> register -> generate, then a summary table."""
    params = params or RunParams()  # the local preset, made at call time: importing a flow reads no config
    log = get_run_logger()
    t_flow = time.perf_counter()
    params = with_budget(params, budget)
    cfg, root = params.load()
    ingested, trained, timings = ingest_then_train(params)  # what the pipeline flow runs

    t = time.perf_counter()
    prompts = prompts or trained.eval_prompts[:4]
    generated = generate_task(prompts, str(trained.registered_version), cfg, str(root.root))
    timings["generate"] = time.perf_counter() - t
    timings["flow (all)"] = time.perf_counter() - t_flow

    run = get_run_context().flow_run
    summary = {
        "clips (ok)": ingested["ok"],
        "rejected rows": ingested["rejected"],
        "caption sources": ingested["caption_sources"],
        "manifest": ingested["manifest"],
        "dataset version": ingested["dataset_version"],
        "training steps": trained.steps,
        "final loss": trained.final_loss,
        **scorer_lines(trained.metrics),
        "registry": f"{cfg.registry.model_name} v{trained.registered_version}"
                    + (" (champion)" if trained.promoted else f" (not promoted: {trained.promotion_reason})"),
        "loss curve": trained.loss_curve,
        "eval samples": trained.eval_grid,
        "generated videos": generated["videos"],
        "GIF previews": generated["gifs"],
        "prefect flow run": f"{run.name} ({run.id})",
        "wall time (s)": {k: round(v, 1) for k, v in timings.items()},
    }
    create_table_artifact(
        [{"item": k, "value": str(v)} for k, v in summary.items()],
        key="local-run-summary",
        description="SoraFlow local run",
    )
    log.info("generated videos: %s", ", ".join(generated["videos"]))
    return summary
