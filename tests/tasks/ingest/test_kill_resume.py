"""kill -9 in the middle of a download and in the middle of a scene split, then a rerun.

A child process (sys.executable, this checkout's soraflow) runs the plain stage functions; the
test SIGKILLs it at a chosen point and runs it again to the end. Checked after the rerun: every
input id ends as ok (or rejected with a reason), no id twice, nothing that was complete before
the kill is fetched or encoded again (requests counted on the server, file inode/mtime kept),
and the file cut off by the kill is resumed with Range + If-Range, not restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from soraflow.storage.data.video_io import write_video
from loopback import LoopbackServer
from videos import make_scene_video

pytestmark = pytest.mark.slow  # child processes that import soraflow: a few seconds each

KEY = "kill-test-key"
IDS = [201, 202, 203, 204]
STALLED = 203  # the download the kill cuts off


def _video_bytes(seed: int, frames: int = 150) -> bytes:
    """A real, small mp4 (a few hundred kB of noise, so a download takes several reads)."""
    import tempfile

    import numpy as np

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        return write_video(
            Path(d) / "v.mp4", rng.integers(0, 255, (frames, 64, 96, 3), dtype=np.uint8), 30.0
        ).read_bytes()


class PexelsLike:
    """/videos/popular (one page) and /files/<id>.mp4 with ETag + Range; the STALLED file can be
    made to send half its body and then hang until released (the child is killed meanwhile)."""

    def __init__(self):
        self.files = {f"/files/{i}.mp4": _video_bytes(i) for i in IDS}
        self.log: list[tuple[str, dict]] = []
        self.stall = threading.Event()  # set: the stalled file hangs half-way
        self.half_sent = threading.Event()
        self.release = threading.Event()
        self.server = LoopbackServer(self._get)
        self.httpd, self.base = self.server.httpd, self.server.base_url

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.stop()

    def gets(self, path: str) -> list[dict]:
        return [h for p, h in self.log if p == path]

    def _send(self, h, code, body, headers=()):
        h.send_response(code)
        for k, v in dict(headers).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _get(self, h):
        path = h.path.split("?", 1)[0]
        self.log.append((path, dict(h.headers)))
        if path == "/videos/popular":
            videos = [
                {
                    "id": i,
                    "width": 96,
                    "height": 64,
                    "url": f"https://www.pexels.com/video/a-red-circle-{i}/",
                    "video_files": [
                        {
                            "id": i,
                            "quality": "hd",
                            "file_type": "video/mp4",
                            "width": 96,
                            "height": 64,
                            "link": f"{self.base}/files/{i}.mp4",
                            "size": len(self.files[f"/files/{i}.mp4"]),
                        }
                    ],
                }
                for i in IDS
            ]
            return self._send(h, 200, json.dumps({"videos": videos}).encode(), {"Content-Type": "application/json"})
        body = self.files.get(path)
        if body is None:
            return self._send(h, 404, b"no")
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        start = 0
        if h.headers.get("Range") and h.headers.get("If-Range") == etag:
            start = int(h.headers["Range"].split("=")[1].split("-")[0])
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "video/mp4"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        part = body[start:]
        if path == f"/files/{STALLED}.mp4" and self.stall.is_set():
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(part)))
            h.end_headers()
            h.wfile.write(part[: len(part) // 2])
            h.wfile.flush()
            self.half_sent.set()
            self.release.wait(20)
            return
        self._send(h, 206 if start else 200, part, headers)


DOWNLOAD_CHILD = textwrap.dedent("""
    import json, sys
    from soraflow.configs.schema import HttpConfig, SourceConfig
    from soraflow.storage.layout import DataRoot
    from soraflow.tasks.ingest.sources import download_items, list_items_or_error
    base, root = sys.argv[1], DataRoot(sys.argv[2])
    source = SourceConfig(kind="pexels", url=base, per_page=10)
    http = HttpConfig(allow_hosts=["127.0.0.1"], timeout_s=30, backoff_base_s=0.01)
    rows = download_items(source, list_items_or_error(source, http, root), root, http)
    print("ROWS " + json.dumps(rows))
