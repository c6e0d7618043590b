"""One thin Prefect task per pipeline stage: a call into glm.stages plus artifacts.

Tasks take the typed config (small) or a shard job and return paths or small dicts, never
data. Retries, result storage and refresh_cache are applied per run by tasks.options.configure;
the cache keys are glm.stages' stage keys (tasks.options).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from glm import stages
from glm.config import PipelineConfig
from tasks import artifacts
from tasks.options import infill_shard_key, stage_key_fn, tokenize_shard_key


def _paths(cfg: PipelineConfig) -> stages.RunPaths:
    return stages.RunPaths(cfg.run_dir)


# --------------------------------------------------------------------------- data


@task(name="ingest", task_run_name="ingest-{cfg.name}", cache_key_fn=stage_key_fn("ingest"))
def ingest(cfg: PipelineConfig) -> str:
    """Sources -> document shards (only new inputs are read)."""
    paths = _paths(cfg)
    manifest = stages.ingest(cfg, paths)
    artifacts.corpus_statistics(cfg, paths.docs)
    return str(manifest)


@task(name="validate-corpus", task_run_name="validate-corpus-{cfg.name}", cache_key_fn=stage_key_fn("validate-corpus"))
def validate_corpus(cfg: PipelineConfig) -> str:
    """The document quality gate; its results are a table artifact whether it passes or not."""
    paths = _paths(cfg)
    try:
        return str(stages.validate_corpus(cfg, paths))
    finally:
        artifacts.validation_results(cfg, paths.docs / stages.VALIDATION, "corpus")


@task(name="train-tokenizer", task_run_name="train-tokenizer-{cfg.name}", cache_key_fn=stage_key_fn("tokenizer"))
def train_tokenizer(cfg: PipelineConfig) -> str:
    paths = _paths(cfg)
    manifest = stages.train_tokenizer(cfg, paths)
    artifacts.tokenizer_summary(cfg, paths.tokenizer)
    return str(manifest)


@task(name="tokenize-shard", task_run_name="tokenize-{job[shard]}", cache_key_fn=tokenize_shard_key)
def tokenize_shard(job: dict[str, str], run_dir: str) -> dict[str, Any]:
    """One document shard -> one token shard; returns its manifest entry."""
    return stages.tokenize_shard(job, stages.RunPaths(run_dir))


@task(name="close-tokenize", task_run_name="close-tokenize-{cfg.name}", cache_key_fn=stage_key_fn("tokenize"))
def close_tokenize(cfg: PipelineConfig, entries: list[dict[str, Any]]) -> str:
    paths = _paths(cfg)
    manifest = stages.close_tokenize(cfg, paths, entries)
    artifacts.token_statistics(cfg, paths.tokens)
    return str(manifest)


@task(name="validate-tokens", task_run_name="validate-tokens-{cfg.name}", cache_key_fn=stage_key_fn("validate-tokens"))
def validate_tokens(cfg: PipelineConfig) -> str:
    paths = _paths(cfg)
    try:
        return str(stages.validate_tokens(cfg, paths))
    finally:
        artifacts.validation_results(cfg, paths.tokens / stages.VALIDATION, "token")


def _shard_run_name(parameters: dict[str, Any]) -> str:
    job = parameters["job"]
    where = "valid" if job.plan.split == "valid" else f"epoch-{job.plan.epoch:03d}"
    return f"span-corruption-{where}-shard-{job.shard_index:05d}"


@task(name="build-span-corruption-shard", task_run_name=_shard_run_name, cache_key_fn=infill_shard_key)
def build_span_corruption_shard(job: Any) -> dict[str, Any]:
    """Pack, corrupt and write one span-corruption shard (job: glm.datasets.ShardJob)."""
    return stages.build_infill_shard(job)


@task(name="close-span-corruption", task_run_name="close-span-corruption-{cfg.name}", cache_key_fn=stage_key_fn("infill"))
def close_infill(cfg: PipelineConfig, results: list[dict[str, Any]]) -> str:
    return str(stages.close_infill(cfg, _paths(cfg), results))


# --------------------------------------------------------------------------- fine-tuning, evaluation, export


@task(name="finetune", task_run_name="finetune-{cfg.finetune.task.name}", cache_key_fn=stage_key_fn("finetune"))
def finetune(cfg: PipelineConfig) -> str:
    """Fine-tune from the pretrained checkpoint (and from scratch, the baseline)."""
    paths = _paths(cfg)
    manifest = stages.finetune(cfg, paths)
    artifacts.finetune_summary(cfg, stages.finetune_results(cfg, paths))
    return str(manifest)


@task(name="evaluate", task_run_name="evaluate-{cfg.name}", cache_key_fn=stage_key_fn("evaluate"))
def evaluate(cfg: PipelineConfig) -> str:
    paths = _paths(cfg)
    manifest = stages.evaluate(cfg, paths)
    artifacts.evaluation_report(cfg, paths.eval)
    return str(manifest)


def _candidate_key(context: Any, parameters: dict[str, Any]) -> str:
    return stage_key_fn("export")(context, parameters) + "-candidate"


@task(name="export-onnx", task_run_name="export-onnx-{cfg.name}", cache_key_fn=_candidate_key)
def export_onnx(cfg: PipelineConfig) -> str:
    """Export the ONNX bundle (unverified, to export/.candidate)."""
    return str(stages.export_candidate(cfg, _paths(cfg)))


@task(name="verify-export", task_run_name="verify-export-{cfg.name}", cache_key_fn=stage_key_fn("export"))
def verify_export(cfg: PipelineConfig) -> str:
    """Check the bundle against PyTorch; only a verified bundle becomes export/bundle."""
    paths = _paths(cfg)
    manifest = stages.verify_and_promote(cfg, paths)
    artifacts.export_bundle(cfg, paths.bundle)
    return str(manifest)
