"""A real two-node Ray cluster on this machine: training spreads over both nodes, an ingest stage maps on it.

The cluster is what an engineer starts by hand: `ray start --head` and a second `ray start
--address`, each with one CPU, with token authentication on (RAY_AUTH_MODE=token and one shared
RAY_AUTH_TOKEN, as Ray >= 2.52 supports and 2.61 will require). Both nodes share this machine's
disk, which stands in for the shared storage a real cluster needs for `runs/`, the cache and the
registry. Each `ray start` runs in a session of its own, so the test stops exactly the processes it
started (their process groups), never another Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from soraflow.storage.holdout import DatasetSplit
from soraflow.storage.layout import DataRoot
from soraflow.storage.manifest import new_row, read_rows, write_manifest
from training_data import make_clip_manifest, train_cfg
from videos import make_scene_video

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodeCluster:
    """`ray start --head` + `ray start --address`, one CPU each, token auth, stopped by process group."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{_free_port()}"  # Ray's state API is served by the dashboard
        # Ray's socket paths must stay short (AF_UNIX): a short folder directly under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="sfray", dir="/tmp")
        self.groups: list[int] = []

    def _ray_start(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus=1", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats", *args]
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.groups.append(proc.pid)  # the daemons it starts stay in its process group
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]

    def start(self) -> "TwoNodeCluster":
        self._ray_start("--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}")
        self._ray_start(f"--address={self.address}")
        return self

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            for pgid in self.groups:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(wait)


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update({k: env[k] for k in saved})  # the driver (this process) authenticates too
    c = TwoNodeCluster(env)
    try:
        yield c.start()
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        c.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_nodes(dashboard: str) -> set[str]:
    """Node ids of the Ray Train workers the cluster ran (the state API keeps dead actors)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         raise_on_missing_output=False)
    return {a.node_id for a in actors}


def test_training_spreads_two_workers_over_both_nodes(cluster, tmp_path):
    from soraflow.tasks.train.driver import train
    from soraflow.tasks.train.vae_fit import fit_vae

    root = DataRoot(tmp_path / "data")
    manifest = make_clip_manifest(tmp_path / "videos", root, n=8, frames=12)
    cfg = train_cfg(root, **{"train.ray_address": cluster.address, "train.num_workers": 2, "train.steps": 6,
                             "train.batch_size": 2, "train.ckpt_every": 6, "train.log_every": 3})
    data = DatasetSplit.read(manifest, cfg.train.val_fraction)
    vae = fit_vae(cfg, data, root, progress=False)
    result = train(cfg, data, root, vae.path, run_name="cluster")

    assert result.metrics["steps"] == 6 and result.metrics["world_size"] == 2
    assert any(result.model_dir.rglob("*.safetensors"))
    assert len(_worker_nodes(cluster.dashboard)) == 2  # one CPU per node: one worker on each


def test_an_ingest_stage_maps_its_shards_on_the_cluster(cluster, tmp_path):
    from soraflow.flows.ingest import run_single_stage
    from soraflow.flows.params import RunParams

    root = DataRoot(tmp_path / "data")
    rows = []
    for i in range(2):
        video = make_scene_video(tmp_path / f"v{i}.mp4", [1.5, 1.5], fps=24.0, seed=i)
        rows.append(new_row(path=str(video.path), video_id=f"v{i}", source="hdvg", status="ok"))
    manifest = write_manifest(rows, "download", root)
    params = RunParams(config="local", data_root=str(root.root), overrides=[
        "ingest.task_runner=ray", f"ingest.ray_address={cluster.address}", "ingest.shard_size=1",
        "ingest.split.fps=24.0", "ingest.split.short_side=32"])
    out = run_single_stage("split", params, str(manifest))

    clips = [r for r in read_rows(out["manifest"]) if r["status"] == "ok"]
    assert len(clips) == 4 and all(Path(r["path"]).exists() for r in clips)  # 2 videos x 2 scenes
