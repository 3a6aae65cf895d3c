"""tasks/sample_world: vocabulary, scene rendering, the seeded plan, and the loopback SampleServer
(HD-VG metadata, Inter4k redirect + zip, Pexels API, Range, rate limit, injected faults)."""

from __future__ import annotations

import io
import stat
import time
import zipfile
from itertools import product

import numpy as np
import pytest
import requests
from soraflow.configs.schema import SampleSourceConfig
from soraflow.storage.layout import safe_id
from soraflow.storage.data.video_io import probe_video, read_frames
from soraflow.tasks.sample_world import scenes as S
from soraflow.tasks.sample_world.server import (
    PEXELS_MAX_PER_PAGE,
    SampleServer,
    timecode,
)

KEY = "sample-test-key"
TIMEOUT = 10


# ---------------------------------------------------------------- helpers


def object_mask(frame: np.ndarray, background) -> np.ndarray:
    """(H, W) bool: pixels clearly off the background."""
    d = np.sqrt(((frame.astype(np.float32) - np.asarray(background, np.float32)) ** 2).sum(-1))
    return d > 60


def border_colour(frame: np.ndarray) -> np.ndarray:
    ring = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float32)
    return np.median(ring, axis=0)


def nearest_colour(rgb) -> str:
    return min(S.COLORS, key=lambda k: float(np.sum((np.asarray(S.COLORS[k], np.float32) - rgb) ** 2)))


def seen_colour(frames: np.ndarray) -> str:
    """The palette colour of the object in these frames (core pixels, all frames pooled)."""
    core = []
    for f in frames:
        m = object_mask(f, border_colour(f))
        assert m.sum() > 20, "no object in the frame"
        core.append(f[m].astype(np.float32))
    return nearest_colour(np.median(np.concatenate(core), axis=0))


def centroid(frame: np.ndarray, background) -> tuple[float, float]:
    ys, xs = np.nonzero(object_mask(frame, background))
    return float(xs.mean()), float(ys.mean())


def seen_direction(frames: np.ndarray) -> str:
    bg = border_colour(frames[0])
    (x0, y0), (x1, y1) = centroid(frames[0], bg), centroid(frames[-1], bg)
    dx, dy = x1 - x0, y1 - y0
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def parse_tc(tc: str) -> float:
    h, m, s = tc.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def small_cfg(**kw) -> SampleSourceConfig:
    base = dict(seed=3, hdvg_videos=2, pexels_videos=5, inter4k_videos=2, scenes_per_video=3, scene_seconds=1.0)
    base.update(kw)
    return SampleSourceConfig(**base)


# ---------------------------------------------------------------- vocabulary and captions


