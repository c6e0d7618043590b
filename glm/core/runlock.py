"""One run at a time per run directory.

Two runs of the same config at once read and write the same stage directories, each deleting and
rewriting what the other is reading (one failed with a missing pretrained/result.json, another
timed out on its own ephemeral API). `run_lock(run_dir)` takes an exclusive `flock` on
RUN_DIR/.lock for the whole run; a second run fails at once with one line naming the holder.

flock, not a pid file: the kernel releases the lock when its holder dies, however it dies, so a
killed run never leaves a stale lock behind. The holder's pid, host, start time and command are
written into the lock file only so the second run can say who holds it.

An owner (a flow run's id) may be named: a process that finds the lock held by the same owner is a
later attempt of the same run (a run marked Crashed by an orchestrator that missed its heartbeats,
say during a database outage, and re-run while its first process still works) and waits for that
process to end instead of failing: the first attempt's work is then the second's cache.

Re-entrant per process: the CLI takes the lock and then runs a Prefect flow that takes it again in
the same process. Processes the run starts (the training subprocess, torchrun, task workers) never
take it: the lock belongs to the process that took it, and a forked child drops its inherited copy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = ".lock"
SAME_OWNER_POLL_SECONDS = 1.0
SAME_OWNER_SAY_EVERY = 600.0  # seconds between "still waiting" lines

log = logging.getLogger(__name__)


class RunDirBusy(RuntimeError):
    """Another process is running in this run directory."""


_held: dict[str, list[int]] = {}  # resolved run dir -> [lock file descriptor, depth]
_guard = threading.Lock()


def _drop_inherited_locks() -> None:
    # a forked child shares the parent's open lock file; closing the child's copy leaves the parent's
    # lock in place, and the child can neither release it nor outlive its parent holding it
    global _guard
    _guard = threading.Lock()  # another thread of the parent may have held it at the fork
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def holder_info(owner: str | None = None) -> dict[str, Any]:
    """What a second run is told about this process."""
    command = " ".join(shlex.join(getattr(sys, "orig_argv", sys.argv)).split())  # one line, for a one-line message
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if len(command) <= 300 else command[:297] + "...",
    }
    return info | ({"owner": owner} if owner else {})


def _read_holder(fd: int) -> dict[str, Any] | None:
    # the holder writes its details right after locking: a run that lost the race by microseconds
    # may find the file still empty, so look again briefly
    for _ in range(10):
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return info
        time.sleep(0.05)
    return None


def busy_message(run_dir: str | Path, info: dict[str, Any] | None) -> str:
    if not info:
        return f"run directory {run_dir} is in use by another process; wait for it or stop it"
    return (
        f"run directory {run_dir} is in use by pid {info.get('pid')} on host {info.get('host')} since "
        f"{info.get('since')} ({info.get('command')}); wait for it or stop it"
    )


def _acquire(key: str, owner: str | None = None) -> int:
    fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _lock_or_wait_for_same_owner(fd, key, owner)
    except BaseException:
        os.close(fd)
        raise
    data = (json.dumps(holder_info(owner)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return fd


def _lock_or_wait_for_same_owner(fd: int, key: str, owner: str | None) -> None:
    """flock `fd`; RunDirBusy if another owner holds it; if the same owner does, wait for its process to end."""
    said = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            info = _read_holder(fd)
            if not (owner and info and info.get("owner") == owner):
                raise RunDirBusy(busy_message(key, info)) from None
        now = time.monotonic()
        if said is None or now - said >= SAME_OWNER_SAY_EVERY:
            log.warning(
                "run directory %s is held by an earlier attempt of this run (%s, pid %s on host %s since %s): "
                "waiting for it to end",
                key, owner, info.get("pid"), info.get("host"), info.get("since"),
            )  # fmt: skip
            said = now
        time.sleep(SAME_OWNER_POLL_SECONDS)


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # while still held: the next holder writes its own details
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | Path, owner: str | None = None) -> Iterator[Path]:
    """Hold RUN_DIR/.lock (created, with RUN_DIR, if missing) for the block; RunDirBusy if another process holds it,
    unless it holds it for the same `owner`: then wait for that process to end (module docstring).

    Re-entrant within a process: nested uses (the CLI, then the flow it runs) share one lock,
    released when the outermost block ends.
    """
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            entry = _held[key] = [_acquire(key, owner), 0]
        entry[1] += 1
    try:
        yield path
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0 and _held.get(key) is entry:
                del _held[key]
                _release(entry[0])


def held(run_dir: str | Path) -> bool:
    """Whether this process holds the lock of `run_dir`."""
    return os.path.realpath(run_dir) in _held
