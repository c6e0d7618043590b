"""The training subprocess runner: streamed output, timeouts that kill, exit codes, the metrics tail."""

from __future__ import annotations

import errno
import json
import os
import select
import sys

import pytest
from glm_pipeline.tasks.options import retry_transient
from glm_pipeline.tasks.stages import ingest
from prefect.states import Failed

from glm.core.errors import ERROR_FILE, EXIT_CODES, write_error_file
from glm.launch import (
    Finished,
    MetricsTail,
    TrainingCrashed,
    TrainingFailed,
    TrainingTimeout,
    _exit_error,
    _train_in_process,
    run_logged,
)


def test_output_is_streamed_line_by_line_and_the_tail_is_kept():
    seen = []
    done = run_logged(
        [sys.executable, "-c", "import sys\nfor i in range(5): print('line', i)\nprint('oops', file=sys.stderr)"], log=seen.append
    )
    assert done.returncode == 0
    assert seen == ["line 0", "line 1", "line 2", "line 3", "line 4", "oops"]
    assert done.lines == seen


@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "own-session-as-torchrun-workers"])
def test_a_process_past_its_timeout_is_killed_with_its_children(tmp_path, own_session):
    pid_file = tmp_path / "child.pid"
    # the process starts a child (as torchrun starts its workers: each in a session of its own) and both
    # would run for a minute
    code = (
        f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        f"start_new_session={own_session}); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)"
    )
    polls = []
    with pytest.raises(TrainingTimeout, match="train_timeout_seconds=3"):
        run_logged(
            [sys.executable, "-c", code], log=lambda line: None, timeout=3, poll_seconds=0.2, on_poll=lambda: polls.append(1)
        )
    assert polls
    child = int(pid_file.read_text())
    # the child terminates, in the killed process group or not (a pidfd becomes readable when it does)
    try:
        fd = os.pidfd_open(child)
    except ProcessLookupError:
        return  # already gone and reaped
    try:
        assert select.select([fd], [], [], 10)[0] == [fd], "the child process survived the kill"
    finally:
        os.close(fd)


def _retried(error: BaseException) -> bool:
    return retry_transient(ingest, None, Failed(data=error))


@pytest.mark.parametrize(
    "code, kind",
    [
        (1, None),
        (-9, None),
        (-15, None),
        (-6, None),
        (137, None),  # uncaught exception, signals, torchrun: crashes
        (2, "usage"),
        (3, "config"),
        (4, "data"),
        (5, "diverged"),
        (6, "disk"),
    ],
)
def test_each_exit_code_is_retried_or_not(code, kind, tmp_path):
    error = _exit_error(Finished(code, ["glm.train: something"]), ["python", "-m", "glm.train"], tmp_path)
    if kind is None:
        assert isinstance(error, TrainingCrashed) and "resumes from the last checkpoint" in str(error)
        assert _retried(error)
    else:
        assert isinstance(error, TrainingFailed) and error.kind == kind and EXIT_CODES[kind] == code
        assert not _retried(error)


def test_the_error_file_wins_over_torchruns_exit_code(tmp_path):
    # torchrun exits 1 when a worker fails, whatever the worker's own code was
    write_error_file(tmp_path, "data", "Arrow shard part-00003.arrow is unreadable")
    error = _exit_error(
        Finished(1, ["torch.distributed.elastic.multiprocessing.errors.ChildFailedError"]), ["torchrun"], tmp_path
    )
    assert isinstance(error, TrainingFailed) and error.kind == "data" and "part-00003.arrow" in str(error)
    assert not _retried(error)
    (tmp_path / ERROR_FILE).write_text("{torn")  # unreadable: the exit code decides
    assert isinstance(_exit_error(Finished(1, []), ["torchrun"], tmp_path), TrainingCrashed)


@pytest.mark.parametrize(
    "error, retried",
    [
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
        (OSError(errno.EIO, "Input/output error"), True),
        (
            RuntimeError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            ),
            False,
        ),
        (TypeError("unsupported operand"), True),
        (FileNotFoundError("/mnt/share/x"), True),
    ],
)
def test_a_full_or_read_only_disk_is_permanent_a_bug_is_not(error, retried):
    assert _retried(error) is retried


def test_in_process_training_classifies_failures_like_the_subprocess(tmp_path, monkeypatch):
    from glm import stages
    from glm.core.config import load_config
    from tests.glm.test_train import build_real_shards

    shards = build_real_shards(tmp_path / "shards")
    cfg = load_config(shards / "run.yaml", [f"run_dir={tmp_path / 'run'}"])
    paths = stages.RunPaths(cfg.run_dir)
    with pytest.raises(TrainingFailed) as missing:  # no shards in the run directory yet: a data problem
        _train_in_process(cfg, paths, on_metrics=lambda record: None)
    assert missing.value.kind == "data" and not _retried(missing.value)

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "infill").symlink_to(shards / "infill")
    monkeypatch.setenv("GLM_TRAIN_CRASH_AFTER_STEP", "3")  # an uncaught RuntimeError, once
    with pytest.raises(TrainingCrashed, match="injected crash after step 3") as crash:
        _train_in_process(cfg, paths, on_metrics=lambda record: None)
    assert _retried(crash.value)
    result = _train_in_process(cfg, paths, on_metrics=lambda record: None)  # what the retry runs
    assert result["resumed_from"] == 2 and result["step"] == 4


def test_the_metrics_tail_follows_appends_torn_lines_and_rewrites(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.poll() == 0  # no file yet
    path.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" + '{"step": 2, "lo')  # a line being written
    assert tail.poll() == 1
    with open(path, "a") as f:
        f.write('ss": 2.5}\n' + json.dumps({"step": 2, "val_loss": 2.6}) + "\n")
    assert tail.poll() == 2
    path.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")  # a resumed run truncates past its checkpoint
    assert tail.poll() == 1 and tail.offset == os.path.getsize(path)
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 2.0}) + "\n")
    assert tail.poll() == 3
    replacement = tmp_path / "metrics.tmp"  # glm.train rewrites the file atomically (a new inode, maybe longer)
    replacement.write_text("".join(json.dumps({"step": s, "loss": 1.0, "pad": "x" * 50}) + "\n" for s in (1, 2)))
    os.replace(replacement, path)
    assert tail.poll() == 2
