"""Stage `pretrain`: the run's plan (budget, precision, continued pretraining), training, pretrain/manifest.json."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from glm.core.config import PipelineConfig, dump_config
from glm.core.contracts import (
    InfillStats,
    PretrainStats,
    TrainSummary,
    check,
)
from glm.core.shards import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_entry,
    manifest_digest,
    read_stats,
    write_manifest,
)
from glm.pipeline.common import vocab_size
from glm.pipeline.engine import (
    LAYOUT,
    RUN_CONFIG,
    RUN_PLAN,
    RunPaths,
    Stage,
    _file_identity,
    record_lineage,
    stage_key,
)

log = logging.getLogger(__name__)


def _loader_data_key(checkpoint: Path) -> str | None:
    from glm.training.checkpoint import load_trainer_state

    ranks = load_trainer_state(checkpoint).get("ranks") or [{}]
    return (ranks[0].get("loader") or {}).get("data")


def _latest_archived(paths: RunPaths) -> Path | None:
    """The newest checkpoint of the newest archive in pretrain/history/ (archives are named TIME-step-N)."""
    from glm.training.checkpoint import latest_checkpoint

    history = paths.pretrain / "history"
    archives = sorted(p for p in history.iterdir() if p.is_dir()) if history.is_dir() else []
    for archive in reversed(archives):
        if (found := latest_checkpoint(archive)) is not None:
            return found
    return None


def prepare_pretrain(cfg: PipelineConfig, paths: RunPaths, continue_steps: int | None = None) -> PipelineConfig:
    """The config this run trains with, written to pretrain/run-config.yaml.

    Continued pretraining: when the blank-infilling data changed since pretrain/'s latest
    checkpoint (new documents were ingested), those checkpoints (and the manifest that describes
    them) move to pretrain/history/TIME-step-N/ and the run starts from the latest of them
    (train.init_from) on the new data. With no checkpoint in pretrain/checkpoints/ (a run that was
    archived, then crashed or was interrupted before its first checkpoint), the newest archived
    checkpoint is where the run starts: a grown corpus never restarts pretraining from scratch.

    How far a continued run trains: `continue_steps` steps past where it starts when given (the
    nightly deployment's parameter), else the config's per-run amount: pretrain.steps more steps
    (or what pretrain.budget_minutes buys, counted from where it starts). The target is fixed per
    stage key, so a crashed run that is retried aims at the same step.

    What must be measured is decided here once per run (glm.budget: pretrain.budget_minutes into
    steps counted from where the run starts, precision auto on a CPU with native bf16) and kept in
    pretrain/run-plan.json with where the run started; run-config.yaml holds the result under a
    comment that says why.
    """
    from glm.training.budget import apply_plan
    from glm.training.checkpoint import latest_checkpoint, read_meta, resolve_checkpoint

    key = stage_key("pretrain", cfg, paths, continue_steps=continue_steps)
    record_lineage(cfg, paths)  # the run directory's checkpoints will be this config's (check_lineage passed)
    plan_path = paths.pretrain / RUN_PLAN
    plan = _read_plan(paths)
    if plan.get("key") != key:
        data_key = read_stats(paths.infill, InfillStats)["build_key"]
        latest = latest_checkpoint(paths.pretrain / "checkpoints") if (paths.pretrain / "checkpoints").is_dir() else None
        configured = cfg.pretrain.init_from or _imported_checkpoint(cfg, paths)  # model.init.from: the imported release
        init_from = configured
        continued = False  # this run starts from weights trained on other data
        if latest is not None and _loader_data_key(latest) != data_key:
            archive = _archive_checkpoints(paths, latest)
            init_from, continued = str(archive / latest.name), True
            log.info("pretrain: the training data changed; continuing from %s on the new data", init_from)
        elif latest is None and (archived := _latest_archived(paths)) is not None:
            init_from, continued = str(archived), True
            log.info("pretrain: no checkpoint in pretrain/checkpoints; continuing from the archived %s", init_from)
        start = latest if latest is not None and not continued else (resolve_checkpoint(init_from) if init_from else None)
        start_step = int(read_meta(start)["step"]) if start is not None else 0
        same_run = latest is not None and not continued  # not archived: this run goes on
        resolved = _resolve_pretrain(cfg, paths, plan.get("resolved") if same_run else None, continue_steps)
        budget = resolved.get("budget")
        if continue_steps:
            steps = start_step + continue_steps
        elif budget:
            # counted from where this training starts; a resumed run reuses its plan, so this is fixed per run
            steps = budget.get("target") or start_step + budget["steps"]
            budget["target"] = steps
        elif continued:
            steps = start_step + cfg.pretrain.steps  # each run on grown data trains pretrain.steps more
        else:
            steps = cfg.pretrain.steps
        plan = {"key": key, "steps": steps, "init_from": init_from, "resolved": resolved}
        plan["start"] = {"step": start_step, "checkpoint": str(start) if start is not None else None, "continued": continued}
        atomic_write_json(plan_path, plan)
    run_cfg = cfg.model_copy(deep=True)
    if "resolved" in plan:
        run_cfg.pretrain = apply_plan(cfg.pretrain, plan["resolved"])
    run_cfg.pretrain.steps = plan["steps"]
    run_cfg.pretrain.init_from = plan["init_from"]
    run_cfg.pretrain.budget_minutes = None  # resolved into steps above
    header = "".join(f"# {line}\n" for line in _plan_lines(plan))
    atomic_write_text(paths.pretrain / RUN_CONFIG, header + dump_config(run_cfg))
    return run_cfg


def _archive_checkpoints(paths: RunPaths, latest: Path) -> Path:
    """Move pretrain/checkpoints/ (and the manifest that describes them, whose lineage the next
    manifest extends) to pretrain/history/TIME-step-N/; returns the archive."""
    base = paths.pretrain / "history" / f"{time.strftime('%Y%m%d-%H%M%S')}-{latest.name}"
    archive, n = base, 1
    while archive.exists():  # two archivals within one second
        archive, n = base.with_name(f"{base.name}-{n}"), n + 1
    archive.parent.mkdir(parents=True, exist_ok=True)
    if (paths.pretrain / MANIFEST).is_file():
        atomic_write_bytes(paths.pretrain / "checkpoints" / MANIFEST, (paths.pretrain / MANIFEST).read_bytes())
    os.rename(paths.pretrain / "checkpoints", archive)
    return archive


def _pretrain_lineage(paths: RunPaths, start: Mapping[str, Any], step: int) -> list[dict[str, Any]]:
    """What the final weights saw, oldest first: one segment per run of training (data, from_step, to_step).

    The segments before this run come from the manifest archived with the checkpoint it started
    from; this run's segment names the blank-infilling data and documents it trained on.
    """
    segments: list[dict[str, Any]] = []
    checkpoint = Path(start["checkpoint"]) if start.get("checkpoint") else None
    if checkpoint is not None and start.get("continued"):
        try:
            before = json.loads((checkpoint.parent / MANIFEST).read_text(encoding="utf-8"))["stats"]
            segments = [dict(s) for s in before.get("lineage") or [] if s.get("from_step", 0) < start["step"]]
        except (OSError, ValueError, KeyError, TypeError):
            segments = []
        if segments:
            segments[-1]["to_step"] = min(segments[-1]["to_step"], start["step"])
        else:  # archived before manifests carried a lineage: what its checkpoint itself tells
            segments = [{"from_step": 0, "to_step": start["step"], "infill": _loader_data_key(checkpoint), "documents": None}]
    elif checkpoint is not None and start.get("step"):  # init_from another run's checkpoint
        segments = [{"from_step": 0, "to_step": start["step"], "infill": None, "documents": None, "init_from": str(checkpoint)}]
    segments.append(
        {
            "from_step": int(start.get("step") or 0),
            "to_step": step,
            "infill": read_stats(paths.infill, InfillStats)["build_key"],
            "documents": manifest_digest(paths.docs / MANIFEST) if (paths.docs / MANIFEST).is_file() else None,
        }
    )
    return segments


def _imported_checkpoint(cfg: PipelineConfig, paths: RunPaths) -> str | None:
    """model.init.from: the released GLM imported once into RUN/imported/ as a weights-only checkpoint."""
    init = cfg.model.init
    if init is None or init.from_ is None:
        return None
    from glm.released import import_to_checkpoint
    from glm.training.checkpoint import latest_checkpoint, read_meta

    out = paths.root / "imported"
    source = str(Path(init.from_).resolve())
    done = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    if done is None or read_meta(done).get("imported_from") != source:
        done, _ = import_to_checkpoint(init.from_, out, dtype=init.dtype, n_head=init.n_head, tokenizer_dir=init.tokenizer)
        log.info("pretrain: imported the released GLM %s into %s", source, done)
    return str(done)


def _read_plan(paths: RunPaths) -> dict[str, Any]:
    try:
        plan = json.loads((paths.pretrain / RUN_PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or not one we wrote
        return {}
    return plan if isinstance(plan, dict) else {}


def _plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The run plan's decisions in words: the budget's line, the precision and why."""
    resolved = plan.get("resolved") or {}
    lines = [resolved["budget"]["line"]] if resolved.get("budget") else []
    if resolved.get("precision"):
        p = resolved["precision"]
        lines.append(f"precision {p['requested']} -> {p['chosen']}: {p['why']}")
    return lines


def _resolve_pretrain(
    cfg: PipelineConfig, paths: RunPaths, previous: Mapping[str, Any] | None, continue_steps: int | None
) -> dict[str, Any]:
    """glm.budget.plan_pretrain on this run's data, unless `previous` (the same run's earlier plan, made for the
    same budget and precision) already decided: a resumed run keeps its steps and precision, never re-measures."""
    from glm.data.loader import InfillingData, TrainLoader
    from glm.training.pretrain_plan import plan_pretrain
    from glm.training.train import vocab_size_from_data

    pre = cfg.pretrain.model_copy(update={"budget_minutes": None}) if continue_steps else cfg.pretrain
    if previous and previous.get("precision", {}).get("requested") == pre.precision:
        budget = previous.get("budget")
        if (budget or {}).get("budget_minutes") == pre.budget_minutes:
            return dict(previous)
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        vocab = vocab_size_from_data(paths.infill) or -(-vocab_size(paths) // 64) * 64  # as glm.train rounds it
        model_cfg = model_cfg.model_copy(update={"vocab_size": vocab})

    def batches() -> Any:
        return iter(TrainLoader(data, pre.micro_batch_size, seed=pre.seed))

    data = InfillingData(paths.infill, seq_len=cfg.infilling.seq_len, max_seq_len=model_cfg.max_seq_len)
    return plan_pretrain(pre, model_cfg, batches, data.objective_mix)


def pretrain_command(run_cfg: PipelineConfig, paths: RunPaths, python: str = sys.executable) -> list[str]:
    """`python -m glm.train ...` for one process, torchrun for several (one node, or this node of
    pretrain.nnodes: glm.launch.train_command); `run_cfg` is what prepare_pretrain returned (and wrote)."""
    from glm.launch import train_command

    return train_command(run_cfg, paths.pretrain / RUN_CONFIG, paths.infill, paths.pretrain, python=python)


def close_pretrain(cfg: PipelineConfig, paths: RunPaths, result: TrainSummary) -> Path:
    """pretrain/manifest.json: the final checkpoint's files, the run's numbers, the data it used."""
    checkpoint = Path(result["checkpoint"]) if result.get("checkpoint") else None
    if checkpoint is None or not (checkpoint / "meta.json").is_file():
        raise RuntimeError(f"pretraining reported no final checkpoint ({result}); see the training log")
    files = [file_entry(p, paths.pretrain) for p in sorted(checkpoint.iterdir()) if p.is_file()]
    stats = PretrainStats(
        checkpoint=checkpoint.relative_to(paths.pretrain).as_posix(),
        step=result["step"],
        loss=result["loss"],
        val_loss=result["val_loss"],
        tokens=result["tokens"],
        elapsed=result["elapsed"],
        bad_steps=result["bad_steps"],
        resumed_from=result["resumed_from"],
    )
    plan = _read_plan(paths)
    start = plan.get("start") or {"step": 0, "checkpoint": None, "continued": False}
    # the truth about what the weights saw: where this run started, how many steps it trained on
    # this data, and every earlier run's data and steps (steps_this_run 0 means the data went unseen)
    stats["start_step"] = int(start.get("step") or 0)
    stats["steps_this_run"] = int(result["step"]) - stats["start_step"]
    stats["continued_from"] = start.get("checkpoint") if start.get("continued") else None
    stats["lineage"] = _pretrain_lineage(paths, start, int(result["step"]))
    resolved = plan.get("resolved") or {}
    if resolved.get("precision"):
        stats["precision"] = {k: resolved["precision"][k] for k in ("requested", "chosen", "why")}
    if resolved.get("budget"):
        b = resolved["budget"]
        keep = ("budget_minutes", "seconds_per_step", "steps", "target", "capped_by", "measuring_seconds", "line")
        stats["budget"] = {k: b.get(k) for k in keep}
    config = {"model": cfg.model.model_dump(mode="json"), "pretrain": cfg.pretrain.model_dump(mode="json")}
    return write_manifest(paths.pretrain, "pretrain", files, config=config, inputs=[paths.infill / MANIFEST], stats=stats)


def train(
    cfg: PipelineConfig,
    paths: RunPaths,
    continue_steps: int | None = None,
    *,
    log_line: Callable[[str], None] | None = None,
    progress: Callable[..., None] | None = None,
) -> Path:
    """Pretrain and write pretrain/manifest.json: the one training path, with or without an orchestrator.

    One device without a timeout trains in this process (orchestration.train_in_process=auto): no
    start-up cost. A subprocess (`python -m glm.train`, torchrun for pretrain.nproc > 1) when a
    timeout is set or asked for: it can then be timed out and killed with its workers, and its
    crash is a failed, retryable run. Either way training resumes from its newest intact
    checkpoint, and failures are classified alike (glm.launch): TrainingFailed is permanent,
    TrainingCrashed is worth a retry. `log_line` gets the subprocess's output line by line;
    `progress(step, total, final=False)` gets the steps done, first the step it starts from.
    """
    from glm import launch
    from glm.core.errors import ERROR_FILE

    say = log_line or log.info
    run_cfg = prepare_pretrain(cfg, paths, continue_steps)
    for line in _plan_lines(_read_plan(paths)):  # what the run decided once: its budget's steps, its precision
        say(line)
    total = run_cfg.pretrain.steps
    tail = launch.MetricsTail(paths.pretrain / "metrics.jsonl")
    show = progress or (lambda step, total, final=False: None)
    show(tail.poll() if (paths.pretrain / "checkpoints").is_dir() else 0, total)
    if cfg.trains_in_process():
        say(f"training in this process (orchestration.train_in_process={cfg.orchestration.train_in_process})")
        result = launch._train_in_process(run_cfg, paths, on_metrics=lambda record: show(int(record["step"]), total))
    elif run_cfg.pretrain.cluster is not None:  # a SLURM or Kubernetes job, submitted and watched (glm.cluster)
        from glm import cluster

        (paths.pretrain / ERROR_FILE).unlink(missing_ok=True)
        timeout = cfg.orchestration.train_timeout_seconds
        finished = cluster.run_job(run_cfg, paths.root, log_line=say, timeout=timeout, on_poll=lambda: show(tail.poll(), total))
        result = parse_train_result("\n".join(finished.lines))
    else:
        cmd = pretrain_command(run_cfg, paths)
        say(f"launching: {' '.join(cmd)}")
        (paths.pretrain / ERROR_FILE).unlink(missing_ok=True)  # what an earlier attempt recorded
        finished = launch.run_logged(
            cmd, log=say, timeout=cfg.orchestration.train_timeout_seconds, on_poll=lambda: show(tail.poll(), total)
        )
        if finished.returncode != 0:
            raise launch._exit_error(finished, cmd, paths.pretrain)
        result = parse_train_result("\n".join(finished.lines))
    manifest = close_pretrain(cfg, paths, result)
    show(int(result["step"]), total, final=True)
    return manifest


def parse_train_result(stdout: str) -> TrainSummary:
    """The TrainResult JSON line `python -m glm.train` prints last."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            return check(TrainSummary, result, "the result line of python -m glm.train")
    raise RuntimeError("the training process printed no result line; see its log")


def _pretrain_extra(cfg: PipelineConfig, continue_steps: int | None = None) -> dict[str, Any]:
    return {"init_from": _file_identity(cfg.pretrain.init_from), "continue_steps": continue_steps}


STAGE = Stage(
    "pretrain",
    "pretrain",
    f"{LAYOUT['pretrain']}/{MANIFEST}",
    sections=("model", "pretrain", "infilling"),
    inputs=("infill",),
    extra=_pretrain_extra,
    options=("continue_steps",),
    build=train,
    stats=PretrainStats,
)
