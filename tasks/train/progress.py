"""Training progress that outlives the worker: rank 0 writes <run>/progress.json at every log step,
and the driver's Prefect task turns it into a progress artifact that moves in the UI.

A file, not a callback, because the loop runs in Ray worker processes (on other nodes, on a
cluster: the run folder is on the shared storage the cluster needs anyway).
"""

from __future__ import annotations

import contextvars
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from soraflow.storage.layout import atomic_write_text

PROGRESS_FILE = "progress.json"


def write_progress(run_dir: str | Path, step: int, total: int, loss: float, samples_per_s: float) -> None:
    atomic_write_text(Path(run_dir) / PROGRESS_FILE, json.dumps(
        {"step": step, "total": total, "loss": loss, "samples_per_s": samples_per_s}))


def read_progress(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None  # not written yet, or being replaced


@contextmanager
def watch_progress(run_dir: str | Path, on_progress: Callable[[dict], None], every_s: float = 2.0) -> Iterator[None]:
    """Call `on_progress(progress)` from a background thread whenever progress.json changes."""
    stop = threading.Event()

    def poll() -> None:
        last = None
        while not stop.is_set():
            p = read_progress(run_dir)
            if p is not None and p != last:
                last = p
                try:
                    on_progress(p)
                except Exception as e:  # noqa: BLE001 - a UI update never stops training
                    print(f"train: progress update failed: {e}", flush=True)
            stop.wait(every_s)

    # the thread carries this context (Prefect's run and client settings live in contextvars)
    thread = threading.Thread(target=contextvars.copy_context().run, args=(poll,), daemon=True, name="train-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
