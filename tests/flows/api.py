"""Reading what a flow run left in the Prefect API: task runs, artifacts, logs."""

from __future__ import annotations

import time
from typing import Any


def client():
    from prefect import get_client

    return get_client(sync_client=True)


def _recorded(c: Any, task_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    return c.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=[task_run_id])))


def _barrier() -> Any:
    """A flow run of one task run; returns that task run's id."""
    from prefect import flow, task

    @task(name="api-barrier-task", persist_result=False)
    def mark() -> None:
        return None

    @flow(name="api-barrier", persist_result=False)
    def barrier() -> Any:
        return mark(return_state=True).state_details.task_run_id

    return barrier()


def settle(timeout: float = 60.0) -> None:
    """Wait until the server has recorded every task run event this process sent so far.

    Task runs and their states reach the server as events, which it records a moment later, in
    the order they were sent: a flow can return before its last task run is visible. A task run
    started now (in a flow run of its own) is recorded after all of them; wait (polling, at most
    `timeout` seconds) until it is.
    """
    task_run_id = _barrier()
    deadline = time.monotonic() + timeout
    with client() as c:
        while not any(r.state is not None and r.state.is_final() for r in _recorded(c, task_run_id)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Prefect server did not record task run events within {timeout:g}s")
            time.sleep(0.05)  # polling the API: the server cannot be asked to tell when it has recorded them


def task_runs(flow_run_id: Any) -> list[Any]:
    """The task runs of a flow run (with the states the server has recorded for them, see settle())."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    settle()
    with client() as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def artifacts(flow_run_id: Any) -> dict[str, Any]:
    """The latest artifact per key of a flow run (its tasks' artifacts included)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in sorted(found, key=lambda a: a.updated or a.created)}


def logs(flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log records are shipped in the background: send them now
    with client() as c:
        return c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def states(runs: list[Any]) -> dict[str, str]:
    """task run name -> state name (Completed, Cached, Failed...)."""
    return {r.name: r.state.name for r in runs}


def events(prefix: str, resource_prefix: str, at_least: int = 1, timeout: float = 60.0) -> list[Any]:
    """The events named `prefix`... about resources `resource_prefix`... that the server has recorded, once
    it has at least `at_least` of them (polling at most `timeout` seconds: they are sent in the background
    and stored a moment after they arrive)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(event=EventNameFilter(prefix=[prefix]), resource=EventResourceFilter(id_prefix=[resource_prefix]))
    deadline = time.monotonic() + timeout
    with client() as c:
        while True:
            found = list(c.read_events(wanted, limit=50).events)
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.2)  # polling the API: the server cannot be asked to tell when it has stored them
