"""Orchestration options every task shares: cache keys, retries with backoff, result storage.

Cache keys are glm.stages' stage keys (config section fingerprint + input manifest digests +
the stage's code version), computed when the task is about to run, from its parameters. Results
(manifest paths, shard entries: small JSON-able values) persist under RUN_DIR/.prefect-results,
so a re-run of an unchanged stage is a cache hit ("Cached" state) and any change upstream
changes the key of exactly the stages downstream of it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from prefect import Task
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff
from pydantic import ValidationError as PydanticValidationError

from glm import stages
from glm.config import ConfigError, PipelineConfig
from glm.quality import ValidationFailed

# failures that a retry cannot fix: bad data, bad config, a missing upstream stage
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ValidationFailed, ConfigError, PydanticValidationError, ValueError, FileNotFoundError, TypeError,
)


def slug(name: str) -> str:
    """A Prefect artifact key part: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def artifact_key(cfg: PipelineConfig, what: str) -> str:
    return f"{slug(cfg.name)}-{what}"


def stage_key_fn(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """cache_key_fn of a whole-stage task whose parameters hold `cfg` (and maybe `continue_steps`)."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        cfg = parameters["cfg"]
        options = {"continue_steps": parameters["continue_steps"]} if "continue_steps" in parameters else {}
        return stages.stage_key(stage, cfg, stages.RunPaths(cfg.run_dir), **options)

    key.__name__ = f"{stage.replace('-', '_')}_cache_key"
    return key


def tokenize_shard_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return stages.tokenize_shard_key(parameters["job"], stages.RunPaths(parameters["run_dir"]))


def infill_shard_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return stages.infill_shard_key(parameters["job"])


def retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is permanent (see PERMANENT_ERRORS)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the exception itself could not be loaded: let the retry decide
        return True
    return not isinstance(error, PERMANENT_ERRORS)


def configure(task: Task, cfg: PipelineConfig, **overrides: Any) -> Task:
    """`task` with the run's retry policy, result storage and any per-call overrides (refresh_cache...)."""
    orch = cfg.orchestration
    return task.with_options(
        retries=orch.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=orch.retry_delay_seconds)(orch.retries) if orch.retries else 0,
        retry_condition_fn=retry_transient,
        persist_result=True,
        result_storage=Path(stages.RunPaths(cfg.run_dir).results).resolve(),
        **overrides,
    )
