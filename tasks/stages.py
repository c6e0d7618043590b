"""The pipeline's Prefect tasks, made from the stage declarations in glm.stages.REGISTRY.

Each stage becomes a task (a stage built in steps, one task per step; a mapped stage, a task per
shard and one that closes the stage). Every task first asks the stamps whether its stage (or
shard) is done and, if so, ends as "Cached" without running it (tasks.options.cached); otherwise
it runs the stage through glm.stages (the same code as the plain runner) and publishes the stage's
artifacts. Tasks take the typed config (small) or a shard job and return paths or small dicts,
never data; retries are applied per run by tasks.options.configure.

Only what is Prefect's lives here: task names, artifacts, the training run's logger and progress.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from glm_pipeline.tasks import artifacts
from glm_pipeline.tasks.finetuning import finetune_hooks
from glm_pipeline.tasks.options import TASK_OPTIONS, cached, cached_result
from glm_pipeline.tasks.training import training_hooks
from prefect import Task, task

from glm import stages
from glm.core.config import PipelineConfig


def _infill_run_name(parameters: dict[str, Any]) -> str:
    job = parameters["job"]
    where = "valid" if job.plan.split == "valid" else f"epoch-{job.plan.epoch:03d}"
    return f"infill-{where}-shard-{job.shard_index:05d}"


# The names users and dashboards know. A stage's task is named after the stage (a step after the
# step) and its runs "{task}-{cfg.name}", unless listed here.
TASK_NAMES = {"tokenizer": "train-tokenizer", "tokenize": "close-tokenize", "infill": "close-infill"}
SHARD_TASK_NAMES = {"tokenize": "tokenize-shard", "infill": "infill-shard"}  # default: STAGE-shard
RUN_NAMES: dict[str, str | Callable[[dict[str, Any]], str]] = {
    "check-finetune-task": "check-finetune-task-{cfg.finetune.task.name}",
    "finetune": "finetune-{cfg.finetune.task.name}",
    "tokenize-shard": "tokenize-{job[shard]}",
    "infill-shard": _infill_run_name,
}

# stage -> what its task publishes once the stage is built
ARTIFACTS: dict[str, Callable[[PipelineConfig, stages.RunPaths], None]] = {
    "ingest": lambda cfg, paths: artifacts.corpus_statistics(cfg, paths.docs),
    "validate-corpus": lambda cfg, paths: artifacts.validation_results(cfg, paths.docs / stages.VALIDATION, "corpus"),
    "tokenizer": lambda cfg, paths: artifacts.tokenizer_summary(cfg, paths.tokenizer),
    "tokenize": lambda cfg, paths: artifacts.token_statistics(cfg, paths.tokens),
    "validate-tokens": lambda cfg, paths: artifacts.validation_results(cfg, paths.tokens / stages.VALIDATION, "token"),
    "pretrain": lambda cfg, paths: artifacts.loss_table(cfg, paths.pretrain / "metrics.jsonl"),
    "finetune": lambda cfg, paths: artifacts.finetune_summary(
        cfg, stages.finetune_results(cfg, paths), paths.finetune(cfg.finetune.task.name)
    ),
    "evaluate": lambda cfg, paths: artifacts.evaluation_report(cfg, paths.eval),
    "export": lambda cfg, paths: artifacts.bundle_gate(cfg, paths.export),  # + the glm.bundle.* event
    "export-generation": lambda cfg, paths: artifacts.export_bundle(cfg, paths.generation / "bundle", kind="generation"),
}
EVEN_WHEN_FAILED = {"validate-corpus", "validate-tokens"}  # a failed quality gate's results are what to look at

# stage -> (cfg) -> keyword arguments only its build takes, made for this task run
HOOKS: dict[str, Callable[[PipelineConfig], dict[str, Any]]] = {"pretrain": training_hooks, "finetune": finetune_hooks}


def check_tables(registry: dict[str, stages.Stage] | None = None) -> None:
    """Every stage named in the tables above is a declared stage (and every run name a task's name), checked at
    import: a renamed or misspelled stage fails here with its name, not later as a task that silently lost
    its artifacts or its run name."""
    registry = stages.REGISTRY if registry is None else registry
    tables = {"TASK_NAMES": TASK_NAMES, "ARTIFACTS": ARTIFACTS, "HOOKS": HOOKS, "EVEN_WHEN_FAILED": EVEN_WHEN_FAILED}
    for table, names in tables.items():
        unknown = sorted(set(names) - set(registry))
        if unknown:
            raise ValueError(f"tasks/stages.py {table} names {unknown}, which are not stages ({', '.join(registry)})")
    mapped = {name for name, st in registry.items() if st.mapped}
    if unknown := sorted(set(SHARD_TASK_NAMES) - mapped):
        raise ValueError(f"tasks/stages.py SHARD_TASK_NAMES names {unknown}, which are not mapped stages ({', '.join(mapped)})")
    task_names = set()  # as tasks_for makes them
    for name, st in registry.items():
        if st.mapped:
            task_names |= {SHARD_TASK_NAMES.get(name, f"{name}-shard"), TASK_NAMES.get(name, f"close-{name}")}
        elif st.steps:
            task_names |= {step for step, _ in st.steps}
        else:
            task_names.add(TASK_NAMES.get(name, name))
    if unknown := sorted(set(RUN_NAMES) - task_names):
        raise ValueError(f"tasks/stages.py RUN_NAMES names {unknown}, which are not task names ({', '.join(sorted(task_names))})")


check_tables()


@dataclasses.dataclass(frozen=True)
class StageTasks:
    """The tasks of one stage: `whole` (built at once), `steps` (built in steps), or `shard` + `close` (mapped)."""

    stage: stages.Stage
    whole: Task | None = None
    steps: tuple[Task, ...] = ()
    shard: Task | None = None
    close: Task | None = None


def _make(fn: Callable[..., Any], name: str, doc: str | None, run_name: str | None = "{name}-{{cfg.name}}") -> Task:
    fn.__name__ = fn.__qualname__ = name.replace("-", "_")
    fn.__doc__ = doc
    default = run_name.format(name=name) if run_name else None
    return task(fn, name=name, task_run_name=RUN_NAMES.get(name, default), **TASK_OPTIONS)


def _returned(done: Any) -> Any:
    return str(done) if isinstance(done, Path) else done


def _publish(st: stages.Stage, cfg: PipelineConfig, paths: stages.RunPaths) -> None:
    if st.name in ARTIFACTS:
        ARTIFACTS[st.name](cfg, paths)


def _whole_task(st: stages.Stage) -> Task:
    def run(cfg: PipelineConfig, options: dict[str, Any] | None = None) -> Any:
        options = options or {}
        if (done := cached(cfg, st, **options)) is not None:
            return done
        paths = stages.RunPaths(cfg.run_dir)
        hooks = HOOKS[st.name](cfg) if st.name in HOOKS else None
        try:
            done = stages.run_stage(st, cfg, paths, hooks=hooks, **options)
        except BaseException:
            if st.name in EVEN_WHEN_FAILED:
                _publish(st, cfg, paths)
            raise
        _publish(st, cfg, paths)
        return _returned(done)

    return _make(run, TASK_NAMES.get(st.name, st.name), st.build.__doc__ if st.build else None)


def _step_task(st: stages.Stage, index: int) -> Task:
    name, step = st.steps[index]
    last = index == len(st.steps) - 1

    def run(cfg: PipelineConfig, options: dict[str, Any] | None = None) -> Any:
        options = options or {}
        if (done := cached(cfg, st, **options)) is not None:
            return done
        paths = stages.RunPaths(cfg.run_dir)
        done = stages.run_step(st, index, cfg, paths, **options)
        if last:
            _publish(st, cfg, paths)
        return _returned(done)

    return _make(run, name, step.__doc__)


def _shard_task(st: stages.Stage) -> Task:
    stage = st.name  # looked up where the task runs: a process pool's worker unpickles only the name

    def run(job: Any, run_dir: str) -> Any:
        paths = stages.RunPaths(run_dir)
        if (done := cached_result(stages.shard_result(stage, job, paths))) is not None:
            return done
        return stages.run_shard(stage, job, paths)

    return _make(run, SHARD_TASK_NAMES.get(st.name, f"{st.name}-shard"), st.shard.__doc__, run_name=None)


def _close_task(st: stages.Stage) -> Task:
    def run(cfg: PipelineConfig, results: list[Any]) -> str:
        if (done := cached(cfg, st)) is not None:
            return done
        paths = stages.RunPaths(cfg.run_dir)
        done = stages.close_stage(st, cfg, paths, results)
        _publish(st, cfg, paths)
        return str(done)

    return _make(run, TASK_NAMES.get(st.name, f"close-{st.name}"), st.close.__doc__)


_MADE: dict[int, tuple[stages.Stage, StageTasks]] = {}


def tasks_for(stage: str | stages.Stage) -> StageTasks:
    """The Prefect tasks of a stage (made once per declaration)."""
    st = stages.REGISTRY[stage] if isinstance(stage, str) else stage
    known = _MADE.get(id(st))
    if known is not None and known[0] is st:
        return known[1]
    if st.mapped:
        made = StageTasks(st, shard=_shard_task(st), close=_close_task(st))
    elif st.steps:
        made = StageTasks(st, steps=tuple(_step_task(st, i) for i in range(len(st.steps))))
    else:
        made = StageTasks(st, whole=_whole_task(st))
    _MADE[id(st)] = (st, made)
    return made


TASKS = {name: tasks_for(name) for name in stages.REGISTRY}
ingest = TASKS["ingest"].whole  # a task to configure in tests and scripts
