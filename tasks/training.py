"""What pretraining needs from Prefect: its log lines in the run's log and a live progress artifact.

The training itself (in this process or a subprocess, the timeout, torchrun, resuming, the
classification of failures for retries) is glm.stages.train, the same for every runner; its task
is made from its declaration like every other stage's (tasks/stages.py).
"""

from __future__ import annotations

from typing import Any

from glm.config import PipelineConfig
from glm_pipeline.tasks import artifacts
from prefect import get_run_logger

POLL_SECONDS = 1.0  # the progress artifact is updated at most this often


class _Progress:
    """glm.stages.train's progress callback as the run's progress artifact (made at the first call)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.artifact = cfg, None

    def __call__(self, step: int, total: int, final: bool = False) -> None:
        if self.artifact is None:
            self.artifact = artifacts.TrainingProgress(self.cfg, total, step, min_interval=POLL_SECONDS)
        self.artifact.update(step, final=final)


def training_hooks(cfg: PipelineConfig) -> dict[str, Any]:
    """glm.stages.train's callbacks for this task run: its output to the run log, its steps to the progress artifact."""
    return {"log_line": get_run_logger().info, "progress": _Progress(cfg)}
