"""A real Prefect API server on 127.0.0.1 for deployment tests (bounded, stopped at the end).

Also: a long-lived child process (e.g. `soraflow serve`) in its own process group with its output
in a log file, and a sync Prefect client pointed at the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e}>"
    return text[-chars:]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc), so children in their own session are found too."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_group(proc: subprocess.Popen | None, term_timeout: float = 30.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL it and
    every descendant that is left (flow-run subprocesses may sit in sessions of their own)."""
    if proc is None:
        return
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    family = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=term_timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def wait_for(
    what: str,
    fn: Callable[[], T | None],
    timeout: float,
    interval: float = 1.0,
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll `fn` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # the server may be busy; keep the last error for the message
            last_error = e
        if time.monotonic() > deadline:
            extra = f"\nlast error: {last_error!r}" if last_error else ""
            raise TimeoutError(
                f"timed out after {timeout:.0f} s waiting for {what}{extra}" + (f"\n{explain()}" if explain else "")
            )
        time.sleep(interval)


class PrefectServer:
    def __init__(self, home: Path, startup_timeout: float = 180.0):
        self.home = Path(home)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "server.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
        )
        return env

    def __enter__(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        script = Path(sys.executable).with_name("prefect")  # a venv that reuses another's packages has no script
        prefect = [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited early:\n{tail(self.log, 3000)}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__(None, None, None)
        raise TimeoutError(f"prefect server did not answer within {self.startup_timeout} s:\n{tail(self.log, 3000)}")

    def __exit__(self, *exc) -> None:
        stop_group(self.proc)

    @contextlib.contextmanager
    def client(self) -> Iterator["object"]:
        """A sync Prefect client for this server (settings scoped to the block, nothing global)."""
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    def post(self, route: str, body: dict, timeout: float = 30.0) -> dict:
        """POST JSON to an API route (e.g. /events/filter, which the client does not wrap)."""
        req = urllib.request.Request(
            f"{self.api_url}{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")


class ChildProcess:
    """A long-lived command (its own process group, output to a log file), stopped group-wide on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.argv, self.env, self.log, self.cwd = argv, env, Path(log), cwd
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ChildProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 6000) -> str:
        state = "running" if self.alive() else f"exited with {self.proc.returncode if self.proc else None}"
        return (
            f"--- {' '.join(self.argv[:3])} ... ({state}), last {chars} chars of {self.log}:\n{tail(self.log, chars)}"
        )
