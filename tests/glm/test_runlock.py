"""glm.runlock: one run per run directory, in real processes; no stale locks; re-entrant in a process."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from glm.core.runlock import LOCK_FILE, RunDirBusy, held, run_lock


def test_a_second_process_is_refused_at_once_and_told_who_holds_it(holder):
    run, proc = holder
    with pytest.raises(RunDirBusy) as err:
        with run_lock(run):
            pytest.fail("the lock was taken twice")
    message = str(err.value)
    assert f"run directory {os.path.realpath(run)} is in use by pid {proc.pid} on host " in message
    assert "-c" in message and message.endswith("; wait for it or stop it")
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid
    assert not held(run)


def test_a_killed_holder_leaves_no_stale_lock(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with run_lock(run):  # the kernel released the dead process's flock
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (run / LOCK_FILE).read_text() == ""  # released: no holder described


def test_the_lock_is_reentrant_within_a_process_and_released_by_the_outermost_block(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        with run_lock(tmp_path / "run" / ".." / "run"):  # the same directory, spelled otherwise
            assert held(run)
        assert held(run)
        done = subprocess.run(
            [sys.executable, "-c", f"from glm.runlock import run_lock\nwith run_lock({str(run)!r}): pass"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and f"pid {os.getpid()}" in done.stderr
    assert not held(run)
    done = subprocess.run(
        [sys.executable, "-c", f"from glm.runlock import run_lock\nwith run_lock({str(run)!r}): pass"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_an_error_inside_releases_the_lock(tmp_path):
    with pytest.raises(KeyError):
        with run_lock(tmp_path / "run"):
            raise KeyError("boom")
    assert not held(tmp_path / "run")
    with run_lock(tmp_path / "run"):
        pass


def _child_tries(run, queue):
    try:
        queue.put(("held" if held(run) else "not held", None))
        with run_lock(run):
            queue.put(("took it", None))
    except RunDirBusy as e:
        queue.put(("busy", str(e)))


def test_a_forked_child_neither_holds_nor_releases_its_parents_lock(tmp_path):
    run = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with run_lock(run):
        child = ctx.Process(target=_child_tries, args=(run, queue))
        child.start()
        child.join(60)
        assert queue.get(timeout=5) == ("not held", None)
        what, message = queue.get(timeout=5)
        assert what == "busy" and f"pid {os.getpid()}" in message
        # the child's exit closed its inherited descriptor: the parent still holds the lock
        done = subprocess.run(
            [sys.executable, "-c", f"from glm.runlock import run_lock\nwith run_lock({str(run)!r}): pass"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and "RunDirBusy" in done.stderr
