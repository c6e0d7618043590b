"""Issue 26 item 8: the Prefect server dies mid-run and stays down. The run finishes its stages and
ends at once with one line (not minutes of retries), and the flow run it leaves `Running` in the API
is marked Crashed by the next run in the same run directory, once a server is back.

Real processes: a `prefect server start`, `glm-pipeline run` training in-process. The CLI is frozen
(SIGSTOP) once it has written a checkpoint, the server is stopped, then the CLI is let go (SIGCONT):
the API dies in the middle of training, never after a run that already finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.integration.runs import ROOT, cli_run, copy_run, data_stage
from tests.integration.server import client_of, prefect_server


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    return data_stage(tmp_path_factory.mktemp("data") / "run")


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_dead_server_ends_the_run_with_one_line_and_the_next_run_marks_the_ghost(data_run, tmp_path):
    run = copy_run(data_run, tmp_path / "run")
    home = tmp_path / "server"  # both servers share it: the second one has the first one's database
    cmd = cli_run(run, "ghost", "pretrain.steps=30", "pretrain.checkpoint_every=5", "pretrain.eval_every=10")
    with prefect_server(home) as first:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=first.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: any((run / "pretrain" / "checkpoints").glob("step-*")), proc)
            os.kill(proc.pid, signal.SIGSTOP)
        except BaseException:
            proc.kill()
            raise
    # the server is stopped; the run goes on without it
    os.kill(proc.pid, signal.SIGCONT)
    try:
        out, err = proc.communicate(timeout=150)  # it lived on for 3+ minutes before, then took 2-3.5 to exit
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run was still alive 150 s after its API died:\n{proc.communicate()[1][-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("glm-pipeline: every stage finished, but the Prefect API at http://127.0.0.1:"), last
    assert f"the next run in {run} marks its flow run Crashed" in last
    assert (run / "pretrain" / "manifest.json").is_file()  # the stage finished
    ghost = json.loads((run / ".flow-run.json").read_text())["id"]

    with prefect_server(home) as second:
        with client_of(second) as client:
            assert client.read_flow_run(ghost).state.type.value == "RUNNING"  # what the API shows until then
        again = subprocess.run(cmd, cwd=ROOT, env=second.env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        with client_of(second) as client:
            state = client.read_flow_run(ghost).state
            assert state.type.value == "CRASHED" and "the Prefect API was unreachable" in state.message
            newer = json.loads((run / ".flow-run.json").read_text())["id"]
            assert newer != ghost and client.read_flow_run(newer).state.type.value == "COMPLETED"
