"""Against a real Prefect server process on loopback: a stage flow run by `glm-pipeline run` in another
process is visible, with its task runs and artifacts, through the server's API; `prefect deploy --all`
registers the deployments of prefect.yaml."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.flows.conftest import SMALL

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200 and json.loads(r.read()) is True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1:<free port> with its own PREFECT_HOME; always stopped."""
    tmp_path = tmp_path_factory.mktemp("server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_API_URL": url}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(480):  # up to 2 minutes on a busy machine
            if _healthy(url):
                break
            try:
                proc.wait(timeout=0.25)  # waits, and notices at once if the server died
                log_text = (tmp_path / "server.log").read_text()[-3000:]
                pytest.fail(f"the Prefect server exited with code {proc.returncode}:\n{log_text}")
            except subprocess.TimeoutExpired:
                pass
        else:
            pytest.fail(f"the Prefect server did not become healthy:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        yield url, env
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_a_stage_flow_run_by_the_cli_is_visible_through_the_server_api(prefect_server, tmp_path):
    url, env = prefect_server
    run_dir = tmp_path / "run"
    overrides = [*SMALL, "quality.enabled=false", "name=served", f"run_dir={run_dir}"]
    cmd = [sys.executable, "-m", "glm.cli", "run", "configs/tiny.yaml", "--stage", "data"]
    for o in overrides:
        cmd += ["--set", o]
    done = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run_dir / "infill" / "manifest.json").is_file()

    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["served"])))
        assert [(r.name, r.state.name) for r in runs] == [("served", "Completed")]
        flow = client.read_flow(runs[0].flow_id)
        assert flow.name == "glm-data"
        ids = FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id]))
        names = {t.name for t in client.read_task_runs(flow_run_filter=ids)}
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
    assert {"ingest-served", "train-tokenizer-served", "close-span-corruption-served", "tokenize-train/part-00000"} <= names
    assert {"served-corpus-statistics", "served-tokenizer-summary", "served-token-statistics"} <= {a.key for a in found}


def test_prefect_deploy_registers_the_deployments_of_prefect_yaml(prefect_server):
    url, env = prefect_server
    for cmd in (["work-pool", "create", "glm-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        done = subprocess.run([sys.executable, "-m", "prefect", *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        flows = {f.id: f.name for f in client.read_flows()}
    assert set(deployments) == {"nightly", "nightly-data", "tiny-smoke"}
    nightly = deployments["nightly"]
    assert flows[nightly.flow_id] == "glm-pipeline" and flows[deployments["nightly-data"].flow_id] == "glm-data"
    assert nightly.work_pool_name == "glm-process"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["config"]["name"] == "nightly" and nightly.parameters["continue_steps"] == 2000
