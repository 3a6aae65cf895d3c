"""Training progress: rank 0's progress.json reaches a watcher in the driver (the Prefect progress artifact)."""

import time

from soraflow.tasks.train.progress import read_progress, watch_progress, write_progress


def test_watcher_sees_each_new_progress_once(tmp_path):
    seen = []
    assert read_progress(tmp_path) is None
    with watch_progress(tmp_path, seen.append, every_s=0.02):
        for step in (5, 10):
            write_progress(tmp_path, step, 10, 1.0 / step, 12.5)
            deadline = time.monotonic() + 5
            while (not seen or seen[-1]["step"] != step) and time.monotonic() < deadline:
                time.sleep(0.01)
    assert [p["step"] for p in seen] == [5, 10]
    assert seen[-1] == {"step": 10, "total": 10, "loss": 0.1, "samples_per_s": 12.5}


def test_a_failing_update_never_stops_the_watcher(tmp_path, capsys):
    calls = []

    def flaky(p):
        calls.append(p["step"])
        raise RuntimeError("API down")

    with watch_progress(tmp_path, flaky, every_s=0.02):
        write_progress(tmp_path, 1, 2, 0.5, 1.0)
        time.sleep(0.2)
        write_progress(tmp_path, 2, 2, 0.4, 1.0)
        time.sleep(0.2)
    assert calls == [1, 2] and "progress update failed: API down" in capsys.readouterr().out
