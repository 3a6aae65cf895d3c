"""The `soraflow` command line: every flow, single stages, the registry and the deployments."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="SoraFlow: Open-Sora v1.0 text-to-video, from data to model, as Prefect flows.", no_args_is_help=True, add_completion=False)
run_app = typer.Typer(help="Run an end-to-end flow.", no_args_is_help=True)
registry_app = typer.Typer(help="The MLflow model registry.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(registry_app, name="registry")
console = Console(soft_wrap=True)  # paths stay whole, so they can be copied

# Without a Prefect server configured, flows run on an ephemeral one started on first use; its first
# start (database migrations) takes longer than Prefect's 20 s default on a 2-core laptop.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from an offline machine
if os.environ.get("PREFECT_HOME"):  # Prefect creates its home but not the folders above it
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="A YAML config, or a preset name in configs/ (local, opensora-v1-16x256x256).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one config key, e.g. --set train.steps=200 (repeatable).")]
RootOpt = Annotated[Optional[str], typer.Option("--root", help="Data root (default: config data.root, or $SORAFLOW_HOME).")]


def _load(config: str, overrides: list[str] | None, root: str | None = None):
    """Validated config + DataRoot, or a clear error and exit code 2."""
    return _params(config, overrides, root).load()


def _params(config: str, overrides: list[str] | None, root: str | None):
    """The flows' parameter model, or a clear config error and exit code 2."""
    from pydantic import ValidationError

    from soraflow.configs.schema import ConfigError
    from soraflow.flows.params import RunParams

    try:
        return RunParams(config=config, overrides=overrides or [], data_root=root)
    except (ConfigError, ValidationError) as e:
        console.print(f"[red]config error[/red]\n{e}")
        raise typer.Exit(2) from None


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


# ---------------------------------------------------------------- generate


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more text prompts.")],
    config: ConfigOpt = "local",
    ckpt: Annotated[Optional[str], typer.Option(help="A SoraFlow model folder, a .safetensors file or an Open-Sora .pth.")] = None,
    model: Annotated[Optional[str], typer.Option(help="A registry reference: champion, another alias, a version number, latest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: the config's).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: the config's).")] = None,
    num_frames: Annotated[Optional[int], typer.Option("--num-frames", help="Frames per video (default: the config's).")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option("--cfg-scale", help="Classifier-free guidance scale.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder (default: <data root>/outputs/samples).")] = None,
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Text to video on this machine: writes mp4 files and GIF previews and prints their paths."""
    cfg, data_root = _load(config, set_, root)
    from soraflow.tasks.generate import generate_videos

    try:
        result = generate_videos(cfg, data_root, prompts, ckpt=ckpt, model_ref=model, steps=steps, seed=seed, cfg_scale=cfg_scale, num_frames=num_frames, out_dir=out)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"weights: {result.weights}")
    for prompt, mp4, gif in zip(result.prompts, result.videos, result.gifs):
        console.print(f"[green]{prompt!r}[/green]\n  video:   {mp4}\n  preview: {gif}")
    console.print(f"done in {result.seconds:.1f} s")


# ---------------------------------------------------------------- ingest, stages, train


@app.command()
def ingest(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None) -> None:
    """Download -> scene split -> caption -> score, as a Prefect flow; prints the final manifest."""
    from soraflow.flows.ingest import run_ingest

    result = run_ingest(_params(config, set_, root))
    _print_dict("ingest", result)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="download | split | caption | score")],
    manifest: Annotated[Optional[str], typer.Option(help="Input manifest (not needed for download).")] = None,
    config: ConfigOpt = "local",
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Run one ingest stage on a manifest and print the manifest it writes."""
    from soraflow.flows.ingest import run_single_stage

    try:
        result = run_single_stage(name, _params(config, set_, root), manifest)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    _print_dict(f"stage {name}", result)


