"""Failures that running again cannot fix, and how a glm process tells its orchestrator about them.

A retry helps when a run was killed, ran out of GPU memory, lost a collective or a network share
for a moment: training resumes from its checkpoint. It cannot help when the config is wrong, the
data is corrupt, the loss diverged, or the disk is read-only or full: the same run fails again the
same way. Those raise (or are classified as) a PermanentError `kind`; an orchestrator retries
everything else.

A training process (python -m glm.train) reports a permanent failure twice: its exit code
(EXIT_CODES) and a small JSON file (ERROR_FILE in its output directory: kind, message), the one
that survives torchrun, which exits 1 whatever its workers' codes were. Any other exit code (1: an
uncaught exception, negative: a signal) is a crash.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

# The longest line an error message or a log record keeps: a value echoed whole (a 50 MB config in a
# validation error, a 300 MB document in an excerpt) would otherwise become one line of that size.
MAX_LINE_CHARS = 2000


def cut_lines(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """`text` with every line longer than `limit` characters cut, saying how much was left out."""
    if len(text) <= limit:
        return text
    return "\n".join(
        line if len(line) <= limit else f"{line[:limit]}... [{len(line) - limit:,} more characters cut]"
        for line in text.split("\n")
    )


# python -m glm.train's exit codes; 1 (an uncaught exception) and signals are crashes, retried
EXIT_CODES: dict[str, int] = {
    "usage": 2,  # bad command line (argparse's own code)
    "config": 3,  # invalid configuration, or a config that does not fit the data/checkpoint
    "data": 4,  # missing, incomplete or corrupt shards, manifests or checkpoints
    "diverged": 5,  # non-finite loss/gradients past train.max_bad_steps
    "disk": 6,  # the output's file system is read-only, full or over quota
}
KINDS_BY_CODE = {code: kind for kind, code in EXIT_CODES.items()}
ERROR_FILE = "last-error.json"

# a retry writes to the same file system: it fails the same way
PERMANENT_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})


class PermanentError(Exception):
    """A failure that a retry cannot fix; `kind` says which (a key of EXIT_CODES)."""

    kind = "permanent"

    def __init__(self, message: str = "", kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


def disk_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a read-only, full or over-quota file system.

    Libraries that write from native code (safetensors, torch.save) wrap the OS error in their own
    exception but keep its text, so the strerror of those errnos in the message counts too.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
            return True
        if any(os.strerror(code) in str(exc) for code in PERMANENT_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_os_error(exc: BaseException | None) -> OSError | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # unreachable


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _newest_stage_dir(run_dir: Path) -> Path | None:
    """The directory of RUN_DIR the run wrote last (the stage that was writing when the disk filled)."""
    newest: tuple[int, Path] | None = None
    for root, _, files in os.walk(run_dir):
        top = Path(root).relative_to(run_dir).parts[:1]
        if not top or top[0] in ("logs", ".stages"):  # the lock, lineage, logs and stamps are no stage's output
            continue
        for name in files:
            try:
                mtime = os.lstat(os.path.join(root, name)).st_mtime_ns
            except OSError:
                continue
            if newest is None or mtime > newest[0]:
                newest = (mtime, Path(root))
    return None if newest is None else run_dir / newest[1].relative_to(run_dir).parts[0]


def disk_error_line(exc: BaseException, run_dir: str | Path) -> str | None:
    """One line for a full, over-quota or read-only disk: the path, the free space and the space needed.

    Writers in native code (pyarrow, safetensors) say "[Errno 28] ... No space left on device" and no
    path; the path is then the run directory's stage directory written last, whose size so far is what
    that stage needed at least (its rebuild writes it again, then more). None if `exc` is no disk error.
    """
    if not disk_error(exc):
        return None
    run_dir = Path(run_dir)
    err = _disk_os_error(exc)
    code = err.errno if err is not None else next(c for c in PERMANENT_ERRNOS if os.strerror(c) in str(exc))
    named = Path(os.fsdecode(err.filename)) if err is not None and err.filename else None
    stage_dir = _newest_stage_dir(run_dir) if run_dir.is_dir() else None
    where = named or stage_dir or run_dir
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; point run_dir at a writable directory"
    import shutil

    usage = shutil.disk_usage(probe)
    written = _tree_bytes(stage_dir) if stage_dir is not None else 0
    problem = "the disk quota is exceeded" if code == errno.EDQUOT else "no space left on device"
    need = f"; free at least {_size(written)} more (what {stage_dir.name}/ had written when it filled)" if written else ""
    return (
        f"{problem} writing {where} ({_size(usage.free)} free of {_size(usage.total)} there){need}, then re-run "
        "the same command: it resumes where it stopped"
    )


def write_error_file(directory: str | Path, kind: str, message: str, **extra: Any) -> Path | None:
    """Record a permanent failure for the orchestrator; returns the file, or None if it could not be
    written (a read-only or full disk: the exit code still says it)."""
    from glm.core.shards import atomic_write_json

    try:
        return atomic_write_json(Path(directory) / ERROR_FILE, {"kind": kind, "message": message, **extra})
    except OSError:
        return None


def read_error_file(directory: str | Path) -> dict[str, Any] | None:
    """The failure a training process recorded in `directory`, if any (and readable)."""
    try:
        record = json.loads((Path(directory) / ERROR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "kind" in record else None
