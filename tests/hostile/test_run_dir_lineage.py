"""Issue 26 item 1: two configs, one run directory. A config that cannot continue the checkpoints in its
run directory (another tokenizer or model) is refused before anything is touched, in one line naming
the differing keys and the fix; a config that can (more steps, another task) still runs there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.hostile.conftest import cli, error_lines

QUICK = ["--set", "pretrain.steps=4", "--set", "pretrain.eval_every=2", "--set", "pretrain.checkpoint_every=2"]


def _tree(run: Path) -> dict[str, str]:
    """Every file under the run directory but its logs, with its content hash."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and "logs" not in p.relative_to(run).parts and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, server):
    run = tmp_path_factory.mktemp("lineage") / "p4"
    for stage in ("data", "pretrain"):
        done = cli("run", "configs/tiny.yaml", "--stage", stage, "--set", f"run_dir={run}", *QUICK, env=server.env, timeout=600)
        assert done.returncode == 0, done.stderr
    assert json.loads((run / "lineage.json").read_text())["keys"]["tokenizer.vocab_size"] == 600
    return run


def test_another_tokenizer_in_the_same_run_directory_is_refused_before_anything_is_touched(trained, server):
    before = _tree(trained)
    done = cli(
        "run", "configs/tiny.yaml", "--set", f"run_dir={trained}", "--set", "tokenizer.vocab_size=800", *QUICK,
        env=server.env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert f"error: run directory {trained} holds the checkpoints of config 'tiny'" in line
    assert "(tokenizer.vocab_size 600 there, 800 here)" in line
    assert f"--set run_dir={trained}-2" in line and "Traceback" not in done.stderr
    assert _tree(trained) == before  # not one file changed, nothing moved to pretrain/history
    assert not (trained / "pretrain" / "history").exists()


def test_another_architecture_is_refused_too_and_the_differences_are_all_named(trained, server):
    done = cli(
        "run", "configs/tiny.yaml", "--stage", "data", "--set", f"run_dir={trained}", "--set", "model.n_layer=3",
        "--set", "tokenizer.lowercase=true", env=server.env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert "(model.n_layer 2 there, 3 here; tokenizer.lowercase false there, true here)" in line


def test_a_config_that_continues_the_run_still_runs_there(trained, server):
    done = cli(
        "run", "configs/tiny.yaml", "--stage", "data", "--set", f"run_dir={trained}", *QUICK,
        "--set", "pretrain.steps=6", "--set", "model.dropout=0.0", env=server.env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
