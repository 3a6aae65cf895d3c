"""The `soraflow` command line: every flow, single stages, the registry, export and the deployments.

Conventions (flows/console.py): results as a table and then their paths one per line, or one
JSON object with --json; expected failures as one line, exit 2 for usage errors and 1 for run
failures, a traceback only with --debug (or SORAFLOW_DEBUG=1); quiet unless --verbose.
Over 400 lines on purpose: every command is a thin function, and one file shows them all.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from soraflow.flows.console import (
    DEBUG_ENV,
    UsageError,
    cli_errors,
    quiet_libraries,
    quiet_ray,
    quiet_tracebacks,
    set_debug,
    show,
    stdout_for,
)
from soraflow.flows.console import console as _console
from soraflow.tasks.ingest import STAGES

app = typer.Typer(help="SoraFlow: Open-Sora v1.0 text-to-video, from data to model, as Prefect flows.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
run_app = typer.Typer(help="Run an end-to-end flow.", no_args_is_help=True)
registry_app = typer.Typer(help="The MLflow model registry.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(registry_app, name="registry")
console = _console  # tests may swap it for a wider one

# Without a Prefect server configured, flows run on an ephemeral one started on first use; its first
# start (database migrations) takes longer than Prefect's 20 s default on a 2-core laptop.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from an offline machine
if os.environ.get("PREFECT_HOME"):  # Prefect creates its home but not the folders above it
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="A preset name (local, opensora-v1-16x256x256; presets come first) or a YAML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one config key, e.g. --set train.steps=200 (repeatable).")]
RootOpt = Annotated[Optional[str], typer.Option("--root", help="Data root (default: config data.root, or $SORAFLOW_HOME).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (paths, versions, metrics) and nothing else on stdout.")]


Stage = Enum("Stage", [(s, s) for s in STAGES], type=str)  # the ingest stages, in order


class Budget(str, Enum):  # the keys of flows.local.BUDGETS
    small = "small"
    default = "default"
    large = "large"


class ExportFormat(str, Enum):
    opensora_csv = "opensora-csv"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"soraflow {version('soraflow')}")
        except PackageNotFoundError:  # pragma: no cover - run from a source tree without install
            typer.echo("soraflow (not installed)")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=f"Full tracebacks on errors (or set {DEBUG_ENV}=1).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Let scene detection, transformers and Ray print their progress.")] = False,
) -> None:
    set_debug(debug)
    quiet_libraries(verbose)


def _params(config: str, overrides: list[str] | None, root: str | None):
    """The flows' parameter model, its config loaded once; a bad config raises ConfigError (one line, exit 2)."""
    from soraflow.flows.params import RunParams

    return RunParams.checked(config, overrides, root)


def _load(config: str, overrides: list[str] | None, root: str | None = None):
    return _params(config, overrides, root).load()


def _existing(option: str, path: str | None) -> str:
    if not path or not Path(path).is_file():
        raise UsageError(f"{option} {path}: no such file")
    return str(Path(path).resolve())


def _show(title: str, data: dict, as_json: bool, paths: list[str] | None = None) -> None:
    show(title, data, as_json, paths, out=console)


# ---------------------------------------------------------------- generate


def _champion_or_none(cfg, data_root) -> str | None:
    """'champion' when the registry has one, else None (a fresh data root has no registry)."""
    from soraflow.storage.registry.model_registry import ModelRegistry, RegistryError

    if not data_root.registry.exists() and cfg.registry.tracking_uri is None:
        return None
    try:
        info = ModelRegistry(data_root, cfg.registry).get("champion")
    except RegistryError:
        return None
    return f"champion (v{info.version})"


@app.command()
@cli_errors
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more text prompts.")],
    config: ConfigOpt = "local",
    ckpt: Annotated[Optional[str], typer.Option(help="A SoraFlow model folder, a .safetensors file or an Open-Sora .pth.")] = None,
    model: Annotated[Optional[str], typer.Option(help="A registry reference: champion (the default when one exists), another alias, a version number, latest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: the config's).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: the config's).")] = None,
    num_frames: Annotated[Optional[int], typer.Option("--num-frames", help="Frames per video (default: the config's).")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option("--cfg-scale", help="Classifier-free guidance scale.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder (default: <data root>/outputs/samples).")] = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Text to video: the champion's weights when one is registered (random weights, said so, when none)."""
    cfg, data_root = _load(config, set_, root)
    from soraflow.tasks.generate import generate_videos

    if ckpt is not None and model is not None:
        raise UsageError("give --ckpt or --model, not both")
    weights_note = None
    if ckpt is None and model is None:
        champion = _champion_or_none(cfg, data_root)
        model = "champion" if champion else None
        weights_note = f"registry {cfg.registry.model_name}@{champion}" if champion else \
            f"no champion in registry {cfg.registry.model_name}: random weights (train one, or pass --ckpt / --model)"
    with stdout_for(as_json):
        result = generate_videos(cfg, data_root, prompts, ckpt=ckpt, model_ref=model, steps=steps, seed=seed, cfg_scale=cfg_scale,
                                 num_frames=num_frames, out_dir=out, progress=not as_json)
    weights = f"{weights_note}; {result.weights}" if weights_note else result.weights
    data = {"weights": weights, "prompts": result.prompts, "videos": [str(p) for p in result.videos],
            "previews": [str(p) for p in result.gifs], "seconds": result.seconds}
    if as_json:
        _show("generate", data, True)
        return
    # the table without the paths, then each video and its preview one per line, whole
    _show("generate", {"weights": weights, "prompts": result.prompts, "seconds": result.seconds}, False,
          paths=[str(p) for pair in zip(result.videos, result.gifs) for p in pair])


