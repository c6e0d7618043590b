"""One thin Prefect task per pipeline stage: a call into glm.stages plus artifacts.

Tasks take the typed config (small) or a shard job and return paths or small dicts, never
data. Each first asks the stage stamps whether its stage (or shard) is done and, if so, ends as
"Cached" without running it (tasks.options.cached); retries are applied per run by
tasks.options.configure.
"""

from __future__ import annotations

from typing import Any

from glm_pipeline.tasks import artifacts
from glm_pipeline.tasks.options import TASK_OPTIONS, cached, cached_result
from prefect import task

from glm import stages
from glm.config import PipelineConfig


def _paths(cfg: PipelineConfig) -> stages.RunPaths:
    return stages.RunPaths(cfg.run_dir)


# --------------------------------------------------------------------------- data


@task(name="ingest", task_run_name="ingest-{cfg.name}", **TASK_OPTIONS)
def ingest(cfg: PipelineConfig) -> str:
    """Sources -> document shards (only new inputs are read)."""
    if (done := cached(cfg, "ingest")) is not None:
        return done
    paths = _paths(cfg)
    manifest = stages.ingest(cfg, paths)
    artifacts.corpus_statistics(cfg, paths.docs)
    return str(manifest)


@task(name="validate-corpus", task_run_name="validate-corpus-{cfg.name}", **TASK_OPTIONS)
def validate_corpus(cfg: PipelineConfig) -> str:
    """The document quality gate; its results are a table artifact whether it passes or not."""
    if (done := cached(cfg, "validate-corpus")) is not None:
        return done
    paths = _paths(cfg)
    try:
        return str(stages.validate_corpus(cfg, paths))
    finally:
        artifacts.validation_results(cfg, paths.docs / stages.VALIDATION, "corpus")


@task(name="train-tokenizer", task_run_name="train-tokenizer-{cfg.name}", **TASK_OPTIONS)
def train_tokenizer(cfg: PipelineConfig) -> str:
    if (done := cached(cfg, "tokenizer")) is not None:
        return done
    paths = _paths(cfg)
    manifest = stages.train_tokenizer(cfg, paths)
    artifacts.tokenizer_summary(cfg, paths.tokenizer)
    return str(manifest)


@task(name="check-finetune-task", task_run_name="check-finetune-task-{cfg.finetune.task.name}", **TASK_OPTIONS)
def check_finetune_task(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The fine-tuning task's pattern, verbalizers, fields and labels against the tokenizer, before pretraining."""
    paths = _paths(cfg)
    if (done := cached_result(stages.cached_finetune_check(cfg, paths))) is not None:
        return done
    return stages.check_finetune_task(cfg, paths)


@task(name="tokenize-shard", task_run_name="tokenize-{job[shard]}", **TASK_OPTIONS)
def tokenize_shard(job: dict[str, str], run_dir: str) -> dict[str, Any]:
    """One document shard -> one token shard; returns its manifest entry."""
    paths = stages.RunPaths(run_dir)
    if (done := cached_result(stages.cached_tokenize_shard(job, paths))) is not None:
        return done
    return stages.tokenize_shard(job, paths)


@task(name="close-tokenize", task_run_name="close-tokenize-{cfg.name}", **TASK_OPTIONS)
def close_tokenize(cfg: PipelineConfig, entries: list[dict[str, Any]]) -> str:
    if (done := cached(cfg, "tokenize")) is not None:
        return done
    paths = _paths(cfg)
    manifest = stages.close_tokenize(cfg, paths, entries)
    artifacts.token_statistics(cfg, paths.tokens)
    return str(manifest)


@task(name="validate-tokens", task_run_name="validate-tokens-{cfg.name}", **TASK_OPTIONS)
def validate_tokens(cfg: PipelineConfig) -> str:
    if (done := cached(cfg, "validate-tokens")) is not None:
        return done
    paths = _paths(cfg)
    try:
        return str(stages.validate_tokens(cfg, paths))
    finally:
        artifacts.validation_results(cfg, paths.tokens / stages.VALIDATION, "token")


def _shard_run_name(parameters: dict[str, Any]) -> str:
    job = parameters["job"]
    where = "valid" if job.plan.split == "valid" else f"epoch-{job.plan.epoch:03d}"
    return f"span-corruption-{where}-shard-{job.shard_index:05d}"


@task(name="build-span-corruption-shard", task_run_name=_shard_run_name, **TASK_OPTIONS)
def build_span_corruption_shard(job: Any, run_dir: str) -> dict[str, Any]:
    """Pack, corrupt and write one span-corruption shard (job: glm.datasets.ShardJob)."""
    paths = stages.RunPaths(run_dir)
    if (done := cached_result(stages.cached_infill_shard(job, paths))) is not None:
        return done
    return stages.build_infill_shard(job, paths)


@task(name="close-span-corruption", task_run_name="close-span-corruption-{cfg.name}", **TASK_OPTIONS)
def close_infill(cfg: PipelineConfig, results: list[dict[str, Any]]) -> str:
    if (done := cached(cfg, "infill")) is not None:
        return done
    return str(stages.close_infill(cfg, _paths(cfg), results))


# --------------------------------------------------------------------------- fine-tuning, evaluation, export


@task(name="finetune", task_run_name="finetune-{cfg.finetune.task.name}", **TASK_OPTIONS)
def finetune(cfg: PipelineConfig) -> str:
    """Fine-tune from the pretrained checkpoint (and from scratch, the baseline)."""
    if (done := cached(cfg, "finetune")) is not None:
        return done
    paths = _paths(cfg)
    manifest = stages.finetune(cfg, paths)
    artifacts.finetune_summary(cfg, stages.finetune_results(cfg, paths))
    return str(manifest)


@task(name="evaluate", task_run_name="evaluate-{cfg.name}", **TASK_OPTIONS)
def evaluate(cfg: PipelineConfig) -> str:
    if (done := cached(cfg, "evaluate")) is not None:
        return done
    paths = _paths(cfg)
    manifest = stages.evaluate(cfg, paths)
    artifacts.evaluation_report(cfg, paths.eval)
    return str(manifest)


@task(name="export-onnx", task_run_name="export-onnx-{cfg.name}", **TASK_OPTIONS)
def export_onnx(cfg: PipelineConfig) -> str:
    """Export the ONNX bundle (unverified, to export/.candidate)."""
    if (done := cached(cfg, "export")) is not None:
        return done
    return str(stages.export_candidate(cfg, _paths(cfg)))


@task(name="verify-export", task_run_name="verify-export-{cfg.name}", **TASK_OPTIONS)
def verify_export(cfg: PipelineConfig) -> str:
    """Check the bundle against PyTorch; only a verified bundle becomes export/bundle."""
    if (done := cached(cfg, "export")) is not None:
        return done
    paths = _paths(cfg)
    manifest = stages.verify_and_promote(cfg, paths)
    artifacts.export_bundle(cfg, paths.bundle)
    return str(manifest)
