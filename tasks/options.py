"""Orchestration options every task shares: retries with backoff, and the one cache.

The pipeline has one cache: glm.stages' stage stamps (a stage is done iff its stamp matches the
key of its config section, input manifests and code, and its outputs are unchanged on disk).
A task asks it first and, when the stage is done, ends at once in a "Cached" state carrying the
stage's output path. Prefect's own result store and cache keys are off: nothing is pickled into
the run directory, and nothing is read back from it but JSON stamps and manifests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed
from prefect.tasks import exponential_backoff
from pydantic import ValidationError as PydanticValidationError

from glm import stages
from glm.core.config import ConfigError, PipelineConfig
from glm.core.errors import PermanentError, disk_error
from glm.core.shards import ManifestError
from glm.data.quality import ValidationFailed

# Failures that a retry cannot fix: a failed quality gate, bad config, corrupt data, a missing
# upstream stage, a diverged or otherwise permanently failed training (glm.errors). ValueError
# stays: glm raises it only for an input it names with its fix (a source's path, a verbalizer...),
# never for something that passes. A TypeError, AttributeError... is a bug and a bare
# FileNotFoundError may be a share that went away: those are retried, and show their traceback.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    PermanentError,
    ValidationFailed,
    ConfigError,
    PydanticValidationError,
    ManifestError,
    stages.StageInputMissing,
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


def cached(cfg: PipelineConfig, stage: str | stages.Stage, **options: Any) -> State | None:
    """A "Cached" state holding the stage's output path (a check: its summary) if the stage is done, else None."""
    done = stages.current_result(stage, cfg, stages.RunPaths(cfg.run_dir), **options)
    return None if done is None else _cached(str(done) if isinstance(done, Path) else done)


def cached_result(result: Any) -> State | None:
    """A "Cached" state holding `result` (a shard's recorded result), or None when there is none."""
    return None if result is None else _cached(result)


def _cached(data: Any) -> State:
    # what Prefect's own cache hits look like: a COMPLETED state named "Cached"
    return Completed(name="Cached", data=data, message="up to date: its stamp matches and its outputs are unchanged")


def retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is permanent (see is_permanent)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the exception itself could not be loaded: let the retry decide
        return True
    return not (isinstance(error, BaseException) and is_permanent(error))


def configure(task: Task, cfg: PipelineConfig, **overrides: Any) -> Task:
    """`task` with the run's retry policy (and any per-call overrides)."""
    orch = cfg.orchestration
    return task.with_options(
        retries=orch.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=orch.retry_delay_seconds)(orch.retries) if orch.retries else 0,
        retry_condition_fn=retry_transient,
        **overrides,
    )


# every task: no Prefect cache or persisted result (the stage stamps are the cache, see above)
TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
