"""Issue 26 item 9: a full disk. The run ends with one line naming the path and the space, the log file
on that disk degrades quietly (no "--- Logging error ---" tracebacks), and after space is freed the
same command finishes. The disk is a real 2 MB tmpfs (mounting one needs root: skipped otherwise)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.hostile.conftest import cli, error_lines


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_with_the_path_and_space_and_the_run_recovers(small_disk, server):
    run = small_disk / "run"
    args = ("run", "configs/tiny.yaml", "--stage", "data", "--set", f"run_dir={run}")
    done = cli(*args, env=server.env, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Logging error" not in done.stderr and "Traceback" not in done.stderr
    [line] = error_lines(done.stderr)
    assert done.stderr.rstrip().endswith(line)
    assert re.match(
        rf"error: no space left on device writing {re.escape(str(run))}/\w+ \([\d.]+ \w?B free of 2\.0 MB there\); free at least [\d.]+ \w?B more",
        line,
    ), line
    assert "re-run the same command" in line
    assert len(done.stderr.splitlines()) < 80
    assert done.stderr.count("cannot write the log file") <= 1

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    again = cli(*args, env=server.env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "infill" / "manifest.json").is_file()
