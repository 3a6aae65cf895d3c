"""Reading a config: a preset name or a YAML file, dotted overrides, then validation against
configs/schema.py, with errors that name the file and the key; and the config's content hash.

A config is data: YAML parsed with `yaml.safe_load`, never executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from soraflow.configs.schema import SoraFlowConfig


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the file and key."""


CONFIG_DIR = Path(__file__).resolve().parent


def resolve_config_path(path: str | Path) -> Path:
    """A preset name in configs/ ("local" -> configs/local.yaml), else a YAML file path.

    A bare name is looked up among the presets first, so a folder or file called `local` in the
    working directory does not shadow the `local` preset (write ./local to mean that file)."""
    text = str(path)
    presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    if (
        "/" not in text
        and "\\" not in text
        and (CONFIG_DIR / f"{Path(text).stem}.yaml").exists()
        and Path(text).suffix in ("", ".yaml")
    ):
        return CONFIG_DIR / f"{Path(text).stem}.yaml"
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"{path}: is a folder, not a config file (give a YAML file or a preset: {', '.join(presets)})"
        )
    if p.is_file():
        return p
    raise ConfigError(f"{path}: no such config file (give a YAML file or a preset: {', '.join(presets)})")


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: key '{dotted}': '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'train.steps=200' -> ('train.steps', 200); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. train.steps=200")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> SoraFlowConfig:
    """Load a YAML preset, apply dotted overrides, validate. Errors name the file and the key."""
    source = "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        _set_dotted(data, key, value, f"{source} (override)")
    try:
        return SoraFlowConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "<top level>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(f"{source}: key '{key}': {msg}")
        raise ConfigError("\n".join(problems)) from None


def config_hash(cfg: SoraFlowConfig) -> str:
    """A short content hash of the validated config (key order independent)."""
    import hashlib
    import json

    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
