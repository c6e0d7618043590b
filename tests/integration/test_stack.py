"""The self-hosted stack of docker-compose.yml, started natively (glm_pipeline.flows.stack): real
PostgreSQL and Redis servers, the API server without services, `prefect server services start`,
`glm-pipeline deploy` and a process worker, with the compose file's settings. The deployments run
on it, then its parts are killed and restarted under running flow runs (issue 22, parts 3 and 4).

One stack for the module (it takes about a minute to start); a test that kills a service starts it
again before it ends. Flow runs are the tiny-smoke and nightly deployments with the small test
config in a temporary run directory (the `config` parameter's file + set).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from glm_pipeline.flows.deploy import RERUN, ZOMBIE
from glm_pipeline.flows.stack import Stack

from tests.integration.conftest import SCHEDULER
from tests.integration.stack import (
    ZOMBIE_AFTER,
    artifact_keys,
    descendants,
    environ,
    events,
    flow_run_pid,
    kill_tree,
    log_messages,
    params,
    start_run,
    state,
    state_history,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.slow  # a minute to start the stack, a minute or two per run

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("POSTGRES_PASSWORD", "PREFECT_SERVER_DATABASE_PASSWORD", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
LONG = ["pretrain.steps=240", "pretrain.checkpoint_every=10", "pretrain.eval_every=1000"]  # a minute or so of training


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    dotenv = root / ".env"  # as .env.example says: the database password (compose reads it as env_file too)
    dotenv.write_text(f"POSTGRES_USER=prefect\nPOSTGRES_PASSWORD={secrets.token_urlsafe(18)}\nPOSTGRES_DB=prefect\n")
    s = Stack(
        root,
        project=ROOT,
        dotenv=dotenv,
        server_settings=SCHEDULER,
        worker_settings={"OMP_NUM_THREADS": "1"},
        deploy_args=["--zombie-after", str(ZOMBIE_AFTER)],
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(stack):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as c:
        yield c


def _verify(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glm_pipeline.flows.cli", "verify", str(run_dir)], capture_output=True, text=True, timeout=120
    )


def _step_lines(messages: list[str], total: int) -> set[int]:
    return {int(m.group(1)) for line in messages if (m := re.match(rf"step (\d+)/{total} loss", line))}


def test_the_tiny_deployment_completes_with_its_artifacts_and_no_server_secret_in_its_environment(stack, client, tmp_path):
    run = start_run(client, "glm-pipeline/tiny-smoke", params(tmp_path / "run", "stack-smoke"))
    wait_state(client, run.id, {"Running"}, 120, stack)

    pid = wait_for("the flow run's process", lambda: flow_run_pid(run.id), 60)
    env = environ(pid)
    password = stack.variables["POSTGRES_PASSWORD"]
    assert password in environ(stack.procs["prefect-server"].pid).values()  # the server has it ...
    assert not [k for k in SECRETS if k in env], sorted(env)  # ... the flow run does not
    assert not [k for k, v in env.items() if password in v]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30" and env["PREFECT_CLIENT_RETRY_EXTRA_CODES"] == "500"

    assert wait_state(client, run.id, {"Completed", "Failed", "Crashed"}, 300, stack) == "Completed"
    keys = artifact_keys(client, run.id)
    for what in ("corpus", "tokenizer", "pretrain-progress", "loss", "evaluation", "bundle"):
        assert any(what in k for k in keys), (what, keys)
    assert events(client, run.id, "prefect.flow-run.heartbeat")  # heartbeats on for deployment runs
    done = _verify(tmp_path / "run")
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_creates_the_zombie_automations_once(stack, client):
    for _ in range(2):  # the stack deployed once; deploying again changes nothing
        [zombie] = client.read_automations_by_name(ZOMBIE)
        [rerun] = client.read_automations_by_name(RERUN)
        stack.deploy()
    assert zombie.trigger.posture == "Proactive" and zombie.trigger.within.total_seconds() == ZOMBIE_AFTER
    assert zombie.trigger.after == {"prefect.flow-run.heartbeat"} and zombie.actions[0].state == "CRASHED"
    assert rerun.trigger.expect == {"prefect.flow-run.Crashed"} and rerun.actions[0].state == "SCHEDULED"
    log = stack.log("deploy").read_text()
    assert log.count("created the automation") == 2 and "updated the automation" not in log


def _scheduled_runs(client, deployment_id, name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
    return [r for r in runs if r.auto_scheduled and f"name={name}" in r.parameters.get("config", {}).get("set", [])]


def test_a_cron_schedule_fires_and_its_run_completes(stack, client, tmp_path):
    from prefect.client.schemas.schedules import CronSchedule

    deployment = client.read_deployment_by_name("glm-pipeline/tiny-smoke")
    [schedule] = client.create_deployment_schedules(
        deployment.id, [(CronSchedule(cron="* * * * *", timezone="UTC"), True)], parameters=params(tmp_path / "run", "stack-cron")
    )
    try:  # the services' scheduler creates the runs; the worker picks up the first at the next minute
        first = wait_for(
            "a run of the schedule",
            lambda: sorted(_scheduled_runs(client, deployment.id, "stack-cron"), key=lambda r: r.expected_start_time),
            60,
        )[0]
        wait_state(client, first.id, {"Running", "Completed", "Failed", "Crashed"}, 150, stack)
    finally:
        client.delete_deployment_schedule(deployment.id, schedule.id)
    for other in _scheduled_runs(client, deployment.id, "stack-cron"):
        if other.id != first.id and other.state.is_scheduled():
            client.delete_flow_run(other.id)
    assert wait_state(client, first.id, {"Completed", "Failed", "Crashed"}, 300, stack) == "Completed"
    assert _verify(tmp_path / "run").returncode == 0


def _nightly(run_dir: Path, name: str, *overrides: str) -> dict:
    return {**params(run_dir, name, *overrides), "continue_steps": None}


def test_a_second_run_on_a_busy_run_directory_is_refused_in_one_line_and_the_nightly_limit_queues(stack, client, tmp_path):
    run_dir = tmp_path / "run"
    first = start_run(client, "glm-pipeline/nightly", _nightly(run_dir, "stack-busy", *LONG))
    wait_state(client, first.id, {"Running"}, 120, stack)
    wait_for("the run lock", lambda: (run_dir / ".lock").exists() and (run_dir / ".lock").stat().st_size > 0, 60)
    queued = start_run(client, "glm-pipeline/nightly", _nightly(run_dir, "stack-busy", *LONG))

    # the nightly deployment's concurrency_limit 1: the second run waits for the slot
    wait_state(client, queued.id, {"AwaitingConcurrencySlot"}, 60, stack)
    # the tiny-smoke deployment has no limit: its run meets the run lock and fails in one line
    other = start_run(client, "glm-pipeline/tiny-smoke", params(run_dir, "stack-busy"))
    assert wait_state(client, other.id, {"Completed", "Failed", "Crashed"}, 180, stack) == "Failed"
    message = client.read_flow_run(other.id).state.message
    assert f"run directory {run_dir} is in use by pid" in message and "wait for it or stop it" in message, message
    assert "\n" not in message.strip(), message
    assert state_history(client, queued.id).count("Running") == 0  # still queued while the first runs

    assert wait_state(client, first.id, {"Completed", "Failed", "Crashed"}, 400, stack) == "Completed"
    assert wait_state(client, queued.id, {"Completed", "Failed", "Crashed"}, 300, stack) == "Completed"
    assert _verify(run_dir).returncode == 0


def test_a_killed_worker_s_run_is_crashed_by_the_zombie_automation_and_rerun_from_its_checkpoint(stack, client, tmp_path):
    from glm import stages

    run_dir = tmp_path / "run"
    run = start_run(client, "glm-pipeline/tiny-smoke", params(run_dir, "stack-zombie", *LONG))
    wait_state(client, run.id, {"Running"}, 120, stack)
    checkpoints = run_dir / "pretrain" / "checkpoints"
    wait_for("a pretraining checkpoint", lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*")), 300)
    assert flow_run_pid(run.id) in descendants(stack.procs["worker"].pid)

    # the worker, its flow run process and its training die at once, as with a lost machine
    worker = stack.procs.pop("worker")
    kill_tree(worker.pid)
    worker.wait()
    killed = time.time()
    assert wait_for(
        "the run is no longer Running", lambda: "Crashed" in state_history(client, run.id), ZOMBIE_AFTER + 90, every=0.5
    )
    detected = time.time() - killed
    crashed = next(s for s in client.read_flow_run_states(run.id) if s.name == "Crashed")
    assert "no heartbeat" in crashed.message, crashed.message
    print(f"\ndead worker: the run left Running {detected:.0f} s after the kill (zombie automation: {ZOMBIE_AFTER} s)")

    stack.start_worker()  # compose restarts the worker (restart: unless-stopped)
    assert (
        wait_for(
            "the re-run",
            lambda: (n := state(client, run.id)) in {"Completed", "Failed"} and n,
            400,
            diagnose=lambda: str(state_history(client, run.id)) + stack.log_tail("worker"),
        )
        == "Completed"
    )
    history = state_history(client, run.id)
    assert history.index("Crashed") < history.index("AwaitingRetry") < len(history) - 1, history
    stats = stages.read_manifest(run_dir / "pretrain" / "manifest.json")["stats"]
    assert stats["resumed_from"] >= 10 and stats["step"] == 240, stats

    # a healthy run is never taken for a zombie: while it is Running (before the kill, and the re-run to its
    # end) no silence between heartbeats reaches the automation's window, however long or short it trains
    beats = [e.occurred.timestamp() for e in events(client, run.id, "prefect.flow-run.heartbeat")]
    states = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    running = [s.timestamp.timestamp() for s in states if s.name == "Running"]
    completed = next(s.timestamp.timestamp() for s in states if s.name == "Completed")
    assert len(running) == 2, [s.name for s in states]
    for start, end in [(running[0], killed), (running[1], completed)]:
        marks = [start, *(t for t in beats if start <= t < end), end]
        silences = [b - a for a, b in zip(marks, marks[1:])]
        assert len(marks) > 2 and max(silences) < ZOMBIE_AFTER, (start, end, silences)
    assert _verify(run_dir).returncode == 0


def _progress(client, flow_run_id) -> float | None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return next((float(a.data) for a in arts if a.type == "progress" and a.key and "pretrain-progress" in a.key), None)


LATE_LOG_SECONDS = 60  # the spool retries every 2 s once the API is back


def _finishes_whole(stack, client, run, run_dir: Path, seconds: float = 500) -> None:
    """The run ends Completed (maybe after an automatic re-run), with every training step's log line,
    the progress artifact at 100 % and every output verified."""
    final = wait_for(
        "the run to finish",
        lambda: (n := state(client, run.id)) in {"Completed", "Failed"} and n,
        seconds,
        diagnose=lambda: f"{state_history(client, run.id)}\n{stack.log_tail('worker')}",
    )
    assert final == "Completed", (
        state_history(client, run.id),
        client.read_flow_run(run.id).state.message,
        log_messages(client, run.id)[-12:],
    )
    # log lines the API could not take during an outage arrive late (flows.log_spool), not never
    deadline = time.monotonic() + LATE_LOG_SECONDS
    while len(_step_lines(messages := log_messages(client, run.id), 240)) < 240 and time.monotonic() < deadline:
        time.sleep(2)
    steps = _step_lines(messages, 240)
    lost = sorted(set(range(1, 241)) - steps)
    assert not lost, (
        f"training log lines lost: steps {lost[:5]}..{lost[-5:]} ({len(lost)}); step lines: "
        + repr([m for m in messages if m.startswith("step ")][:3])
        + f"; {len(messages)} messages, states {state_history(client, run.id)}, first: {messages[:8]}"
    )
    assert _progress(client, run.id) == 100.0
    done = _verify(run_dir)
    assert done.returncode == 0, done.stdout + done.stderr


def _training(client, stack, deployment: str, parameters: dict, run_dir: Path):
    run = start_run(client, deployment, parameters)
    wait_state(client, run.id, {"Running"}, 120, stack)
    checkpoints = run_dir / "pretrain" / "checkpoints"
    wait_for("a pretraining checkpoint", lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*")), 300)
    return run


def test_redis_killed_and_restarted_under_a_concurrency_limited_run(stack, client, tmp_path):
    run_dir = tmp_path / "run"
    run = _training(client, stack, "glm-pipeline/nightly", _nightly(run_dir, "stack-redis", *LONG), run_dir)
    lease = client.read_flow_run(run.id).state.state_details.deployment_concurrency_lease_id
    assert lease is not None  # the nightly deployment's concurrency slot, leased in Redis

    stack.kill("redis")  # SIGKILL
    time.sleep(3)
    stack.start_redis()
    # the run renews its lease every 225 s; a renewal now is what it would do: the lease survived in
    # Redis's append-only file (without it: 410 Gone, and the run is Crashed)
    assert client.renew_concurrency_lease(lease, lease_duration=300).status_code in (200, 204)
    _finishes_whole(stack, client, run, run_dir)


POSTGRES_OUTAGE_SECONDS = 90  # longer than the client's ~62 s of retries and than the zombie window


def test_postgres_restarted_under_a_run_loses_no_log_line(stack, client, tmp_path):
    run_dir = tmp_path / "run"
    run = _training(client, stack, "glm-pipeline/tiny-smoke", params(run_dir, "stack-postgres", *LONG), run_dir)
    stack.postgres_ctl("stop", mode="immediate")  # a crash: no checkpoint, no goodbye to the clients
    # lines the API refuses meanwhile are kept in the run directory's log spool and sent late
    # (flows.log_spool); the zombie automation may mark the healthy run Crashed meanwhile, and its
    # re-run then waits for the first attempt's process (glm.core.runlock's owner) instead of failing
    time.sleep(POSTGRES_OUTAGE_SECONDS)
    stack.postgres_ctl("start")
    _finishes_whole(stack, client, run, run_dir)


def test_the_api_server_restarted_under_a_run(stack, client, tmp_path):
    import signal

    run_dir = tmp_path / "run"
    run = _training(client, stack, "glm-pipeline/tiny-smoke", params(run_dir, "stack-api", *LONG), run_dir)
    stack.kill("prefect-server", signal.SIGTERM)
    time.sleep(5)
    stack.start_server()
    _finishes_whole(stack, client, run, run_dir)
