"""VideoClipDataset: Open-Sora v1.0 temporal sampling, resize + centre crop, row filtering."""

import numpy as np
import pytest
import torch
from PIL import Image
from soraflow.storage.data.dataset import VideoClipDataset, frame_indices, resize_crop
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import reject, write_manifest
from soraflow.storage.data.video_io import write_video

LEVEL0, STEP = 10, 6  # frame i is a flat grey of level 10 + 6 * i, so a decoded value names its index


def _level_video(path, n, h=48, w=64):
    levels = (LEVEL0 + STEP * np.arange(n)).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).copy()
    return write_video(path, frames, fps=10)


def _decoded_indices(video: torch.Tensor) -> list[int]:
    """(3, T, H, W) in [-1, 1] of flat grey frames -> the frame index each one came from."""
    levels = (video.mean(dim=(0, 2, 3)) + 1) / 2 * 255
    return [int(round((float(v) - LEVEL0) / STEP)) for v in levels]


def _row(path, clip_id, num_frames, text="a red circle moving left", **kw):
    return {"path": str(path), "text": text, "num_frames": num_frames, "height": 48, "width": 64, "fps": 10.0,
            "clip_id": clip_id, "video_id": clip_id.split(".")[0], "source": "pexels", "status": "ok", **kw}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = DataRoot(tmp_path_factory.mktemp("root"))
    clips = root.root / "clips"
    clips.mkdir()
    long = _level_video(clips / "long.mp4", 40)
    short = _level_video(clips / "short.mp4", 3)
    # a white 32x32 square in the middle of a black 64x96 frame, to check resize + crop
    box = np.zeros((2, 64, 96, 3), np.uint8)
    box[:, 16:48, 32:64] = 255
    boxed = write_video(clips / "box.mp4", box, fps=10)
    img = clips / "still.png"
    Image.fromarray(np.full((40, 60, 3), (200, 30, 90), np.uint8)).save(img)
    rows = [
        _row(long, "long.0", 40),
        _row(long, "long.1", None),  # num_frames unknown: probed
        _row(short, "short.0", 3),
        reject(_row(long, "bad.0", 40), "corrupt: moov atom not found"),
        _row(clips / "gone.mp4", "gone.0", 40),
        _row(long, "nocap.0", 40, text=""),
        _row(long, "range.0", 40, start_s=0.5, end_s=4.5),  # a split clip: start_s/end_s are lineage
        _row(boxed, "box.0", 2, height=64, width=96),
        _row(img, "still.0", 1, height=40, width=60),
    ]
    return write_manifest(rows, "score", root)


