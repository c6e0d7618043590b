"""Running pretraining as a process: the command (one process, torchrun on one node, or one node of a
multi-node job), streamed output, a timeout that kills its process group, the metrics tail for
progress, and one classification of failures for in-process and subprocess training.

Several nodes. Every node runs the same torchrun agent (`train_command`): `--nnodes N
--nproc_per_node P --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id ID`, the torchtitan way.
The c10d rendezvous assigns global ranks, so no node rank needs configuring; rank 0 (whichever node it
lands on) writes the run directory, which must therefore be on storage every node mounts. On one
node the pipeline's pretrain stage starts its agent; on the others run

    python -m glm.launch --config RUN/pretrain/run-config.yaml --data RUN/infill --out RUN/pretrain

(what the stage logs as "launching: ..."), or let a scheduler start them all (pretrain.cluster,
glm/cluster.py). A crash or kill of any node ends every node's agent (--max_restarts 0); run the
same commands again and training resumes from the last checkpoint.

Both ways classify a failure alike (glm.train.failure_kind): a config, data, divergence or disk
problem is TrainingFailed, permanent, never retried; anything else (an uncaught exception, a
signal, out of memory) is TrainingCrashed, which a retry resumes from the last checkpoint. A
subprocess reports the first by its exit code and pretrain/last-error.json (glm.errors), which also
outlives torchrun's exit code 1. glm.stages.train decides which way a run trains.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from glm.core.config import ConfigError, PipelineConfig, TrainConfig
from glm.core.contracts import TrainSummary, check
from glm.core.errors import KINDS_BY_CODE, PermanentError, read_error_file

POLL_SECONDS = 1.0
KILL_GRACE_SECONDS = 10.0


# --------------------------------------------------------------------------- the command


def rendezvous(pre: TrainConfig, name: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(endpoint, id) of a multi-node job: the config's, else what the scheduler set in the environment
    (MASTER_ADDR/MASTER_PORT: a Kubernetes PyTorchJob; SLURM_JOB_ID), else the config's name as the id."""
    env = os.environ if env is None else env
    endpoint = pre.rdzv_endpoint
    if endpoint is None and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        endpoint = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    if endpoint is None:
        raise ConfigError(
            f"pretrain.nnodes={pre.nnodes} needs the rendezvous address: set pretrain.rdzv_endpoint=HOST:PORT "
            "(the first node's address and a free port, reachable from every node), or pretrain.cluster to submit a job"
        )
    rdzv_id = pre.rdzv_id or env.get("SLURM_JOB_ID") or "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)
    return endpoint, rdzv_id


def torchrun_args(pre: TrainConfig, *, endpoint: str = "", rdzv_id: str = "") -> list[str]:
    """torchrun's options: --standalone on this node alone; given an endpoint, the c10d rendezvous of
    pre.nnodes nodes (a scheduler's job uses it even for one node)."""
    if not endpoint:
        return ["--standalone", "--nproc_per_node", str(pre.nproc)]
    return [
        "--nnodes",
        str(pre.nnodes),
        "--nproc_per_node",
        str(pre.nproc),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        endpoint,
        "--rdzv_id",
        rdzv_id,
        "--max_restarts",
        "0",  # a failed node ends the job: the orchestrator's retry resumes it from the last checkpoint
    ]


