"""The GLM pipeline as Prefect flows: the end-to-end flow and stage flows that also run alone.

    glm_pipeline(config)   data -> pretrain -> finetune + evaluate -> export (one flow run)
    data_flow(config)      ingest, validate, tokenizer, token shards, validate, blank-infilling shards
    pretrain_flow(config)  pretraining (in-process for one device, a subprocess for torchrun or a timeout; resumes from its checkpoint)
    finetune_flow(config)  fine-tuning (+ the from-scratch baseline) and the evaluation report
    export_flow(config)    ONNX bundle, verified against PyTorch

The parameter is the typed PipelineConfig (Prefect validates it before anything runs), given
inline or as {file: configs/tiny.yaml, set: [key=value, ...]}: a YAML config read when the run
starts, with overrides as `glm-pipeline --set` takes them. Every task first asks its stage's
stamp (glm.stages, the pipeline's one cache) whether it is done, so re-running an unchanged
config is a series of "Cached" task runs, and a changed input, config section or glm module
re-runs exactly the stages downstream of it. A stage (or shard) whose output was deleted or
changed on disk is rebuilt.

Ways to run:
    glm-pipeline run configs/tiny.yaml [--stage data]       in-process (Prefect's ephemeral API)
    glm-pipeline serve configs/demo.yaml --cron "0 2 * * *"  one long-lived process that creates the
        deployment `glm-pipeline/NAME-nightly` on the Prefect server at PREFECT_API_URL and runs it on
        the schedule, one run at a time (each night: new files are ingested, and pretraining continues
        from its last checkpoint for pretrain.steps more steps when the data changed); Ctrl-C pauses
        the schedule.
    glm-pipeline deploy                                        the deployments of prefect.yaml (flows/deploy.py),
        run by a worker of the `glm-process` pool: `prefect worker start --pool glm-process`
"""

# No `from __future__ import annotations` here (tests/flows/test_deployment.py checks): a served or
# deployed run unpickles these flows by value, and a string annotation such as "PipelineConfig" then
# names nothing, so Prefect cannot validate the parameters and every run fails before it starts.
import contextlib
import json
from typing import Annotated, Any

import glm_pipeline.tasks  # noqa: F401  (before Prefect: sets the environment that routes glm logs into runs)
from glm_pipeline.flows import api_watch
from glm_pipeline.tasks import artifacts
from glm_pipeline.tasks.options import configure, slug
from glm_pipeline.tasks.runguard import cluster_lock
from glm_pipeline.tasks.stages import tasks_for
from prefect import Task, flow, unmapped
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from glm import stages
from glm.core.config import ConfigError, PipelineConfig, load_config
from glm.core.runlock import run_lock


class ConfigFile(BaseModel):
    """A flow's config by reference: a YAML file (or a name under configs/, read from the run's
    working directory) and `key=value` overrides, as `glm-pipeline run FILE --set ...` takes them."""

    model_config = ConfigDict(extra="forbid")
    file: str
    set: list[str] = Field(default_factory=list)


def _read_config_file(value: Any) -> Any:
    if isinstance(value, dict) and "file" in value:
        ref = ConfigFile.model_validate(value)
        return load_config(ref.file, ref.set)  # a ConfigError (a ValueError) names the file and the fix
    return value


# The flows' `config` parameter: a PipelineConfig (inline), or a ConfigFile that becomes one when the
# run's parameters are validated, so a deployment can reference configs/tiny.yaml instead of copying it.
ConfigParameter = Annotated[
    PipelineConfig, BeforeValidator(_read_config_file, json_schema_input_type=PipelineConfig | ConfigFile)
]


# Prefect's server refuses flow-run parameters over this many bytes (a 422 that echoes them all)
MAX_PARAMETER_BYTES = 524_288


