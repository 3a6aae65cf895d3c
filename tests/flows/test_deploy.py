"""The deployments end to end, as a user runs them: a real `prefect server start` on 127.0.0.1,
`soraflow serve` in a subprocess, `prefect deployment run 'soraflow-pipeline/scheduled-pipeline' --watch`,
then the run's state, artifacts and the dataset event's triggered retrain through the Prefect API,
and the scheduler's own runs of the cron schedule (brought forward through the API, not waited for).

All loopback (the sample source is served on 127.0.0.1 by the ingest flow), with a tiny config
so the whole pipeline runs in about a minute or two on 2 CPU cores. One server and one `soraflow
serve` serve the whole module; the tests run in file order on it.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect_server import ChildProcess, PrefectServer, tail, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # each test bounds its own waits well below this

REPO = Path(__file__).resolve().parents[2]
CRON = "17 3 * * *"  # not the default, so the test sees that --cron reaches the deployment
DATASET_EVENT = "soraflow.dataset.updated"

# Small enough for a couple of minutes on 2 busy cores; every key is checked by configs/schema.py.
TINY = [
    "ingest.sample_source.hdvg_videos=2",
    "ingest.sample_source.pexels_videos=2",
    "text_encoder.tiny.d_model=32",
    "text_encoder.tiny.num_layers=1",
    "text_encoder.tiny.d_ff=64",
    "vae.fit.steps=3",
    "vae.fit.batch_size=4",
    "train.steps=4",
    "train.num_workers=0",
    "train.batch_size=2",
    "train.log_every=2",
    "train.ckpt_every=4",
    "train.val_fraction=0.2",
    "scheduler.num_sampling_steps=5",
    "eval.num_prompts=2",
]


class Stack:
    """The server, the `soraflow serve` child and the data root; `diagnostics()` for failure messages."""

    def __init__(self, server: PrefectServer, serve: ChildProcess, root: Path):
        self.server, self.serve, self.root = server, serve, root
        self.deployments: dict[str, object] = {}

    def diagnostics(self) -> str:
        return f"{self.serve.tail()}\n--- prefect server log (tail):\n{tail(self.server.log, 2000)}"

    @contextlib.contextmanager
    def explained(self):
        """Print the serve and server log tails when the block fails (pytest shows them with the failure)."""
        try:
            yield
        except BaseException:
            print(self.diagnostics())
            raise


def _soraflow() -> list[str]:
    script = Path(sys.executable).with_name("soraflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "soraflow.flows.cli"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy")
    root = base / "data"
    with PrefectServer(base / "prefect") as server:
        env = server.env()
        env.pop("SORAFLOW_HOME", None)
        # one torch thread per flow-run process: the pipeline's training and the retrain it triggers
        # run side by side, and on 2 busy cores oversubscribed threads make both crawl
        env.update(PYTHONUNBUFFERED="1", PREFECT_RUNNER_POLL_FREQUENCY="1", OMP_NUM_THREADS="1")
        argv = [*_soraflow(), "serve", "--config", "local", "--root", str(root), "--cron", CRON]
        for item in TINY:
            argv += ["--set", item]
        with ChildProcess(argv, env, base / "serve.log", cwd=REPO) as serve:
            s = Stack(server, serve, root)
            with s.explained(), server.client() as client:

                def both_deployments():
                    if not serve.alive():
                        raise AssertionError("soraflow serve exited")
                    return {
                        name: client.read_deployment_by_name(name)
                        for name in ("soraflow-pipeline/scheduled-pipeline", "soraflow-train/retrain-on-new-data")
                    }

                try:
                    s.deployments = wait_for(
                        "soraflow serve to create both deployments", both_deployments, timeout=180, interval=1
                    )
                except TimeoutError:
                    if not serve.alive():
                        raise AssertionError(f"soraflow serve exited with {serve.proc.returncode}") from None
                    raise
            yield s


@pytest.fixture(scope="module")
def pipeline_run(stack):
    """Run the pipeline deployment once with the CLI, as the README shows; returns (flow run id, CLI output)."""
    script = Path(sys.executable).with_name("prefect")
    prefect = [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]
    t0 = time.monotonic()
    with stack.explained():
        proc = subprocess.run(
            [
                *prefect,
                "deployment",
                "run",
                "soraflow-pipeline/scheduled-pipeline",
                "--watch",
                "--watch-timeout",
                "360",
            ],
            env=stack.server.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
        out = proc.stdout + proc.stderr
        found = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert found, f"no flow run id in the CLI output:\n{out[-3000:]}"
        assert proc.returncode == 0, f"`prefect deployment run --watch` exited {proc.returncode}:\n{out[-4000:]}"
    print(f"pipeline deployment run took {time.monotonic() - t0:.0f} s")
    return UUID(found.group(1)), out


def _table(artifact) -> list[dict]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def _artifacts_by_key(client, flow_run_ids: list[UUID]) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
    return {a.key: a for a in arts if a.key}


def _subflow_ids(client, parent: UUID) -> dict[str, UUID]:
    """Subflow runs of `parent`, by flow name."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
    )
    names = {f.id: f.name for f in (client.read_flow(r.flow_id) for r in {r.flow_id: r for r in runs}.values())}
    return {names[r.flow_id]: r.id for r in runs}


