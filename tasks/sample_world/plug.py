"""Plugging the sample world into a run: start the loopback server and point the sources at it.

    with sample_source(cfg, root) as cfg:     # cfg.ingest.sources[*].url: ${SAMPLE_SOURCE} -> http://127.0.0.1:<port>
        download_stage(cfg, root)

A config whose `ingest.sample_source.enabled` is false passes through untouched.
`render_sample_videos(cfg, root)` writes the server's videos ahead of the run (the server
then finds them on disk), so a caller can overlap that with other start-up work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator

from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.layout import DataRoot
from soraflow.tasks.ingest.sources.pexels import ENV_KEY
from soraflow.tasks.sample_world import (
    server,  # SampleServer looked up at start-up: tests swap in a subclass
)

SAMPLE_TOKEN = "${SAMPLE_SOURCE}"


def stable_port(root: DataRoot) -> int:
    """A loopback port fixed per data root: the source URLs that land in the manifests (and so
    the dataset version and the task cache keys) stay the same from one run to the next."""
    digest = hashlib.sha256(str(root.root.resolve()).encode()).digest()
    return 20000 + int.from_bytes(digest[:4], "big") % 20000


def render_sample_videos(cfg: SoraFlowConfig, root: DataRoot) -> None:
    """Write the sample server's videos for this config that are not on disk yet (no-op when disabled)."""
    if cfg.ingest.sample_source.enabled:
        server.SampleServer(root.root / "sample_source", cfg.ingest.sample_source).generate()


@contextlib.contextmanager
def sample_source(cfg: SoraFlowConfig, root: DataRoot) -> Iterator[SoraFlowConfig]:
    """Start the loopback sample server when the config asks for it, and point the sources at it."""
    if not cfg.ingest.sample_source.enabled:
        yield cfg
        return
    # The loopback Pexels API accepts whatever key the downloader will send (a real key, if one
    # is set, never leaves this machine: the server is on 127.0.0.1 and logs no headers).
    previous = os.environ.get(ENV_KEY)
    key = previous or "sample-source-key"
    os.environ[ENV_KEY] = key
    try:
        with server.SampleServer(
            root.root / "sample_source", cfg.ingest.sample_source, api_key=key, port=stable_port(root)
        ) as running:
            cfg = cfg.model_copy(deep=True)
            # The sample server is on loopback, which the URL policy refuses unless allow-listed:
            # this server's port only, so metadata cannot point at other local services.
            cfg.ingest.http.allow_hosts = [*cfg.ingest.http.allow_hosts, running.base_url.split("://", 1)[1]]
            for source in cfg.ingest.sources:
                source.url = source.url and source.url.replace(
                    SAMPLE_TOKEN, running.base_url
                )  # folder/csv sources may have no url
            yield cfg
    finally:
        if previous is None:
            os.environ.pop(ENV_KEY, None)
