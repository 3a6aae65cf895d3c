"""tasks/sample_world/plug.py: the local preset's sample world starts on loopback and the
sources point at it; a config without it passes through untouched; the API key env is restored."""

from __future__ import annotations

import os

import requests
from soraflow.configs.loader import load_config
from soraflow.storage.layout import DataRoot
from soraflow.tasks.ingest.sources.pexels import ENV_KEY
from soraflow.tasks.sample_world.plug import SAMPLE_TOKEN, sample_source, stable_port

TINY = [
    "ingest.sample_source.hdvg_videos=1",
    "ingest.sample_source.pexels_videos=1",
    "ingest.sample_source.scenes_per_video=1",
    "ingest.sample_source.scene_seconds=0.5",
    "ingest.sample_source.width=32",
    "ingest.sample_source.height=32",
]


def test_sources_point_at_the_running_server_and_the_key_env_is_restored(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    cfg, root = load_config("local", TINY), DataRoot(tmp_path / "data")
    assert all(s.url.startswith(SAMPLE_TOKEN) for s in cfg.ingest.sources)
    with sample_source(cfg, root) as plugged:
        urls = {s.kind: s.url for s in plugged.ingest.sources}
        base = urls["pexels"]
        assert base.startswith("http://127.0.0.1:") and urls["hdvg"] == f"{base}/metafiles/hdvg_0.json"
        assert requests.get(urls["hdvg"], timeout=10).status_code == 200
        assert (
            requests.get(
                f"{base}/videos/popular", headers={"Authorization": os.environ[ENV_KEY]}, timeout=10
            ).status_code
            == 200
        )
    assert ENV_KEY not in os.environ  # the key it set is gone again
    assert all(s.url.startswith(SAMPLE_TOKEN) for s in cfg.ingest.sources)  # the caller's config is not modified
    assert stable_port(root) == stable_port(DataRoot(tmp_path / "data")) and 20000 <= stable_port(root) < 40000


def test_a_config_without_the_sample_world_passes_through(tmp_path):
    cfg = load_config("local", ["ingest.sample_source.enabled=false"])
    with sample_source(cfg, DataRoot(tmp_path)) as same:
        assert same is cfg
    assert not (tmp_path / "sample_source").exists()  # nothing generated
