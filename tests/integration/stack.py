"""Helpers for the tests on the native self-hosted stack (glm_pipeline.flows.stack): runs of the
deployments it registered, the processes of a flow run, its events, logs and artifacts."""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from tests.flows.conftest import SMALL

ZOMBIE_AFTER = 75  # seconds without a heartbeat before a run is Crashed: beats every 30 s, one may be lost (an API restart)


def params(run_dir: Path, name: str, *overrides: str) -> dict[str, Any]:
    """The tiny-smoke deployment's `config` parameter, small and in its own run directory."""
    return {
        "config": {
            "file": "configs/tiny.yaml",
            "set": [*SMALL, "quality.enabled=false", f"name={name}", f"run_dir={run_dir}", *overrides],
        }
    }


def start_run(client, deployment: str, parameters: dict[str, Any], name: str | None = None):
    d = client.read_deployment_by_name(deployment)
    return client.create_flow_run_from_deployment(d.id, parameters=parameters, name=name or f"t-{uuid.uuid4().hex[:6]}")


def wait_for(what: str, check: Callable[[], Any], seconds: float, every: float = 1.0, diagnose: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {seconds:.0f} s\n{diagnose()}")
        time.sleep(every)


def state(client, flow_run_id) -> str:
    """The run's state name; any COMPLETED-type state reads "Completed" (the blessing gate ends a run whose
    model it refused in a COMPLETED state named "Not promoted": the run succeeded, its bundle was not shipped)."""
    s = client.read_flow_run(flow_run_id).state
    return "Completed" if s.is_completed() else s.name


def wait_state(client, flow_run_id, names: set[str], seconds: float, stack=None) -> str:
    def diagnose() -> str:
        history = [s.name for s in sorted(client.read_flow_run_states(flow_run_id), key=lambda s: s.timestamp)]
        logs = "" if stack is None else "\n".join(f"--- {s}\n{stack.log_tail(s, 1500)}" for s in ("worker", "prefect-services"))
        return f"states {history}\n{logs}"

    return wait_for(
        f"flow run {flow_run_id} in {sorted(names)}",
        lambda: (n := state(client, flow_run_id)) in names and n,
        seconds,
        diagnose=diagnose,
    )


def state_history(client, flow_run_id) -> list[str]:
    return [s.name for s in sorted(client.read_flow_run_states(flow_run_id), key=lambda s: s.timestamp)]


# --------------------------------------------------------------------------- processes


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def environ(pid: int) -> dict[str, str]:
    """A live process's environment, as the kernel holds it (/proc/PID/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def flow_run_pid(flow_run_id) -> int | None:
    """The process a worker started for the flow run (the topmost one with PREFECT__FLOW_RUN_ID set to it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if environ(int(entry.name)).get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                    pids.append(int(entry.name))
            except OSError:
                continue
    top = [p for p in pids if _ppid(p) not in pids]
    return min(top) if top else None


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, as a machine or container dying would."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- events, logs, artifacts


def events(client, flow_run_id, name: str) -> list[Any]:
    """Events `name` about the flow run that the server stored, oldest first."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
    from prefect.types._datetime import now

    event_filter = EventFilter(
        occurred=EventOccurredFilter(since=now("UTC") - timedelta(hours=1), until=now("UTC") + timedelta(minutes=1)),
        event=EventNameFilter(name=[name]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    page = client.read_events(event_filter, limit=50)
    found = list(page.events)
    while page.next_page:
        page = client.read_events_page(page.next_page)
        found += page.events
    return sorted(found, key=lambda e: e.occurred)


def log_messages(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    out, offset = [], 0
    while True:
        page = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset
        )
        out += [r.message for r in page]
        if len(page) < 200:
            return out
        offset += 200


def artifact_keys(client, flow_run_id) -> set[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key for a in arts if a.key}
