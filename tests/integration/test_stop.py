"""Stopping `glm-pipeline run` (issue 12.10): SIGTERM, or Ctrl-C (SIGINT to the whole process group), ends
the run cleanly: exit code 143/130, one line saying how to resume, no process left behind (Prefect's
ephemeral uvicorn server, a training subprocess), the flow run Crashed in the API, and the same command
run again resumes from the last checkpoint. orchestration.timeout_minutes stops a run the same way.

Real processes throughout. A tiny run trains a step in milliseconds, so the process that trains is
frozen (SIGSTOP) once it has written a checkpoint, signalled, then let go (SIGCONT): the signal lands in
the middle of training, never after a run that already finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from glm import stages
from tests.integration.runs import ROOT, cli_run, copy_run, data_stage
from tests.integration.server import client_of, prefect_server

STEPS = 200
RESUME_LINE = "re-run the same command to resume from the last checkpoint"


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    return data_stage(tmp_path_factory.mktemp("data") / "run")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> dict[int, str]:
    """pid's live descendant processes: pid -> command line."""
    tree, found, todo = _children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return found


def alive(pid: int, cmdline: str) -> bool:
    """The process still runs (not a zombie, and not a new process that reused the pid)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        now = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and now == cmdline


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The run in its own process group, as a terminal's foreground job; stdout and stderr to files
    (a pipe nobody reads while waiting would fill and stall it)."""
    with open(log.with_suffix(".out"), "w") as out, open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for the run to exit (kill its group if it does not); its stderr."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text()


def wait_for(condition, what: str, timeout: float = 300.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


def trained_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines[:-1] if line.strip()]  # the last line may be half-written
    return max(steps, default=0)


def ephemeral_env(home: Path) -> dict[str, str]:
    """No PREFECT_API_URL: the run starts Prefect's ephemeral server, its database under home/prefect-home."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {
        **env,
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.parametrize(
    "sig, to_group, in_process",
    [
        (signal.SIGTERM, False, True),  # `kill PID`, in-process training
        (signal.SIGINT, True, False),
    ],  # Ctrl-C in a terminal (the whole foreground group), a training subprocess
    ids=["sigterm-in-process", "ctrl-c-subprocess"],
)
def test_a_signal_stops_the_run_cleanly_and_the_same_command_resumes(data_run, tmp_path, sig, to_group, in_process):
    run_dir = copy_run(data_run, tmp_path / "run")
    name = f"stopped-{sig.name.lower()}"
    cmd = cli_run(
        run_dir,
        name,
        f"pretrain.steps={STEPS}",
        "pretrain.eval_every=1000",
        "pretrain.log_every=50",
        f"orchestration.train_in_process={str(in_process).lower()}",
    )
    log = tmp_path / "stopped.log"
    proc = start(cmd, ephemeral_env(tmp_path), log)
    sent = None
    try:
        wait_for(lambda: trained_steps(run_dir) >= 3, "training passed checkpoint 2", proc=proc, log=log)
        running = descendants(proc.pid)
        trainer = proc.pid if in_process else next(p for p, c in running.items() if "glm.train" in c)
        os.kill(trainer, signal.SIGSTOP)
        try:
            assert any("uvicorn" in c for c in running.values()), running  # the ephemeral server
            (os.killpg if to_group else os.kill)(proc.pid, sig)
            sent = time.monotonic()
        finally:
            os.kill(trainer, signal.SIGCONT)
    finally:
        stderr = finish(proc, log, timeout=120)
    print(f"{sig.name} -> exit: {time.monotonic() - sent:.2f} s")  # a figure for the record, not asserted
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert [line for line in stderr.splitlines() if RESUME_LINE in line] == [
        f"glm-pipeline: stopped by {sig.name}; {RESUME_LINE}"
    ]
    assert "Error logging to API" not in stderr and "Traceback" not in stderr
    left = {p: c for p, c in running.items() if alive(p, c)}
    assert not left, f"left running after the run exited: {left}"
    checkpoint = int((run_dir / "pretrain" / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert 2 <= checkpoint < STEPS

    # the same command, now against a server on the ephemeral run's database: it resumes and finishes
    with prefect_server(tmp_path) as server:
        again = subprocess.run(
            cmd, cwd=ROOT, env={**server.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600, check=False
        )
        assert again.returncode == 0, again.stderr[-3000:]
        stats = stages.read_manifest(run_dir / "pretrain" / "manifest.json")["stats"]
        assert stats["resumed_from"] == checkpoint and stats["step"] == STEPS

        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        with client_of(server) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        assert sorted(r.state.name for r in runs) == ["Completed", "Crashed"]  # the stopped run was reported


def test_the_run_timeout_stops_in_process_training_naming_the_key(data_run, tmp_path):
    run_dir = copy_run(data_run, tmp_path / "run")
    # 12 s from the flow run's start: a few for the task to start and import torch, the rest training
    cmd = cli_run(
        run_dir,
        "timed-out",
        "pretrain.steps=1000000",
        "pretrain.eval_every=1000000",
        "pretrain.log_every=1000",
        "orchestration.timeout_minutes=0.2",
    )
    with prefect_server(tmp_path) as server:
        log = tmp_path / "timed-out.log"
        proc = start(cmd, {**server.env, "OMP_NUM_THREADS": "1"}, log)
        try:
            wait_for(lambda: trained_steps(run_dir) >= 1, "training started", proc=proc, log=log)
            running = descendants(proc.pid)
        finally:
            stderr = finish(proc, log, timeout=300)
        assert proc.returncode == 124, stderr[-3000:]
        expected = (
            "error: the run exceeded orchestration.timeout_minutes=0.2 and was stopped; raise or unset "
            f"orchestration.timeout_minutes, then {RESUME_LINE} (full log: {run_dir}/logs/run-"
        )
        assert [line for line in stderr.splitlines() if line.startswith(expected)], stderr[-3000:]
        assert not {p: c for p, c in running.items() if alive(p, c)}
        assert 0 < trained_steps(run_dir) < 1000000

        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        with client_of(server) as client:
            [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["timed-out"])))
        assert run.state.name == "TimedOut"
