"""A real two-node Ray cluster on this machine: training spreads over both nodes, an ingest stage maps on it.

The cluster is what an engineer starts by hand: `ray start --head` and a second `ray start
--address`, each with one CPU, with token authentication on (RAY_AUTH_MODE=token and one shared
RAY_AUTH_TOKEN, as Ray >= 2.52 supports and 2.61 will require). Both nodes share this machine's
disk, which stands in for the shared storage a real cluster needs for `runs/`, the cache and the
registry. Each `ray start` runs in a session of its own, so the test stops exactly the processes it
started (their process groups), never another Ray on the machine. The drivers run in child
processes too: Ray caches the auth token per process, and this pytest process must keep the
token of the local instances other tests start.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import new_row, read_rows, write_manifest
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
        # Ray's daemons take 10-20 s to act on SIGTERM here (`ray stop --force` kills at once): a short
        # grace, then SIGKILL. Nothing of the cluster is kept after the module.
        for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.0)):
            for pgid in self.groups:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_group_alive(g) for g in self.groups):
                time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process is left in process group `pgid` (from /proc: a zombie whose parent
    never reaps it would still answer killpg(pgid, 0))."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.fixture(scope="module")
def cluster():
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "support"), os.environ.get("PYTHONPATH", "")]),
    }
    c = TwoNodeCluster(env)
    try:
        yield c.start()
    finally:
        c.stop()


def _driver(cluster: TwoNodeCluster, code: str) -> dict:
    """Run `code` as a Ray driver in a child process with the cluster's token; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=cluster.env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_spreads_two_workers_over_both_nodes(cluster, tmp_path):
    out = _driver(
        cluster,
        f"""
        import json
        from pathlib import Path
        from ray.util.state import list_actors
        from training_data import make_clip_manifest, train_cfg
        from soraflow.storage.data.holdout import DatasetSplit
        from soraflow.storage.layout import DataRoot
        from soraflow.tasks.train.driver import train
        from soraflow.tasks.train.vae_fit import fit_vae

        root = DataRoot({str(tmp_path / "data")!r})
        manifest = make_clip_manifest(Path({str(tmp_path / "videos")!r}), root, n=8, frames=12)
        # a VAE of 2 fit steps and 2 training steps: where the workers run does not depend on how long they learn
        cfg = train_cfg(root, **{{"train.ray_address": {cluster.address!r}, "train.num_workers": 2, "train.steps": 2,
                                 "train.batch_size": 2, "train.ckpt_every": 2, "train.log_every": 1,
                                 "vae.fit.steps": 2}})
        data = DatasetSplit.read(manifest, cfg.train.val_fraction)
        vae = fit_vae(cfg, data, root, progress=False)
        result = train(cfg, data, root, vae.path, run_name="cluster")
        # the state API (served by the head's dashboard) keeps the finished workers
        actors = list_actors(address={cluster.dashboard!r}, filters=[("class_name", "=", "RayTrainWorker")],
                             detail=True, raise_on_missing_output=False)
        print(json.dumps({{"steps": result.metrics["steps"], "world_size": result.metrics["world_size"],
                          "weights": [str(p) for p in result.model_dir.rglob("*.safetensors")],
                          "nodes": sorted({{a.node_id for a in actors}})}}))
    """,
    )
    assert out["steps"] == 2 and out["world_size"] == 2
    assert out["weights"]
    assert len(out["nodes"]) == 2  # one CPU per node: one worker on each


def test_an_ingest_stage_maps_its_shards_on_the_cluster(cluster, tmp_path):
    root = DataRoot(tmp_path / "data")
    rows = []
    for i in range(2):
        video = make_scene_video(tmp_path / f"v{i}.mp4", [1.5, 1.5], fps=24.0, seed=i)
        rows.append(new_row(path=str(video.path), video_id=f"v{i}", source="hdvg", status="ok"))
    manifest = write_manifest(rows, "download", root)
    overrides = ["ingest.task_runner=ray", f"ingest.ray_address={cluster.address}", "ingest.shard_size=1",
                 "ingest.split.fps=24.0", "ingest.split.short_side=32"]
    out = _driver(cluster, f"""
        import json
        from soraflow.flows.ingest import run_single_stage
        from soraflow.flows.params import RunParams

        params = RunParams(config="local", data_root={str(root.root)!r}, overrides={overrides!r})
        print(json.dumps(run_single_stage("split", params, {str(manifest)!r}), default=str))
    """)

    clips = [r for r in read_rows(out["manifest"]) if r["status"] == "ok"]
    assert len(clips) == 4 and all(Path(r["path"]).exists() for r in clips)  # 2 videos x 2 scenes
