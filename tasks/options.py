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
from glm.errors import PermanentError, disk_error
from glm.quality import ValidationFailed
from glm.shards import ManifestError

# Failures that a retry cannot fix: a failed quality gate, bad config, corrupt data, a missing
# upstream stage, a diverged or otherwise permanently failed training (glm.errors). ValueError
# stays: glm raises it only for an input it names with its fix (a source's path, a verbalizer...),
# never for something that passes. A TypeError, AttributeError... is a bug and a bare
# FileNotFoundError may be a share that went away: those are retried, and show their traceback.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    PermanentError, ValidationFailed, ConfigError, PydanticValidationError, ManifestError, stages.StageInputMissing,
    ValueError,
)


def is_permanent(error: BaseException) -> bool:
    """PERMANENT_ERRORS, or a read-only, full or over-quota disk (the retry would write to the same one)."""
    return isinstance(error, PERMANENT_ERRORS) or disk_error(error)


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
    """Retry unless the failure is permanent (see is_permanent)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the exception itself could not be loaded: let the retry decide
        return True
    return not (isinstance(error, BaseException) and is_permanent(error))


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
