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


OWNED_HOLDER = """
import sys, time
from glm.core.runlock import run_lock
with run_lock(sys.argv[1], owner=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()  # until told to end
"""


@pytest.fixture
def owned_holder(tmp_path):
    """Another process holding tmp_path/run's lock for the owner "flow run A", until its stdin says so."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNED_HOLDER, str(run), "flow run A"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


def test_another_owner_is_refused_at_once(owned_holder):
    run, proc = owned_holder
    with pytest.raises(RunDirBusy, match=f"in use by pid {proc.pid} "):
        with run_lock(run, owner="flow run B"):
            pytest.fail("the lock was taken twice")
    with pytest.raises(RunDirBusy):
        with run_lock(run):  # no owner: never waits
            pytest.fail("the lock was taken twice")


def test_a_later_attempt_of_the_same_owner_waits_for_the_first_to_end(owned_holder, caplog):
    import threading

    run, proc = owned_holder
    threading.Timer(1.5, lambda: (proc.stdin.write("end\n"), proc.stdin.flush())).start()
    with caplog.at_level("WARNING", logger="glm.core.runlock"):
        with run_lock(run, owner="flow run A"):
            holder = json.loads((run / LOCK_FILE).read_text())  # ours now: the first attempt let go
            assert holder["pid"] == os.getpid() and holder["owner"] == "flow run A"
    assert [r.getMessage() for r in caplog.records if "earlier attempt of this run" in r.getMessage()]
