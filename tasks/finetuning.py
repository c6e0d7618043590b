"""What fine-tuning needs from Prefect: a live progress artifact per fine-tuning run (pretrained,
from scratch), as pretraining has (tasks/training.py). Its log lines (fine-tune RUN step N/M loss ...)
come from glm.finetune's logger, which Prefect collects (PREFECT_LOGGING_EXTRA_LOGGERS=glm).
"""

from __future__ import annotations

from typing import Any

from glm.config import PipelineConfig
from glm_pipeline.tasks import artifacts

POLL_SECONDS = 1.0  # each progress artifact is updated at most this often


class FinetuneProgress:
    """glm.stages._finetune's progress(run, step, total) as one progress artifact per run, made at its first step."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.runs = cfg, {}

    def __call__(self, run: str, step: int, total: int) -> None:
        shown = self.runs.get(run)
        if shown is None or shown.total != max(total, 1):  # a new run, or a collapse-guard restart with another length
            what = f"finetune-progress-{run.replace('_', '-')}"
            description = f"Fine-tuning steps done of {total} ({self.cfg.finetune.task.name}, {run.replace('_', ' ')})"
            shown = self.runs[run] = artifacts.TrainingProgress(self.cfg, total, step, POLL_SECONDS, what, description)
        shown.update(step, final=step >= total)


def finetune_hooks(cfg: PipelineConfig) -> dict[str, Any]:
    """glm.stages._finetune's keyword arguments for this task run."""
    return {"progress": FinetuneProgress(cfg)}