def test_frame_indices_hand_computed():
    class Begin0:
        def integers(self, low, high):
            assert (low, high) == (0, 52)  # begin in [0, 100 - 48 - 1]
            return 0

    # 16 frames at interval 3 over 100: linspace(0, 47, 16), step 47/15 = 3.133, truncated
    assert frame_indices(100, 16, 3, Begin0()) == [0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37, 40, 43, 47]
    # no rng: the centred window [26, 74)
    assert frame_indices(100, 16, 3) == [26, 29, 32, 35, 38, 41, 44, 47, 51, 54, 57, 60, 63, 66, 69, 73]
    # shorter than the window: spread over the whole clip
    assert frame_indices(20, 4, 8) == [0, 6, 12, 19]
    assert frame_indices(4, 4, 3) == [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = frame_indices(60, 4, 3, rng)
        assert 0 <= idx[0] <= 60 - 12 - 1 and idx[-1] - idx[0] == 11 and idx == sorted(idx)
    with pytest.raises(ValueError, match="fewer than num_frames"):
        frame_indices(3, 4, 1)


def test_resize_crop_covers_then_centres():
    x = torch.rand(2, 3, 30, 50)
    assert resize_crop(x, (16, 16)).shape == (2, 3, 16, 16)
    assert resize_crop(x, (20, 48)).shape == (2, 3, 20, 48)  # non-square target: both sides covered
    assert torch.equal(resize_crop(x, (30, 30)), x[..., :, 10:40])  # no resize needed: pure centre crop


def test_rows_filtered_with_reasons(data):
    ds = VideoClipDataset(data, num_frames=4, frame_interval=3, image_size=(32, 32))
    assert [r["clip_id"] for r in ds.rows] == ["long.0", "long.1", "range.0", "still.0"]
    assert len(ds) == 4 and ds.num_rejected == 1
    reasons = {s["clip_id"]: s["reason"] for s in ds.skipped}
    assert set(reasons) == {"short.0", "gone.0", "nocap.0", "box.0"}
    assert "too short: 3 frames < num_frames=4" in reasons["short.0"]
    assert "too short: 2 frames" in reasons["box.0"]
    assert "not found" in reasons["gone.0"] and "caption" in reasons["nocap.0"]
    # with num_frames=2 the short clip and the 2-frame box clip are both usable
    assert "short.0" in [r["clip_id"] for r in VideoClipDataset(data, 2, 1, 32).rows]


def test_items_shapes_range_and_centred_indices(data):
    ds = VideoClipDataset(data, num_frames=4, frame_interval=3, image_size=(32, 32), train=False)
    item = ds[0]
    assert set(item) == {"video", "text", "index", "clip_id"}
    v = item["video"]
    assert v.shape == (3, 4, 32, 32) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    assert item["text"] == "a red circle moving left" and item["index"] == 0 and item["clip_id"] == "long.0"
    # centred window of 12 frames in 40: begin 14, linspace(14, 25, 4) -> 14, 17, 21, 25
    assert ds.indices_for(0) == [14, 17, 21, 25]
    assert _decoded_indices(v) == [14, 17, 21, 25]
    assert _decoded_indices(ds[1]["video"]) == [14, 17, 21, 25]  # probed row: same file
    # start_s/end_s (the clip's place in its source video) do not cut the clip file again
    assert _decoded_indices(ds[2]["video"]) == [14, 17, 21, 25]


def test_resize_then_centre_crop(data):
    ds = VideoClipDataset(data, num_frames=2, frame_interval=1, image_size=(32, 32), train=False)
    box = ds[[r["clip_id"] for r in ds.rows].index("box.0")]["video"]  # 64x96 -> 32x48 -> crop 32x32
    white = (box[:, 0] > 0).all(dim=0)  # (32, 32)
    rows, cols = white.any(dim=1).nonzero().flatten(), white.any(dim=0).nonzero().flatten()
    # the 32x32 square becomes 16x16 in the middle; a squashing resize would make it 16 x 10.7
    assert abs(int(rows[0]) - 8) <= 1 and abs(int(rows[-1]) - 23) <= 1
    assert abs(int(cols[0]) - 8) <= 1 and abs(int(cols[-1]) - 23) <= 1
    assert box[:, :, :5, :5].max() < -0.9 and box[:, :, -5:, -5:].max() < -0.9


def test_image_rows(data):
    one = VideoClipDataset(data, num_frames=1, frame_interval=1, image_size=(16, 16))
    i = [r["clip_id"] for r in one.rows].index("still.0")
    v = one[i]["video"]
    assert v.shape == (3, 1, 16, 16)
    expected = torch.tensor([200, 30, 90]) / 255 * 2 - 1
    assert torch.allclose(v[:, 0, 8, 8], expected, atol=1e-3)
    many = VideoClipDataset(data, num_frames=4, frame_interval=3, image_size=(16, 16))
    v4 = many[[r["clip_id"] for r in many.rows].index("still.0")]["video"]
    assert v4.shape == (3, 4, 16, 16) and torch.equal(v4, v.repeat(1, 4, 1, 1))


def test_random_windows_are_seeded(data):
    a = VideoClipDataset(data, num_frames=4, frame_interval=3, image_size=(32, 32), seed=7)
    b = VideoClipDataset(data, num_frames=4, frame_interval=3, image_size=(32, 32), seed=7)
    assert [a.indices_for(k) for k in range(3)] == [b.indices_for(k) for k in range(3)]
    assert _decoded_indices(a[0]["video"]) == a.indices_for(0)
    epochs = set()
    for e in range(8):
        a.set_epoch(e)
        idx = a.indices_for(0)
        assert 0 <= idx[0] <= 40 - 12 - 1 and idx[-1] - idx[0] == 11
        epochs.add(tuple(idx))
    assert len(epochs) > 1  # a new window per epoch
    seeds = {tuple(VideoClipDataset(data, 4, 3, 32, seed=s).indices_for(0)) for s in range(8)}
    assert len(seeds) > 1


def test_dataloader_batches(data):
    ds = VideoClipDataset(data, num_frames=4, frame_interval=3, image_size=(32, 32))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["video"].shape == (2, 3, 4, 32, 32) and len(batch["text"]) == 2
    assert batch["clip_id"] == ["long.0", "long.1"]
