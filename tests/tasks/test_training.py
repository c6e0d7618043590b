"""The training subprocess runner: streamed output, timeouts that kill, exit codes, the metrics tail."""

from __future__ import annotations

import json
import os
import select
import sys

import pytest

from tasks.training import Finished, MetricsTail, TrainingCrashed, TrainingTimeout, _exit_error, run_logged


def test_output_is_streamed_line_by_line_and_the_tail_is_kept():
    seen = []
    done = run_logged([sys.executable, "-c", "import sys\nfor i in range(5): print('line', i)\nprint('oops', file=sys.stderr)"],
                      log=seen.append)
    assert done.returncode == 0
    assert seen == ["line 0", "line 1", "line 2", "line 3", "line 4", "oops"]
    assert done.lines == seen


def test_a_process_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # the process starts a child (as torchrun starts its workers) and both would run for a minute
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    polls = []
    with pytest.raises(TrainingTimeout, match="train_timeout_seconds=3"):
        run_logged([sys.executable, "-c", code], log=lambda line: None, timeout=3, poll_seconds=0.2,
                   on_poll=lambda: polls.append(1))
    assert polls
    child = int(pid_file.read_text())
    # the child was in the killed process group: it terminates (a pidfd becomes readable when it does)
    try:
        fd = os.pidfd_open(child)
    except ProcessLookupError:
        return  # already gone and reaped
    try:
        assert select.select([fd], [], [], 10)[0] == [fd], "the child process survived the kill"
    finally:
        os.close(fd)


def test_exit_codes_separate_explained_failures_from_crashes():
    assert isinstance(_exit_error(Finished(2, ["glm.train: invalid configuration"]), ["python"]), ValueError)
    assert isinstance(_exit_error(Finished(1, ["glm.train: non-finite loss"]), ["python"]), ValueError)
    crash = _exit_error(Finished(-9, ["step 3"]), ["python", "-m", "glm.train"])
    assert isinstance(crash, TrainingCrashed) and "resumes from the last checkpoint" in str(crash)


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
