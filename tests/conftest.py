"""Shared pytest set-up: offline, deterministic, small."""

import os
import sys
import tempfile
from pathlib import Path

# Test helpers shared across folders (synthetic videos, a Prefect server in a child process).
sys.path.insert(0, str(Path(__file__).parent / "support"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the 2 cores: one torch/OpenMP thread each (and in their children),
    # since oversubscribed OpenMP threads wait on each other and run several times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# One fresh Prefect home per test session: the ephemeral API server's SQLite database,
# cached task results and settings never leak between runs or into ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="soraflow-prefect-")
os.environ.pop("PREFECT_API_URL", None)


def pytest_unconfigure(config):
    # Prefect stops its ephemeral server at interpreter exit and logs it to a console pytest has
    # already closed; without this, every run ends with a "Logging error" traceback.
    import logging

    logging.raiseExceptions = False
