"""The pretraining task: glm.train in the task's thread (one device) or in a subprocess.

One device trains in the task's thread by default (orchestration.train_in_process=auto): no
start-up cost, the same glm call a script would make. A subprocess (`python -m glm.train`, or
torchrun for pretrain.nproc > 1) when a timeout is set or asked for (train_in_process=false):
the task can then time it out and kill it (with torchrun's workers: it runs in its own process
group), and a crash of the training process is a failed, retryable task run. Either way
glm.train resumes from its latest checkpoint, so a retry (or a re-run of the flow) continues
where a killed run stopped.

A subprocess's output goes to the run log line by line and pretrain/metrics.jsonl is tailed
into a progress artifact; in-process, glm's own log records and metrics callback do the same.

Both ways classify a failure alike (glm.train.failure_kind): a config, data, divergence or disk
problem is TrainingFailed, permanent, never retried; anything else (an uncaught exception, a
signal, out of memory) is TrainingCrashed, retried. A subprocess reports the first by its exit
code and pretrain/last-error.json (glm.errors), which also outlives torchrun's exit code 1.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glm_pipeline.tasks import artifacts
from glm_pipeline.tasks.options import TASK_OPTIONS, cached
from prefect import get_run_logger, task

from glm import stages
from glm.config import PipelineConfig
from glm.errors import ERROR_FILE, KINDS_BY_CODE, PermanentError, read_error_file

POLL_SECONDS = 1.0
KILL_GRACE_SECONDS = 10.0


class TrainingTimeout(TimeoutError):
    """The training process ran past orchestration.train_timeout_seconds and was killed."""


class TrainingCrashed(RuntimeError):
    """Training crashed (an uncaught exception, a signal, out of memory...): a retry resumes from its checkpoint."""


class TrainingFailed(PermanentError):
    """Training stopped on a problem a retry cannot fix; `kind` is config, data, diverged, disk or usage."""


@dataclass
class Finished:
    returncode: int
    lines: list[str] = field(default_factory=list)  # the last lines of output


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it if it has not exited after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(
    cmd: list[str],
    *,
    log: Callable[[str], None],
    timeout: float | None = None,
    on_poll: Callable[[], None] | None = None,
    poll_seconds: float = POLL_SECONDS,
    keep_lines: int = 200,
    env: dict[str, str] | None = None,
) -> Finished:
    """Run `cmd`, sending each output line to `log`; call `on_poll` every poll_seconds; kill it
    (and its process group) after `timeout` seconds with TrainingTimeout."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True, env=env
    )
    tail: collections.deque[str] = collections.deque(maxlen=keep_lines)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)

    reader = threading.Thread(target=pump, name="train-output", daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                proc.wait(timeout=poll_seconds if deadline is None else max(0.0, min(poll_seconds, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                pass
            if on_poll is not None:
                on_poll()
            if deadline is not None and time.monotonic() >= deadline:
                _kill_group(proc, KILL_GRACE_SECONDS)
                raise TrainingTimeout(
                    f"training ran longer than orchestration.train_timeout_seconds={timeout:g} and was killed "
                    f"(pid {proc.pid}); raise the timeout, or re-run: training resumes from its last checkpoint"
                )
    except BaseException:
        _kill_group(proc, KILL_GRACE_SECONDS)  # the task was cancelled or crashed: never leave training behind
        raise
    finally:
        reader.join(timeout=5)
    return Finished(proc.returncode, list(tail))


class MetricsTail:
    """Follows metrics.jsonl (appended by the trainer, rewritten on resume): the last step it records."""

    def __init__(self, path: Path):
        self.path, self.offset, self.step, self.pending, self.inode = path, 0, 0, "", None

    def poll(self) -> int:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return self.step
        if st.st_ino != self.inode or st.st_size < self.offset:  # rewritten: a resumed run drops records past its checkpoint
            self.offset, self.pending, self.step, self.inode = 0, "", 0, st.st_ino
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        *complete, self.pending = (self.pending + chunk).split("\n")
        for line in complete:
            try:
                self.step = max(self.step, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
        return self.step


def _exit_error(finished: Finished, cmd: list[str], out_dir: Path | None = None) -> Exception:
    """The error of a training process that exited with a non-zero code.

    out_dir/last-error.json, written by this attempt (the task deletes any older one before it
    starts the process), wins over the exit code: torchrun exits 1 whatever its workers' codes were.
    """
    last = "\n".join(finished.lines[-15:])
    record = read_error_file(out_dir) if out_dir is not None else None
    if record is not None:
        return TrainingFailed(f"training failed ({record['kind']}): {record.get('message', '')}", kind=record["kind"])
    kind = KINDS_BY_CODE.get(finished.returncode)
    if kind is not None:
        return TrainingFailed(f"training failed ({kind}, exit code {finished.returncode}):\n{last}", kind=kind)
    return TrainingCrashed(
        f"training process crashed (exit code {finished.returncode}, command {' '.join(cmd)}); "
        f"a retry resumes from the last checkpoint. Last output:\n{last}"
    )


def _train_in_process(run_cfg: PipelineConfig, paths: stages.RunPaths, on_metrics: Callable[[dict], None]) -> dict:
    """glm.train's pretrain_on_shards in this thread: the result dict `python -m glm.train` prints.

    Failures are classified as the subprocess's exit code would classify them."""
    import dataclasses

    from glm.train import failure_kind, pretrain_on_shards

    try:
        result = pretrain_on_shards(run_cfg, paths.infill, paths.pretrain, on_metrics=on_metrics)
    except Exception as e:
        kind = failure_kind(e)
        if kind is not None:
            raise TrainingFailed(f"training failed ({kind}): {e}", kind=kind) from e
        raise TrainingCrashed(f"training crashed ({type(e).__name__}: {e}); a retry resumes from the last checkpoint") from e
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}


@task(name="pretrain", task_run_name="pretrain-{cfg.name}", **TASK_OPTIONS)
def pretrain(cfg: PipelineConfig, continue_steps: int | None = None) -> str:
    """Pretrain in this process or a subprocess (orchestration.train_in_process); returns pretrain/manifest.json."""
    logger = get_run_logger()
    paths = stages.RunPaths(cfg.run_dir)
    if (done := cached(cfg, "pretrain", continue_steps=continue_steps)) is not None:
        return done
    run_cfg = stages.prepare_pretrain(cfg, paths, continue_steps)
    cmd = stages.pretrain_command(run_cfg, paths)
    total = run_cfg.pretrain.steps
    tail = MetricsTail(paths.pretrain / "metrics.jsonl")
    start = tail.poll() if (paths.pretrain / "checkpoints").is_dir() else 0
    progress = artifacts.TrainingProgress(cfg, total, start, min_interval=POLL_SECONDS)

    if cfg.trains_in_process():
        logger.info("training in this process (orchestration.train_in_process=%s)", cfg.orchestration.train_in_process)
        result = _train_in_process(run_cfg, paths, on_metrics=lambda record: progress.update(int(record["step"])))
    else:
        logger.info("launching: %s", " ".join(cmd))
        (paths.pretrain / ERROR_FILE).unlink(missing_ok=True)  # what an earlier attempt recorded
        finished = run_logged(
            cmd, log=logger.info, timeout=cfg.orchestration.train_timeout_seconds, on_poll=lambda: progress.update(tail.poll())
        )
        if finished.returncode != 0:
            raise _exit_error(finished, cmd, paths.pretrain)
        result = stages.parse_train_result("\n".join(finished.lines))
    manifest = stages.close_pretrain(cfg, paths, result, continue_steps)
    progress.update(int(result["step"]), final=True)
    artifacts.loss_table(cfg, paths.pretrain / "metrics.jsonl")
    return str(manifest)
