"""The command line's shared conventions: the options every command takes, what it prints (result
tables or one JSON object), one-line errors, quiet libraries.

* Results: a table (paths never folded mid-name) followed by every result path one per line,
  or with --json exactly one JSON object on stdout and nothing else there (anything the run
  prints goes to stderr meanwhile).
* Errors: one line naming the input and what to do; exit 2 for usage errors (a bad config key
  or value, a missing input file, a bad choice), 1 for run failures (too little data, no
  champion, an unreachable source). --debug or SORAFLOW_DEBUG=1 re-raises for the traceback.
* Quiet by default: PySceneDetect's per-video lines, transformers' loading bars, Ray's
  banners and the tracebacks in Prefect's console log are turned down unless --verbose
  (tracebacks: --debug).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(soft_wrap=True)  # paths stay whole, so they can be copied
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
DEBUG_ENV = "SORAFLOW_DEBUG"


class UsageError(ValueError):
    """A bad command-line input (a missing file, an option that does not fit): exit code 2."""


# ---------------------------------------------------------------- options every command takes

ConfigOpt = Annotated[str, typer.Option(
    "--config", "-c", help="A preset name (local, opensora-v1-16x256x256; presets come first) or a YAML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override one config key, e.g. --set train.steps=200 (repeatable).")]
RootOpt = Annotated[
    Optional[str], typer.Option("--root", help="Data root (default: config data.root, or $SORAFLOW_HOME).")
]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object (paths, versions, metrics) and nothing else on stdout.")]


def run_params(config: str, overrides: list[str] | None, root: str | None):
    """The flows' parameter model, its config loaded once; a bad config raises ConfigError (one line, exit 2)."""
    from soraflow.flows.params import RunParams

    return RunParams.checked(config, overrides, root)


def load_run(config: str, overrides: list[str] | None, root: str | None = None):
    """(validated config, data root) of a command's --config, --set and --root."""
    return run_params(config, overrides, root).load()


def existing_file(option: str, path: str | None) -> str:
    if not path or not Path(path).is_file():
        raise UsageError(f"{option} {path}: no such file")
    return str(Path(path).resolve())


_flags = {"debug": False}  # set by the command line's --debug on every invocation


def set_debug(on: bool) -> None:
    _flags["debug"] = bool(on)


