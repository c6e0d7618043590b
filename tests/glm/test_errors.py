"""Permanent failures: the disk errors no retry fixes, and the error file a training process leaves."""

from __future__ import annotations

import errno

from glm.core.errors import (
    ERROR_FILE,
    EXIT_CODES,
    KINDS_BY_CODE,
    PermanentError,
    disk_error,
    read_error_file,
    write_error_file,
)


def test_a_full_or_read_only_disk_is_recognised_through_wrappers():
    assert disk_error(OSError(errno.EROFS, "Read-only file system", "/runs/x"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("checkpoint write failed") from e
    except RuntimeError as wrapped:
        assert disk_error(wrapped)  # the cause counts
    assert disk_error(RuntimeError('IoError(Os { code: 122, message: "Disk quota exceeded" })'))  # safetensors' wording
    assert not disk_error(OSError(errno.EIO, "Input/output error"))
    assert not disk_error(ConnectionError("share unreachable"))


def test_the_error_file_round_trips_and_exit_codes_are_distinct(tmp_path):
    assert read_error_file(tmp_path) is None
    write_error_file(tmp_path, "diverged", "non-finite loss at step 7", rank=0)
    assert read_error_file(tmp_path) == {"kind": "diverged", "message": "non-finite loss at step 7", "rank": 0}
    (tmp_path / ERROR_FILE).write_text("[]")
    assert read_error_file(tmp_path) is None  # not a record
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES) and 1 not in KINDS_BY_CODE  # 1 is a crash
    assert PermanentError("x", kind="data").kind == "data" and PermanentError("x").kind == "permanent"
