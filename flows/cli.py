"""The `soraflow` command line: every flow, single stages, the registry, export and the deployments.

Conventions (flows/console.py): results as a table and then their paths one per line, or one
JSON object with --json; expected failures as one line, exit 2 for usage errors and 1 for run
failures, a traceback only with --debug (or SORAFLOW_DEBUG=1); quiet unless --verbose.
The registry commands are in flows/registry_commands.py, the shared options in flows/console.py.
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
    ConfigOpt,
    JsonOpt,
    RootOpt,
    SetOpt,
    UsageError,
    cli_errors,
    console,
    existing_file,
    load_run,
    quiet_libraries,
    quiet_ray,
    quiet_tracebacks,
    run_params,
    set_debug,
    show,
    stdout_for,
)
from soraflow.flows.registry_commands import registry_app
from soraflow.tasks.ingest import STAGES

app = typer.Typer(help="SoraFlow: Open-Sora v1.0 text-to-video, from data to model, as Prefect flows.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
run_app = typer.Typer(help="Run an end-to-end flow.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(registry_app, name="registry")

# Without a Prefect server configured, flows run on an ephemeral one started on first use; its first
# start (database migrations) takes longer than Prefect's 20 s default on a 2-core laptop.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from an offline machine
if os.environ.get("PREFECT_HOME"):  # Prefect creates its home but not the folders above it
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)

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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=f"Full tracebacks on errors (or set {DEBUG_ENV}=1).")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Let scene detection, transformers and Ray print their progress.")] = False,
) -> None:
    set_debug(debug)
    quiet_libraries(verbose)


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
    ckpt: Annotated[Optional[str], typer.Option(
        help="A SoraFlow model folder, a .safetensors file or an Open-Sora .pth.")] = None,
    model: Annotated[Optional[str], typer.Option(help="A registry reference: champion (the default when one exists), "
                                                      "another alias, a version number, latest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: the config's).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: the config's).")] = None,
    num_frames: Annotated[Optional[int], typer.Option("--num-frames",
                                                      help="Frames per video (default: the config's).")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option("--cfg-scale", help="Classifier-free guidance scale.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder (default: <data root>/outputs/samples).")] = None,
    set_: SetOpt = None,
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Text to video: the champion's weights when one is registered (random weights, said so, when none)."""
    cfg, data_root = load_run(config, set_, root)
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
        result = generate_videos(cfg, data_root, prompts, ckpt=ckpt, model_ref=model, steps=steps, seed=seed,
                                 cfg_scale=cfg_scale, num_frames=num_frames, out_dir=out, progress=not as_json)
    weights = f"{weights_note}; {result.weights}" if weights_note else result.weights
    data = {"weights": weights, "prompts": result.prompts, "videos": [str(p) for p in result.videos],
            "previews": [str(p) for p in result.gifs], "seconds": result.seconds}
    if as_json:
        show("generate", data, True)
        return
    # the table without the paths, then each video and its preview one per line, whole
    show("generate", {"weights": weights, "prompts": result.prompts, "seconds": result.seconds}, False,
          paths=[str(p) for pair in zip(result.videos, result.gifs) for p in pair])


# ---------------------------------------------------------------- ingest, stages, train, export


@app.command()
@cli_errors
def ingest(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False) -> None:
    """Sources -> scene split -> caption -> score, as a Prefect flow; prints the final manifest."""
    params = run_params(config, set_, root)
    from soraflow.flows.ingest import run_ingest

    quiet_tracebacks()

    with stdout_for(as_json):
        result = run_ingest(params)
    show("ingest", result, as_json,
         paths=[*result["stage_manifests"].values(), result["manifest"]])  # the final one last


@app.command()
@cli_errors
def stage(
    name: Annotated[Stage, typer.Argument(help="The stage to run.")],
    manifest: Annotated[Optional[str], typer.Option(help="Input manifest (not needed for download).")] = None,
    config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False,
) -> None:
    """Run one ingest stage on a manifest and print the manifest it writes."""
    params = run_params(config, set_, root)
    if name is not Stage.download:
        if not manifest:
            raise UsageError(f"stage {name.value} needs --manifest (the output of the stage before it)")
        manifest = existing_file("--manifest", manifest)
    from soraflow.flows.ingest import run_single_stage

    quiet_tracebacks()

    with stdout_for(as_json):
        result = run_single_stage(name.value, params, manifest)
    show(f"stage {name.value}", result, as_json, paths=[result["manifest"]])


@app.command()
@cli_errors
def train(
    manifest: Annotated[str, typer.Option(help="The training manifest (output of ingest).")],
    config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False,
) -> None:
    """(VAE fit) -> latent cache -> Ray Train STDiT -> evaluate -> register, as a Prefect flow."""
    manifest = existing_file("--manifest", manifest)
    params = run_params(config, set_, root)
    from soraflow.flows.train import train_flow

    quiet_tracebacks()
    quiet_ray()

    with stdout_for(as_json):
        result = train_flow(manifest, params)
    show("training", result.as_dict(), as_json)