def check_parameter_size(cfg: PipelineConfig) -> None:
    """Refuse, before Prefect starts, a config too large to be a flow run's parameter, naming what makes it so."""
    data = cfg.model_dump(mode="json")
    size = len(json.dumps(data).encode())
    if size <= MAX_PARAMETER_BYTES:
        return
    parts = {f"{section}.{key}": value for section, body in data.items() if isinstance(body, dict) for key, value in body.items()}
    biggest, value = max(parts.items(), key=lambda kv: len(json.dumps(kv[1])))
    what = f"{len(value):,} entries, " if isinstance(value, (list, dict)) else ""
    hint = (
        "give a directory or a glob as one source's path (e.g. {kind: text, path: 'corpus/**/*.txt'}) instead of one source per file"
        if biggest == "data.sources"
        else f"make {biggest} smaller"
    )
    raise ConfigError(
        f"config {cfg.name!r} is {size:,} bytes as a Prefect flow parameter, over Prefect's limit of "
        f"{MAX_PARAMETER_BYTES:,} ({biggest}: {what}{len(json.dumps(value)):,} bytes); {hint}"
    )


def this_flow_run() -> str | None:
    """The run lock's owner: a later attempt of the same flow run (a false zombie re-run) waits for the first."""
    from prefect.runtime import flow_run

    return f"flow run {flow_run.id}" if flow_run.id else None


def task_runner(cfg: PipelineConfig) -> TaskRunner:
    """The runner of per-shard tasks: orchestration.task_runner with data.workers workers, or the
    existing Dask cluster at orchestration.dask_address (its workers need this project installed,
    PREFECT_API_URL pointing at the same server, and the run directory at the same path)."""
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
    if cfg.orchestration.dask_address:
        return DaskTaskRunner(address=cfg.orchestration.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers})


def _run(task: Task, cfg: PipelineConfig, *args: Any, **options: Any) -> Any:
    """Run a whole-stage task: task(cfg, *args, **options) with the run's retry options.

    The arguments are plain data, never futures, so they are quoted: Prefect does not walk the
    config's every field looking for futures three times per task run (about 1 ms each).
    """
    return configure(task, cfg)(quote(cfg), *(quote(a) for a in args), **{k: quote(v) for k, v in options.items()})


def _map_shards(runner: TaskRunner, task: Task, cfg: PipelineConfig, jobs: list[Any]) -> list[Any]:
    """Map `task` over shard jobs on `runner` (each task ends "Cached" when its shard is done).

    Jobs are plain data (quoted: Prefect does not walk each one looking for futures). Not on Dask:
    prefect-dask 0.3.7 hands the quote wrapper itself to the task-run name template on the worker
    ("tuple indices must be integers"), so there they go as they are."""
    plain = type(runner).__name__ == "DaskTaskRunner"
    futures = runner.map(
        configure(task, cfg), {"job": [j if plain else quote(j) for j in jobs], "run_dir": unmapped(cfg.run_dir)}
    )
    return [f.result() for f in futures]


# --------------------------------------------------------------------------- stage groups


def run_group(group: str, cfg: PipelineConfig, continue_steps: int | None = None) -> dict[str, str]:
    """Every stage of a group (glm.stages.GROUPS, or "all"), in registry order, as Prefect tasks.

    A mapped stage's shards run on one task runner, opened once for the group; a stage built in
    steps runs one task per step. Returns each stage's output (checks, which have none, are left out).
    """
    if group == "all":
        return {name: done for g in stages.GROUPS for name, done in run_group(g, cfg, continue_steps).items()}
    paths = stages.RunPaths(cfg.run_dir)
    run_options = {"continue_steps": continue_steps}
    out: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        runner: TaskRunner | None = None
        for st in stages.stages_of(group):
            made = tasks_for(st)
            options = {name: run_options.get(name) for name in st.options}
            if st.mapped:
                runner = runner or stack.enter_context(task_runner(cfg))
                done = _run(made.close, cfg, _map_shards(runner, made.shard, cfg, st.plan(cfg, paths)))
            else:
                for one in made.steps or (made.whole,):
                    done = _run(one, cfg, options) if options else _run(one, cfg)
            if st.output is not None:
                out[st.name] = done
    return out


