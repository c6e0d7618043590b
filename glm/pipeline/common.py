"""What several stages read from the run directory: the pretrained checkpoint, the tokenizer's vocabulary
size, the fine-tuning stage's results (an edit here re-runs the stages that import it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    FinetuneStats,
    PretrainStats,
    TokenizerStats,
)
from glm.core.shards import (
    atomic_write_json,
    read_stats,
)
from glm.pipeline.engine import (
    VALIDATION,
    RunPaths,
)


def write_skipped_validation(directory: Path, summary: dict[str, Any]) -> None:
    if summary.get("skipped"):
        atomic_write_json(directory / VALIDATION, summary)


def vocab_size(paths: RunPaths) -> int:
    return read_stats(paths.tokenizer, TokenizerStats)["vocab_size"]


def pretrained_checkpoint(paths: RunPaths) -> Path:
    return paths.pretrain / read_stats(paths.pretrain, PretrainStats)["checkpoint"]


RUN_DIRS = {"pretrained": "pretrained", "from scratch": "from_scratch"}


def finetune_results(cfg: PipelineConfig, paths: RunPaths) -> dict[str, dict[str, Any]]:
    """{run name: its result.json} of the fine-tuning stage."""
    task_dir = paths.finetune(cfg.finetune.task.name)
    runs = read_stats(task_dir, FinetuneStats)["runs"]
    ordered = sorted(runs, key=lambda name: list(RUN_DIRS).index(name) if name in RUN_DIRS else len(RUN_DIRS))
    return {name: json.loads((task_dir / runs[name]).read_text(encoding="utf-8")) for name in ordered}