# ---------------------------------------------------------------- ingest, stages, train, export


@app.command()
@cli_errors
def ingest(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Sources -> scene split -> caption -> score, as a Prefect flow; prints the final manifest."""
    params = _params(config, set_, root)
    from soraflow.flows.ingest import run_ingest

    quiet_tracebacks()

    with stdout_for(as_json):
        result = run_ingest(params)
    _show("ingest", result, as_json, paths=[*result["stage_manifests"].values(), result["manifest"]])  # the final one last


@app.command()
@cli_errors
def stage(
    name: Annotated[Stage, typer.Argument(help="The stage to run.")],
    manifest: Annotated[Optional[str], typer.Option(help="Input manifest (not needed for download).")] = None,
    config: ConfigOpt = "local",
    set_: SetOpt = None,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one ingest stage on a manifest and print the manifest it writes."""
    params = _params(config, set_, root)
    if name is not Stage.download:
        if not manifest:
            raise UsageError(f"stage {name.value} needs --manifest (the output of the stage before it)")
        manifest = _existing("--manifest", manifest)
    from soraflow.flows.ingest import run_single_stage

    quiet_tracebacks()

    with stdout_for(as_json):
        result = run_single_stage(name.value, params, manifest)
    _show(f"stage {name.value}", result, as_json, paths=[result["manifest"]])


@app.command()
@cli_errors
def train(
    manifest: Annotated[str, typer.Option(help="The training manifest (output of ingest).")],
    config: ConfigOpt = "local",
    set_: SetOpt = None,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """(VAE fit) -> latent cache -> Ray Train STDiT -> evaluate -> register, as a Prefect flow."""
    manifest = _existing("--manifest", manifest)
    params = _params(config, set_, root)
    from soraflow.flows.train import train_flow

    quiet_tracebacks()
    quiet_ray()

    with stdout_for(as_json):
        result = train_flow(manifest, params)
    _show("training", result.as_dict(), as_json)


@app.command()
@cli_errors
def export(
    manifest: Annotated[str, typer.Option(help="A manifest (e.g. the output of ingest); its ok rows are exported.")],
    out: Annotated[str, typer.Option(help="The file to write.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="opensora-csv: the headerless path,text,num_frames CSV Open-Sora's DatasetFromCSV reads.")] = ExportFormat.opensora_csv,
    root: Annotated[Optional[str], typer.Option("--root", help="Write paths relative to this folder (Open-Sora's `root`); default absolute paths.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a manifest for another tool: Open-Sora's training CSV."""
    from soraflow.tasks.export import export_opensora_csv

    result = export_opensora_csv(_existing("--manifest", manifest), out, root)
    _show("export", {"format": format.value, **result}, as_json, paths=[result["out"]])


# ---------------------------------------------------------------- end to end


@run_app.command("local")
@cli_errors
def run_local(
    budget: Annotated[Budget, typer.Option(help="Training budget: small (60 clips, 300 steps: about 1.5 min on 2 cores), default (156 clips, 2000 steps: about 6 min on 2 cores) or large (276 clips, 5000 steps, decaying rate: about twice default).")] = Budget.default,
    config: ConfigOpt = "local",
    set_: SetOpt = None,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole life cycle on a synthetic sample served on loopback: ingest, train, evaluate, register, generate."""
    params = _params(config, set_, root)
    from soraflow.flows.local import local_flow, start_up

    quiet_tracebacks()
    quiet_ray()

    with stdout_for(as_json):
        start_up(params, budget=budget.value)
        summary = local_flow(params, budget=budget.value)
    _show("SoraFlow local run", summary, as_json)


@run_app.command("pipeline")
@cli_errors
def run_pipeline(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Ingest then train (no generation), as one Prefect flow."""
    params = _params(config, set_, root)
    from soraflow.flows.pipeline import pipeline_flow

    quiet_tracebacks()
    quiet_ray()

    with stdout_for(as_json):
        result = pipeline_flow(params)
    _show("pipeline", result, as_json)


@app.command()
@cli_errors
def serve(
    config: ConfigOpt = "local",
    cron: Annotated[str, typer.Option(help="Cron schedule of the pipeline deployment (scheduled retraining).")] = "0 3 * * *",
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Serve the pipeline deployment (cron) and the train deployment (new-dataset trigger) until stopped."""
    params = _params(config, set_, root)
    from soraflow.flows.deploy import serve_deployments

    quiet_tracebacks()

    serve_deployments(params, cron=cron)


@app.command("sample-server")
@cli_errors
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


def _registry(config: str, set_: list[str] | None, root: str | None):
    cfg, data_root = _load(config, set_, root)
    from soraflow.storage.registry.model_registry import ModelRegistry

    return cfg, ModelRegistry(data_root, cfg.registry)


@registry_app.command("list")
@cli_errors
def registry_list(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Every registered version with its aliases and metrics."""
    from rich.table import Table

    cfg, registry = _registry(config, set_, root)
    versions = registry.list_versions()
    if as_json:
        _show("", {"model": cfg.registry.model_name, "versions": [
            {"version": v.version, "aliases": list(v.aliases), "metrics": v.metrics, "dataset_version": v.tags.get("dataset_version"),
             "run_id": v.run_id, "source": v.source} for v in versions]}, True)
        return
    table = Table(title=f"registry: {cfg.registry.model_name}")
    for col in ("version", "aliases", "metrics", "dataset", "created"):
        table.add_column(col)
    for v in versions:
        metrics = ", ".join(f"{k}={float(x):.4g}" for k, x in sorted(v.metrics.items()))
        table.add_row(str(v.version), ",".join(v.aliases), metrics, v.tags.get("dataset_version", ""), str(getattr(v, "created", "")))
    console.print(table if versions else "no registered versions yet")


@registry_app.command("show")
@cli_errors
def registry_show(ref: Annotated[str, typer.Argument(help="champion, an alias, a version number or latest")] = "champion", config: ConfigOpt = "local",
                  set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """One version: tags, metrics, aliases and where its files are."""
    cfg, registry = _registry(config, set_, root)
    info = registry.get(ref)
    _show(f"{cfg.registry.model_name} v{info.version}", {"model": cfg.registry.model_name, "version": info.version, "aliases": info.aliases,
          "run_id": info.run_id, "source": info.source, "metrics": info.metrics, "tags": info.tags}, as_json)


@registry_app.command("promote")
@cli_errors
def registry_promote(version: Annotated[str, typer.Argument(help="The version number to promote.")], alias: Annotated[str, typer.Option(help="Alias to move.")] = "champion",
                     config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Move an alias (default champion) to a version, by hand."""
    cfg, registry = _registry(config, set_, root)
    registry.promote(version, alias=alias)
    _show("promote", {"model": cfg.registry.model_name, "alias": alias, "version": version}, as_json)


# ---------------------------------------------------------------- explain


@app.command()
@cli_errors
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
    if train:
        result = explain_training(cfg, data_root, prompt, folder, model_ref=model, ckpt=ckpt, seed=seed)
    else:
        result = explain_generation(cfg, data_root, prompt, folder, model_ref=model, ckpt=ckpt, steps=steps, seed=seed)
    f = result.facts
    console.print(f"weights: {result.weights}")
    console.print(f"{result.mode}: {prompt!r}; video (T, H, W) = ({f['T']}, {f['H']}, {f['W']}), latents (C, T, H/f, W/f) = "
                  f"({f['C']}, {f['T']}, {f['h']}, {f['w']}) with f = {f['f']}; patches {f['pt']}x{f['ph']}x{f['pw']}, "
                  f"token grid T'xH'xW' = {f['grid_t']}x{f['grid_h']}x{f['grid_w']}, S = {f['S']} tokens per time step; D = {f['D']}, {f['heads']} heads, {f['depth']} blocks; L = {f['L']} text tokens")
    rows = [(s.stage, s.module, s.shape, s.meaning) for s in result.stages]
    widths = [max(len(r[k]) for r in rows) for k in range(2)]
    console.print(f"{'stage':<{widths[0]}}  {'module':<{widths[1]}}  shape  |  meaning", markup=False)
    for stage, module, shape, meaning in rows:  # shapes measured by forward hooks on the live modules
        console.print(f"{stage:<{widths[0]}}  {module:<{widths[1]}}  {shape}  |  {meaning}", markup=False, highlight=False)
    for name, path in result.images.items():
        console.print(f"{name}: {path}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
