"""The pipeline's stages over one run directory, without Prefect: the public API of glm.pipeline.

What a stage is, keys, stamps and the runners live in glm.pipeline.engine; each stage's declaration
and build code in its own module of glm/pipeline/ (glm.pipeline.pretrain, ...), listed in order in
glm/pipeline/__init__.py. This module gathers what scripts, notebooks, tasks/ and flows/ use, under
the names they have always used (`from glm import stages; stages.run_pipeline(cfg)`). No stage
imports it, so it is in no stage's code version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glm.core.config import PipelineConfig
from glm.core.shards import MANIFEST, read_manifest
from glm.pipeline import REGISTRY
from glm.pipeline.choice import SEQ2SEQ_LOSS_SE, choose_export, export_choice, export_source
from glm.pipeline.common import RUN_DIRS, finetune_results, pretrained_checkpoint
from glm.pipeline.engine import (
    GROUPS,
    LINEAGE,
    RUN_CONFIG,
    RUN_PLAN,
    VALIDATION,
    RunDirTaken,
    RunPaths,
    Stage,
    StageInputMissing,
    cache_key,
    cached_shard,
    check_lineage,
    close_stage,
    current_output,
    current_result,
    declare,
    is_current,
    lineage_keys,
    output_ok,
    record_lineage,
    record_shard,
    record_stage,
    run_pipeline,
    run_shard,
    run_stage,
    run_step,
    shard_result,
    source_fingerprint,
    stage_code_version,
    stage_dependencies,
    stage_key,
    stage_modules,
    stages_of,
    verify_run,
)
from glm.pipeline.export import bundle_lineage, export_candidate, verify_and_promote
from glm.pipeline.generation import export_generation
from glm.pipeline.infill import build_infill_shard, close_infill, infill_jobs, infill_shard_key
from glm.pipeline.pretrain import close_pretrain, parse_train_result, prepare_pretrain, pretrain_command, train
from glm.pipeline.tokenize import close_tokenize, tokenize_jobs, tokenize_shard, tokenize_shard_key

__all__ = [
    "GROUPS", "LINEAGE", "MANIFEST", "read_manifest", "REGISTRY", "RUN_CONFIG", "RUN_DIRS", "RUN_PLAN", "SEQ2SEQ_LOSS_SE", "STAGES", "KEYED",
    "VALIDATION", "RunDirTaken", "RunPaths", "Stage", "StageInputMissing", "build_infill_shard", "build_infilling",
    "bundle_lineage", "cache_key", "cached_shard", "check_finetune_task", "check_lineage", "choose_export",
    "close_infill", "close_pretrain", "close_stage", "close_tokenize", "current_output", "current_result", "declare",
    "evaluate", "export", "export_candidate", "export_choice", "export_generation", "export_source", "finetune",
    "finetune_results", "infill_jobs", "infill_shard_key", "ingest", "is_current", "lineage_keys", "output_ok",
    "parse_train_result", "prepare_pretrain", "pretrain", "pretrain_command", "pretrained_checkpoint",
    "record_lineage", "record_shard", "record_stage", "run_pipeline", "run_shard", "run_stage", "run_step",
    "shard_result", "source_fingerprint", "stage_code_version", "stage_dependencies", "stage_key", "stage_modules",
    "stages_of", "tokenize", "tokenize_jobs", "tokenize_shard", "tokenize_shard_key", "train", "train_tokenizer",
    "validate_corpus", "validate_tokens", "verify_and_promote", "verify_run",
]  # fmt: skip

# derived, for callers that list them
STAGES = tuple(name for name, st in REGISTRY.items() if st.output is not None)  # those with an output
# every name a code version is kept under: each stage's, and "STAGE-shard" for a mapped stage's shards
KEYED = (*REGISTRY, *(f"{name}-shard" for name, st in REGISTRY.items() if st.mapped))


# one function per stage, for scripts and notebooks: run it unless it is done; its output
def ingest(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("ingest", cfg, paths)


def validate_corpus(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("validate-corpus", cfg, paths)


def train_tokenizer(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("tokenizer", cfg, paths)


def check_finetune_task(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    return run_stage("check-finetune-task", cfg, paths)


def tokenize(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("tokenize", cfg, paths)


def validate_tokens(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("validate-tokens", cfg, paths)


def build_infilling(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("infill", cfg, paths)


def pretrain(cfg: PipelineConfig, paths: RunPaths, continue_steps: int | None = None, **hooks: Any) -> Path:
    """hooks: train's log_line and progress callbacks."""
    return run_stage("pretrain", cfg, paths, hooks=hooks, continue_steps=continue_steps)


def finetune(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("finetune", cfg, paths)


def evaluate(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("evaluate", cfg, paths)


def export(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("export", cfg, paths)