def test_vocabulary_is_distinct_from_backgrounds():
    assert {"red", "green", "blue", "yellow"} <= set(S.COLORS) and len(S.COLORS) <= 6
    assert S.SHAPES == ("circle", "square", "triangle") and S.DIRECTIONS == ("left", "right", "up", "down")
    assert len(S.COMBINATIONS) == len(S.COLORS) * 3 * 4 == len(set(S.COMBINATIONS))
    for name, rgb in S.COLORS.items():
        for bg in S.DARK_BACKGROUNDS + S.LIGHT_BACKGROUNDS:
            assert abs(S.luma(rgb) - S.luma(bg)) >= S.MIN_SHAPE_LUMA, (name, bg)
            assert np.linalg.norm(np.subtract(rgb, bg)) > 120, (name, bg)
    for a, b in product(S.DARK_BACKGROUNDS, S.LIGHT_BACKGROUNDS):
        assert abs(S.luma(a) - S.luma(b)) >= S.MIN_CUT_LUMA
    names = list(S.COLORS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.linalg.norm(np.subtract(S.COLORS[a], S.COLORS[b])) > 100, (a, b)


def test_caption_round_trip():
    for combo in S.COMBINATIONS:
        text = S.caption(*combo)
        assert text == f"a {combo[0]} {combo[1]} moving {combo[2]}"
        assert S.parse_caption(text) == combo
        assert S.parse_caption(text.upper() + ".") == combo
        assert S.parse_caption(text.replace(" ", "-") + "-1003") == combo  # a Pexels page slug
    assert S.parse_caption("a red blue circle moving left") is None  # two colours
    assert S.parse_caption("a red circle") is None  # no direction
    assert S.parse_caption("a purple circle moving left") is None
    assert S.parse_caption("") is None and S.parse_caption(None) is None
    with pytest.raises(ValueError):
        S.caption("purple", "circle", "left")


# ---------------------------------------------------------------- the plan


def test_plan_covers_all_combinations_evenly():
    cfg = SampleSourceConfig(seed=5, hdvg_videos=16, pexels_videos=0, scenes_per_video=3)
    hdvg = S.plan_videos(cfg, "hdvg")
    combos = [(s.color, s.shape, s.direction) for p in hdvg for s in p.scenes]
    assert sorted(combos) == sorted(S.COMBINATIONS)  # 48 scenes: each combination exactly once

    cfg = SampleSourceConfig(seed=1, hdvg_videos=7, pexels_videos=23, inter4k_videos=5, scenes_per_video=3)
    plans = {k: S.plan_videos(cfg, k) for k in S.KINDS}
    assert [len(plans[k]) for k in S.KINDS] == [7, 23, 5]
    assert all(len(p.scenes) == 3 for k in ("hdvg", "inter4k") for p in plans[k])
    assert all(len(p.scenes) == 1 for p in plans["pexels"])
    counts: dict = {}
    for k in S.KINDS:
        for p in plans[k]:
            for s in p.scenes:
                counts[(s.color, s.shape, s.direction)] = counts.get((s.color, s.shape, s.direction), 0) + 1
    assert sum(counts.values()) == 7 * 3 + 23 + 5 * 3 == 59
    assert set(counts) == set(S.COMBINATIONS) and max(counts.values()) - min(counts.values()) <= 1


def test_plan_is_seeded_and_safe():
    cfg = SampleSourceConfig(seed=2, hdvg_videos=4, pexels_videos=4, inter4k_videos=3)
    again = SampleSourceConfig(seed=2, hdvg_videos=4, pexels_videos=4, inter4k_videos=3)
    other = SampleSourceConfig(seed=9, hdvg_videos=4, pexels_videos=4, inter4k_videos=3)
    for kind in S.KINDS:
        assert S.plan_videos(cfg, kind) == S.plan_videos(again, kind)
    assert S.plan_videos(cfg, "hdvg") != S.plan_videos(other, "hdvg")
    assert [p.video_id for p in S.plan_videos(cfg, "hdvg")] == ["hdvg0000", "hdvg0001", "hdvg0002", "hdvg0003"]
    assert [p.video_id for p in S.plan_videos(cfg, "pexels")] == [1000, 1001, 1002, 1003]
    assert [p.video_id for p in S.plan_videos(cfg, "inter4k")] == ["1", "2", "3"]
    for kind in S.KINDS:
        for p in S.plan_videos(cfg, kind):
            safe_id(p.video_id)
            assert all(s.n_frames == 48 for s in p.scenes)  # 2 s at 24 fps
            for a, b in zip(p.scenes, p.scenes[1:]):
                assert abs(S.luma(a.background) - S.luma(b.background)) >= S.MIN_CUT_LUMA
    with pytest.raises(ValueError):
        S.plan_videos(cfg, "youtube")


@pytest.mark.parametrize("size", [(96, 64), (64, 96), (64, 64)])
def test_planned_motion_stays_in_frame_and_crosses_half(size):
    w, h = size
    cfg = SampleSourceConfig(seed=4, hdvg_videos=16, width=w, height=h)
    for p in S.plan_videos(cfg, "hdvg"):
        for s in p.scenes:
            track = S.centre_track(s, w, h)
            unclamped = np.array(s.start_xy) + np.outer(
                np.arange(s.n_frames), np.array(S._UNIT[s.direction]) * s.speed_px
            )
            assert np.allclose(track, unclamped), "the planned track should never need clamping"
            along = w if s.direction in ("left", "right") else h
            travel = float(np.abs(track[-1] - track[0]).sum())
            assert 0.4 * along <= travel <= 0.55 * along, (s, travel)


# ---------------------------------------------------------------- rendering


def test_render_scene_colour_shape_motion():
    w, h = 96, 64
    cfg = SampleSourceConfig(seed=0, hdvg_videos=16, width=w, height=h)
    fill = {}
    for p in S.plan_videos(cfg, "hdvg"):
        for s in p.scenes:
            frames = S.render_scene(s, w, h)
            assert frames.shape == (s.n_frames, h, w, 3) and frames.dtype == np.uint8
            # plain background on the whole border ring: the shape never leaves the frame
            ring = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
            assert (ring == np.asarray(s.background, np.uint8)).all()
            inside = frames[object_mask(frames, s.background)]
            assert np.abs(np.median(inside, axis=0) - np.asarray(S.COLORS[s.color])).max() <= 2
            assert seen_direction(frames) == s.direction
            (x0, y0), (x1, y1) = centroid(frames[0], s.background), centroid(frames[-1], s.background)
            moved = abs(x1 - x0) if s.direction in ("left", "right") else abs(y1 - y0)
            assert moved >= 0.4 * (w if s.direction in ("left", "right") else h)
            m = object_mask(frames[0], s.background)
            ys, xs = np.nonzero(m)
            fill.setdefault(s.shape, []).append(m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
            assert 0.3 * min(w, h) <= np.ptp(ys) + 1 <= 0.55 * min(w, h)  # diameter ~40% of the short side
    # the shapes are told apart by how much of their bounding box they fill
    assert np.mean(fill["square"]) > 0.9 and 0.7 < np.mean(fill["circle"]) < 0.85 and np.mean(fill["triangle"]) < 0.6


def test_make_video_ranges_match_the_file(tmp_path):
    cfg = small_cfg()
    plan = S.plan_videos(cfg, "hdvg")[1]
    fps = cfg.fps
    ranges = S.make_video(tmp_path / "v.mp4", plan.scenes, cfg.width, cfg.height, fps, pad_frames=(5, 7))
    info = probe_video(tmp_path / "v.mp4")
    assert info.num_frames == 5 + plan.n_frames + 7 and info.fps == pytest.approx(fps)
    assert (info.width, info.height) == (cfg.width, cfg.height)
    assert [r[2] for r in ranges] == plan.captions
    assert ranges[0][0] == 5 and ranges[-1][1] == 5 + plan.n_frames
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    frames = read_frames(tmp_path / "v.mp4")
    lumas = [S.luma(border_colour(f)) for f in frames]
    for (a, b, text), spec in zip(ranges, plan.scenes):
        assert all(
            abs(lumas[i] - S.luma(spec.background)) < 12 for i in range(a, b)
        ), text  # the whole window is this scene
        assert abs(lumas[a - 1] - lumas[a]) >= S.MIN_CUT_LUMA * 0.8  # a hard cut into it (padding or previous scene)
        assert seen_colour(frames[a:b]) == spec.color
        assert seen_direction(frames[a:b]) == spec.direction
    assert abs(lumas[ranges[-1][1]] - lumas[ranges[-1][1] - 1]) >= S.MIN_CUT_LUMA * 0.8


def test_make_video_refuses_a_hue_only_cut(tmp_path):
    cfg = small_cfg()
    a = S.plan_videos(cfg, "hdvg")[0].scenes[0]
    b = S.SceneSpec("blue", "circle", "left", S.DARK_BACKGROUNDS[1], 10, (60.0, 30.0), 1.0)
    assert abs(S.luma(a.background) - S.luma(b.background)) < S.MIN_CUT_LUMA
    with pytest.raises(ValueError, match="luma"):
        S.make_video(tmp_path / "v.mp4", [a, b], cfg.width, cfg.height, cfg.fps)
    assert not (tmp_path / "v.mp4").exists()


# ---------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server_root(tmp_path_factory):
    return tmp_path_factory.mktemp("sample_source")


@pytest.fixture(scope="module")
def server(server_root):
    with SampleServer(server_root, small_cfg(), api_key=KEY) as s:
        yield s


@pytest.fixture
def srv(server):
    """The shared server with a clean log and no faults left over."""
    server.reset_log()
    server.clear_faults()
    yield server
    server.clear_faults()


def get(server, path, **kw):
    kw.setdefault("timeout", TIMEOUT)
    return requests.get(server.base_url + path, **kw)


def api(server, path, key=KEY, **kw):
    return get(server, path, headers={"Authorization": key}, **kw)


def test_hdvg_metadata_schema_and_scene_windows(srv, tmp_path):
    meta = get(srv, "/metafiles/hdvg_0.json").json()
    cfg = srv.cfg
    assert set(meta) == {"hdvg0000", "hdvg0001"}
    for vid, entry in meta.items():
        assert set(entry) == {"url", "clip"} and entry["url"] == f"{srv.base_url}/videos/{vid}.mp4"
        assert list(entry["clip"]) == [f"{vid}.0.mp4"]
        clip = entry["clip"][f"{vid}.0.mp4"]
        assert set(clip) == {"span", "fps", "scene_split"}
        assert isinstance(clip["fps"], float) and clip["fps"] == cfg.fps
        assert all(isinstance(t, str) and len(t) == 12 for t in clip["span"])
        scenes = clip["scene_split"]
        assert len(scenes) == cfg.scenes_per_video
        assert [s["scene_cut"][0] for s in scenes] != sorted(s["scene_cut"][0] for s in scenes)  # not in index order
        for s in scenes:
            assert set(s) == {"scene_cut", "clip_id", "caption"}
            assert all(isinstance(x, int) for x in s["scene_cut"])
            assert s["clip_id"].startswith(f"{vid}.0_") and S.parse_caption(s["caption"]) is not None
        cuts = sorted(tuple(s["scene_cut"]) for s in scenes)
        n = sum(b - a for a, b in cuts)
        assert cuts[0][0] == 0 and all(x[1] == y[0] for x, y in zip(cuts, cuts[1:]))  # contiguous, end exclusive

        # the span covers exactly the scenes: from the end of the padding, n frames long
        r = requests.get(entry["url"], timeout=TIMEOUT)
        assert r.status_code == 200 and r.headers["Content-Type"] == "video/mp4"
        (tmp_path / f"{vid}.mp4").write_bytes(r.content)
        frames = read_frames(tmp_path / f"{vid}.mp4")
        fps = clip["fps"]
        first = int(np.ceil(parse_tc(clip["span"][0]) * fps - 1e-3))
        end = int(np.ceil(parse_tc(clip["span"][1]) * fps - 1e-3))
        assert first == round(0.5 * fps) and end - first == n and len(frames) == n + 2 * first
        lumas = [S.luma(border_colour(f)) for f in frames]
        for s in scenes:
            a, b = first + s["scene_cut"][0], first + s["scene_cut"][1]
            color, _, direction = S.parse_caption(s["caption"])
            assert seen_colour(frames[a:b]) == color, s
            assert seen_direction(frames[a:b]) == direction, s
            assert max(lumas[a:b]) - min(lumas[a:b]) < 12  # one background throughout the window
            assert abs(lumas[a - 1] - lumas[a]) > 60 and abs(lumas[b] - lumas[b - 1]) > 60  # cuts at both ends
    assert get(srv, "/metafiles/hdvg_7.json").status_code == 404
    assert get(srv, "/videos/nope.mp4").status_code == 404


def test_timecode_floors_to_the_millisecond():
    assert timecode(0.5) == "00:00:00.500"
    assert timecode(3725.0129) == "01:02:05.012"
    assert timecode(15 / (30000 / 1001)) == "00:00:00.500"  # 0.5005 s: frame 15 stays inside


def test_pexels_auth(srv):
    r = get(srv, "/videos/popular")
    assert r.status_code == 401 and "error" in r.json()
    assert "X-Ratelimit-Remaining" not in r.headers
    assert api(srv, "/videos/popular", key="wrong").status_code == 401
    assert api(srv, "/videos/popular", key=f"Bearer {KEY}").status_code == 401
    r = api(srv, "/videos/popular")
    assert r.status_code == 200 and len(r.json()["videos"]) == 5
    assert KEY not in r.text


def test_pexels_pagination(srv):
    ids, url, pages = [], "/videos/search?query=shapes&per_page=2", []
    while url:
        r = api(srv, url)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body)
        assert body["per_page"] == 2 and body["total_results"] == 5 and len(body["videos"]) <= 2
        ids += [v["id"] for v in body["videos"]]
        url = body["next_page"][len(srv.base_url) :] if "next_page" in body else None
        assert len(pages) < 10
    assert ids == [1000, 1001, 1002, 1003, 1004]
    assert [b["page"] for b in pages] == [1, 2, 3]
    assert "prev_page" not in pages[0] and "next_page" not in pages[-1]
    assert "page=2" in pages[2]["prev_page"] and "query=shapes" in pages[0]["next_page"]
    # per_page is capped, defaults to 15, and the /v1/ prefix is accepted
    body = api(srv, "/videos/popular?per_page=5").json()  # exactly one full page
    assert len(body["videos"]) == 5 and "next_page" not in body and "prev_page" not in body
    body = api(srv, "/videos/popular?per_page=500").json()
    assert body["per_page"] == PEXELS_MAX_PER_PAGE and "next_page" not in body
    assert api(srv, "/v1/videos/popular").json()["per_page"] == 15
    # past the last page: empty, with prev_page only
    body = api(srv, "/videos/popular?page=9&per_page=2").json()
    assert body["videos"] == [] and "next_page" not in body and "prev_page" in body
    # search: query required, vocabulary words filter
    r = api(srv, "/videos/search")
    assert r.status_code == 400 and "query" in r.json()["error"]
    assert api(srv, "/videos/search?query=nonsense&page=x").status_code == 400
    truth = {v["id"]: v["url"] for v in api(srv, "/videos/popular").json()["videos"]}
    colour = S.parse_caption(truth[1000])[0]
    found = api(srv, f"/videos/search?query={colour}").json()["videos"]
    assert 1000 in [v["id"] for v in found] and all(f"-{colour}-" in v["url"] for v in found)


def test_pexels_video_objects_and_files(srv, tmp_path):
    video = api(srv, "/videos/videos/1002").json()
    assert api(srv, "/v1/videos/videos/1002").json() == video
    assert api(srv, "/videos/videos/999").status_code == 404
    assert {"id", "width", "height", "url", "image", "duration", "user", "video_files", "video_pictures"} <= set(video)
    plan = S.plan_videos(srv.cfg, "pexels")[2]
    assert video["url"] == f"https://www.pexels.com/video/{plan.scenes[0].caption.replace(' ', '-')}-1002/"
    assert set(video["user"]) == {"id", "name", "url"} and isinstance(video["duration"], int)
    files = video["video_files"]
    assert sorted(f["quality"] for f in files) == ["hd", "sd", "uhd"]
    sizes = set()
    for f in files:
        assert f["file_type"] == "video/mp4" and f["link"].startswith(srv.base_url + "/video-files/1002/1002-")
        assert f["link"].endswith(f"-{f['quality']}_{f['width']}_{f['height']}_{f['fps']}fps.mp4")
        r = requests.get(f["link"], timeout=TIMEOUT)  # file links need no key
        assert r.status_code == 200 and len(r.content) == f["size"] == int(r.headers["Content-Length"])
        sizes.add(f["size"])
        (tmp_path / "f.mp4").write_bytes(r.content)
        info = probe_video(tmp_path / "f.mp4")
        assert (info.width, info.height, info.num_frames) == (f["width"], f["height"], plan.n_frames)
        assert seen_colour(read_frames(tmp_path / "f.mp4", [0, plan.n_frames - 1])) == plan.scenes[0].color
    assert len(sizes) == 3
    assert {f["width"] for f in files} == {srv.cfg.width, 2 * srv.cfg.width, 4 * srv.cfg.width}


def test_pexels_rate_limit_headers_and_budget(server_root):
    with SampleServer(server_root, small_cfg(), api_key=KEY, request_budget=3, retry_after=7) as s:
        assert get(s, "/videos/popular").status_code == 401  # unauthorised calls do not spend the budget
        remaining = []
        for _ in range(3):
            r = api(s, "/videos/popular?per_page=1")
            assert r.status_code == 200
            assert int(r.headers["X-Ratelimit-Limit"]) == 3
            assert int(r.headers["X-Ratelimit-Reset"]) > time.time()
            remaining.append(int(r.headers["X-Ratelimit-Remaining"]))
        assert remaining == [2, 1, 0]
        for path in ("/videos/popular", "/videos/search?query=x", "/videos/videos/1000"):
            r = api(s, path)
            assert r.status_code == 429 and r.json() == {"error": "Too Many Requests"}
            assert not any(h.lower().startswith("x-ratelimit") for h in r.headers)
            assert r.headers["Retry-After"] == "7"
        # files are not API calls: still served
        link = s.pexels_videos()[0]["video_files"][0]["link"]
        assert requests.get(link, timeout=TIMEOUT).status_code == 200
    with SampleServer(server_root, small_cfg(), api_key=KEY, request_budget=0) as s:
        r = api(s, "/videos/popular")
        assert r.status_code == 429 and "Retry-After" not in r.headers
        assert not any(h.lower().startswith("x-ratelimit") for h in r.headers)


def test_range_requests(srv):
    full = get(srv, "/videos/hdvg0000.mp4")
    body = full.content
    n = len(body)
    assert (
        full.status_code == 200
        and int(full.headers["Content-Length"]) == n
        and full.headers["Accept-Ranges"] == "bytes"
    )
    r = get(srv, "/videos/hdvg0000.mp4", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == body[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{n}" and r.headers["Content-Length"] == "100"
    r = get(srv, "/videos/hdvg0000.mp4", headers={"Range": f"bytes={n - 10}-"})
    assert r.status_code == 206 and r.content == body[-10:]
    r = get(srv, "/videos/hdvg0000.mp4", headers={"Range": "bytes=-25"})
    assert r.status_code == 206 and r.content == body[-25:]
    r = get(srv, "/videos/hdvg0000.mp4", headers={"Range": f"bytes={n}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{n}"
    r = get(srv, "/Inter4K.zip", headers={"Range": "bytes=0-3"})
    assert r.status_code == 206 and r.content == b"PK\x03\x04"
    assert [(e.status, e.range) for e in srv.requests_log if e.path == "/videos/hdvg0000.mp4"] == [
        (200, None),
        (206, "bytes=100-199"),
        (206, f"bytes={n - 10}-"),
        (206, "bytes=-25"),
        (416, f"bytes={n}-"),
    ]


def test_inter4k_redirect_and_zip(srv, tmp_path):
    r = get(srv, "/inter4KUHD", allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"] == srv.base_url + "/Inter4K.zip"
    r = get(srv, "/inter4KUHD")
    assert r.status_code == 200 and [h.status_code for h in r.history] == [302]
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    mp4s = [n for n in zf.namelist() if n.endswith(".mp4")]
    assert mp4s == ["Inter4K/60fps/UHD/1.mp4", "Inter4K/60fps/UHD/2.mp4"]
    assert all(n.startswith("Inter4K/") and ".." not in n for n in zf.namelist())
    plan = S.plan_videos(srv.cfg, "inter4k")[0]
    (tmp_path / "1.mp4").write_bytes(zf.read(mp4s[0]))
    info = probe_video(tmp_path / "1.mp4")
    assert info.num_frames == plan.n_frames  # the scenes only, no padding
    frames = read_frames(tmp_path / "1.mp4")
    start = 0
    for spec in plan.scenes:
        assert seen_colour(frames[start : start + spec.n_frames]) == spec.color
        start += spec.n_frames


def test_evil_zips(srv):
    def members(kind):
        r = requests.get(srv.evil_zip_route(kind), timeout=TIMEOUT)
        assert r.status_code == 200
        return {i.filename: i for i in zipfile.ZipFile(io.BytesIO(r.content)).infolist()}, len(r.content)

    m, _ = members("dotdot")
    assert "../evil.mp4" in m and "Inter4K/60fps/UHD/1.mp4" in m
    m, _ = members("absolute")
    assert "/abs/evil.mp4" in m
    m, _ = members("symlink")
    assert stat.S_ISLNK(m["Inter4K/60fps/UHD/8.mp4"].external_attr >> 16)
    m, size = members("bomb")
    assert m["Inter4K/60fps/UHD/9.mp4"].file_size >= 64 << 20 and size < 1 << 20
    m, _ = members("all")
    assert {"../evil.mp4", "/abs/evil.mp4", "Inter4K/60fps/UHD/8.mp4", "Inter4K/60fps/UHD/9.mp4"} <= set(m)
    with pytest.raises(ValueError):
        srv.evil_zip_route("nope")
    assert get(srv, "/evil/nope.zip").status_code == 404
    # set_zip replaces the real archive behind the redirect, None restores it
    srv.set_zip([("../up.mp4", b"x")])
    try:
        assert zipfile.ZipFile(io.BytesIO(get(srv, "/inter4KUHD").content)).namelist() == ["../up.mp4"]
    finally:
        srv.set_zip(None)
    assert "Inter4K/60fps/UHD/1.mp4" in zipfile.ZipFile(io.BytesIO(get(srv, "/inter4KUHD").content)).namelist()


def test_odd_listings(srv):
    srv.add_hdvg_entry("../escape", {"url": srv.base_url + "/videos/x.mp4", "clip": {}})
    srv.add_pexels_video({"id": "../../etc", "url": "https://www.pexels.com/video/x-1/", "video_files": []})
    try:
        assert "../escape" in get(srv, "/metafiles/hdvg_0.json").json()
        ids = [v["id"] for v in api(srv, "/videos/popular?per_page=80").json()["videos"]]
        assert ids[-1] == "../../etc" and len(ids) == 6
        url = srv.add_file("/custom/a.bin", b"0123456789")
        assert requests.get(url, headers={"Range": "bytes=2-4"}, timeout=TIMEOUT).content == b"234"
    finally:
        srv._extra_hdvg.clear()
        srv._extra_pexels.clear()


# ---------------------------------------------------------------- faults


def test_fault_reset(srv):
    n = len(get(srv, "/videos/hdvg0001.mp4").content)
    srv.inject("/videos/hdvg0001", "reset")
    with pytest.raises(requests.exceptions.RequestException, match="reset by peer"):  # an RST, not a FIN
        get(srv, "/videos/hdvg0001.mp4")
    srv.inject("/videos/hdvg0001", "reset", times=2)
    for _ in range(2):  # headers promise the whole body, then the connection dies
        with pytest.raises(requests.exceptions.RequestException):
            with get(srv, "/videos/hdvg0001.mp4", stream=True) as r:
                assert r.status_code == 200 and int(r.headers["Content-Length"]) == n
                r.content
    assert get(srv, "/videos/hdvg0001.mp4").status_code == 200  # consumed
    assert [e.status for e in srv.hits("/videos/hdvg0001.mp4")] == [200] * 5


def test_fault_truncate_then_resume(srv):
    body = get(srv, "/videos/hdvg0001.mp4").content
    srv.inject("/videos/hdvg0001", "truncate", at=1000)
    r = get(srv, "/videos/hdvg0001.mp4", stream=True)
    assert int(r.headers["Content-Length"]) == len(body)
    got = bytearray()
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead\\(1000 bytes read"):
        for chunk in r.iter_content(100):
            got += chunk
    assert 0 < len(got) <= 1000 and body.startswith(got)
    r = get(srv, "/videos/hdvg0001.mp4", headers={"Range": f"bytes={len(got)}-"})
    assert r.status_code == 206 and bytes(got) + r.content == body
    log = srv.hits("/videos/hdvg0001.mp4")
    assert [(e.status, e.range) for e in log] == [(200, None), (200, None), (206, f"bytes={len(got)}-")]
    # a truncated ranged response: 206 headers for the range, part of it sent
    srv.inject("/videos/hdvg0001", "truncate")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(srv, "/videos/hdvg0001.mp4", headers={"Range": "bytes=100-1099"})


def test_fault_status_codes_in_order(srv):
    srv.inject("/metafiles/", "503")
    srv.inject("/metafiles/", "500", times=2)
    srv.inject("/metafiles/", "404")
    srv.inject("/metafiles/", "429", retry_after=3, ratelimit_reset=1_900_000_000)
    srv.inject("/metafiles/", "429")
    seen = []
    for _ in range(7):
        r = get(srv, "/metafiles/hdvg_0.json")
        seen.append(r.status_code)
        if r.status_code == 429:
            assert r.json() == {"error": "Too Many Requests"}
            if len(seen) == 5:
                assert r.headers["Retry-After"] == "3" and r.headers["X-Ratelimit-Reset"] == "1900000000"
            else:
                assert "Retry-After" not in r.headers and "X-Ratelimit-Reset" not in r.headers
    assert seen == [503, 500, 500, 404, 429, 429, 200]
    assert [e.status for e in srv.requests_log] == seen
    assert srv.pending_faults() == 0
    # a fault on one prefix leaves other paths alone
    srv.inject("/videos/hdvg0000", "500")
    assert get(srv, "/videos/hdvg0001.mp4").status_code == 200
    assert get(srv, "/videos/hdvg0000.mp4").status_code == 500
    with pytest.raises(ValueError):
        srv.inject("/x", "explode")


def test_fault_corrupt_and_not_video(srv, tmp_path):
    body = get(srv, "/videos/hdvg0000.mp4").content
    srv.inject("/videos/hdvg0000", "corrupt")
    bad = get(srv, "/videos/hdvg0000.mp4")
    assert bad.status_code == 200 and len(bad.content) == len(body)
    assert bad.content[:1024] == body[:1024] and bad.content[1024:] != body[1024:]
    assert np.mean(np.frombuffer(bad.content[1024:], np.uint8) != np.frombuffer(body[1024:], np.uint8)) > 0.9
    srv.inject("/video-files/", "not_video")
    link = srv.pexels_videos()[0]["video_files"][0]["link"]
    r = requests.get(link, timeout=TIMEOUT)
    assert (
        r.status_code == 200 and r.headers["Content-Type"] == "video/mp4" and r.content.startswith(b"<!DOCTYPE html>")
    )
    (tmp_path / "x.mp4").write_bytes(r.content)
    with pytest.raises(ValueError):
        probe_video(tmp_path / "x.mp4")
    assert requests.get(link, timeout=TIMEOUT).content[4:8] == b"ftyp"


def test_fault_on_the_api_does_not_spend_the_budget(server_root):
    with SampleServer(server_root, small_cfg(), api_key=KEY, request_budget=1) as s:
        s.inject("/videos/popular", "503")
        assert api(s, "/videos/popular").status_code == 503
        assert api(s, "/videos/popular").status_code == 200
        assert api(s, "/videos/popular").status_code == 429


# ---------------------------------------------------------------- lifecycle


def test_cached_files_and_clean_shutdown(server_root):
    cfg = small_cfg()
    with SampleServer(server_root, cfg) as s:
        first = {p: p.stat().st_mtime_ns for p in s.dir.rglob("*.mp4")}
        base = s.base_url
        session = requests.Session()  # an idle keep-alive connection must not block shutdown
        assert session.get(base + "/metafiles/hdvg_0.json", timeout=TIMEOUT).status_code == 200
        t = time.monotonic()
    assert time.monotonic() - t < 5
    assert len(first) == 2 + 2 + 5 * 3
    with SampleServer(server_root, cfg) as again:  # the same config reuses the files
        assert {p: p.stat().st_mtime_ns for p in again.dir.rglob("*.mp4")} == first
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(base + "/metafiles/hdvg_0.json", timeout=2)
    with pytest.raises(RuntimeError):
        s.base_url
    with SampleServer(server_root, small_cfg(seed=4)) as other:
        assert other.dir != s.dir
