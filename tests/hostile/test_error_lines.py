"""13.8: what a user reads when something fails: one `error:` line, exit 2 (config) or 1 (runtime),
the traceback in the run's log file, and on the terminal only with --debug."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hostile.conftest import cli, error_lines

MISSING_CORPUS = "data.sources=[{kind: text, path: /nonexistent/corpus}]"


def _full_log(line: str) -> Path:
    match = re.search(r"\(full log: (\S+\.log)\)$", line)
    assert match, line
    return Path(match.group(1))


def test_a_missing_corpus_is_one_error_line_and_a_log_file_with_the_traceback(tmp_path):
    run = tmp_path / "run"
    done = cli("run", "configs/tiny.yaml", "--set", f"run_dir={run}", "--set", MISSING_CORPUS)  # Prefect's ephemeral API
    assert done.returncode == 1, done.stderr
    [line] = error_lines(done.stderr)
    assert line.startswith("error: CorpusError: data.sources[0] (text): path '/nonexistent/corpus' does not exist")
    assert "Traceback" not in done.stderr and done.stderr.rstrip().endswith(line)
    log = _full_log(line)
    assert log.parent == run / "logs" and log.is_file()
    text = log.read_text(encoding="utf-8")
    assert "Traceback" in text and "glm/data/corpus.py" in text and "run failed: CorpusError" in text


def test_debug_puts_the_traceback_on_the_terminal(tmp_path, server):
    done = cli(
        "--debug",
        "run",
        "configs/tiny.yaml",
        "--stage",
        "data",
        "--set",
        f"run_dir={tmp_path / 'run'}",
        "--set",
        MISSING_CORPUS,
        env=server.env,
    )
    assert done.returncode == 1, done.stderr
    assert len(error_lines(done.stderr)) == 1 and "Traceback (most recent call last)" in done.stderr
    assert 'glm/data/corpus.py", line' in done.stderr


@pytest.fixture
def latin1_config(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\nrun_dir: runs/x\n".encode("latin-1"))
    return path


@pytest.mark.parametrize("case", ["not-utf8", "vocab-pairing", "vocab-special", "task-name"])
@pytest.mark.parametrize("debug", [False, True])
def test_config_problems_are_one_error_line_and_exit_2(case, debug, latin1_config, tmp_path):
    args, expected = {
        "not-utf8": ([str(latin1_config)], "is not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8 YAML"),
        "vocab-pairing": (
            ["configs/tiny.yaml", "--set", "model.vocab_size=64"],
            "model.vocab_size=64 is smaller than tokenizer.vocab_size=600",
        ),
        "vocab-special": (
            ["configs/tiny.yaml", "--set", "tokenizer.vocab_size=8"],
            "tokenizer.vocab_size: Input should be greater than or equal to 32",
        ),
        "task-name": (["configs/tiny.yaml", "--set", "finetune.task.name=.."], "finetune.task.name: '..'"),
    }[case]
    done = cli(*(["--debug"] if debug else []), "run", *args, "--set", f"run_dir={tmp_path / 'run'}", timeout=60)
    assert done.returncode == 2, done.stderr
    assert len(error_lines(done.stderr)) == 1 and expected in done.stderr
    assert ("Traceback" in done.stderr) == debug
    assert not (tmp_path / "run").exists()  # refused before any work
