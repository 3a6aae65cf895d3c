"""`export_opensora_csv`: the headerless path,text,num_frames CSV Open-Sora v1.0's DatasetFromCSV reads,
and the csv source reads it back."""

from __future__ import annotations

import csv

import pytest
from footage import copy_real
from soraflow.configs.schema import HttpConfig, SourceConfig
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import new_row, write_manifest
from soraflow.tasks.export import export_opensora_csv
from soraflow.tasks.ingest.sources import download_items, list_items


@pytest.fixture()
def manifest(tmp_path):
    clips = tmp_path / "clips"
    a = copy_real("bikes.mp4", clips / "a.mp4")
    b = copy_real("carphone_pristine.mp4", clips / "sub" / "b.mp4")
    rows = [
        new_row(
            path=str(a),
            text="cyclists racing,\nfast",
            num_frames=250,
            clip_id="a",
            video_id="a",
            source="folder",
            status="ok",
        ),
        new_row(
            path=str(clips / "x.mp4"),
            clip_id="x",
            video_id="x",
            source="folder",
            status="rejected",
            error="not a video",
        ),
        new_row(
            path=str(b),
            text="a man on the phone",
            num_frames=120,
            clip_id="b",
            video_id="b",
            source="folder",
            status="ok",
        ),
    ]
    return write_manifest(rows, "score", DataRoot(tmp_path / "data")), clips


def test_opensora_csv_columns_and_paths(manifest, tmp_path):
    path, clips = manifest
    got = export_opensora_csv(path, tmp_path / "out" / "train.csv")
    assert got["rows"] == 2 and got["skipped"] == 1
    with open(tmp_path / "out" / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    # Open-Sora v1.0: no header; path, caption, num_frames (DatasetFromCSV reads columns 0 and 1)
    assert rows == [
        [str(clips / "a.mp4"), "cyclists racing, fast", "250"],
        [str(clips / "sub" / "b.mp4"), "a man on the phone", "120"],
    ]
    export_opensora_csv(path, tmp_path / "rel.csv", root=clips)
    with open(tmp_path / "rel.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["a.mp4", "sub/b.mp4"]
    with pytest.raises(ValueError, match="is not under --root"):
        export_opensora_csv(path, tmp_path / "bad.csv", root=clips / "sub")


def test_csv_source_reads_the_export_back(manifest, tmp_path):
    path, clips = manifest
    http = HttpConfig(max_retries=0)
    root = DataRoot(tmp_path / "data2")
    for out, base in ((tmp_path / "abs.csv", None), (clips / "rel.csv", clips)):
        export_opensora_csv(path, out, root=base)
        source = SourceConfig(kind="csv", path=str(out))
        rows = download_items(source, list_items(source, http, root), root, http)
        assert [(r["status"], r["path"], r["text"], r["num_frames"]) for r in rows] == [
            ("ok", str(clips / "a.mp4"), "cyclists racing, fast", 250),
            ("ok", str(clips / "sub" / "b.mp4"), "a man on the phone", 120),
        ]