""")


def _child(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PEXELS_API_KEY=KEY)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _rows(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err[-3000:]}"
    line = [x for x in out.splitlines() if x.startswith("ROWS ")][-1]
    return json.loads(line[5:])


def _stamp(paths) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _wait(cond, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill_mid_download_then_rerun(tmp_path):
    root = tmp_path / "data"
    raw = root / "raw" / "pexels"
    with PexelsLike() as srv:
        srv.stall.set()
        proc = _child(DOWNLOAD_CHILD, srv.base, str(root))
        try:
            _wait(srv.half_sent.is_set, "the stalled download to start")
            part = raw / f"{STALLED}.mp4.part"
            _wait(lambda: part.exists() and part.stat().st_size > 0, "bytes in the part file")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        srv.stall.clear()
        srv.release.set()
        done_before = _stamp(raw / f"{i}.mp4" for i in IDS if i < STALLED)
        assert len(done_before) == 2 and not (raw / f"{STALLED}.mp4").exists()
        had = part.stat().st_size

        rows = _rows(_child(DOWNLOAD_CHILD, srv.base, str(root)))

        assert sorted(r["video_id"] for r in rows) == [str(i) for i in IDS], "every id once"
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
        for i in IDS:
            assert open(raw / f"{i}.mp4", "rb").read() == srv.files[f"/files/{i}.mp4"]
        assert _stamp(raw / f"{i}.mp4" for i in IDS if i < STALLED) == done_before, "finished files rewritten"
        for i in IDS:
            want = 2 if i == STALLED else 1
            assert len(srv.gets(f"/files/{i}.mp4")) == want, (i, srv.gets(f"/files/{i}.mp4"))
        resumed = srv.gets(f"/files/{STALLED}.mp4")[1]
        assert resumed["Range"] == f"bytes={had}-" and resumed["If-Range"].startswith('"'), resumed
        assert not part.exists()


SPLIT_CHILD = textwrap.dedent("""
    import json, sys, time
    import soraflow.tasks.ingest.clip_cut as cc
    import soraflow.tasks.ingest.scene_split as ss
    from soraflow.configs.schema import SplitConfig
    from soraflow.storage.layout import DataRoot
    from soraflow.storage.data.manifest import read_rows
    real = cc.encode_clip
    def slow_write(*a, **k):  # a test hook in this child only: leaves time to kill between clips
        out = real(*a, **k)
        time.sleep(float(sys.argv[3]))
        return out
    cc.encode_clip = slow_write
    rows = read_rows(sys.argv[1])
    out = ss.split_rows(rows, DataRoot(sys.argv[2]),
                        SplitConfig(fps=24.0, short_side=64, min_seconds=0.5, max_seconds=5.0))
    print("ROWS " + json.dumps(out))
""")


def test_kill_mid_split_then_rerun(tmp_path):
    from soraflow.storage.layout import DataRoot
    from soraflow.storage.data.manifest import new_row, write_manifest
    from soraflow.storage.data.video_io import probe_video

    root = DataRoot(tmp_path / "data")
    rows = []
    for k in range(2):
        v = make_scene_video(tmp_path / f"v{k}.mp4", [1.0, 1.25, 1.0], fps=24.0, seed=k)
        info = probe_video(v.path)
        rows.append(new_row(source="hdvg", video_id=f"v{k}", path=str(v.path), num_frames=info.num_frames, fps=info.fps,
                            height=info.height, width=info.width, status="ok"))
    manifest = write_manifest(rows, "download", root)
    clips = root.root / "clips"

    def finished() -> list[Path]:
        return [p for p in clips.rglob("*.mp4") if not p.name.startswith(".")] if clips.exists() else []

    proc = _child(SPLIT_CHILD, str(manifest), str(root.root), "2.0")
    try:
        _wait(lambda: len(finished()) >= 1, "the first clip")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _stamp(finished())
    assert 1 <= len(before) < 6, f"the kill should land mid-split: {sorted(before)}"

    out = _rows(_child(SPLIT_CHILD, str(manifest), str(root.root), "0"))

    ids = [(r["video_id"], r["clip_id"]) for r in out]
    assert len(ids) == len(set(ids)) == 6, ids
    assert all(r["status"] == "ok" for r in out), [r["error"] for r in out]
    after = _stamp(finished())
    assert len(after) == 6
    assert {p: after[p] for p in before} == before, "clips finished before the kill were encoded again"
