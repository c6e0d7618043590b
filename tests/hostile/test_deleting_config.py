"""13.1: a config value must not be able to delete directories (`--set finetune.task.name=..`)."""

from __future__ import annotations

import json

import pytest

from glm import stages
from glm.core.config import load_config
from glm.core.safety import UnsafeDelete
from tests.hostile.conftest import cli, error_lines


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["..", "/outside"])
def test_the_cli_refuses_a_task_name_that_escapes_before_touching_anything(tmp_path, name):
    run, outside = tmp_path / "run", tmp_path / "outside"
    for d in (run / "finetune" / "sentiment", run / "pretrain", outside):
        d.mkdir(parents=True)
        (d / "precious.txt").write_text("x")
    before = _tree(tmp_path)
    name = str(outside) if name == "/outside" else name
    done = cli("run", "configs/tiny.yaml", "--set", f"run_dir={run}", "--set", f"finetune.task.name={name}")
    assert done.returncode == 2, done.stderr
    assert len(error_lines(done.stderr)) == 1 and "finetune.task.name" in done.stderr and "Traceback" not in done.stderr
    assert _tree(tmp_path) == before


def _fake_inputs(run):
    """Just enough for the finetune stage's key: its two input manifests (the stage fails after its cleanup)."""
    for d in ("pretrain", "tokenizer"):
        (run / d).mkdir(parents=True, exist_ok=True)
        stats = {"checkpoint": "no-such-checkpoint", "step": 1, "loss": None, "val_loss": None, "tokens": 0, "elapsed": 0.0}
        stats |= {"bad_steps": 0, "resumed_from": None}
        (run / d / "manifest.json").write_text(json.dumps({"files": [], "stats": stats}))


def test_the_finetune_cleanup_clears_its_own_task_directory_and_never_a_sibling(tmp_path):
    run = tmp_path / "run"
    _fake_inputs(run)
    for task in ("sentiment", "other-task"):
        (run / "finetune" / task).mkdir(parents=True)
        (run / "finetune" / task / "stale.txt").write_text("x")
    cfg = load_config("configs/tiny.yaml", [f"run_dir={run}"])
    with pytest.raises(FileNotFoundError, match="tokenizer.model does not exist"):  # no real inputs: fails after the cleanup
        stages.finetune(cfg, stages.RunPaths(run))
    assert not (run / "finetune" / "sentiment" / "stale.txt").exists()
    assert (run / "finetune" / "other-task" / "stale.txt").is_file() and (run / "pretrain" / "manifest.json").is_file()


@pytest.mark.parametrize("name", ["..", "/outside", "../../outside"])
def test_the_finetune_cleanup_refuses_an_escaping_name_that_got_past_the_config(tmp_path, name):
    """Defense in depth: a config that skipped validation (model_copy) still cannot delete the run or beyond."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    _fake_inputs(run)
    (run / "finetune").mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    (run / "precious.txt").write_text("x")
    cfg = load_config("configs/tiny.yaml", [f"run_dir={run}"])
    name = str(outside) if name == "/outside" else name
    cfg.finetune.task = cfg.finetune.task.model_copy(update={"name": name})  # model_copy does not validate
    before = _tree(tmp_path)
    with pytest.raises(UnsafeDelete, match="refusing to delete"):
        stages.finetune(cfg, stages.RunPaths(run))
    assert _tree(tmp_path) == before
