"""Checkpoints without pickles: safetensors for tensors, JSON for everything else.

Three kinds of files go through here:

* a model folder: `model.safetensors` + `config.json` (what the registry stores and `--ckpt` loads);
* an Open-Sora v1.0 `.pth` (flat state dict, or one under an `ema`/`state_dict` key), read with
  `torch.load(weights_only=True)` so no code in the file can run;
* a training state folder: model, EMA and optimizer tensors as safetensors with the nested
  optimizer structure, step and data position in JSON, so a run can resume exactly. Its
  completion marker (`complete.json`, the sha256 of every other file) is written last: a
  folder without it, or whose files no longer match it, is not a checkpoint (a save that was
  killed, a truncated copy) and `load_training_state` refuses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from soraflow.models.stdit import POSITIONAL_BUFFERS
from soraflow.storage.layout import atomic_output, atomic_write_text

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# File suffixes of pickle-based formats (torch.save, pickle, joblib), compared case-insensitively.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib")
STATE_FILES = ("state.safetensors", "state.json")
COMPLETE_MARKER = "complete.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and lists what is wrong."""


# ---------------------------------------------------------------- plain tensors


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors refuses shared or non-contiguous storage, so store independent copies."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a SoraFlow folder, a .safetensors file or an Open-Sora .pth/.pt file."""
    path = Path(path)
    if path.is_dir():
        return load_tensors(path / WEIGHTS)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if path.suffix in (".pth", ".pt"):
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file")
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for anything that is not plain tensors
            raise CheckpointError(
                f"{path}: not a plain-tensor PyTorch checkpoint (loaded with weights_only=True): {e}"
            ) from e
        for key in ("ema", "state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (flat, or under 'ema'/'state_dict')")
        return obj
    raise CheckpointError(f"{path}: unknown checkpoint format (expected a folder, .safetensors, .pth or .pt)")


def load_weights_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load with strict key and shape checks; the two positional buffers are recomputed, not loaded.

    Raises CheckpointError listing missing keys, unexpected keys and shape mismatches.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in POSITIONAL_BUFFERS}
    expected = {k: v for k, v in model.state_dict().items() if k not in POSITIONAL_BUFFERS}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: does not fit the model ({len(expected)} keys expected, {len(state_dict)} given)"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    result = model.load_state_dict(state_dict, strict=False)
    leftover = set(result.missing_keys) - set(POSITIONAL_BUFFERS)
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; kept as a guard
        raise CheckpointError(f"{source}: load left missing={sorted(leftover)} unexpected={result.unexpected_keys}")


# ---------------------------------------------------------------- model folders


def save_model_dir(
    folder: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Write `model.safetensors` (without the recomputed positional buffers) and `config.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    save_tensors(folder / WEIGHTS, {k: v for k, v in sd.items() if k not in POSITIONAL_BUFFERS})
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_model_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder}: no {CONFIG} next to the weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def refuse_pickles(folder: str | Path) -> None:
    """A model folder we publish or load must hold no pickled files."""
    bad = [p.name for p in Path(folder).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if bad:
        raise CheckpointError(f"{folder}: holds pickle-based files {bad}; only safetensors and JSON are allowed")


# ---------------------------------------------------------------- training state


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference key, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_training_state(
    folder: str | Path, model: dict, ema: dict | None, optimizer: dict | None, meta: dict[str, Any]
) -> Path:
    """model/ema/optimizer state dicts -> state.safetensors; the structure and `meta` -> state.json.

    Optimizer state dicts have integer keys (param ids); JSON turns them into strings,
    so `load_training_state` turns digit-only keys of `optimizer.state` back into ints.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = {
        "model": _flatten(model, "model", tensors),
        "ema": _flatten(ema, "ema", tensors) if ema is not None else None,
        "optimizer": _flatten(optimizer, "optimizer", tensors) if optimizer is not None else None,
    }
    save_tensors(folder / "state.safetensors", tensors)
    atomic_write_text(folder / "state.json", json.dumps({"structure": structure, "meta": meta}, indent=1))
    write_complete_marker(folder)
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_complete_marker(folder: str | Path) -> Path:
    """The last file of a training state: the sha256 of each state file (both already fsynced)."""
    folder = Path(folder)
    files = {name: _sha256(folder / name) for name in STATE_FILES}
    return atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"files": files}, indent=1))


def verify_training_state(folder: str | Path) -> None:
    """Raise CheckpointError saying why `folder` is not a complete, intact training state."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.exists():
        raise CheckpointError(f"{folder}: no {COMPLETE_MARKER} (the save did not finish)")
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: unreadable completion marker: {e}") from e
    for name in STATE_FILES:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing (listed in {COMPLETE_MARKER})")
        if _sha256(path) != files.get(name):
            raise CheckpointError(
                f"{path}: content does not match the sha256 in {COMPLETE_MARKER} (truncated or changed)"
            )


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """A training state saved by save_training_state, after checking it against its completion marker."""
    folder = Path(folder)
    verify_training_state(folder)
    try:
        doc = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: no readable state.json: {e}") from e
    tensors = load_tensors(folder / "state.safetensors")
    try:
        out = {k: _unflatten(v, tensors) for k, v in doc["structure"].items()}
        out["meta"] = doc["meta"]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder}: state.json does not match state.safetensors: {e!r}") from e
    opt = out.get("optimizer")
    if opt and isinstance(opt.get("state"), dict):
        opt["state"] = {int(k) if k.isdigit() else k: v for k, v in opt["state"].items()}
    return out
