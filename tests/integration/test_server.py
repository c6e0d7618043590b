"""Against a real Prefect server process on loopback: a stage flow run by `glm-pipeline run` in another
process is visible, with its task runs and artifacts, through the server's API; `glm-pipeline deploy`
registers the deployments of prefect.yaml from the checkout and a real process worker runs one."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.flows.conftest import SMALL
from tests.integration.server import ROOT, client_of


def test_a_stage_flow_run_by_the_cli_is_visible_through_the_server_api(server, tmp_path):
    env = server.env
    run_dir = tmp_path / "run"
    overrides = [*SMALL, "quality.enabled=false", "name=served", f"run_dir={run_dir}"]
    cmd = [sys.executable, "-m", "glm_pipeline.flows.cli", "run", "configs/tiny.yaml", "--stage", "data"]
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
    assert {"ingest-served", "train-tokenizer-served", "close-infill-served", "tokenize-train/part-00000"} <= names
    assert {"served-corpus-statistics", "served-tokenizer-summary", "served-token-statistics"} <= {a.key for a in found}


def test_glm_pipeline_deploy_from_a_checkout_and_a_process_worker_runs_tiny_smoke(server, tmp_path):
    """The README's way on a fresh server: `glm-pipeline deploy` (work pool + `prefect deploy --all`),
    then `prefect worker start --pool glm-process` runs tiny-smoke, reading configs/tiny.yaml."""
    from glm_pipeline.flows.deploy import ensure_process_pool
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    env = server.env
    done = subprocess.run(
        [sys.executable, "-m", "glm_pipeline.flows.cli", "deploy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "created the process work pool 'glm-process'" in done.stdout

    with client_of(server) as client:
        assert not ensure_process_pool("glm-process")  # a second deploy leaves the pool alone
        assert client.read_work_pool("glm-process").type == "process"
        deployments = {d.name: d for d in client.read_deployments() if d.name in ("nightly", "nightly-data", "tiny-smoke")}
        flows = {f.id: f.name for f in client.read_flows()}
        assert set(deployments) == {"nightly", "nightly-data", "tiny-smoke"}
        nightly = deployments["nightly"]
        assert flows[nightly.flow_id] == "glm-pipeline" and flows[deployments["nightly-data"].flow_id] == "glm-data"
        assert {d.work_pool_name for d in deployments.values()} == {"glm-process"}
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        assert nightly.parameters["config"]["name"] == "nightly" and nightly.parameters["continue_steps"] == 2000
        # runs start in the directory the deployment was made from (here the checkout, /app in the image)
        pull = deployments["tiny-smoke"].pull_steps
        assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert deployments["tiny-smoke"].parameters == {"config": {"file": "configs/tiny.yaml"}}

        run_dir = tmp_path / "run"
        config = json.dumps({"file": "configs/tiny.yaml", "set": [*SMALL, f"run_dir={run_dir}"]})
        done = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "glm-pipeline/tiny-smoke", "--param", f"config={config}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        [run] = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployments["tiny-smoke"].id]))
        )
        # started elsewhere: the deployment's pull step, not the worker's directory, finds the code
        worker = subprocess.run(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "glm-process", "--type", "process", "--run-once"],
            cwd=tmp_path,
            env={**env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        run = client.read_flow_run(run.id)
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker.stdout[-4000:]}{worker.stderr[-4000:]}"
        assert worker.returncode == 0, worker.stderr[-4000:]
        assert run.name == "tiny"  # the config read from configs/tiny.yaml names the run
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert (run_dir / "export" / "bundle" / "model.onnx").is_file()
    assert any(entry.name.startswith("glm.") for entry in logs)
