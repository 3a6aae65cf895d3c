"""`soraflow registry`: the MLflow model registry's versions, one version, and promoting by hand."""

from __future__ import annotations

from typing import Annotated

import typer
from soraflow.flows.console import ConfigOpt, JsonOpt, RootOpt, SetOpt, cli_errors, console, load_run, show

registry_app = typer.Typer(help="The MLflow model registry.", no_args_is_help=True)


def _registry(config: str, set_: list[str] | None, root: str | None):
    cfg, data_root = load_run(config, set_, root)
    from soraflow.storage.registry.model_registry import ModelRegistry

    return cfg, ModelRegistry(data_root, cfg.registry)


@registry_app.command("list")
@cli_errors
def registry_list(
    config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False
) -> None:
    """Every registered version with its aliases and metrics."""
    from rich.table import Table

    cfg, registry = _registry(config, set_, root)
    versions = registry.list_versions()
    if as_json:
        show("", {"model": cfg.registry.model_name, "versions": [
            {"version": v.version, "aliases": list(v.aliases), "metrics": v.metrics,
             "dataset_version": v.tags.get("dataset_version"), "run_id": v.run_id, "source": v.source}
            for v in versions]}, True)
        return
    table = Table(title=f"registry: {cfg.registry.model_name}")
    for col in ("version", "aliases", "metrics", "dataset", "created"):
        table.add_column(col)
    for v in versions:
        metrics = ", ".join(f"{k}={float(x):.4g}" for k, x in sorted(v.metrics.items()))
        table.add_row(
            str(v.version),
            ",".join(v.aliases),
            metrics,
            v.tags.get("dataset_version", ""),
            str(getattr(v, "created", "")),
        )
    console.print(table if versions else "no registered versions yet")


@registry_app.command("show")
@cli_errors
def registryshow(
    ref: Annotated[str, typer.Argument(help="champion, an alias, a version number or latest")] = "champion",
    config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False,
) -> None:
    """One version: tags, metrics, aliases and where its files are."""
    cfg, registry = _registry(config, set_, root)
    info = registry.get(ref)
    show(
        f"{cfg.registry.model_name} v{info.version}",
        {
            "model": cfg.registry.model_name,
            "version": info.version,
            "aliases": info.aliases,
            "run_id": info.run_id,
            "source": info.source,
            "metrics": info.metrics,
            "tags": info.tags,
        },
        as_json,
    )


@registry_app.command("promote")
@cli_errors
def registry_promote(
    version: Annotated[str, typer.Argument(help="The version number to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "champion",
    config: ConfigOpt = "local", set_: SetOpt = None, root: RootOpt = None, as_json: JsonOpt = False,
) -> None:
    """Move an alias (default champion) to a version, by hand."""
    cfg, registry = _registry(config, set_, root)
    registry.promote(version, alias=alias)
    show("promote", {"model": cfg.registry.model_name, "alias": alias, "version": version}, as_json)
