import json
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
from soraflow.storage.data.manifest import (
    ManifestError,
    dataset_version,
    lineage,
    new_row,
    ok_rows,
    read_rows,
    reject,
    shard_ranges,
    summarize,
    write_manifest,
)
from soraflow.storage.data.video_io import (
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
        new_row(
            path="/d/a.mp4",
            text="a red circle moving left",
            video_id="a",
            source="hdvg",
            num_frames=16,
            height=32,
            width=48,
            fps=8.0,
        ),
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
    assert [b - a for a, b in shard_ranges(len(rows), 4)] == [4, 4, 2]
    s = summarize(rows)
    assert (
        s["ok"] == 5
        and s["rejected"] == 5
        and s["ok_by_source"] == {"hdvg": 5}
        and s["reject_reasons"] == {"download failed": 5}
    )


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


# ----------------------------------------------------- hardening: ids, locks, redaction, duplicates, decode caps


def test_safe_id_uses_fullmatch_and_refuses_control_characters():
    from soraflow.storage.layout import UnsafePathError, safe_id

    for bad in ("77\n", "77\r\n", "a\x1bb", "a\x7f", "\n77", "", None, True, 1.5):
        with pytest.raises(UnsafePathError):
            safe_id(bad)
    assert safe_id("hdvg0000.0_1") == "hdvg0000.0_1"


def test_file_lock_names_the_holder_across_processes(tmp_path):
    import subprocess
    import sys

    from soraflow.storage.layout import LockHeldError, file_lock

    lock = tmp_path / "locks" / "ingest.lock"
    code = ("import sys, time; from soraflow.storage.layout import file_lock\n"
            "with file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(
            LockHeldError, match=rf"ingest here is held by PID {child.pid} on \S+ since 20\d\d-\d\d-\d\dT"
        ):
            with file_lock(lock, wait_s=0.2, what="ingest here"):
                pass
    finally:
        child.kill()
        child.wait()
    with file_lock(lock, wait_s=5):  # a killed holder leaves no stale lock: the kernel released it
        assert f"PID {os.getpid()} " in lock.read_text()


def test_redact_config_masks_secrets_everywhere():
    from soraflow.storage.redact import redact_config

    cfg = {
        "ingest": {
            "sources": [
                {"kind": "pexels", "url": "https://user:hunter2@api.example/v1?api_key=SEKRET&page=2", "query": "cats"}
            ],
            "http": {"secret_headers": ["X-Api-Key"], "max_bytes": 10, "allow_hosts": ["10.0.0.0/8"]},
        },
        "registry": {
            "tracking_uri": "postgresql://ml:pw123@db:5432/mlflow",
            "api_token": "tok-123",
            "password": "p",
            "token_path": "/x",
        },
        "note": "see https://a:b@h/x",
    }
    out = redact_config(cfg)
    text = json.dumps(out)
    for secret in ("hunter2", "SEKRET", "pw123", "tok-123", '"p"', "a:b@"):
        assert secret not in text, secret
    assert out["ingest"]["sources"][0]["query"] == "cats" and "page=2" in out["ingest"]["sources"][0]["url"]
    assert out["ingest"]["http"] == cfg["ingest"]["http"] and out["registry"]["token_path"] == "/x"
    assert cfg["registry"]["api_token"] == "tok-123"  # a copy: the input is untouched


def test_lineage_is_redacted(tmp_path):
    from soraflow.storage.data.manifest import lineage

    root = DataRoot(tmp_path)
    path = write_manifest([new_row(video_id="v", source="pexels", status="rejected", error="x")], "download", root,
                          extra={"source": "https://u:secretpw@h/x?token=tok-SECRET-42"})
    assert "secretpw" not in json.dumps(lineage(path)) and "tok-SECRET-42" not in json.dumps(lineage(path))


def test_mark_duplicates_keeps_the_first_ok_row():
    from soraflow.storage.data.manifest import mark_duplicates

    rows = [
        new_row(video_id="1", source="pexels", path="/a"),
        new_row(video_id="1", source="pexels", path="/a"),
        new_row(video_id="2", source="hdvg", clip_id="c", path="/b"),
        new_row(video_id="2", source="hdvg", clip_id="c", path="/c"),
        new_row(video_id="2", source="hdvg", clip_id="d", path="/d"),
    ]
    out, n = mark_duplicates(rows)
    assert n == 2 and [r["status"] for r in out] == ["ok", "rejected", "ok", "rejected", "ok"]
    assert "row 0" in out[1]["error"] and "row 2" in out[3]["error"]


def test_clip_paths_are_keyed_by_the_split_settings(tmp_path):
    from soraflow.configs.schema import SplitConfig
    from soraflow.tasks.ingest.scene_split import split_variant

    root = DataRoot(tmp_path)
    a, b = split_variant(SplitConfig()), split_variant(SplitConfig(fps=24.0))
    assert a != b and a == split_variant(SplitConfig())
    assert root.clip("hdvg", "v", "c", variant=a) != root.clip("hdvg", "v", "c", variant=b)


def test_decode_caps_before_allocation(tmp_path, monkeypatch):
    import soraflow.storage.data.video_io as vio

    with pytest.raises(vio.VideoError, match="aspect ratio"):
        vio.check_geometry("x.mp4", 2, 4096)
    with pytest.raises(vio.VideoError, match="pixels"):
        vio.check_geometry("x.mp4", 10000, 10000)
    with pytest.raises(vio.VideoError, match="longer than"):
        vio.check_geometry("x.mp4", 64, 96, fps=30.0, num_frames=30 * 3600 * 25)
    with pytest.raises(vio.VideoError, match="GiB"):
        vio.check_decode_bytes("x.mp4", 100_000, 1080, 1920)
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    path = vio.write_video(tmp_path / "v.mp4", frames, 8.0)
    monkeypatch.setattr(vio, "MAX_DECODE_BYTES", 16 * 16 * 3 * 4)  # room for 4 frames
    assert vio.read_frames(path, [0, 1, 2, 3]).shape == (4, 16, 16, 3)
    with pytest.raises(vio.VideoError, match="over the limit"):
        vio.read_frames(path)  # all 8: refused as they are counted, not after
    with pytest.raises(vio.VideoError, match="over the limit"):
        vio.read_frames(path, list(range(6)))