# ----------------------------------------------------------------------------- tests


def test_serve_creates_deployments_with_schedule_trigger_and_limits(stack):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    with stack.explained(), stack.server.client() as client:
        pipeline = stack.deployments["soraflow-pipeline/scheduled-pipeline"]
        retrain = stack.deployments["soraflow-train/retrain-on-new-data"]

        # the cron schedule from --cron, active
        crons = [s.schedule.cron for s in pipeline.schedules if getattr(s.schedule, "cron", None)]
        assert crons == [CRON], pipeline.schedules
        assert all(s.active for s in pipeline.schedules)
        assert not retrain.schedules, "the retrain deployment runs on the dataset event, not on a schedule"

        # one run at a time per deployment
        for dep in (pipeline, retrain):
            assert dep.global_concurrency_limit is not None, f"{dep.name}: no concurrency limit"
            assert dep.global_concurrency_limit.limit == 1, dep.global_concurrency_limit
            strategy = (
                dep.concurrency_options.collision_strategy
                if dep.concurrency_options
                else ConcurrencyLimitStrategy.ENQUEUE
            )
            assert strategy == ConcurrencyLimitStrategy.ENQUEUE

        # parameters carry the config reference, the overrides and the data root
        for dep in (pipeline, retrain):
            params = dep.parameters["params"]
            assert params["config"] == "local" and params["overrides"] == TINY
            assert Path(params["data_root"]).resolve() == stack.root.resolve()

        # the dataset trigger is an automation on the retrain deployment
        # (serve creates it just after the deployment itself: wait for it rather than race it)
        automations = wait_for(
            "the retrain trigger's automation",
            lambda: client.read_resource_related_automations(f"prefect.deployment.{retrain.id}"),
            timeout=60,
            interval=1,
        )
        triggers = [a.trigger for a in automations if a.enabled]
        assert len(triggers) == 1, automations
        trigger = triggers[0]
        assert trigger.expect == {DATASET_EVENT}
        assert trigger.match.model_dump().get("prefect.resource.id") == "soraflow.dataset.local"
        assert trigger.match.model_dump().get("soraflow.retrain") == "true", "only new versions nobody trains yet"
        actions = [a for a in automations if a.enabled][0].actions
        assert len(actions) == 1 and actions[0].type == "run-deployment" and actions[0].deployment_id == retrain.id
        assert actions[0].parameters["manifest"] == "{{ event.payload.manifest }}"
        assert not client.read_resource_related_automations(
            f"prefect.deployment.{pipeline.id}"
        ), "the pipeline has no trigger"

        # the global slot every training run takes
        gcl = client.read_global_concurrency_limit_by_name("soraflow-training")
        assert gcl.limit == 1 and gcl.active


