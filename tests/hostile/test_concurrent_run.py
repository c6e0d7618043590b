"""13.4: two runs of one config at once: the second fails at once with one line naming the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from glm.core.runlock import run_lock
from tests.hostile.conftest import cli, error_lines


def test_a_second_cli_run_fails_at_once_with_one_line_and_exit_2(holder):
    run, proc = holder
    # --stage export: were the lock not taken, this would fail differently (exit 1, no fine-tuned model)
    done = cli("run", "configs/tiny.yaml", "--stage", "export", "--set", f"run_dir={run}", timeout=60)
    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert f"is in use by pid {proc.pid} on host " in line and line.endswith("wait for it or stop it")
    assert "Traceback" not in done.stderr and "prefect" not in done.stderr.lower()  # refused before Prefect started
    assert not (run / "logs").exists()  # and before anything was written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with run_lock(run):  # no stale lock after the holder was killed
        pass


def test_the_plain_runner_takes_the_lock_too(holder):
    from glm import stages
    from glm.core.config import load_config
    from glm.core.runlock import RunDirBusy

    run, proc = holder
    with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
        stages.run_pipeline(load_config("configs/tiny.yaml", [f"run_dir={run}"]), "data")
    assert sorted(os.listdir(run)) == [".lock"]


FLOW_ALONE = """
import sys
from glm_pipeline.flows.pipeline import data_flow
from glm.core.config import load_config
data_flow(load_config("configs/tiny.yaml", ["name=second", "run_dir=" + sys.argv[1]]))
"""


def test_a_flow_run_without_the_cli_takes_the_lock(holder, server):
    """As a served or deployed flow runs: the flow function itself, in its own process, against a server."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from tests.integration.server import ROOT, client_of

    run, proc = holder
    done = subprocess.run(
        [sys.executable, "-c", FLOW_ALONE, str(run)], cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=300
    )
    assert (
        done.returncode != 0 and f"RunDirBusy: run directory {os.path.realpath(run)} is in use by pid {proc.pid}" in done.stderr
    )
    assert sorted(os.listdir(run)) == [".lock"]  # no stage ran
    with client_of(server) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["second"])))
    assert flow_run.state.name == "Failed" and f"pid {proc.pid}" in flow_run.state.message
