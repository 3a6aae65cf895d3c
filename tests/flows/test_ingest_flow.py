"""The ingest flow end to end on the loopback sample source: download -> split -> caption -> score.

Every scene the sample source generates has a known caption and known frame range (its seeded
plan, tasks/sample_world/scenes.py), so the final manifest can be checked exactly: one ok clip
per scene, cut at the planned frames, with its true caption, at the split config's fps and size.

The flow starts its own SampleServer (tasks.sample_world.plug.sample_source); `recorder` swaps in a subclass
that keeps every started server (for its request log) and queues faults on it as it starts.

Kill/restart: a run dies half-way (a task raises SimulatedCrash, a ValueError so Prefect does not
retry it: see tasks.task_policy.retry_unless_bad_input), then the same flow runs again on the
same data root: finished downloads are neither requested again nor rewritten, finished clips are
not re-encoded, and the final manifest holds each clip once.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import soraflow.flows.cli as cli
import soraflow.tasks.ingest.clip_cut as clip_cut
import soraflow.tasks.ingest.scene_split as scene_split
import soraflow.tasks.ingest.sources.pexels as pexels_download
import soraflow.tasks.sample_world.server as server_module
from rich.console import Console
from soraflow.flows.ingest import run_ingest
from soraflow.flows.params import RunParams
from soraflow.storage.faults import EnvironmentFault
from soraflow.storage.data.manifest import ok_rows, read_rows
from soraflow.storage.data.video_io import probe_video
from soraflow.tasks.sample_world.scenes import plan_videos
from typer.testing import CliRunner

SIZES = [
    "ingest.sample_source.seed=0",
    "ingest.sample_source.scenes_per_video=3",
    "ingest.sample_source.inter4k_videos=0",
    "ingest.sample_source.scene_seconds=2.0",
    "ingest.shard_size=4",
    "ingest.max_workers=2",
]
# The main run: 3 HD-VG videos x 3 scenes + 3 Pexels videos; one of each kind is made to fail.
MAIN = [*SIZES, "ingest.sample_source.hdvg_videos=3", "ingest.sample_source.pexels_videos=3"]
MAIN_FAULTS = [("/videos/hdvg0002.mp4", "not_video"), ("/video-files/1002/", "404")]
BROKEN = {"hdvg0002": "not a readable video", "1002": "HTTP 404"}  # video id -> what its rejected rows must say
# The restart runs: 2 HD-VG videos x 3 scenes + 2 Pexels videos = 8 rows, 2 split shards of 4.
SMALL = [*SIZES, "ingest.sample_source.hdvg_videos=2", "ingest.sample_source.pexels_videos=2"]


class SimulatedCrash(EnvironmentFault, ValueError):
    """The run dies here, as a killed process or a machine fault would: an EnvironmentFault, so no
    per-row guard records it as a rejected row, and a ValueError, so Prefect does not retry the
    task: the flow fails at once. (A real kill -9: tests/tasks/ingest/test_kill_resume.py.)"""


class Recorder:
    """Replaces SampleServer with a subclass that records each started server and injects `faults`."""

    def __init__(self, faults: list[tuple[str, str]] = ()):
        self.faults = list(faults)
        self.started: list[server_module.SampleServer] = []

    def install(self, mp: pytest.MonkeyPatch) -> "Recorder":
        recorder = self

        class RecordingServer(server_module.SampleServer):
            def __enter__(self):
                super().__enter__()
                for prefix, fault in recorder.faults:
                    self.inject(prefix, fault)
                recorder.started.append(self)
                return self

        # tasks.sample_world.plug.sample_source imports SampleServer from this module when it starts one
        mp.setattr(server_module, "SampleServer", RecordingServer)
        return self


def gets(server, prefix: str) -> list[str]:
    """Targets of the GET requests the server answered under `prefix`."""
    return [e.path for e in server.hits(prefix) if e.method == "GET"]


def params(data_root: Path, overrides: list[str]) -> RunParams:
    return RunParams(config="local", overrides=overrides, data_root=str(data_root))


def expected_clips(p: RunParams) -> dict[str, dict]:
    """clip_id -> what the final manifest must say about it, from the sample source's seeded plan."""
    cfg = p.load_config()
    src, split = cfg.ingest.sample_source, cfg.ingest.split
    assert (
        src.width >= src.height and (src.width * split.short_side) % src.height == 0
    ), "test assumes a landscape frame that scales to an integer width"
    size = (split.short_side, src.width * split.short_side // src.height)
    out: dict[str, dict] = {}

    def add(clip_id: str, video_id: str, source: str, first: int, scene) -> None:
        assert scene.n_frames <= split.max_seconds * src.fps, "test assumes no scene is truncated to max_seconds"
        out[clip_id] = {
            "video_id": video_id,
            "source": source,
            "text": scene.caption,
            "start_s": first / src.fps,
            "end_s": (first + scene.n_frames) / src.fps,
            "num_frames": round(scene.n_frames * split.fps / src.fps),
            "fps": split.fps,
            "size": size,
        }

    for plan in plan_videos(src, "hdvg"):
        first = 0  # frames counted from the span's first frame (the span covers exactly the scenes)
        for k, scene in enumerate(plan.scenes):
            add(f"{plan.video_id}.0_{k}", plan.video_id, "hdvg", first, scene)
            first += scene.n_frames
    for plan in plan_videos(src, "pexels"):  # one scene each; clip id = video id; caption = page slug
        add(str(plan.video_id), str(plan.video_id), "pexels", 0, plan.scenes[0])

    # the same truth the server itself reports (SampleServer.truth), without starting it
    truth = server_module.SampleServer(Path("/nonexistent"), src).truth()
    assert {
        k: v["text"] for k, v in out.items()
    } == truth, "the test's reading of the plan disagrees with SampleServer.truth()"
    return out


def assert_final_manifest(rows: list[dict], expected: dict[str, dict]) -> None:
    """Exactly one ok row per expected clip, none other, each true to the plan; no duplicates."""
    ok = [r for r in rows if r["status"] == "ok"]
    ids = Counter(r["clip_id"] for r in ok)
    paths = Counter(r["path"] for r in ok)
    assert not [k for k, n in ids.items() if n > 1], f"duplicate clip_id rows: {[k for k, n in ids.items() if n > 1]}"
    assert not [k for k, n in paths.items() if n > 1], f"duplicate path rows: {[k for k, n in paths.items() if n > 1]}"
    assert set(ids) == set(
        expected
    ), (
        f"ok clips differ from the planned scenes: missing {sorted(set(expected) - set(ids))}, "
        f"unexpected {sorted(set(ids) - set(expected))}"
    )
    for r in ok:
        want, cid = expected[r["clip_id"]], r["clip_id"]
        assert r["text"] == want["text"], f"{cid}: caption {r['text']!r}, true caption {want['text']!r}"
        assert r["caption_source"] == "source", f"{cid}: caption_source {r['caption_source']!r}"
        assert (r["video_id"], r["source"]) == (
            want["video_id"],
            want["source"],
        ), f"{cid}: video {r['video_id']!r} from {r['source']!r}, expected {want['video_id']!r} from {want['source']!r}"
        assert r["start_s"] == pytest.approx(want["start_s"], abs=1e-6) and r["end_s"] == pytest.approx(
            want["end_s"], abs=1e-6
        ), f"{cid}: cut at [{r['start_s']}, {r['end_s']}) s, the scene is [{want['start_s']}, {want['end_s']}) s"
        got = (r["num_frames"], r["fps"], (r["height"], r["width"]))
        assert got == (
            want["num_frames"],
            want["fps"],
            want["size"],
        ), f"{cid}: (frames, fps, (H, W)) = {got}, expected {(want['num_frames'], want['fps'], want['size'])}"
        assert r["flow"] is not None and r["flow"] > 0, f"{cid}: motion score {r['flow']!r}, every planned scene moves"


# ---------------------------------------------------------------- one full run (shared)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """One ingest run with one broken video per source: (params, result, recorder)."""
    p = params(tmp_path_factory.mktemp("ingest") / "data", MAIN)
    with pytest.MonkeyPatch.context() as mp:
        recorder = Recorder(MAIN_FAULTS).install(mp)
        result = run_ingest(p)
    assert len(recorder.started) == 1, f"the flow started {len(recorder.started)} sample servers, expected 1"
    return p, result, recorder


def test_every_scene_is_one_ok_clip_with_its_true_caption(main_run):
    p, result, _ = main_run
    expected = {cid: e for cid, e in expected_clips(p).items() if e["video_id"] not in BROKEN}
    assert len(expected) == 2 * 3 + 2, "test set-up: 2 good HD-VG videos x 3 scenes + 2 good Pexels videos"
    rows = read_rows(result["manifest"])
    assert_final_manifest(rows, expected)
    assert result["ok"] == len(expected), f"summary says {result['ok']} ok rows, expected {len(expected)}"
    for r in ok_rows(rows):  # the manifest describes the file that is there
        info = probe_video(r["path"])
        assert (info.num_frames, info.height, info.width) == (
            r["num_frames"],
            r["height"],
            r["width"],
        ), f"{r['path']}: file is {info}, manifest row says {r['num_frames']} frames {r['height']}x{r['width']}"
        assert info.fps == pytest.approx(8.0), f"{r['path']}: {info.fps} fps, expected 8"


def test_every_source_video_is_ok_or_rejected_with_a_reason(main_run):
    p, result, recorder = main_run
    cfg = p.load_config()
    videos = {str(v.video_id) for kind in ("hdvg", "pexels") for v in plan_videos(cfg.ingest.sample_source, kind)}
    rows = read_rows(result["manifest"])
    ok_ids = {r["video_id"] for r in rows if r["status"] == "ok"}
    rejected = [r for r in rows if r["status"] == "rejected"]
    missing = videos - ok_ids - {r["video_id"] for r in rejected}
    assert not missing, f"source videos with no row at all in the final manifest: {sorted(missing)}"
    assert all(
        r["error"] and r["error"].strip() for r in rejected
    ), f"rejected rows without a reason: {[r for r in rejected if not r['error']]}"
    assert ok_ids == videos - set(
        BROKEN
    ), f"videos with ok clips: {sorted(ok_ids)}, expected {sorted(videos - set(BROKEN))}"
    by_video = {
        vid: [r["error"] for r in rejected if r["video_id"] == vid] for vid in {r["video_id"] for r in rejected}
    }
    assert set(by_video) == set(
        BROKEN
    ), f"videos with rejected rows: {sorted(by_video)}, expected the broken ones {sorted(BROKEN)}"
    for vid, reason in BROKEN.items():
        assert all(
            reason in e for e in by_video[vid]
        ), f"{vid}: rejected rows should say {reason!r}, got {by_video[vid]}"
    hdvg_broken = [r for r in rejected if r["video_id"] == "hdvg0002"]
    assert sorted(r["clip_id"] for r in hdvg_broken) == [
        f"hdvg0002.0_{k}" for k in range(3)
    ], f"each scene of the broken HD-VG video is one rejected row: {[r['clip_id'] for r in hdvg_broken]}"
    assert (
        result["rejected"] == len(rejected) == 4
    ), f"summary says {result['rejected']} rejected rows, manifest has {len(rejected)}, expected 3 + 1"
    assert (
        recorder.started[0].pending_faults() == 0
    ), "an injected fault was never hit: the broken videos were not requested"
    for stage in ("download", "split", "caption", "score"):
        assert Path(
            result["stage_manifests"][stage]
        ).exists(), f"{stage} manifest {result['stage_manifests'][stage]} is missing"


# ---------------------------------------------------------------- kill and restart


def crash_download_of_second_pexels_video(mp: pytest.MonkeyPatch) -> None:
    """Pexels 1000 is fetched, then the shard dies before fetching 1001 (HD-VG finishes meanwhile)."""
    real = pexels_download.download_item

    def download_item(source, item, *args, **kwargs):
        if item.get("video_id") == "1001":
            raise SimulatedCrash("simulated crash while downloading Pexels 1001")
        return real(source, item, *args, **kwargs)

    mp.setattr(pexels_download, "download_item", download_item)


def crash_split_of_pexels_rows(mp: pytest.MonkeyPatch) -> None:
    """Split shard [0, 4) (HD-VG only) cuts its clips; shard [4, 8) (holding the Pexels rows) dies."""
    real = scene_split.split_rows

    def split_rows(rows, root, cfg):
        if any(r["source"] == "pexels" for r in rows):
            raise SimulatedCrash("simulated crash while splitting the Pexels rows")
        return real(rows, root, cfg)

    mp.setattr(scene_split, "split_rows", split_rows)


def file_ids(folder: Path) -> dict[str, tuple[int, int, int]]:
    """relative path -> (inode, mtime_ns, size) of every mp4 under folder."""
    return {
        str(f.relative_to(folder)): (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size)
        for f in sorted(folder.rglob("*.mp4"))
    }


@pytest.mark.parametrize(
    "crash", [crash_download_of_second_pexels_video, crash_split_of_pexels_rows], ids=["download", "split"]
)
def test_rerun_after_a_crash_resumes_without_refetching(crash, tmp_path, monkeypatch):
    data = tmp_path / "data"
    p = params(data, SMALL)
    recorder = Recorder().install(monkeypatch)

    with monkeypatch.context() as mp:
        crash(mp)
        with pytest.raises(SimulatedCrash):
            run_ingest(p)
    first = recorder.started[0]
    assert not (data / "manifests" / "score").exists(), "the crashed run still wrote a final manifest"
    raw_before, clips_before = file_ids(data / "raw"), file_ids(data / "clips")
    assert (
        len(gets(first, "/videos/hdvg")) == 2
    ), f"run 1 should fetch both full HD-VG videos: {gets(first, '/videos/hdvg')}"
    if crash is crash_download_of_second_pexels_video:
        assert sorted(raw_before) == [
            "hdvg/hdvg0000.0.mp4",
            "hdvg/hdvg0001.0.mp4",
            "pexels/1000.mp4",
        ], f"raw files after the crash: {sorted(raw_before)}"
        assert not clips_before, f"no clip can exist before the split stage: {sorted(clips_before)}"
    else:
        assert len(raw_before) == 4, f"every video is downloaded before the split crash: {sorted(raw_before)}"
        v = scene_split.split_variant(p.load_config().ingest.split)  # clips live under a hash of the split settings
        assert sorted(clips_before) == [
            f"hdvg/{v}/hdvg0000/hdvg0000.0_0.mp4",
            f"hdvg/{v}/hdvg0000/hdvg0000.0_1.mp4",
            f"hdvg/{v}/hdvg0000/hdvg0000.0_2.mp4",
            f"hdvg/{v}/hdvg0001/hdvg0001.0_0.mp4",
        ], f"split shard [0, 4) should have cut its 4 clips before the run died: {sorted(clips_before)}"

    result = run_ingest(p)  # the restart: same config, same data root, nothing patched
    assert len(recorder.started) == 2, "the restarted run should start its own sample server"
    second = recorder.started[1]
    assert gets(second, "/metafiles/") and gets(second, "/videos/search"), "the restarted run did not list the sources"
    assert (
        gets(second, "/videos/hdvg") == []
    ), f"finished HD-VG videos were downloaded again: {gets(second, '/videos/hdvg')}"
    refetched = gets(second, "/video-files/")
    if crash is crash_download_of_second_pexels_video:
        assert len(refetched) == 1 and refetched[0].startswith(
            "/video-files/1001/"
        ), f"only the unfinished Pexels 1001 should be fetched, got {refetched}"
    else:
        assert refetched == [], f"finished Pexels videos were downloaded again: {refetched}"

    raw_after, clips_after = file_ids(data / "raw"), file_ids(data / "clips")
    changed = [f for f in raw_before if raw_after.get(f) != raw_before[f]]
    assert not changed, f"raw files rewritten by the restart (inode, mtime or size changed): {changed}"
    recut = [f for f in clips_before if clips_after.get(f) != clips_before[f]]
    assert not recut, f"clips cut before the crash were encoded again: {recut}"
    assert len(clips_after) == 8, f"clip files after the restart: {sorted(clips_after)}"

    rows = read_rows(result["manifest"])
    assert_final_manifest(rows, expected_clips(p))
    assert (
        result["rejected"] == 0
    ), f"rejected rows after the restart: {[r['error'] for r in rows if r['status'] == 'rejected']}"


# ---------------------------------------------------------------- `soraflow stage split`


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    # a wide, plain console: rich would fold long paths at the default 80 columns
    monkeypatch.setattr(cli, "console", Console(width=1000, color_system=None, highlight=False, soft_wrap=True))
    return CliRunner()


def test_cli_stage_split_writes_the_split_manifest(main_run, runner):
    p, result, _ = main_run
    download = result["stage_manifests"]["download"]
    # another shard size: new task inputs (no Prefect cache hit), same rows in, so the same rows out
    args = ["stage", "split", "--manifest", download, "--root", p.data_root]
    for o in [*MAIN, "ingest.shard_size=5"]:
        args += ["--set", o]
    out = runner.invoke(cli.app, args)
    assert out.exit_code == 0, f"soraflow stage split exited {out.exit_code}:\n{out.output}\n{out.exception!r}"
    printed = set(re.findall(r"(/\S+/manifests/split/[0-9a-f]{16}\.parquet)", out.output))
    assert len(printed) == 1, f"expected one split manifest path in the output, found {printed}:\n{out.output}"
    manifest = printed.pop()
    assert Path(manifest).exists(), f"printed manifest {manifest} does not exist"
    assert (
        manifest == result["stage_manifests"]["split"]
    ), (
        f"the stage alone wrote {manifest}, "
        f"the flow's split stage wrote {result['stage_manifests']['split']} from the same input"
    )
    rows = read_rows(manifest)
    assert (
        len(ok_rows(rows)) == 8 and len(rows) == 12
    ), f"split manifest: {len(ok_rows(rows))} ok of {len(rows)} rows, expected 8 of 12"


def test_cli_stage_split_without_a_manifest_file_fails_clearly(tmp_path, runner):
    missing = tmp_path / "no-such-manifest.parquet"
    out = runner.invoke(cli.app, ["stage", "split", "--manifest", str(missing), "--root", str(tmp_path / "data")])
    assert out.exit_code != 0, f"a missing --manifest file exited 0:\n{out.output}"
    assert f"--manifest {missing}: no such file" in out.output, f"the error should name the missing file:\n{out.output}"
    assert "Traceback" not in out.output, f"a missing file should be a clear error, not a traceback:\n{out.output}"
    assert not (tmp_path / "data" / "manifests").exists(), "nothing should run when the input is missing"

    out = runner.invoke(cli.app, ["stage", "split", "--root", str(tmp_path / "data")])
    assert (
        out.exit_code != 0 and "needs --manifest" in out.output
    ), f"stage split with no --manifest: exit {out.exit_code}:\n{out.output}"


# ---------------------------------------------------------------- machine faults, locks, cached results


def test_disk_full_fails_the_run_clearly_and_caches_no_rejection(tmp_path, monkeypatch):
    """The clip writer hits ENOSPC: the run fails with one clear line, no clip becomes a rejected
    row, and the rerun (disk freed) cuts every clip. A cached shard whose clip files were deleted
    afterwards is made again rather than trusted."""
    import errno

    data = tmp_path / "data"
    p = params(data, SMALL)

    def full_disk(path, frames, fps, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as mp:
        mp.setattr(clip_cut, "encode_clip", full_disk)  # the clip writer of the scene cutter
        with pytest.raises(EnvironmentFault) as ei:
            run_ingest(p)
    msg = str(ei.value)
    assert "ENOSPC" in msg and "environment fault" in msg and "\n" not in msg, msg
    assert not (data / "manifests" / "split").exists(), "a split manifest was written while the disk was full"

    result = run_ingest(p)
    assert result["rejected"] == 0, [r["error"] for r in read_rows(result["manifest"]) if r["status"] == "rejected"]
    assert_final_manifest(read_rows(result["manifest"]), expected_clips(p))

    clips = sorted((data / "clips").rglob("*.mp4"))
    for f in clips:
        f.unlink()  # e.g. a cleanup; the cached split shards now point at nothing
    again = run_ingest(p)
    assert again["rejected"] == 0 and all(f.exists() for f in clips), "cached shard results outlived their clip files"


def test_second_ingest_on_a_root_is_refused_naming_the_holder(tmp_path):
    import os

    from soraflow.flows.ingest import ingest_lock
    from soraflow.storage.layout import DataRoot, LockHeldError

    data = tmp_path / "data"
    with ingest_lock(DataRoot(data)):
        with pytest.raises(LockHeldError, match=rf"held by PID {os.getpid()} on \S+ since \d{{4}}-"):
            run_ingest(params(data, SMALL))
    assert not (data / "manifests").exists()