def test_pipeline_deployment_run_completes_with_artifacts(stack, pipeline_run):
    flow_run_id, cli_out = pipeline_run
    assert "Completed" in cli_out
    with stack.explained(), stack.server.client() as client:
        run = client.read_flow_run(flow_run_id)
        assert run.state.is_completed(), run.state
        assert run.deployment_id == stack.deployments["soraflow-pipeline/scheduled-pipeline"].id
        assert run.parameters["params"]["overrides"] == TINY

        subflows = _subflow_ids(client, flow_run_id)
        assert set(subflows) == {"soraflow-ingest", "soraflow-train"}, subflows
        for sub in subflows.values():
            assert client.read_flow_run(sub).state.is_completed()
        arts = _artifacts_by_key(client, [flow_run_id, *subflows.values()])
        assert {"ingest-manifests", "manifest-statistics", "eval-metrics", "mlflow-run", "registered-model"} <= set(
            arts
        ), sorted(arts)
        assert re.search(
            r"\(http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\)$", arts["mlflow-run"].data
        ), arts["mlflow-run"].data
        assert "mlflow.pyfunc.load_model" in arts["registered-model"].data

        # ingest: one row per stage, each an existing manifest under the data root
        stages = _table(arts["ingest-manifests"])
        assert [row["stage"] for row in stages] == ["download", "split", "caption", "score"]
        for row in stages:
            path = Path(row["manifest"])
            assert path.is_file() and stack.root.resolve() in path.resolve().parents, row
        # HD-VG lists one row per scene (2 videos x 3 scenes) + 2 single-scene Pexels videos;
        # every scene becomes one clip with its source caption, and none is rejected
        print("ingest-manifests:", stages)
        assert [(row["rows"], row["ok"]) for row in stages] == [(8, 8)] * 4, stages
        assert arts["ingest-manifests"].flow_run_id == subflows["soraflow-ingest"]

        stats = {row["statistic"]: row["value"] for row in _table(arts["manifest-statistics"])}
        assert int(stats["ok"]) == stages[-1]["ok"], stats
        assert stages[-1]["manifest"] in arts["manifest-statistics"].description

        # train: the metrics table and the registered version's summary
        metrics = {row["metric"]: row["value"] for row in _table(arts["eval-metrics"])}
        assert int(float(metrics["steps"])) == 4, metrics
        assert "adherence_all" in metrics and 0.0 <= float(metrics["adherence_all"]) <= 1.0, metrics
        assert arts["eval-metrics"].flow_run_id == subflows["soraflow-train"]
        card = arts["registered-model"].data
        assert re.search(r"## soraflow-local v\d+", card), card
        model_dir = re.search(r"model folder: `([^`]+)`", card).group(1)
        assert Path(model_dir).is_dir() and stack.root.resolve() in Path(model_dir).resolve().parents, card


def _dataset_events(stack) -> list[dict]:
    page = stack.server.post(
        "/events/filter", {"filter": {"event": {"name": [DATASET_EVENT]}, "order": "ASC"}, "limit": 20}
    )
    return sorted(page["events"], key=lambda e: e["occurred"])


