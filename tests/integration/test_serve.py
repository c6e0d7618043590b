"""`glm-pipeline serve` against a real Prefect server whose scheduler loops every second (conftest.py):
its cron schedule fires by itself and a run started by hand completes too, each with its logs in
the API, and Ctrl-C pauses the schedule and ends the process. The SQLAlchemy pin the scheduler
needs holds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement

from tests.flows.conftest import SMALL
from tests.integration.server import ROOT, client_of, stop_group

RUN_SECONDS = 400  # the whole small pipeline takes about a minute here; generous for busy cores


def test_the_installed_sqlalchemy_is_the_one_the_prefect_scheduler_works_with():
    """prefect 3.8.8's scheduler fails every loop on SQLAlchemy 2.1 ("Can't evaluate bulk DML
    statement"), so no scheduled run is ever created: the pin is in both install files and holds."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#") and Requirement(line).name.lower() == "sqlalchemy":
            pins["constraints.txt"] = Requirement(line).specifier
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        if Requirement(dep).name.lower() == "sqlalchemy":
            pins["pyproject.toml"] = Requirement(dep).specifier
    assert set(pins) == {"constraints.txt", "pyproject.toml"}, f"sqlalchemy is pinned only in {sorted(pins)}"
    installed = version("sqlalchemy")
    for where, spec in pins.items():
        assert spec.contains(installed), (
            f"SQLAlchemy {installed} is installed but {where} pins sqlalchemy{spec}: Prefect's scheduler breaks on "
            f"other versions; reinstall with `pip install -c constraints.txt 'sqlalchemy{spec}'`"
        )
        assert not spec.contains("2.1.0"), f"{where} allows SQLAlchemy 2.1, on which prefect 3.8.8's scheduler fails"


def _wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log) -> object:
    """Poll check() until it returns something truthy; fail with the serve log if serve died or time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert proc.poll() is None, f"serve exited with code {proc.returncode} while waiting for {what}:\n{log()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s:\n{log()}"
        time.sleep(1)


def test_serve_runs_on_its_cron_schedule_and_on_demand_then_pauses_on_ctrl_c(server, tmp_path):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.exceptions import ObjectNotFound

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "glm_pipeline.flows.cli", "serve", "configs/tiny.yaml", "--cron", "* * * * *"]
    for override in [*SMALL, f"run_dir={run_dir}"]:
        cmd += ["--set", override]
    log_path = tmp_path / "serve.log"
    env = {**server.env, "OMP_NUM_THREADS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def log() -> str:
        return log_path.read_text(errors="replace")[-4000:] + "\n--- server ---\n" + server.log_tail(2000)

    try:
        with client_of(server) as client:

            def deployment():
                try:
                    return client.read_deployment_by_name("glm-pipeline/tiny-nightly")
                except ObjectNotFound:
                    return None

            served = _wait_for("deployment glm-pipeline/tiny-nightly", deployment, 120, proc, log)
            by_hand = client.create_flow_run_from_deployment(served.id)
            only_served = DeploymentFilter(id=DeploymentFilterId(any_=[served.id]))

            def runs():
                return client.read_flow_runs(flow_run_filter=FlowRunFilter(), deployment_filter=only_served)

            # the scheduler loops every second: a run for the next minute exists at once unless it fails
            _wait_for(
                "run created by the scheduler (its errors are in the server log)",
                lambda: [r for r in runs() if r.auto_scheduled],
                60,
                proc,
                log,
            )

            def finished():
                now = runs()
                mine = next(r for r in now if r.id == by_hand.id)
                scheduled = [r for r in now if r.auto_scheduled and r.state.is_final()]
                return (mine, scheduled) if mine.state.is_final() and scheduled else None

            # one run at a time (serve's limit): whichever goes first builds everything, the other
            # finds every stage cached
            by_hand, scheduled = _wait_for("finished run by hand and by the schedule", finished, 2 * RUN_SECONDS, proc, log)
            for run in (by_hand, *scheduled):
                assert run.state.is_completed(), f"{run.name}: {run.state.name} {run.state.message}\n{log()}"
            assert by_hand.name == "tiny" and by_hand.parameters["config"]["run_dir"] == str(run_dir)
            assert (run_dir / "export" / "bundle" / "model.onnx").is_file()
            assert (run_dir / "eval" / "manifest.json").is_file()
            for run in (by_hand, scheduled[0]):
                # a run's log lines reach the API in batches, after its state: wait for its last one
                def completed_line(run=run):
                    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                    return any("Finished in state Completed" in entry.message for entry in logs)

                _wait_for(f"'Finished in state Completed' in the logs of {run.name}", completed_line, 60, proc, log)
            all_logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[by_hand.id, scheduled[0].id])))
            assert any(entry.name.startswith("glm.") for entry in all_logs)  # the pipeline's own lines too

            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in serve's terminal
            assert proc.wait(timeout=120) == 0, log()
            assert client.read_deployment(served.id).paused, "Ctrl-C did not pause the schedule"
        assert re.search(r"Pausing all deployments", log_path.read_text())
    finally:
        if proc.poll() is None:
            stop_group(proc)