def debug_enabled() -> bool:
    return _flags["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_usage(e: BaseException) -> bool:
    from pydantic import ValidationError
    from soraflow.configs.loader import ConfigError

    return isinstance(e, (UsageError, ConfigError, ValidationError))


def _unwrap(e: BaseException) -> BaseException:
    """Past the wrappers Ray and Prefect put around the error a task or a worker raised."""
    seen = set()
    while id(e) not in seen and type(e).__module__.split(".")[0] in ("ray", "prefect"):
        seen.add(id(e))
        nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if nxt is None:
            break
        e = nxt
    return e


_TRACE_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")


def one_line(e: BaseException) -> str:
    """The error as one line: pydantic's wrapper text and Ray's worker tracebacks stripped."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):  # RunParams wraps the ConfigError its validator raised
        parts = []
        for err in e.errors():
            inner = (err.get("ctx") or {}).get("error")
            parts.append(str(inner) if inner is not None else f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
        text = "; ".join(parts)
    else:
        inner = _unwrap(e)
        text = str(inner) or type(inner).__name__
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and any(ln.lstrip().startswith(("Traceback", "File ")) for ln in lines):
            # a worker's formatted traceback (Ray): keep its last "SomeError: message" line
            found = [m.group(2) for ln in lines if (m := _TRACE_LINE.match(ln))]
            text = found[-1] if found else lines[-1]
        if isinstance(inner, FileNotFoundError) and inner.filename and str(inner.filename) not in text:
            text = f"{inner.filename}: {inner.strerror or 'no such file'}"
    text = re.sub(r"\s*\n\s*", "; ", text.strip())
    return text[:1000]


def cli_errors(fn: Callable) -> Callable:
    """Run a command; an exception becomes one line on stderr and exit 2 (usage) or 1 (run)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - every failure ends as one line (or a traceback with --debug)
            if debug_enabled():
                raise
            usage = _is_usage(e)
            kind = "config error" if usage and not isinstance(e, UsageError) else "error"
            hint = (
                " (fix that key or value in the file or in --set)"
                if kind == "config error" and "key '" in str(e)
                else ""
            )
            err_console.print(
                f"[red]{kind}:[/red] {escape(one_line(e))}{hint}", markup=True, highlight=False, soft_wrap=True
            )
            if not usage:
                err_console.print("(run with --debug, or SORAFLOW_DEBUG=1, for the full traceback)", markup=False)
            raise typer.Exit(2 if usage else 1) from None

    return wrapper


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_libraries(verbose: bool) -> None:
    """Turn down the libraries' chatter unless --verbose."""
    _flags["verbose"] = bool(verbose)
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables..."
    # "Detecting scenes..." per video: scenedetect resets its logger's level when it is imported,
    # so a filter (which it keeps) rather than a level
    scenes = logging.getLogger("pyscenedetect")
    if not any(isinstance(f, _BelowWarning) for f in scenes.filters):
        scenes.addFilter(_BelowWarning())
    for name in ("ray", "mlflow", "alembic"):  # Ray's banners, MLflow's "Creating initial MLflow database tables"
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def quiet_tracebacks() -> None:
    """Prefect's console log shows a failed task's message without its traceback (the error
    line that follows says it all); the traceback still goes to the Prefect API (the UI's
    logs), and to the console with --debug. Call after Prefect has set up its logging."""
    if debug_enabled():
        return
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # Prefect's console handler sits on the root
        for handler in logging.getLogger(name or None).handlers:
            if isinstance(handler, logging.StreamHandler) and not getattr(handler, "_soraflow_quiet", False):
                handler.format = _without_traceback(handler.format)
                handler._soraflow_quiet = True


def quiet_ray() -> None:
    """Ray sets its logger to INFO when imported ("Running in local mode ..."): for the commands
    that train, import it now and turn it down, unless --verbose."""
    if _flags.get("verbose"):
        return
    import ray  # noqa: F401 - its import configures the "ray" logger; we adjust it afterwards

    logging.getLogger("ray").setLevel(logging.WARNING)


def _without_traceback(fmt: Callable[[logging.LogRecord], str]) -> Callable[[logging.LogRecord], str]:
    def format(record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return fmt(record)
        finally:
            record.exc_info, record.exc_text = saved

    return format


@contextlib.contextmanager
def stdout_for(as_json: bool) -> Iterator[None]:
    """With --json, whatever the run prints goes to stderr: stdout is the JSON object alone."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _paths(value: Any) -> list[str]:
    """Every existing-looking path in a result (strings that name a file or folder)."""
    out: list[str] = []
    if isinstance(value, dict):
        for v in value.values():
            out.extend(_paths(v))
    elif isinstance(value, (list, tuple)):
        for v in value:
            out.extend(_paths(v))
    elif isinstance(value, (str, Path)) and os.sep in str(value) and Path(value).exists():
        out.append(str(value))
    return out


def show(title: str, data: dict, as_json: bool, paths: list[str] | None = None, out: Console | None = None) -> None:
    """One JSON object (--json), or a table then the result paths one per line."""
    out = out or console
    if as_json:
        sys.stdout.write(json.dumps(data, default=str, sort_keys=False) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in data.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)):
            v = "\n".join(str(x) for x in v) if v else "-"
        elif isinstance(v, dict) and any(os.sep in str(b) for b in v.values()):
            v = "\n".join(f"{a}: {b}" for a, b in v.items())  # paths: one per line
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()) or "-"
        table.add_row(str(k), str(v))
    out.print(table)
    for p in dict.fromkeys(paths if paths is not None else _paths(data)):
        out.print(p, markup=False, highlight=False, soft_wrap=True)
