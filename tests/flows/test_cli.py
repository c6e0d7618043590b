"""the CLI's error reporting: one line on the terminal, tracebacks only in the log file or with --debug.

The CLI as a user runs it (real subprocesses, Prefect included) is tested in tests/hostile/.
"""

from __future__ import annotations

import logging
import sys

import pytest
from glm_pipeline.flows import cli

from glm.config import ConfigError
from glm.runlock import RunDirBusy


def _record_with_traceback() -> logging.LogRecord:
    try:
        raise KeyError("boom")
    except KeyError:
        return logging.getLogger("prefect.flow_runs").makeRecord(
            "prefect.flow_runs",
            logging.ERROR,
            __file__,
            1,
            "Encountered exception during execution: %r",
            (KeyError("boom"),),
            sys.exc_info(),
        )


@pytest.mark.parametrize("file_first", [False, True])
def test_the_console_hides_a_traceback_the_log_file_still_gets(file_first):
    record = _record_with_traceback()
    console, file = cli.ConsoleFormatter(), logging.Formatter("%(message)s")
    if file_first:
        assert "Traceback" in file.format(record)  # caches record.exc_text
    shown = console.format(record)
    assert shown.endswith("Encountered exception during execution: KeyError('boom')") and "\n" not in shown
    assert "Traceback" in file.format(record) and 'raise KeyError("boom")' in file.format(record)


def test_debug_shows_the_traceback_on_the_console():
    assert "Traceback" in cli.ConsoleFormatter(debug=True).format(_record_with_traceback())


def test_prefects_queue_draining_notice_is_kept_off_the_console():
    drain = logging.LogRecord(
        "APILogWorker", logging.WARNING, __file__, 1, "Still processing items: 4 items remaining...", (), None
    )
    other = logging.LogRecord("glm.stages", logging.WARNING, __file__, 1, "something else", (), None)
    handler = cli._console(debug=False)
    assert not handler.filter(drain) and handler.filter(other)
    assert cli._console(debug=True).filter(drain)


@pytest.mark.parametrize(
    "error, line",
    [
        (ConfigError("invalid configuration (x.yaml):\n  a.b: bad"), "invalid configuration (x.yaml):\n  a.b: bad"),
        (RunDirBusy("run directory r is in use by pid 1"), "run directory r is in use by pid 1"),
        (FileNotFoundError(2, "No such file or directory"), "FileNotFoundError: [Errno 2] No such file or directory"),
        (RuntimeError(""), "RuntimeError: RuntimeError"),
    ],
)
def test_one_line_says_what_failed(error, line):
    assert cli._one_line(error) == line


def test_main_in_process_leaves_logging_as_it_found_it(capsys, tmp_path):
    root = logging.getLogger()
    handlers, levels = list(root.handlers), (root.level, logging.getLogger("glm").level)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    assert cli.main(["config", str(bad)]) == 2
    assert (
        capsys.readouterr().err == f"error: config file {bad} is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8 YAML\n"
    )
    assert root.handlers == handlers and (root.level, logging.getLogger("glm").level) == levels
