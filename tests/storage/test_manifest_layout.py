import os

import numpy as np
import pytest
from soraflow.storage.layout import (
    DataRoot,
    UnsafePathError,
    atomic_output,
    safe_id,
    safe_join,
)
from soraflow.storage.manifest import (
    ManifestError,
    dataset_version,
    lineage,
    new_row,
    ok_rows,
    read_rows,
    reject,
    shards,
    summarize,
    write_manifest,
)
from soraflow.storage.video_io import (
    VideoError,
    probe_video,
    read_frames,
    write_gif,
    write_video,
)


@pytest.mark.parametrize("bad", ["../x", "a/b", "/etc/passwd", "..", ".hidden", "", "a" * 200, "x\x00y", "a..b"])
def test_safe_id_refuses(bad):
    with pytest.raises(UnsafePathError):
        safe_id(bad)


def test_safe_join_stays_inside(tmp_path):
    assert safe_join(tmp_path, "a", "b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, "..", "x")
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, "/etc/passwd")


def test_data_root_layout(tmp_path):
    root = DataRoot(tmp_path)
    assert root.clip("hdvg", "vid", "vid.0_1") == tmp_path.resolve() / "clips/hdvg/vid/vid.0_1.mp4"
    assert root.raw("pexels", "123") == tmp_path.resolve() / "raw/pexels/123.mp4"
    with pytest.raises(UnsafePathError):
        root.raw("pexels", "../../evil")


def test_data_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SORAFLOW_HOME", str(tmp_path))
    assert DataRoot().root == tmp_path.resolve()


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []


def _rows():
    return [
        new_row(path="/d/a.mp4", text="a red circle moving left", video_id="a", source="hdvg", num_frames=16, height=32, width=48, fps=8.0),
        reject(new_row(path="/d/b.mp4", video_id="b", source="pexels"), "download failed: 404"),
    ]


def test_write_read_roundtrip_and_version(tmp_path):
    root = DataRoot(tmp_path)
    p = write_manifest(_rows(), "split", root, inputs=["in.parquet"], config_hash="abc")
    rows = read_rows(p)
    assert [r["status"] for r in rows] == ["ok", "rejected"]
    assert rows[0]["aspect_ratio"] == pytest.approx(32 / 48) and rows[0]["resolution"] == 32 * 48
    assert p.stem == dataset_version(p)
    meta = lineage(p)
    assert meta["stage"] == "split" and meta["inputs"] == ["in.parquet"] and meta["config_hash"] == "abc"
    # same rows -> same file; different rows -> different version
    assert write_manifest(_rows(), "split", root) == p
    assert write_manifest(_rows()[:1], "split", root) != p
    assert len(ok_rows(p)) == 1


def test_validation_names_row_and_column(tmp_path):
    root = DataRoot(tmp_path)
    with pytest.raises(ManifestError, match=r"row 1: column 'num_frames'"):
        write_manifest([_rows()[0], new_row(path="x", video_id="c", source="hdvg", num_frames=-3)], "s", root)
    with pytest.raises(ManifestError, match=r"row 0: column 'status'"):
        write_manifest([new_row(path="x", video_id="c", source="hdvg", status="maybe")], "s", root)
    with pytest.raises(ManifestError, match=r"rejected row has no 'error'"):
        write_manifest([new_row(video_id="c", source="hdvg", status="rejected")], "s", root)
    with pytest.raises(ManifestError, match="unknown manifest column"):
        new_row(colour="red")


def test_damaged_manifest_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="bad.parquet: not a readable Parquet"):
        read_rows(bad)


def test_shards_and_summary():
    rows = _rows() * 5
    assert [len(s) for s in shards(rows, 4)] == [4, 4, 2]
    s = summarize(rows)
    assert s["ok"] == 5 and s["rejected"] == 5 and s["ok_by_source"] == {"hdvg": 5} and s["reject_reasons"] == {"download failed": 5}


def test_video_roundtrip(tmp_path):
    frames = np.zeros((12, 31, 45, 3), np.uint8)
    for t in range(12):
        frames[t, :, : 3 * t + 3] = (200, 40, 40)
    p = write_video(tmp_path / "v.mp4", frames, fps=12)
    info = probe_video(p)
    assert (info.num_frames, info.height, info.width, info.fps) == (12, 32, 46, 12.0)  # padded to even
    sel = read_frames(p, [0, 11])
    assert sel.shape == (2, 32, 46, 3)
    assert sel[1, 10, 30, 0] > 150 and sel[0, 10, 30, 0] < 60  # the bar grew
    gif = write_gif(tmp_path / "v.gif", frames, fps=12, scale=2)
    assert gif.read_bytes()[:3] == b"GIF"


def test_corrupt_video_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with pytest.raises(VideoError, match="bad.mp4"):
        probe_video(bad)
    with pytest.raises(VideoError, match="missing or empty"):
        probe_video(tmp_path / "none.mp4")
