"""the CLI's error reporting: one line on the terminal, tracebacks only in the log file or with --debug.

The CLI as a user runs it (real subprocesses, Prefect included) is tested in tests/hostile/.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import yaml
from glm_pipeline.flows import cli

from glm.core.config import ConfigError, load_config
from glm.core.runlock import RunDirBusy


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


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_loads_and_its_printout_runs_as_the_same_config(path, capsys, tmp_path):
    overrides = []
    if "init:" in path.read_text(encoding="utf-8"):  # a released GLM's config: a tiny release of its family stands in
        from glm.core.released_tokenizer import FAMILIES

        fixture = {"wordpiece": "glm-large", "roberta": "glm-roberta-large", "gpt2": "glm-2b", "sp": "glm-large-chinese"}
        release = path.parents[1] / "tests" / "fixtures" / "released" / fixture[FAMILIES[path.stem]]
        overrides = [f"model.init.from={release / 'model'}", f"model.init.tokenizer={release / 'tokenizer'}"]
        overrides += ["model.init.n_head=4", "infilling.seq_len=64"]
    assert cli.main(["config", str(path), *(a for o in overrides for a in ("--set", o))]) == 0
    shown = capsys.readouterr().out
    saved = tmp_path / "saved.yaml"
    saved.write_text(shown, encoding="utf-8")
    # sources reduced to the fields their kind reads: nothing the shipped config sets is lost
    assert load_config(saved) == load_config(path, overrides)


def test_config_shows_the_fields_each_source_kind_reads(capsys):
    assert cli.main(["config", "configs/byo-csv.yaml"]) == 0
    shown = capsys.readouterr().out
    data = yaml.safe_load(shown)
    assert data["data"]["sources"] == [{"kind": "csv", "path": "data/my-data.csv", "text_field": "body", "limit": None}]
    assert data["finetune"]["task"]["source"] == data["data"]["sources"][0] and data["finetune"]["task"]["label_field"] == "topic"
    assert "#   text_field='body': the column holding the text\n" in shown
    assert (
        "#   finetune.task.label_field='topic': the column holding the label (its values are the keys of "
        "finetune.task.verbalizers: 'business', 'sport', 'politics', 'tech')\n"
    ) in shown
    assert cli.main(["config", "configs/byo-text.yaml"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["data"]["sources"] == [{"kind": "text", "path": "data/my-texts/", "split_on_blank_lines": False, "limit": None}]