@app.command()
@cli_errors
def export(
    manifest: Annotated[str, typer.Option(help="A manifest (e.g. the output of ingest); its ok rows are exported.")],
    out: Annotated[str, typer.Option(help="The file to write.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="opensora-csv: the headerless path,text,num_frames "
                                                 "CSV Open-Sora's DatasetFromCSV reads.")] = ExportFormat.opensora_csv,
    root: Annotated[Optional[str], typer.Option(
        "--root", help="Write paths relative to this folder (Open-Sora's `root`); default absolute paths.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a manifest for another tool: Open-Sora's training CSV."""
    from soraflow.tasks.export import export_opensora_csv

    result = export_opensora_csv(existing_file("--manifest", manifest), out, root)
    show("export", {"format": format.value, **result}, as_json, paths=[result["out"]])


# ---------------------------------------------------------------- end to end


@run_app.command("local")
@cli_errors
def run_local(
    budget: Annotated[Budget, typer.Option(
        help="Training budget: small (60 clips, 300 steps: about 1.5 min on 2 cores), default (156 clips, 2000 steps: "
             "about 6 min on 2 cores) or large (276 clips, 5000 steps, decaying rate: "
             "about twice default).")] = Budget.default,
    config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False,
) -> None:
    """The whole life cycle on a synthetic sample served on loopback: ingest, train, evaluate, register, generate."""
    params = run_params(config, set_, root)
    from soraflow.flows.local import local_flow, start_up

    quiet_tracebacks()
    quiet_ray()

    with stdout_for(as_json):
        start_up(params, budget=budget.value)
        summary = local_flow(params, budget=budget.value)
    show("SoraFlow local run", summary, as_json)


@run_app.command("pipeline")
@cli_errors
def run_pipeline(config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Ingest then train (no generation), as one Prefect flow."""
    params = run_params(config, set_, root)
    from soraflow.flows.pipeline import pipeline_flow

    quiet_tracebacks()
    quiet_ray()

    with stdout_for(as_json):
        result = pipeline_flow(params)
    show("pipeline", result, as_json)


@app.command()
@cli_errors
def serve(
    config: ConfigOpt = "local",
    cron: Annotated[str, typer.Option(
        help="Cron schedule of the pipeline deployment (scheduled retraining).")] = "0 3 * * *",
    set_: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Serve the pipeline deployment (cron) and the train deployment (new-dataset trigger) until stopped."""
    params = run_params(config, set_, root)
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

    cfg, data_root = load_run(config, set_, root)
    from soraflow.tasks.sample_world.server import SampleServer

    with SampleServer(data_root.root / "sample_source", cfg.ingest.sample_source) as server:
        console.print(f"sample source on {server.base_url} (HD-VG: /metafiles/hdvg_0.json, Inter4k: /inter4KUHD, "
                      "Pexels: /videos/popular)")
        deadline = time.monotonic() + seconds if seconds > 0 else None
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


# ---------------------------------------------------------------- explain


@app.command()
@cli_errors
def explain(
    prompt: Annotated[str, typer.Argument(help="A prompt, e.g. 'a red circle moving left'.")],
    train: Annotated[bool, typer.Option(
        "--train", help="Trace one training step on the prompt's sample-world clip instead.")] = False,
    model: Annotated[str, typer.Option(
        help="Registry reference to explain (random weights if the registry has none).")] = "champion",
    ckpt: Annotated[Optional[str], typer.Option(help="A model folder or checkpoint instead of the registry.")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps (generation).")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Optional[str], typer.Option(
        help="Folder for the PNGs (default: <data root>/outputs/explain).")] = None,
    config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None,
) -> None:
    ("Run one generation (or one training step) and print every stage's tensor shape, "
     "from hooks on the live modules.")  # one string, the command's help
    cfg, data_root = load_run(config, set_, root)
    from soraflow.tasks.explain import explain_generation, explain_training

    folder = Path(out) if out else data_root.samples.parent / "explain"
    if train:
        result = explain_training(cfg, data_root, prompt, folder, model_ref=model, ckpt=ckpt, seed=seed)
    else:
        result = explain_generation(cfg, data_root, prompt, folder, model_ref=model, ckpt=ckpt, steps=steps, seed=seed)
    f = result.facts
    console.print(f"weights: {result.weights}")
    console.print(f"{result.mode}: {prompt!r}; video (T, H, W) = ({f['T']}, {f['H']}, {f['W']}), "
                  f"latents (C, T, H/f, W/f) = ({f['C']}, {f['T']}, {f['h']}, {f['w']}) with f = {f['f']}; "
                  f"patches {f['pt']}x{f['ph']}x{f['pw']}, token grid T'xH'xW' = "
                  f"{f['grid_t']}x{f['grid_h']}x{f['grid_w']}, S = {f['S']} tokens per time step; "
                  f"D = {f['D']}, {f['heads']} heads, {f['depth']} blocks; L = {f['L']} text tokens")
    rows = [(s.stage, s.module, s.shape, s.meaning) for s in result.stages]
    widths = [max(len(r[k]) for r in rows) for k in range(2)]
    console.print(f"{'stage':<{widths[0]}}  {'module':<{widths[1]}}  shape  |  meaning", markup=False)
    for stage, module, shape, meaning in rows:  # shapes measured by forward hooks on the live modules
        console.print(f"{stage:<{widths[0]}}  {module:<{widths[1]}}  {shape}  |  {meaning}",
                      markup=False, highlight=False)
    for name, path in result.images.items():
        console.print(f"{name}: {path}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