def train_command(
    run_cfg: PipelineConfig, config: Path, data: Path, out: Path, python: str = sys.executable, env: dict[str, str] | None = None
) -> list[str]:
    """`python -m glm.train ...` for one process, torchrun (`python -m torch.distributed.run`) for several
    on this node, torchrun with the c10d rendezvous for one node of several (the same on every node)."""
    args = ["--config", str(config), "--data", str(data), "--out", str(out)]
    pre = run_cfg.pretrain
    if pre.world_size == 1:
        return [python, "-m", "glm.train", *args]
    endpoint, rdzv_id = rendezvous(pre, run_cfg.name, env) if pre.nnodes > 1 else ("", "")
    return [
        python,
        "-m",
        "torch.distributed.run",
        *torchrun_args(pre, endpoint=endpoint, rdzv_id=rdzv_id),
        "-m",
        "glm.train",
        *args,
    ]


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


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc; empty elsewhere), children before grandchildren."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
        except (OSError, IndexError):
            continue  # exited while we looked
        children[int(fields[1])].append(int(stat.parent.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue += children.get(child, [])
    return found


def kill_tree(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it if it has not exited after `grace` seconds, then SIGKILL
    what is left of its descendants: torchrun starts each worker in a session of its own, so a worker
    outlives a group kill of an agent that did not stop it (and would train on, orphaned)."""
    # recorded now (once the agent is gone its workers belong to init), as pidfds: a worker that exits
    # during the grace period frees its pid, and a pid reused by another process is never signalled
    tree = _pidfds(descendants(proc.pid))
    try:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for fd in tree:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone
    finally:
        for fd in tree:
            os.close(fd)


def _pidfds(pids: list[int]) -> list[int]:
    """A pidfd per live pid (Linux >= 5.3; none elsewhere, where `descendants` finds none either)."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except (ProcessLookupError, AttributeError, OSError):
            continue  # exited meanwhile, or no pidfd support
    return fds


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
                kill_tree(proc, KILL_GRACE_SECONDS)
                raise TrainingTimeout(
                    f"training ran longer than orchestration.train_timeout_seconds={timeout:g} and was killed "
                    f"(pid {proc.pid}); raise the timeout, or re-run: training resumes from its last checkpoint"
                )
    except BaseException:
        kill_tree(proc, KILL_GRACE_SECONDS)  # the task was cancelled or crashed: never leave training behind
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


def _train_in_process(run_cfg: PipelineConfig, paths: Any, on_metrics: Callable[[dict], None]) -> TrainSummary:
    """glm.train's pretrain_on_shards in this thread: the result dict `python -m glm.train` prints.

    Failures are classified as the subprocess's exit code would classify them."""
    import dataclasses

    from glm.training.train import failure_kind, pretrain_on_shards

    try:
        result = pretrain_on_shards(run_cfg, paths.infill, paths.pretrain, on_metrics=on_metrics)
    except Exception as e:
        kind = failure_kind(e)
        if kind is not None:
            raise TrainingFailed(f"training failed ({kind}): {e}", kind=kind) from e
        raise TrainingCrashed(f"training crashed ({type(e).__name__}: {e}); a retry resumes from the last checkpoint") from e
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}
    return check(TrainSummary, summary, "the result of training in this process")


# --------------------------------------------------------------------------- one node of several


def main(argv: list[str] | None = None) -> int:
    """`python -m glm.launch --config RUN.yaml --data INFILL --out OUT`: this node's torchrun agent for the
    config's layout (replaces this process: signals reach torchrun). The pipeline's pretrain stage runs
    the same on its node; start this on every other node of a multi-node run."""
    import argparse

    from glm.core.config import add_override_argument, load_config

    p = argparse.ArgumentParser(prog="python -m glm.launch", description="Start this node's part of a pretraining run.")
    p.add_argument("--config", required=True, help="the run's pretrain/run-config.yaml (the pretrain stage writes it)")
    p.add_argument("--data", required=True, help="the blank-infilling dataset (RUN/infill)")
    p.add_argument("--out", required=True, help="the pretraining directory (RUN/pretrain), on storage every node shares")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for --config to appear (the first node writes it)")
    add_override_argument(p)
    args = p.parse_args(argv)
    config = Path(args.config)
    deadline = time.monotonic() + args.wait
    while not config.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        run_cfg = load_config(config, args.overrides)
        cmd = train_command(run_cfg, config, Path(args.data), Path(args.out))
        cmd += [a for override in args.overrides for a in ("--set", override)]  # the workers read the same config
    except (ConfigError, ValueError, OSError) as e:
        print(f"glm.launch: {e}", file=sys.stderr)
        return 3
    print(f"glm.launch: {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
