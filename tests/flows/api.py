"""Reading what a flow run left in the Prefect API: task runs, artifacts, logs."""

from __future__ import annotations

from typing import Any


def client():
    from prefect import get_client

    return get_client(sync_client=True)


def task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

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
