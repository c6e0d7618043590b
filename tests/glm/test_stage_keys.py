"""Stage cache keys cover exactly the code that can change a stage's output: its own module
(declaration and build code) and what that imports at run time. Tested through the real key
functions reading a copy of the glm sources (glm.pipeline.engine._PACKAGE_DIR points at the copy)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from glm import stages
from glm.core.config import PipelineConfig
from glm.pipeline import engine

# Every stage's code version covers these glm modules (names relative to glm). A change here is a
# change of what re-runs a stage: a new import that widens a key must show in review, so this table
# is checked in and compared, not generated.
STAGE_MODULES_TABLE = {
    "ingest": ["core.config", "core.contracts", "core.shards", "data.corpus", "pipeline.ingest"],
    "validate-corpus": [
        "core.config",
        "core.contracts",
        "core.shards",
        "core.special_tokens",
        "data.corpus",
        "data.quality",
        "pipeline.common",
        "pipeline.validate",
    ],
    "tokenizer": [
        "core.config",
        "core.contracts",
        "core.released_tokenizer",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "pipeline.tokenizer",
        "runtime",
    ],
    "check-finetune-task": [
        "core.config",
        "core.contracts",
        "core.metrics",
        "core.model",
        "core.released_tokenizer",
        "core.safety",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.corpus",
        "evaluation.evaluate",
        "evaluation.generate",
        "finetuning.finetune",
        "finetuning.heads",
        "pipeline.check_task",
        "runtime",
        "training.budget",
        "training.checkpoint",
        "training.step",
    ],
    "tokenize": [
        "core.config",
        "core.contracts",
        "core.released_tokenizer",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.tokenize_shards",
        "pipeline.tokenize",
        "runtime",
    ],
    "validate-tokens": [
        "core.config",
        "core.contracts",
        "core.shards",
        "core.special_tokens",
        "data.corpus",
        "data.quality",
        "pipeline.common",
        "pipeline.validate",
    ],
    "infill": [
        "core.config",
        "core.contracts",
        "core.released_tokenizer",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.infill_shards",
        "data.infilling",
        "pipeline.infill",
        "runtime",
    ],
    "pretrain": [
        "cluster",
        "core.config",
        "core.contracts",
        "core.errors",
        "core.metrics",
        "core.model",
        "core.released_tokenizer",
        "core.safety",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.infill_shards",
        "data.infilling",
        "data.loader",
        "distributed",
        "launch",
        "pipeline.common",
        "pipeline.pretrain",
        "released",
        "runtime",
        "training.budget",
        "training.checkpoint",
        "training.pretrain_plan",
        "training.step",
        "training.train",
    ],
    "finetune": [
        "core.config",
        "core.contracts",
        "core.metrics",
        "core.model",
        "core.released_tokenizer",
        "core.safety",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.corpus",
        "distributed",
        "evaluation.evaluate",
        "evaluation.generate",
        "evaluation.report",
        "finetuning.finetune",
        "finetuning.heads",
        "pipeline.common",
        "pipeline.finetune",
        "runtime",
        "training.budget",
        "training.checkpoint",
        "training.step",
    ],
    "evaluate": [
        "core.config",
        "core.contracts",
        "core.metrics",
        "core.model",
        "core.released_tokenizer",
        "core.safety",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.corpus",
        "data.infill_shards",
        "data.infilling",
        "data.loader",
        "distributed",
        "evaluation.evaluate",
        "evaluation.generate",
        "evaluation.report",
        "finetuning.finetune",
        "finetuning.heads",
        "pipeline.choice",
        "pipeline.common",
        "pipeline.evaluate",
        "runtime",
        "training.budget",
        "training.checkpoint",
        "training.step",
    ],
    "export": [
        "bundles",
        "core.config",
        "core.contracts",
        "core.metrics",
        "core.model",
        "core.released_tokenizer",
        "core.safety",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.corpus",
        "evaluation.evaluate",
        "evaluation.generate",
        "export",
        "finetuning.finetune",
        "finetuning.heads",
        "pipeline.choice",
        "pipeline.common",
        "pipeline.export",
        "runtime",
        "training.budget",
        "training.checkpoint",
        "training.step",
    ],
    "export-generation": [
        "core.config",
        "core.contracts",
        "core.metrics",
        "core.model",
        "core.released_tokenizer",
        "core.safety",
        "core.shards",
        "core.special_tokens",
        "core.tokenizer",
        "data.corpus",
        "evaluation.evaluate",
        "evaluation.generate",
        "export",
        "finetuning.finetune",
        "finetuning.heads",
        "pipeline.common",
        "pipeline.generation",
        "runtime",
        "training.budget",
        "training.checkpoint",
        "training.step",
    ],
}


def test_each_stages_code_version_covers_exactly_the_checked_in_modules():
    actual = {name: stages.stage_modules(name) for name in stages.REGISTRY}
    assert actual == STAGE_MODULES_TABLE
    for name, st in stages.REGISTRY.items():
        assert f"pipeline.{st.module.rsplit('.', 1)[-1]}" in actual[name]  # its own module, declaration and glue
        assert "pipeline.engine" not in actual[name]
    assert "evaluation.evaluate" not in actual["pretrain"] and "finetuning.finetune" not in actual["pretrain"]
    assert "training.train" not in actual["finetune"]  # its learning rate comes from glm.training.step, not the loop
    with pytest.raises(ValueError, match="unknown stage"):
        stages.stage_modules("nope")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of the glm sources that stage code versions are read from (edits stay in tmp_path)."""
    copy = tmp_path / "glm"
    shutil.copytree(Path(engine.__file__).parent.parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(engine, "_PACKAGE_DIR", copy)
    monkeypatch.setattr(engine, "_SOURCES", {})
    monkeypatch.setattr(engine, "_VERSIONS", {})
    return copy


def _versions():
    return {stage: stages.stage_code_version(stage) for stage in stages.KEYED}


def _changed(before):
    after = _versions()
    return {stage for stage in before if before[stage] != after[stage]}


def _edit(path: Path, old: str, new: str) -> None:
    source = path.read_text()
    assert old in source, f"{old!r} not in {path}"
    path.write_text(source.replace(old, new, 1))


def test_an_edit_to_the_report_writer_keeps_pretraining_cached(package):
    before = _versions()
    _edit(package / "evaluation" / "report.py", "def write_report(", "REPORT_EDITED = 1\n\n\ndef write_report(")
    assert _changed(before) == {"evaluate", "finetune"}  # finetune: its manifest carries the report's warnings


def test_an_edit_to_the_export_choice_reruns_export_and_the_report_that_shows_it(package):
    before = _versions()
    _edit(package / "pipeline" / "choice.py", "margin = margin_se * se", "margin = margin_se * se * 1.0")
    assert _changed(before) == {"evaluate", "export"}


def test_an_edit_to_a_stages_glue_reruns_that_stage_only(package):
    before = _versions()
    _edit(package / "pipeline" / "pretrain.py", "def _plan_lines(", "GLUE_EDITED = 1\n\n\ndef _plan_lines(")
    assert _changed(before) == {"pretrain"}


def test_an_edit_to_the_engine_reruns_nothing(package):
    before = _versions()
    _edit(package / "pipeline" / "engine.py", "def output_ok(", "ENGINE_EDITED = 1\n\n\ndef output_ok(")
    assert _changed(before) == set()


def test_comments_docstrings_and_layout_keep_every_stage_cached(package):
    before = _versions()
    model = package / "core" / "model.py"
    source = model.read_text()
    edited = source.replace('"""', '"""Edited docstring. ', 1).replace("\n\n\n", "\n\n\n# a new comment\n\n", 1)
    model.write_text(edited + "\n\n# trailing remark\n")
    assert model.read_text() != source
    assert _versions() == before


def test_a_code_change_reruns_the_stages_that_use_the_module_and_only_them(package):
    before = _versions()
    model = package / "core" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _added(x):\n    return x + 1\n")
    changed = _changed(before)
    assert {"pretrain", "finetune", "evaluate", "export"} <= changed
    assert not changed & {"ingest", "validate-corpus", "tokenizer", "tokenize", "validate-tokens", "infill"}


def test_type_checking_imports_are_not_part_of_a_key(package):
    """heads imports finetune for annotations only: an edit to finetune must not re-run a stage that
    reaches heads alone. A real import in the same place is counted."""
    (package / "probe.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from glm.model import GLM\n    import glm.train\n"
        "else:\n    from glm.metrics import MetricsLog\n\n\ndef f():\n    from glm.special_tokens import SPECIAL\n"
    )
    assert engine._imports("probe") == {"core.metrics", "core.special_tokens"}  # old names: where they are now
    assert engine._scan_imports("from glm.pipeline import common, engine as e\nimport glm.pipeline.choice\n") == {
        "pipeline.common",
        "pipeline.engine",
        "pipeline.choice",
    }


def test_a_changed_glm_module_changes_the_code_version_within_one_process(tmp_path, monkeypatch):
    """Code versions are memoized per process, but an edit (or a new import) is seen at once."""
    package = tmp_path / "glm"
    package.mkdir()
    (package / "widths.py").write_text("WIDTH = 32\n")
    (package / "trainer.py").write_text("from glm.widths import WIDTH\n")
    (package / "extra.py").write_text("X = 1\n")
    monkeypatch.setattr(engine, "_PACKAGE_DIR", package)
    monkeypatch.setitem(engine.REGISTRY, "pretrain", dataclasses.replace(engine.REGISTRY["pretrain"], module="glm.trainer"))
    monkeypatch.setattr(engine, "_SOURCES", {})
    monkeypatch.setattr(engine, "_VERSIONS", {})

    first = stages.stage_code_version("pretrain")
    assert stages.stage_modules("pretrain") == ["trainer", "widths"]
    assert stages.stage_code_version("pretrain") == first
    memo = engine._SOURCES["widths"]
    stages.stage_code_version("pretrain")
    assert engine._SOURCES["widths"] is memo  # unchanged file: not read again

    (package / "widths.py").write_text("WIDTH = 64\n")  # same size: the file's identity still changes
    os.utime(package / "widths.py", ns=(1, 1))
    edited = stages.stage_code_version("pretrain")
    assert edited != first

    (package / "trainer.py").write_text("from glm.widths import WIDTH\nfrom glm import extra\n")
    assert stages.stage_modules("pretrain") == ["extra", "trainer", "widths"]
    assert stages.stage_code_version("pretrain") not in (first, edited)


def test_ignore_code_version_leaves_code_out_of_the_stage_key(package, tmp_path):
    from glm.core.shards import write_manifest

    cfg = PipelineConfig(run_dir=str(tmp_path / "run"))
    paths = stages.RunPaths(cfg.run_dir)
    write_manifest(paths.docs, "docs", [])
    cfg.orchestration.ignore_code_version = True
    key = stages.stage_key("tokenizer", cfg, paths)
    (package / "core" / "tokenizer.py").write_text((package / "core" / "tokenizer.py").read_text() + "\nX = 1\n")
    assert stages.stage_key("tokenizer", cfg, paths) == key
    cfg.orchestration.ignore_code_version = False
    assert stages.stage_key("tokenizer", cfg, paths) != key