def finish(cfg: PipelineConfig, out: dict[str, str]) -> Any:
    """The flow run's final state: when this run's bundle was refused by the gate (glm.bundles), a
    COMPLETED state named "Not promoted" whose message says why and which version stays current, so
    the runs list shows it at a glance (docs/architecture.md, "Bundles"); otherwise the outputs."""
    from pathlib import Path

    from prefect.states import Completed

    from glm import bundles

    if "export" not in out:
        return out
    export = Path(cfg.run_dir) / "export"
    stats = artifacts.export_stats(export)
    if not stats.get("version"):
        return out
    stats["current"] = bundles.current_version(export)  # a version may have been promoted by hand since
    promoted = stats.get("blessed") and stats["current"] == stats["version"]
    message = artifacts.gate_headline(cfg, stats)
    return Completed(name="Completed" if promoted else "Not promoted", message=message[:1000], data=out)


# --------------------------------------------------------------------------- flows


@flow(name="glm-pipeline", flow_run_name="{config.name}")
def glm_pipeline(config: ConfigParameter, continue_steps: int | None = None) -> dict[str, str]:
    """Every stage: data, pretraining, fine-tuning and evaluation, export. Returns each stage's output.

    continue_steps: train this many steps past the latest checkpoint (nightly continued pretraining).
    """
    with (
        run_lock(config.run_dir, owner=this_flow_run()),
        cluster_lock(config.run_dir),  # the same across machines (tasks/runguard.py)
        artifacts.sent(),
        api_watch.watch(config.run_dir),
    ):  # one run per run directory, also when served or deployed
        stages.check_lineage(config)  # and one lineage: refused before anything is touched
        return finish(config, run_group("all", config, continue_steps))


@flow(name="glm-data", flow_run_name="{config.name}")
def data_flow(config: ConfigParameter) -> dict[str, str]:
    """Documents, tokenizer, token shards and blank-infilling shards, each gated by validation."""
    with (
        run_lock(config.run_dir, owner=this_flow_run()),
        cluster_lock(config.run_dir),
        artifacts.sent(),
        api_watch.watch(config.run_dir),
    ):
        stages.check_lineage(config)
        return run_group("data", config)


@flow(name="glm-pretrain", flow_run_name="{config.name}")
def pretrain_flow(config: ConfigParameter, continue_steps: int | None = None) -> dict[str, str]:
    """Pretraining on the blank-infilling shards the data flow built."""
    with (
        run_lock(config.run_dir, owner=this_flow_run()),
        cluster_lock(config.run_dir),
        artifacts.sent(),
        api_watch.watch(config.run_dir),
    ):
        stages.check_lineage(config)
        return run_group("pretrain", config, continue_steps)


@flow(name="glm-finetune", flow_run_name="{config.name}")
def finetune_flow(config: ConfigParameter) -> dict[str, str]:
    """Fine-tuning from the pretrained checkpoint, and the evaluation report."""
    with (
        run_lock(config.run_dir, owner=this_flow_run()),
        cluster_lock(config.run_dir),
        artifacts.sent(),
        api_watch.watch(config.run_dir),
    ):
        stages.check_lineage(config)
        return run_group("finetune", config)


@flow(name="glm-export", flow_run_name="{config.name}")
def export_flow(config: ConfigParameter) -> dict[str, str]:
    """The ONNX bundle of the fine-tuned model, verified against PyTorch."""
    with (
        run_lock(config.run_dir, owner=this_flow_run()),
        cluster_lock(config.run_dir),
        artifacts.sent(),
        api_watch.watch(config.run_dir),
    ):
        stages.check_lineage(config)
        return finish(config, run_group("export", config))


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
    check_parameter_size(cfg)  # before the flow run is created (and an ephemeral server started)
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
    steps (default: pretrain.steps). Runs go one at a time: every run writes the same run_dir, so
    a run started by hand while the scheduled one trains waits for it. Ctrl-C (or SIGTERM)
    pauses the deployment's schedule and exits.
    """
    check_parameter_size(cfg)
    glm_pipeline.serve(
        name=f"{slug(cfg.name)}-nightly",
        cron=cron,
        parameters={"config": cfg.model_dump(mode="json"), "continue_steps": continue_steps or cfg.pretrain.steps},
        description=f"GLM pipeline for config {cfg.name!r}: nightly ingestion and continued pretraining",
        tags=["glm", slug(cfg.name)],
        limit=1,
    )