@app.command()
def train(
    manifest: Annotated[str, typer.Option(help="The training manifest (output of ingest).")],
    config: ConfigOpt = "local",
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """(VAE fit) -> latent cache -> Ray Train STDiT -> evaluate -> register, as a Prefect flow."""
    if not Path(manifest).exists():
        _fail(f"--manifest {manifest}: no such file")
    from soraflow.flows.train import train_flow

    result = train_flow(str(Path(manifest).resolve()), _params(config, set_, root))
    _print_dict("training", result)


# ---------------------------------------------------------------- end to end


@run_app.command("local")
def run_local(
    budget: Annotated[str, typer.Option(help="Training budget: small (60 clips, 300 steps: about a fifth of default), default (156 clips, 2500 steps: 12-25 min on 2 cores, by CPU speed) or large (276 clips, 5000 steps: about twice default).")] = "default",
    config: ConfigOpt = "local",
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """The whole life cycle on a synthetic sample served on loopback: ingest, train, evaluate, register, generate."""
    from soraflow.flows.local import BUDGETS, local_flow

    if budget not in BUDGETS:
        _fail(f"--budget {budget!r}: expected one of {', '.join(BUDGETS)}")
    summary = local_flow(_params(config, set_, root), budget=budget)
    _print_dict("SoraFlow local run", summary)


@run_app.command("pipeline")
def run_pipeline(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None) -> None:
    """Ingest then train (no generation), as one Prefect flow."""
    from soraflow.flows.pipeline import pipeline_flow

    result = pipeline_flow(_params(config, set_, root))
    _print_dict("pipeline", result)


@app.command()
def serve(
    config: ConfigOpt = "local",
    cron: Annotated[str, typer.Option(help="Cron schedule of the pipeline deployment (scheduled retraining).")] = "0 3 * * *",
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Serve the pipeline deployment (cron) and the train deployment (new-dataset trigger) until stopped."""
    from soraflow.flows.deploy import serve_deployments

    serve_deployments(_params(config, set_, root), cron=cron)


@app.command("sample-server")
def sample_server(
    config: ConfigOpt = "local",
    seconds: Annotated[float, typer.Option(help="Stop after this many seconds (0 = until Ctrl-C).")] = 0,
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Serve the synthetic sample source on 127.0.0.1 (HD-VG metadata, Inter4k zip, Pexels API)."""
    import time

    cfg, data_root = _load(config, set_, root)
    from soraflow.tasks.sample_world.server import SampleServer

    with SampleServer(data_root.root / "sample_source", cfg.ingest.sample_source) as server:
        console.print(f"sample source on {server.base_url} (HD-VG: /metafiles/hdvg_0.json, Inter4k: /inter4KUHD, Pexels: /videos/popular)")
        deadline = time.monotonic() + seconds if seconds > 0 else None
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


# ---------------------------------------------------------------- registry


@registry_app.command("list")
def registry_list(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None) -> None:
    """Every registered version with its aliases and metrics."""
    cfg, data_root = _load(config, set_, root)
    from soraflow.storage.registry import ModelRegistry

    versions = ModelRegistry(data_root, cfg.registry).list_versions()
    table = Table(title=f"registry: {cfg.registry.model_name}")
    for col in ("version", "aliases", "metrics", "dataset", "created"):
        table.add_column(col)
    for v in versions:
        metrics = ", ".join(f"{k}={float(x):.4g}" for k, x in sorted(v.metrics.items()))
        table.add_row(str(v.version), ",".join(v.aliases), metrics, v.tags.get("dataset_version", ""), str(getattr(v, "created", "")))
    console.print(table if versions else "no registered versions yet")


@registry_app.command("show")
def registry_show(ref: Annotated[str, typer.Argument(help="champion, an alias, a version number or latest")] = "champion", config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None) -> None:
    """One version: tags, metrics, aliases and where its files are."""
    cfg, data_root = _load(config, set_, root)
    from soraflow.storage.registry import ModelRegistry, RegistryError

    try:
        info = ModelRegistry(data_root, cfg.registry).get(ref)
    except RegistryError as e:
        _fail(str(e))
    _print_dict(f"{cfg.registry.model_name} v{info.version}", {"aliases": info.aliases, "run_id": info.run_id, "source": info.source, **{f"metric {k}": v for k, v in info.metrics.items()}, **{f"tag {k}": v for k, v in info.tags.items()}})


@registry_app.command("promote")
def registry_promote(version: Annotated[str, typer.Argument(help="The version number to promote.")], alias: Annotated[str, typer.Option(help="Alias to move.")] = "champion", config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None) -> None:
    """Move an alias (default champion) to a version, by hand."""
    cfg, data_root = _load(config, set_, root)
    from soraflow.storage.registry import ModelRegistry, RegistryError

    try:
        ModelRegistry(data_root, cfg.registry).promote(version, alias=alias)
    except RegistryError as e:
        _fail(str(e))
    console.print(f"{cfg.registry.model_name}@{alias} -> v{version}")


# ---------------------------------------------------------------- printing


def _print_dict(title: str, data: dict) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")  # long paths wrap, never cut
    for k, v in data.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)):
            v = "\n".join(str(x) for x in v) if v else "-"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        table.add_row(str(k), str(v))
    console.print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())


# ---------------------------------------------------------------- explain


@app.command()
def explain(
    prompt: Annotated[str, typer.Argument(help="A prompt, e.g. 'a red circle moving left'.")],
    train: Annotated[bool, typer.Option("--train", help="Trace one training step on the prompt's sample-world clip instead.")] = False,
    model: Annotated[str, typer.Option(help="Registry reference to explain (random weights if the registry has none).")] = "champion",
    ckpt: Annotated[Optional[str], typer.Option(help="A model folder or checkpoint instead of the registry.")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps (generation).")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Optional[str], typer.Option(help="Folder for the PNGs (default: <data root>/outputs/explain).")] = None,
    config: ConfigOpt = "local",
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Run one generation (or one training step) and print every stage's tensor shape, from hooks on the live modules."""
    cfg, data_root = _load(config, set_, root)
    from soraflow.tasks.explain import explain_generation, explain_training

    folder = Path(out) if out else data_root.samples.parent / "explain"
    try:
        if train:
            result = explain_training(cfg, data_root, prompt, folder, model_ref=model, ckpt=ckpt, seed=seed)
        else:
            result = explain_generation(cfg, data_root, prompt, folder, model_ref=model, ckpt=ckpt, steps=steps, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    f = result.facts
    console.print(f"weights: {result.weights}")
    console.print(f"{result.mode}: {prompt!r}; video (T, H, W) = ({f['T']}, {f['H']}, {f['W']}), latents (C, T, H/f, W/f) = "
                  f"({f['C']}, {f['T']}, {f['h']}, {f['w']}) with f = {f['f']}; token grid {f['grid_t']}x{f['grid_h']}x{f['grid_w']}, "
                  f"S = {f['S']} tokens per frame; D = {f['D']}, {f['heads']} heads, {f['depth']} blocks; L = {f['L']} text tokens")
    rows = [(s.stage, s.module, s.shape, s.meaning) for s in result.stages]
    widths = [max(len(r[k]) for r in rows) for k in range(2)]
    console.print(f"{'stage':<{widths[0]}}  {'module':<{widths[1]}}  shape  |  meaning", markup=False)
    for stage, module, shape, meaning in rows:  # shapes measured by forward hooks on the live modules
        console.print(f"{stage:<{widths[0]}}  {module:<{widths[1]}}  {shape}  |  {meaning}", markup=False, highlight=False)
    for name, path in result.images.items():
        console.print(f"{name}: {path}", markup=False)
