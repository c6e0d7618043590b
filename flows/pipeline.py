"""The GLM pipeline as Prefect flows: the end-to-end flow and stage flows that also run alone.

    glm_pipeline(config)   data -> pretrain -> finetune + evaluate -> export (one flow run)
    data_flow(config)      ingest, validate, tokenizer, token shards, validate, span-corruption shards
    pretrain_flow(config)  pretraining (in-process for one device, a subprocess for torchrun or a timeout; resumes from its checkpoint)
    finetune_flow(config)  fine-tuning (+ the from-scratch baseline) and the evaluation report
    export_flow(config)    ONNX bundle, verified against PyTorch

The parameter is the typed PipelineConfig (Prefect validates it before anything runs). Every
task is cached on its stage key (tasks/options.py), so re-running an unchanged config is a
series of "Cached" task runs, and a changed input, config section or glm module re-runs
exactly the stages downstream of it. A stage whose output was deleted is refreshed.

Ways to run:
    glm-pipeline run configs/tiny.yaml [--stage data]       in-process (Prefect's ephemeral API)
    glm-pipeline serve configs/demo.yaml --cron "0 2 * * *"  one long-lived process that creates the
        deployment `glm-pipeline/NAME-nightly` on the Prefect server at PREFECT_API_URL and runs it on
        the schedule (each night: new files are ingested, and pretraining continues from its last
        checkpoint for pretrain.steps more steps when the data changed); Ctrl-C pauses the schedule.
    prefect deploy --all                                       the deployments of prefect.yaml, run by a
        worker of the `glm-process` pool (docker compose up, see docker-compose.yml)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tasks  # noqa: F401  (routes glm logs into Prefect before Prefect configures logging)
from prefect import Task, flow, unmapped
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from glm import stages
from glm.config import PipelineConfig
from tasks import artifacts
from tasks import stages as t
from tasks.options import configure, slug
from tasks.training import pretrain as pretrain_task


def task_runner(cfg: PipelineConfig) -> TaskRunner:
    """The runner of per-shard tasks: orchestration.task_runner with data.workers workers."""
    kind, workers = cfg.orchestration.task_runner, cfg.data.workers
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ImportError(
            "orchestration.task_runner=dask needs prefect-dask: pip install 'glm-pipeline[dask]' "
            "(or choose task_runner threads or processes)"
        ) from None
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers})


def _stage_task(task: Task, cfg: PipelineConfig, stage: str, **options: Any) -> Task:
    """The task with the run's options. Its cached result is trusted only while the stage's output on
    disk is the one made for this key (glm.stages stamps): a deleted or since-overwritten output is rebuilt."""
    paths = stages.RunPaths(cfg.run_dir)
    try:
        current = stages.is_current(stage, stages.stage_key(stage, cfg, paths, **options), paths.output(stage, cfg), paths)
    except stages.StageInputMissing:
        current = True  # nothing to refresh: the task itself fails and says which stage to run first
    return configure(task, cfg, refresh_cache=not current)


def _run(task: Task, cfg: PipelineConfig, stage: str, *args: Any, **options: Any) -> Any:
    """Run a whole-stage task: task(cfg, *args) with the run's options.

    The arguments are plain data, never futures, so they are quoted: Prefect does not walk the
    config's every field looking for futures three times per task run (about 1 ms each).
    """
    return _stage_task(task, cfg, stage, **options)(quote(cfg), *(quote(a) for a in args))


def _map_shards(runner: TaskRunner, task: Task, cfg: PipelineConfig, jobs: list[Any], done: Any, **static: Any) -> list[Any]:
    """Map `task` over jobs on `runner`; a job whose output is missing (done(job) false) skips the cache.

    Jobs are plain data (quoted: Prefect does not walk each one looking for futures)."""
    static = {k: unmapped(v) for k, v in static.items()}
    finished = [bool(done(j)) for j in jobs]
    groups = {False: [j for j, f in zip(jobs, finished) if f], True: [j for j, f in zip(jobs, finished) if not f]}
    futures = []
    for refresh, group in groups.items():
        if group:
            futures += runner.map(configure(task, cfg, refresh_cache=refresh), {"job": [quote(j) for j in group], **static})
    return [f.result() for f in futures]


# --------------------------------------------------------------------------- stage groups


def data_stages(cfg: PipelineConfig) -> dict[str, str]:
    paths = stages.RunPaths(cfg.run_dir)
    out = {"docs": _run(t.ingest, cfg, "ingest")}
    out["docs_validation"] = _run(t.validate_corpus, cfg, "validate-corpus")
    out["tokenizer"] = _run(t.train_tokenizer, cfg, "tokenizer")
    with task_runner(cfg) as runner:  # one pool for both per-shard stages
        entries = _map_shards(runner, t.tokenize_shard, cfg, stages.tokenize_jobs(cfg, paths),
                              lambda job: Path(job["out_path"]).is_file(), run_dir=cfg.run_dir)
        out["tokens"] = _run(t.close_tokenize, cfg, "tokenize", entries)
        out["tokens_validation"] = _run(t.validate_tokens, cfg, "validate-tokens")
        results = _map_shards(runner, t.build_span_corruption_shard, cfg, stages.infill_jobs(cfg, paths),
                              stages.infill_shard_done)
    out["infill"] = _run(t.close_infill, cfg, "infill", results)
    return out


def pretrain_stage(cfg: PipelineConfig, continue_steps: int | None = None) -> dict[str, str]:
    return {"pretrain": _run(pretrain_task, cfg, "pretrain", continue_steps, continue_steps=continue_steps)}


def finetune_stages(cfg: PipelineConfig) -> dict[str, str]:
    out = {"finetune": _run(t.finetune, cfg, "finetune")}
    out["eval"] = _run(t.evaluate, cfg, "evaluate")
    return out


def export_stages(cfg: PipelineConfig) -> dict[str, str]:
    _run(t.export_onnx, cfg, "export")
    return {"export": _run(t.verify_export, cfg, "export")}


# --------------------------------------------------------------------------- flows


@flow(name="glm-pipeline", flow_run_name="{config.name}")
def glm_pipeline(config: PipelineConfig, continue_steps: int | None = None) -> dict[str, str]:
    """Every stage: data, pretraining, fine-tuning and evaluation, export. Returns each stage's output.

    continue_steps: train this many steps past the latest checkpoint (nightly continued pretraining).
    """
    with artifacts.sent():
        return {**data_stages(config), **pretrain_stage(config, continue_steps), **finetune_stages(config), **export_stages(config)}


@flow(name="glm-data", flow_run_name="{config.name}")
def data_flow(config: PipelineConfig) -> dict[str, str]:
    """Documents, tokenizer, token shards and span-corruption shards, each gated by validation."""
    with artifacts.sent():
        return data_stages(config)


@flow(name="glm-pretrain", flow_run_name="{config.name}")
def pretrain_flow(config: PipelineConfig, continue_steps: int | None = None) -> dict[str, str]:
    """Pretraining on the span-corruption shards the data flow built."""
    with artifacts.sent():
        return pretrain_stage(config, continue_steps)


@flow(name="glm-finetune", flow_run_name="{config.name}")
def finetune_flow(config: PipelineConfig) -> dict[str, str]:
    """Fine-tuning from the pretrained checkpoint, and the evaluation report."""
    with artifacts.sent():
        return finetune_stages(config)


@flow(name="glm-export", flow_run_name="{config.name}")
def export_flow(config: PipelineConfig) -> dict[str, str]:
    """The ONNX bundle of the fine-tuned model, verified against PyTorch."""
    with artifacts.sent():
        return export_stages(config)


FLOWS = {"data": data_flow, "pretrain": pretrain_flow, "finetune": finetune_flow, "export": export_flow, "all": glm_pipeline}


class RunTimedOut(TimeoutError):
    """The run took longer than orchestration.timeout_minutes and was stopped."""


def run_stage(cfg: PipelineConfig, stage: str = "all", continue_steps: int | None = None) -> dict[str, str]:
    """Run one stage flow (or the whole pipeline) now, in this process; raises if it fails.

    orchestration.timeout_minutes is the flow's timeout: in this (main) thread Prefect enforces it
    with SIGALRM, which interrupts in-process training between two steps and a training
    subprocess's wait (that subprocess is then killed); the flow run ends TimedOut.
    """
    from prefect.flow_engine import FlowRunTimeoutError

    if stage not in FLOWS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(FLOWS)}")
    minutes = cfg.orchestration.timeout_minutes
    run = FLOWS[stage] if minutes is None else FLOWS[stage].with_options(timeout_seconds=minutes * 60)
    try:
        return run(cfg, continue_steps=continue_steps) if stage in ("pretrain", "all") else run(cfg)
    except FlowRunTimeoutError:
        raise RunTimedOut(
            f"the run exceeded orchestration.timeout_minutes={minutes:g} and was stopped; raise or unset "
            "orchestration.timeout_minutes, then re-run the same command to resume from the last checkpoint"
        ) from None


def serve(cfg: PipelineConfig, cron: str = "0 2 * * *", continue_steps: int | None = None) -> None:
    """Serve the pipeline as deployment `glm-pipeline/NAME-nightly` on a cron schedule (blocks).

    Needs a Prefect server (PREFECT_API_URL). Each scheduled run ingests new files; when the
    data changed, pretraining continues from its latest checkpoint for `continue_steps` more
    steps (default: pretrain.steps).
    """
    glm_pipeline.serve(
        name=f"{slug(cfg.name)}-nightly",
        cron=cron,
        parameters={"config": cfg.model_dump(mode="json"), "continue_steps": continue_steps or cfg.pretrain.steps},
        description=f"GLM pipeline for config {cfg.name!r}: nightly ingestion and continued pretraining",
        tags=["glm", slug(cfg.name)],
    )
