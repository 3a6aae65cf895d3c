"""tasks/download: HD-VG, Inter4k and Pexels downloaders.

The first half needs no server: frame-accurate span cuts, fetcher routing (a fake yt-dlp),
archive checks on hand-made evil zips, Pexels file choice. The second half runs the real
entry points against the loopback SampleServer with injected faults. Sleeps are recorded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from configs.schema import HttpConfig, SourceConfig
from storage.layout import DataRoot
from storage.manifest import COLUMNS, validate_rows
from storage.video_io import probe_video, read_frames, sha256_file, write_video
from tasks.download import download_items, list_items
from tasks.download import hdvg, inter4k, pexels
from tasks.http import BadInputError

KEY = "pexels-test-KEY-0a1b2c3d4e5f"


class Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)


def marked_frames(n: int, h: int = 64, w: int = 96) -> np.ndarray:
    """Frame k shows k in binary as 8 black/white bars, so a cut can be checked frame for frame."""
    f = np.zeros((n, h, w, 3), np.uint8)
    for k in range(n):
        for b in range(8):
            if (k >> b) & 1:
                f[k, :, b * 12 : (b + 1) * 12] = 255
    return f


def frame_index(frame: np.ndarray) -> int:
    return sum(1 << b for b in range(8) if frame[:, b * 12 + 2 : (b + 1) * 12 - 2].mean() > 128)


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def http_cfg():
    return HttpConfig(timeout_s=5, max_retries=3, backoff_base_s=1.0, backoff_max_s=30.0)


# ---------------------------------------------------------------- HD-VG: spans, routing, ids (no server)


@pytest.mark.parametrize("fps", [30.0, 30000 / 1001])
def test_cut_span_is_frame_accurate(tmp_path, fps):
    src = write_video(tmp_path / "src.mp4", marked_frames(90), fps)
    n = hdvg.cut_span(src, tmp_path / "span.mp4", 1.0, 2.0)
    ids = [frame_index(f) for f in read_frames(tmp_path / "span.mp4")]
    first = int(np.ceil(1.0 * fps - 1e-6))
    last = int(np.ceil(2.0 * fps - 1e-6)) - 1
    assert ids == list(range(first, last + 1)) and n == len(ids)
    assert probe_video(tmp_path / "span.mp4").fps == pytest.approx(fps, rel=1e-4)


def test_parse_timecode():
    assert hdvg.parse_timecode("00:01:46.479") == pytest.approx(106.479)
    assert hdvg.parse_timecode("01:00:00.000") == 3600.0
    with pytest.raises(BadInputError):
        hdvg.parse_timecode("1:2")


def test_fetcher_routing():
    assert hdvg.choose_fetcher("https://www.youtube.com/watch?v=abc", "auto") == "yt-dlp"
    assert hdvg.choose_fetcher("https://youtu.be/abc", "auto") == "yt-dlp"
    assert hdvg.choose_fetcher("https://m.youtube.com/watch?v=abc", "auto") == "yt-dlp"
    assert hdvg.choose_fetcher("http://127.0.0.1:8000/videos/abc.mp4", "auto") == "http"
    assert hdvg.choose_fetcher("https://notyoutube.com.evil/x.mp4", "auto") == "http"
    assert hdvg.choose_fetcher("https://www.youtube.com/watch?v=abc", "http") == "http"
    assert hdvg.choose_fetcher("http://127.0.0.1/x.mp4", "yt-dlp") == "yt-dlp"


def test_ytdlp_options(tmp_path):
    opts = hdvg.ytdlp_options(tmp_path / "v.mp4", HttpConfig())
    assert opts["outtmpl"] == {"default": str(tmp_path / "v.mp4")}
    assert opts["noplaylist"] is True and "height<=720" in opts["format"] and "mp4" in opts["format"]


def _hdvg_item(vid: str, url: str, clip_id: str | None = None) -> dict:
    return {
        "video_id": vid,
        "url": url,
        "clips": [
            {
                "name": f"{vid}.0.mp4",
                "span": ["00:00:00.500", "00:00:02.500"],
                "fps": 30.0,
                "scenes": [
                    {"scene_cut": [30, -1], "clip_id": clip_id or f"{vid}.0_1", "caption": "second"},
                    {"scene_cut": [0, 30], "clip_id": f"{vid}.0_0", "caption": "first"},
                ],
            }
        ],
    }


def test_auto_fetcher_uses_ytdlp_for_youtube(tmp_path, monkeypatch, http_cfg):
    calls = []

    def fake_ytdlp(url, dest, http, session, sleep):
        calls.append((url, Path(dest)))
        write_video(dest, marked_frames(90), 30.0)

    def no_http(*a, **k):
        raise AssertionError("the http fetcher must not be used for YouTube")

    monkeypatch.setitem(hdvg.FETCHERS, "yt-dlp", fake_ytdlp)
    monkeypatch.setitem(hdvg.FETCHERS, "http", no_http)
    root = DataRoot(tmp_path / "data")
    source = SourceConfig(kind="hdvg", url="http://127.0.0.1:1/hdvg_0.json", fetcher="auto")
    rows = download_items(source, [_hdvg_item("abcDEF_123", "https://www.youtube.com/watch?v=abcDEF_123")], root, http_cfg)
    assert [c[0] for c in calls] == ["https://www.youtube.com/watch?v=abcDEF_123"]
    assert calls[0][1].parent == root.tmp / "hdvg"
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # one row per scene, in frame order, windows from scene_cut / fps (end -1 = to the span's end)
    assert [(r["clip_id"], r["start_s"], r["end_s"], r["text"]) for r in rows] == [
        ("abcDEF_123.0_0", 0.0, 1.0, "first"),
        ("abcDEF_123.0_1", 1.0, None, "second"),
    ]
    span = root.raw("hdvg", "abcDEF_123.0")
    assert all(r["path"] == str(span) and r["caption_source"] == "source" for r in rows)
    ids = [frame_index(f) for f in read_frames(span)]
    assert ids == list(range(15, 75))  # span 0.5 s .. 2.5 s at 30 fps
    assert not (root.tmp / "hdvg" / "abcDEF_123.mp4").exists()  # the full video is dropped once cut
    validate_rows(rows)
    # again: the span exists and probes, nothing is fetched
    assert download_items(source, [_hdvg_item("abcDEF_123", "https://www.youtube.com/watch?v=abcDEF_123")], root, http_cfg) == rows
    assert len(calls) == 1


def test_unsafe_ids_never_leave_the_root(tmp_path, monkeypatch, http_cfg):
    def fake(url, dest, http, session, sleep):
        write_video(dest, marked_frames(90), 30.0)

    monkeypatch.setitem(hdvg.FETCHERS, "http", fake)
    root = DataRoot(tmp_path / "data")
    source = SourceConfig(kind="hdvg", url="http://127.0.0.1:1/hdvg_0.json", fetcher="http")
    items = [
        _hdvg_item("../../evil", "http://127.0.0.1:1/videos/evil.mp4"),
        _hdvg_item("a/b", "http://127.0.0.1:1/videos/ab.mp4"),
        _hdvg_item("good", "http://127.0.0.1:1/videos/good.mp4", clip_id="../../escape"),
    ]
    before = files_under(tmp_path)
    rows = download_items(source, items, root, http_cfg)
    new = files_under(tmp_path) - before
    assert all(root.root in p.parents for p in new)
    assert not list(tmp_path.glob("evil*")) and not (tmp_path / "escape.mp4").exists()
    bad = [r for r in rows if r["status"] == "rejected"]
    assert [r["video_id"] for r in bad] == ["../../evil", "a/b", "good"]
    assert all("unsafe id" in r["error"] and r["path"] is None for r in bad)
    assert [r["clip_id"] for r in rows if r["status"] == "ok"] == ["good.0_0"]


# ---------------------------------------------------------------- Inter4k: archive checks (no server)


def _zip(entries: list[tuple], path: Path) -> Path:
    """entries: (name, data) or (name, data, unix_mode)."""
    with zipfile.ZipFile(path, "w") as zf:
        for e in entries:
            name, data = e[0], e[1]
            info = zipfile.ZipInfo(name)
            if len(e) > 2:
                info.external_attr = e[2] << 16
            info.create_system = 3
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "entry, why",
    [
        (("Inter4K/60fps/UHD/../../../evil.mp4", b"x"), "'..'"),
        (("/etc/evil.mp4", b"x"), "absolute"),
        (("C:/evil.mp4", b"x"), "absolute"),
        (("Inter4K/60fps/UHD/link.mp4", b"/etc/passwd", stat.S_IFLNK | 0o777), "not a regular file"),
        (("Inter4K/60fps/UHD/fifo.mp4", b"", stat.S_IFIFO | 0o644), "not a regular file"),
        (("Inter4K/60fps/UHD/big.mp4", b"y" * 5000), "over the per-file limit"),
        (("Inter4K/notes/readme.txt", b"hi"), "outside the layout"),
        (("Inter4K\\60fps\\UHD\\3.mp4", b"x"), "backslash"),
    ],
)
def test_check_entries_refuses(tmp_path, entry, why):
    zpath = _zip([("Inter4K/60fps/UHD/1.mp4", b"ok"), entry], tmp_path / "a.zip")
    with zipfile.ZipFile(zpath) as zf, pytest.raises(BadInputError, match="refused archive entry") as ei:
        inter4k.check_entries(zf, member_cap=1000, total_cap=10_000)
    assert why in str(ei.value) and repr(entry[0])[1:-1][:20] in str(ei.value)


def test_check_entries_total_cap_and_order(tmp_path):
    zpath = _zip([(f"Inter4K/60fps/UHD/{n}.mp4", b"z" * 600) for n in (10, 2, 1)], tmp_path / "a.zip")
    with zipfile.ZipFile(zpath) as zf:
        assert [m["video_id"] for m in inter4k.check_entries(zf, 1000, 10_000)] == ["1", "2", "10"]
        with pytest.raises(BadInputError, match="total"):
            inter4k.check_entries(zf, 1000, 1500)


def test_extract_counts_bytes_not_only_declared_sizes(tmp_path):
    """A member whose header declares fewer bytes than it holds is refused while streaming."""
    zpath = _zip([("Inter4K/60fps/UHD/1.mp4", b"A" * 5000)], tmp_path / "a.zip")
    raw = bytearray(zpath.read_bytes())
    # Lie in the central directory: file_size 5000 -> 50 (offset 24 of the entry).
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (50).to_bytes(4, "little")
    zpath.write_bytes(bytes(raw))
    with zipfile.ZipFile(zpath) as zf:
        [m] = inter4k.check_entries(zf, 1000, 10_000)  # the declared size passes ...
        with pytest.raises(BadInputError):  # ... the bytes do not
            inter4k.extract_member(zf, m, tmp_path / "out" / "1.mp4", 1000, [10_000])
    assert not (tmp_path / "out" / "1.mp4").exists()


# ---------------------------------------------------------------- Pexels: file choice, key (no server)


def test_choose_file():
    files = [
        {"link": "sd", "quality": "sd", "width": 640, "height": 360, "size": 1000, "file_type": "video/mp4"},
        {"link": "hd", "quality": "hd", "width": 1280, "height": 720, "size": 5000, "file_type": "video/mp4"},
        {"link": "hd2", "quality": "hd", "width": 1920, "height": 1080, "size": 9000, "file_type": "video/mp4"},
        {"link": "uhd", "quality": "uhd", "width": 3840, "height": 2160, "size": 50_000, "file_type": "video/mp4"},
        {"link": "webm", "quality": "hd", "width": 4000, "height": 3000, "size": 10, "file_type": "video/webm"},
    ]
    assert pexels.choose_file(files, "hd", 100_000)["link"] == "hd2"
    assert pexels.choose_file(files, "hd", 6000)["link"] == "hd"
    assert pexels.choose_file(files, "uhd", 10_000)["link"] == "hd2"  # preferred too big: largest allowed
    assert pexels.choose_file(files, "sd", 100_000, min_width=1000)["link"] == "uhd"  # no sd that wide
    assert pexels.choose_file(files, "hd", 500)["link"] == "sd"  # nothing allowed: smallest
    assert pexels.choose_file([], "hd", 500) is None


def test_pexels_needs_key(tmp_path, monkeypatch, http_cfg):
    monkeypatch.delenv("PEXELS_API_KEY", raising=False)
    with pytest.raises(BadInputError, match="set PEXELS_API_KEY"):
        list_items(SourceConfig(kind="pexels", url="http://127.0.0.1:1"), http_cfg, DataRoot(tmp_path))