def test_dataset_event_triggers_retrain_on_a_new_manifest(stack, pipeline_run):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from soraflow.storage.data.manifest import dataset_version

    flow_run_id, _ = pipeline_run
    retrain = stack.deployments["soraflow-train/retrain-on-new-data"]
    with stack.explained(), stack.server.client() as client:
        ingest_id = _subflow_ids(client, flow_run_id)["soraflow-ingest"]
        final_manifest = _table(_artifacts_by_key(client, [ingest_id])["ingest-manifests"])[-1]["manifest"]

        def retrain_runs():
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain.id])))

        # 1. The pipeline's own ingest announces its dataset but trains on it itself: no retrain
        #    (checked below, once the standalone ingest has run: by then its trigger had ample time).
        events = wait_for(
            "the pipeline's dataset event to be stored", lambda: _dataset_events(stack), timeout=60, interval=1
        )
        assert len(events) == 1, events
        event = events[0]
        assert event["resource"]["prefect.resource.id"] == "soraflow.dataset.local"
        assert event["resource"]["soraflow.retrain"] == "false", event["resource"]
        assert event["payload"]["manifest"] == final_manifest
        assert event["payload"]["dataset_version"] == dataset_version(final_manifest)
        assert any(r.get("prefect.resource.id") == f"prefect.flow-run.{ingest_id}" for r in event["related"]), event[
            "related"
        ]

        # 2. A standalone ingest that finds more data publishes a new version: one retrain run on it.
        argv = [*_soraflow(), "ingest", "--config", "local", "--root", str(stack.root)]
        for item in [*TINY, "ingest.sample_source.pexels_videos=3"]:
            argv += ["--set", item]
        proc = subprocess.run(argv, env=stack.server.env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        events = wait_for(
            "the standalone ingest's event", lambda: (e := _dataset_events(stack))[1:] and e, timeout=60, interval=1
        )
        assert len(events) == 2, events
        new = events[1]
        new_manifest = new["payload"]["manifest"]
        assert new["resource"]["soraflow.retrain"] == "true" and new["payload"]["new_version"] is True, new
        assert new_manifest != final_manifest and Path(new_manifest).exists()

        runs = wait_for("a run of train/retrain-on-new-data", retrain_runs, timeout=60, interval=1)
        _settle(events[0])  # automations act within a second or two on loopback; the pipeline's event is long past that
        runs = retrain_runs()
        assert len(runs) == 1, [
            (r.name, r.state_name, r.parameters.get("manifest")) for r in runs
        ]  # none for step 1's event
        run = runs[0]
        assert run.parameters["manifest"] == new_manifest
        assert (
            run.parameters["params"] == stack.deployments["soraflow-pipeline/scheduled-pipeline"].parameters["params"]
        )

        # 3. Publishing a version already seen starts nothing. (The repeat ingest runs while the
        #    retrain trains: the published-version marker, not the retrain, decides that it is old.)
        repeat_log = stack.root.parent / "repeat-ingest.log"  # a file, not a pipe nobody reads meanwhile
        with open(repeat_log, "w") as log:
            repeat = subprocess.Popen(
                argv, env=stack.server.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True
            )
        try:

            def finished():
                r = client.read_flow_run(run.id)
                return r if r.state.is_final() else None

            done = wait_for(f"retrain run {run.name} to finish", finished, timeout=300, interval=1)
            assert done.state.is_completed(), done.state
            artifacts = _artifacts_by_key(client, [run.id])
            metrics = {row["metric"]: row["value"] for row in _table(artifacts["eval-metrics"])}
            assert int(float(metrics["steps"])) == 4, metrics
            assert new_manifest in artifacts["eval-metrics"].description
            assert re.search(r"## soraflow-local v\d+", artifacts["registered-model"].data), artifacts[
                "registered-model"
            ].data

            repeat.wait(timeout=300)
        finally:
            if repeat.poll() is None:
                repeat.kill()
        assert repeat.returncode == 0, tail(repeat_log)
        events = wait_for(
            "the repeated ingest's event", lambda: (e := _dataset_events(stack))[2:] and e, timeout=60, interval=1
        )
        assert events[2]["payload"]["manifest"] == new_manifest, "same data, same dataset version"
        assert events[2]["resource"]["soraflow.retrain"] == "false"
        _settle(events[2])
        assert len(retrain_runs()) == 1


SETTLE_S = 10.0  # what an automation gets to act on an event before "it started nothing" is believed


def _settle(event: dict) -> None:
    """Sleep until SETTLE_S have passed since `event` occurred (usually they already have)."""
    import datetime

    occurred = datetime.datetime.fromisoformat(event["occurred"].replace("Z", "+00:00"))
    age = (datetime.datetime.now(datetime.timezone.utc) - occurred).total_seconds()
    time.sleep(max(0.0, SETTLE_S - age))


def test_scheduled_runs_follow_the_cron_complete_and_queue_behind_each_other(stack):
    """The scheduler (not a person) creates the pipeline's runs from the declared cron; a scheduled
    run completes, and the next one, due while the first is still running, waits instead of
    running beside it.

    The cron fires at 03:17, so rather than wait for it the test brings the scheduler's own first
    two runs forward through Prefect's API (a Scheduled state due now: what a run looks like when
    its time has come) and `soraflow serve` picks them up as it would at 03:17. So that the first
    run is surely still running when the second comes due, the test holds the global training slot
    `soraflow-training` until the second has been turned away: the first run waits at its training
    step, as it would behind any other training run. (Last in the module: it holds the slot, and
    on the data the tests before it ingested and trained, the first run finds its work done.)
    """
    import datetime
    from zoneinfo import ZoneInfo

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Cancelling, Scheduled

    dep = stack.deployments["soraflow-pipeline/scheduled-pipeline"]
    (schedule,) = [s.schedule for s in dep.schedules]
    tz = ZoneInfo(schedule.timezone or "UTC")
    with stack.explained(), stack.server.client() as client:

        def runs():
            found = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            return sorted(found, key=lambda r: r.expected_start_time)

        def scheduled_ahead():
            ahead = [r for r in runs() if r.auto_scheduled and r.state.is_scheduled()]
            return ahead if len(ahead) >= 2 else None

        first, second = wait_for("the scheduler to create the cron's runs", scheduled_ahead, timeout=120, interval=1)[
            :2
        ]
        for r in (first, second):  # at the cron's times: 03:17 in the schedule's time zone, a day apart
            at = r.expected_start_time.astimezone(tz)
            assert (at.hour, at.minute, at.second) == (3, 17, 0), (schedule, at)
        assert second.expected_start_time - first.expected_start_time == datetime.timedelta(days=1)

        def due_now(run):
            client.set_flow_run_state(
                run.id, Scheduled(scheduled_time=datetime.datetime.now(datetime.timezone.utc)), force=True
            )

        with (
            temporary_settings(updates={PREFECT_API_URL: stack.server.api_url}),
            concurrency("soraflow-training", occupy=1, strict=True),
        ):
            due_now(first)
            wait_for(
                f"scheduled run {first.name} to start",
                lambda: client.read_flow_run(first.id).state.is_running(),
                timeout=240,
                interval=1,
                explain=stack.serve.tail,
            )  # a flow-run process may take a minute to start on busy cores
            due_now(second)

            def second_turned_away():
                r = client.read_flow_run(second.id)
                assert (
                    not r.state.is_running() and not r.state.is_pending()
                ), f"a second run runs beside the first: {r.state}"
                return r.state.name == "AwaitingConcurrencySlot"

            wait_for(
                "the second run to be turned away",
                second_turned_away,
                timeout=150,
                interval=1,
                explain=stack.serve.tail,
            )
            assert client.read_flow_run(first.id).state.is_running()
        # slot released: the first run trains and completes; the second has waited all along
        done = wait_for(
            f"scheduled run {first.name} to finish",
            lambda: (r := client.read_flow_run(first.id)).state.is_final() and r,
            timeout=400,
            interval=1,
            explain=stack.serve.tail,
        )
        assert done.state.is_completed(), done.state
        assert done.auto_scheduled and done.parameters == dep.parameters
        history = client.read_flow_run_states(second.id)
        names = [s.name for s in history]
        assert (
            "AwaitingConcurrencySlot" in names
        ), names  # the deployment's limit held it back, the runner did not start it
        assert not any(s.is_running() and s.timestamp < done.end_time for s in history), names
        # The second run would start now: cancel it rather than run a whole second pipeline on 2 cores.
        state = client.read_flow_run(second.id).state
        if state.is_scheduled():
            client.set_flow_run_state(second.id, Cancelled(), force=True)
        elif not state.is_final():  # it has just started: the runner stops it on Cancelling
            client.set_flow_run_state(second.id, Cancelling(), force=True)
            wait_for(
                f"run {second.name} to be cancelled",
                lambda: client.read_flow_run(second.id).state.is_final(),
                timeout=120,
                interval=1,
            )
