"""Ray for training: connect to a cluster or start a local instance (bound to 127.0.0.1), and
keep Ray Train's own log lines out of the training output.

Quieting goes by logger names and logging filters only (no imports of Ray's private modules):
the names below are those Ray 2.60's Train V2 logs under.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
import ray.train
from soraflow.configs.schema import SoraFlowConfig

LOCAL_NODE_IP = "127.0.0.1"  # the local instance never listens on other interfaces
_TRAIN_INTERNAL = "ray.train.v2._internal.execution"
# Train logs every ray.train.report at INFO through a logger named after its file (outside the
# ray.train hierarchy that LoggingConfig sets): one long line per report and rank.
_REPORT_LOGGER = str(Path(ray.train.__file__).parent / "v2" / "_internal" / "execution" / "context.py")


def start_ray(cfg: SoraFlowConfig) -> bool:
    """Connect to train.ray_address or start a local instance on 127.0.0.1; True if we started it."""
    if ray.is_initialized():
        return False
    runtime_env = {
        # Train V2 would also route every print through its logger: each progress line twice.
        # A job-level runtime_env drops Ray's default of one OpenMP thread per worker (CPU: 1
        # each): set it, or every worker spawns a thread per core and they fight (4x slower here).
        "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "OMP_NUM_THREADS": "1"},
        # On a real cluster the autoscaling coordinator's warnings stay visible (quiet_local_ray_logs).
        "worker_process_setup_hook": f"{__name__}."
        + ("quiet_ray_logs" if cfg.train.ray_address else "quiet_local_ray_logs"),
    }
    if cfg.train.ray_address:
        ray.init(address=cfg.train.ray_address, runtime_env=runtime_env)
    else:
        # `_node_ip_address` is ray.init's documented keyword for this node's address (Ray 2.60).
        # address="local": a new instance for this run. With no address, ray.init joins any Ray
        # already running on the machine (it scans for a GCS process), e.g. someone's `ray start`.
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            runtime_env=runtime_env,
            _node_ip_address=LOCAL_NODE_IP,
        )
    return True


class _BelowLevel(logging.Filter):
    """A logging filter that drops records under `level`."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def _quiet(name: str, level: int) -> None:
    """Raise a logger's threshold to `level`. Also as a filter: Train's controller configures the
    `ray.train` logger with logging.config.dictConfig after the set-up hook has run, and that resets
    the level of every existing child logger (filters survive it)."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    if not any(isinstance(f, _BelowLevel) for f in logger.filters):
        logger.addFilter(_BelowLevel(level))


def quiet_ray_logs() -> None:
    """Worker set-up hook (and called by `train` itself in local mode, where the loop runs in this
    process): keep training output to our own progress lines. Without the dashboard
    (local runs) the state API is absent, and Train's placement-group cleaner would warn about it
    every second of the run."""
    _quiet(f"{_TRAIN_INTERNAL}.controller.placement_group_cleaner", logging.ERROR)
    _quiet(_REPORT_LOGGER, logging.WARNING)
    # ... and, in local mode (num_workers 0), through the module logger of train_fn_utils
    _quiet(f"{_TRAIN_INTERNAL}.train_fn_utils", logging.WARNING)


def quiet_local_ray_logs() -> None:
    """quiet_ray_logs, plus: on the local instance we start ourselves (no autoscaler), Train's
    controller still asks the autoscaling coordinator for its workers' resources, within 5 s; on
    2 busy cores the coordinator actor is often not up by then and a harmless timeout prints a
    full traceback. On a real cluster (train.ray_address) that warning stays visible."""
    quiet_ray_logs()
    _quiet(f"{_TRAIN_INTERNAL}.scaling_policy.autoscaling_coordinator_client", logging.ERROR)
