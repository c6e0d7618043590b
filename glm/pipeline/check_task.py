"""Stage `check-finetune-task`: the fine-tuning task checked against the tokenizer before pretraining."""

from __future__ import annotations

import logging
from typing import Any

from glm.core.config import PipelineConfig
from glm.pipeline.engine import (
    RunPaths,
    Stage,
    source_fingerprint,
)

log = logging.getLogger(__name__)


def _finetune_source(cfg: PipelineConfig) -> Any:
    """The fine-tuning task's labelled source files (a changed file re-runs the check)."""
    task_source = cfg.data.model_copy(update={"sources": [cfg.finetune.task.source]})
    return source_fingerprint(cfg.model_copy(update={"data": task_source}))


def _check_finetune_task(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Check the fine-tuning task against the tokenizer now, before pretraining (glm.finetune.check_task)."""
    from glm.core.tokenizer import load_tokenizer
    from glm.finetuning.finetune import check_task

    summary = check_task(cfg.finetune, load_tokenizer(paths.tokenizer_model), cfg.model.max_seq_len)
    log.info("fine-tuning task %r checks out against the tokenizer: %s", cfg.finetune.task.name, summary)
    return summary


# a wrong verbalizer fails here, not after pretraining; not repeated once fine-tuning is done
STAGE = Stage(
    "check-finetune-task",
    "data",
    None,
    sections=("finetune", "model"),
    inputs=("tokenizer",),
    extra=_finetune_source,
    build=_check_finetune_task,
    skip_while="finetune",
)
