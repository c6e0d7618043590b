"""Issue 26 item 4: a bad JSON Lines row in the labelled (fine-tuning) source is one error line naming
the file and its 1-based line, as ingestion's errors do (not Arrow's "in row 172")."""

from __future__ import annotations

import json

from tests.hostile.conftest import cli, error_lines


def test_a_bad_labelled_row_names_the_file_and_its_line(tmp_path, server):
    data = tmp_path / "labelled.jsonl"
    rows = [json.dumps({"text": f"a {'fine' if i % 2 else 'dull'} film number {i}", "label": i % 2}) for i in range(60)]
    rows[41] = '{"text": "a broken row" "label": 1}'  # line 42: a missing comma
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    done = cli(
        "run",
        "configs/tiny.yaml",
        "--stage",
        "data",
        "--set",
        f"run_dir={tmp_path / 'run'}",
        "--set",
        f"finetune.task.source={{kind: jsonl, path: '{data}'}}",
        env=server.env,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    [line] = error_lines(done.stderr)
    assert f"labelled source {data} line 42: not valid JSON (Expecting ',' delimiter)" in line, line
    assert "finetune.task.source" in line and "ArrowInvalid" not in done.stderr


def test_a_labelled_line_that_is_not_an_object_is_named_too(tmp_path):
    from glm.core.config import SourceConfig
    from glm.data.corpus import CorpusError
    from glm.finetuning.finetune import read_labelled

    data = tmp_path / "labelled.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n\n[1, 2]\n', encoding="utf-8")
    try:
        read_labelled(SourceConfig(kind="jsonl", path=str(data)))
    except CorpusError as e:
        assert f"labelled source {data} line 3: a JSON list, not an object" in str(e)
    else:
        raise AssertionError("a JSON array line was accepted")
