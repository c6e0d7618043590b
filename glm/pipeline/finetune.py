"""Stage `finetune`: the pretrained checkpoint fine-tuned (and the same model from scratch) on the task."""

from __future__ import annotations

from typing import Callable

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    FinetuneStats,
)
from glm.core.safety import remove_tree
from glm.core.shards import (
    MANIFEST,
    file_entry,
    write_manifest,
)
from glm.pipeline.common import RUN_DIRS, pretrained_checkpoint
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
)


def _finetune(cfg: PipelineConfig, paths: RunPaths, progress: Callable[[str, int, int], None] | None = None) -> None:
    """Fine-tune the pretrained checkpoint (and, if configured, the same model from scratch).

    progress(run, step, total): each training step (the orchestrator's progress artifact)."""
    from glm.core.tokenizer import load_tokenizer
    from glm.distributed import resolve_device
    from glm.finetuning.finetune import finetune_from_checkpoint, reporting

    task_dir = paths.finetune(cfg.finetune.task.name)
    remove_tree(task_dir, inside=paths.root / "finetune", ignore_errors=True)  # every file is regenerated
    with reporting(progress):
        results = finetune_from_checkpoint(
            pretrained_checkpoint(paths),
            load_tokenizer(paths.tokenizer_model),
            cfg.finetune,
            task_dir,
            device=resolve_device(cfg.pretrain.device),
        )
    files = [file_entry(p, task_dir) for p in sorted(task_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    headline = "best_val_accuracy" if cfg.finetune.kind == "cloze" else "best_val_loss"
    stats = {
        "kind": cfg.finetune.kind,
        "runs": {name: f"{RUN_DIRS[name]}/result.json" for name in results},
        "summary": {
            name: {
                "test": {k: v for k, v in r["test"].items() if isinstance(v, (int, float))},
                headline: r.get(headline),
                "steps": r.get("steps"),
                "best_step": r.get("best_step"),
                "attempts": len(r.get("attempts") or [None]),
                "collapsed": r.get("collapsed", False),
            }
            for name, r in results.items()
        },
    }
    if cfg.finetune.kind == "cloze":
        from glm.evaluation.report import finetune_warnings

        first = next(iter(results.values()))
        stats["baselines"] = {k: first[k]["accuracy"] for k in ("majority", "linear_baseline") if first.get(k)}
        stats["warnings"] = finetune_warnings(results)  # what the Prefect artifact and the report show first
    write_manifest(
        task_dir,
        "finetune",
        files,
        config=cfg.finetune.model_dump(mode="json"),
        inputs=[paths.pretrain / MANIFEST, paths.tokenizer / MANIFEST],
        stats=stats,
    )


STAGE = Stage(
    "finetune",
    "finetune",
    f"{LAYOUT['finetune']}/{{cfg.finetune.task.name}}/{MANIFEST}",
    sections=("finetune",),
    inputs=("pretrain", "tokenizer"),
    build=_finetune,
    stats=FinetuneStats,
)
