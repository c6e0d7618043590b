"""Issue 26 items 2 and 6: a config file is read strictly (a key given twice is refused with its
lines) and kindly (unquoted numeric label keys are the strings the labels are read as)."""

from __future__ import annotations

import json

from tests.hostile.conftest import cli, error_lines

DUPLICATED = """\
name: dup
run_dir: {first}
pretrain:
  steps: 5
  steps: 7
run_dir: {second}
"""


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text(DUPLICATED.format(first=tmp_path / "a", second=tmp_path / "b"), encoding="utf-8")
    for command in ("config", "run"):
        done = cli(command, str(config), timeout=60)
        assert done.returncode == 2, done.stderr
        [line] = error_lines(done.stderr)
        assert (
            f"config file {config}: keys given twice: 'run_dir' (lines 2 and 6), 'steps' (lines 4 and 5); keep one of each"
            in line
        ), line
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work


def test_a_top_level_key_given_twice_names_it(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text(f"name: dup\nrun_dir: {tmp_path / 'a'}\nrun_dir: {tmp_path / 'b'}\n", encoding="utf-8")
    done = cli("config", str(config), timeout=60)
    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert "keys given twice: 'run_dir' (lines 2 and 3)" in line


def test_a_key_given_twice_in_an_override_is_refused(tmp_path):
    done = cli("config", "configs/tiny.yaml", "--set", "finetune.task.verbalizers={a: x, a: y}", timeout=60)
    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert "keys given twice: 'a' (lines 1 and 1)" in line


def test_merge_keys_may_still_be_overridden(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(
        "name: merge\nbase: &b {steps: 5, batch_size: 8, micro_batch_size: 8}\npretrain:\n  <<: *b\n  steps: 7\n".replace(
            "base:", "x-base:"
        ),
        encoding="utf-8",
    )
    # `x-base` is an unknown key, so the config is invalid, but for that reason, not for a duplicate
    done = cli("config", str(config), timeout=60)
    assert done.returncode == 2 and "given twice" not in done.stderr and "x-base" in done.stderr


NUMERIC_LABELS = """\
name: numeric
run_dir: {run}
finetune:
  task:
    source: {{kind: jsonl, path: {data}}}
    verbalizers: {{0: bad, 1: good}}
"""


def test_numeric_label_keys_are_the_strings_the_labels_are_read_as(tmp_path):
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(10)))
    config = tmp_path / "numeric.yaml"
    config.write_text(NUMERIC_LABELS.format(run=tmp_path / "run", data=data), encoding="utf-8")
    done = cli("config", str(config), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "verbalizers:\n      '0': bad\n      '1': good" in done.stdout

    from glm.core.config import load_config
    from glm.finetuning.finetune import read_labelled

    cfg = load_config(config)
    labels = {e.label for e in read_labelled(cfg.finetune.task.source, cfg.finetune.task.label_field)}
    assert labels == set(cfg.finetune.task.verbalizers) == {"0", "1"}


def test_boolean_label_keys_say_to_quote_them(tmp_path):
    done = cli("config", "configs/tiny.yaml", "--set", "finetune.task.verbalizers={yes: good, no: bad}", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "read by YAML as a boolean; quote it" in done.stderr
