"""One deployment definition: prefect.yaml is generated from flows/deploy.py (what `soraflow serve`
serves), and a process work pool runs the pipeline deployment from prefect.yaml end to end.

The slow test does what the README tells a user: `prefect work-pool create --type process`,
`prefect deploy --all`, `prefect worker start --pool ...` (all via `sys.executable -m prefect`
against a real `prefect server start` on 127.0.0.1), then runs the pipeline deployment on a tiny
config and reads its artifacts through the API.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect_server import ChildProcess, PrefectServer, tail, wait_for
from soraflow.flows.deploy import PREFECT_YAML, build_deployments, prefect_yaml
from soraflow.flows.params import RunParams

REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_is_generated_from_the_deployment_definitions():
    assert (
        PREFECT_YAML.read_text() == prefect_yaml()
    ), "prefect.yaml is stale: run `python -m soraflow.flows.deploy --write-yaml`"


def test_serve_and_prefect_yaml_define_the_same_deployments():
    params = RunParams()
    served = {d.name: d for d in build_deployments(params)}
    declared = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert set(served) == set(declared) == {"scheduled-pipeline", "retrain-on-new-data"}
    for name, dep in declared.items():
        ran = served[name]
        assert ran.parameters == dep["parameters"] and ran.description == dep["description"]
        assert sorted(ran.tags) == sorted(dep["tags"]) and ran.concurrency_limit == dep["concurrency_limit"] == 1
        assert ran.entrypoint.split(":")[-1] == dep["entrypoint"].split(":")[-1], (ran.entrypoint, dep["entrypoint"])
        assert [s.schedule.cron for s in ran.schedules or []] == [s["cron"] for s in dep.get("schedules", [])]
        assert len(ran.triggers or []) == len(dep.get("triggers", []))
        for trig, spec in zip(ran.triggers or [], dep.get("triggers", [])):
            assert trig.match.model_dump() == spec["match"] and sorted(trig.expect) == spec["expect"]
            assert trig.parameters == spec["parameters"]
    trigger = declared["retrain-on-new-data"]["triggers"][0]
    assert trigger["match"]["prefect.resource.id"] == "soraflow.dataset.local", "the exact dataset, not a wildcard"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_process_work_pool_runs_the_pipeline_deployment_from_prefect_yaml(tmp_path):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from test_deploy import TINY

    root = tmp_path / "data"
    with PrefectServer(tmp_path / "prefect") as server:
        env = {**server.env(), "SORAFLOW_REPO": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.pop("SORAFLOW_HOME", None)
        prefect = [sys.executable, "-m", "prefect"]

        def cli(*args: str) -> str:
            proc = subprocess.run([*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
            assert (
                proc.returncode == 0
            ), f"prefect {' '.join(args)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
            return proc.stdout + proc.stderr

        cli("work-pool", "create", "soraflow", "--type", "process")
        cli("--no-prompt", "deploy", "--all")
        with server.client() as client:
            dep = client.read_deployment_by_name("soraflow-pipeline/scheduled-pipeline")
            assert dep.work_pool_name == "soraflow" and [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
            client.read_deployment_by_name("soraflow-train/retrain-on-new-data")
            params = {"config": "local", "overrides": TINY, "data_root": str(root)}
            run = client.create_flow_run_from_deployment(dep.id, parameters={"params": params})

        # the worker starts elsewhere: the deployment's pull step changes into $SORAFLOW_REPO
        worker_cwd = tmp_path / "worker"
        worker_cwd.mkdir()
        with ChildProcess(
            [*prefect, "worker", "start", "--pool", "soraflow", "--limit", "1"],
            env,
            tmp_path / "worker.log",
            cwd=worker_cwd,
        ) as worker:
            with server.client() as client:

                def finished():
                    if not worker.alive():
                        raise AssertionError(f"the worker exited\n{worker.tail()}")
                    r = client.read_flow_run(run.id)
                    return r if r.state.is_final() else None

                try:
                    done = wait_for("the pipeline deployment run", finished, timeout=600, interval=1)
                except BaseException:
                    print(worker.tail(), tail(server.log, 2000))
                    raise
                assert done.state.is_completed(), f"{done.state}\n{worker.tail()}"
                subs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
                )
                names = {client.read_flow(r.flow_id).name for r in subs}
                assert names == {"soraflow-ingest", "soraflow-train"}, names
                arts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[run.id, *[r.id for r in subs]])
                    )
                )
                by_key = {a.key: a for a in arts if a.key}
                assert {"ingest-manifests", "eval-metrics", "mlflow-run", "registered-model"} <= set(by_key), sorted(
                    by_key
                )
                assert "/runs/" in by_key["mlflow-run"].data and "soraflow-local v1" in by_key["registered-model"].data
                # the train flow created the global training slot itself (prefect deploy does not)
                limit = client.read_global_concurrency_limit_by_name("soraflow-training")
                assert limit.limit == 1
    assert (root / "registry" / "mlflow.db").is_file()
