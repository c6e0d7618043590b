"""A crash of the training subprocess is retried and resumes from its checkpoint (issue 12.5): the real
`glm-pipeline run --stage pretrain` against a real Prefect server, with glm.train's fault-injection hook
(GLM_TRAIN_CRASH_AFTER_STEP) raising an uncaught exception once, after checkpoint 4 of 6."""

from __future__ import annotations

import subprocess

import pytest

from glm import stages
from tests.integration.runs import ROOT, cli_run, copy_run, data_stage
from tests.integration.server import client_of


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    return data_stage(tmp_path_factory.mktemp("data") / "run")


def test_a_crashed_training_subprocess_is_retried_and_resumes_from_its_checkpoint(server, data_run, tmp_path):
    run_dir = copy_run(data_run, tmp_path / "run")
    cmd = cli_run(
        run_dir,
        "crash-once",
        "orchestration.train_in_process=false",
        "orchestration.retries=1",
        "orchestration.retry_delay_seconds=0",
    )
    env = {**server.env, "OMP_NUM_THREADS": "1", "GLM_TRAIN_CRASH_AFTER_STEP": "4"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]

    paths = stages.RunPaths(run_dir)
    stats = stages.read_manifest(paths.pretrain / "manifest.json")["stats"]
    assert stats["resumed_from"] == 4 and stats["step"] == 6 and stats["checkpoint"] == "checkpoints/step-000006"
    assert (paths.pretrain / ".crash-injected-4").is_file()  # the hook fired (once)

    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    with client_of(server) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["crash-once"])))
        assert flow_run.state.name == "Completed"
        [pretrain] = [
            t
            for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
            if t.name == "pretrain-crash-once"
        ]
        history = [s.name for s in sorted(client.read_task_run_states(pretrain.id), key=lambda s: s.timestamp)]
        messages = [r.message for r in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))]
    assert pretrain.run_count == 2 and pretrain.state.name == "Completed"
    assert history[-3:] == ["AwaitingRetry", "Retrying", "Completed"], history
    log = "\n".join(messages)
    assert "injected crash after step 4" in log and "training process crashed (exit code 1" in log
    assert "resuming from" in log and "(step 4)" in log
