"""Against a real Prefect server process on loopback: a stage flow run by `glm-pipeline run` in another
process is visible, with its task runs and artifacts, through the server's API; `prefect deploy --all`
registers the deployments of prefect.yaml."""

from __future__ import annotations

import subprocess
import sys

from tests.flows.conftest import SMALL
from tests.integration.server import ROOT, client_of


def test_a_stage_flow_run_by_the_cli_is_visible_through_the_server_api(server, tmp_path):
    env = server.env
    run_dir = tmp_path / "run"
    overrides = [*SMALL, "quality.enabled=false", "name=served", f"run_dir={run_dir}"]
    cmd = [sys.executable, "-m", "glm.cli", "run", "configs/tiny.yaml", "--stage", "data"]
    for o in overrides:
        cmd += ["--set", o]
    done = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run_dir / "infill" / "manifest.json").is_file()

    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
    )

    with client_of(server) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["served"])))
        assert [(r.name, r.state.name) for r in runs] == [("served", "Completed")]
        flow = client.read_flow(runs[0].flow_id)
        assert flow.name == "glm-data"
        ids = FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id]))
        names = {t.name for t in client.read_task_runs(flow_run_filter=ids)}
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
    assert {"ingest-served", "train-tokenizer-served", "close-span-corruption-served", "tokenize-train/part-00000"} <= names
    assert {"served-corpus-statistics", "served-tokenizer-summary", "served-token-statistics"} <= {a.key for a in found}


def test_prefect_deploy_registers_the_deployments_of_prefect_yaml(server):
    env = server.env
    for cmd in (["work-pool", "create", "glm-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        done = subprocess.run([sys.executable, "-m", "prefect", *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with client_of(server) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        flows = {f.id: f.name for f in client.read_flows()}
    assert set(deployments) == {"nightly", "nightly-data", "tiny-smoke"}
    nightly = deployments["nightly"]
    assert flows[nightly.flow_id] == "glm-pipeline" and flows[deployments["nightly-data"].flow_id] == "glm-data"
    assert nightly.work_pool_name == "glm-process"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["config"]["name"] == "nightly" and nightly.parameters["continue_steps"] == 2000
