"""The shapes stages exchange are checked where they are written, with the key named."""

from __future__ import annotations

import json

import pytest

from glm import stages
from glm.core.config import PipelineConfig
from glm.core.contracts import ContractError, PretrainStats, TrainSummary, check
from glm.core.shards import file_entry, read_stats, write_manifest

GOOD_PRETRAIN = {
    "checkpoint": "checkpoints/step-000002",
    "step": 2,
    "loss": 7.5,
    "val_loss": None,
    "tokens": 512,
    "elapsed": 1.5,
    "bad_steps": 0,
    "resumed_from": None,
}


def test_check_returns_the_value_itself_extra_keys_kept():
    value = {**GOOD_PRETRAIN, "note": "a stage may record more than its contract"}
    assert check(PretrainStats, value, "x") is value


@pytest.mark.parametrize(
    ("change", "named"),
    [({"step": None}, "step"), ({"checkpoint": 3}, "checkpoint"), ({"loss": "low"}, "loss")],
)
def test_a_wrong_or_missing_key_is_named(change, named):
    with pytest.raises(ContractError, match=rf"^the stats of here does not have the shape of PretrainStats: {named}: "):
        check(PretrainStats, {**GOOD_PRETRAIN, **change}, "the stats of here")
    missing = {k: v for k, v in GOOD_PRETRAIN.items() if k != named}
    with pytest.raises(ContractError, match=rf"PretrainStats: {named}: Field required"):
        check(PretrainStats, missing, "the stats of here")


def test_read_stats_checks_the_manifest_on_disk(tmp_path):
    write_manifest(tmp_path, "pretrain", [], stats=GOOD_PRETRAIN)
    assert read_stats(tmp_path, PretrainStats) == GOOD_PRETRAIN
    write_manifest(tmp_path, "pretrain", [], stats={**GOOD_PRETRAIN, "step": "two"})
    with pytest.raises(ContractError, match=r"manifest.json does not have the shape of PretrainStats: step"):
        read_stats(tmp_path, PretrainStats)


def test_the_training_result_line_is_checked():
    line = json.dumps({**GOOD_PRETRAIN, "checkpoint": "/x", "metrics_path": "/m"})
    assert stages.parse_train_result(f"log line\n{line}\n")["step"] == 2
    broken = json.dumps({"step": 2, "checkpoint": "/x"})
    with pytest.raises(ContractError, match="the result line of python -m glm.train .*TrainSummary"):
        stages.parse_train_result(broken)
    assert TrainSummary.__required_keys__ >= {"step", "checkpoint", "metrics_path"}


def test_a_stage_that_breaks_its_contract_is_not_stamped(tmp_path, swap_registry):
    """The registry checks a stage's stats before stamping it: a broken writer fails at once, naming the
    key, and nothing marks its output as done (the next run builds it again)."""
    written = []

    def build(cfg, paths):
        out = paths.root / "toy"
        out.mkdir(parents=True, exist_ok=True)
        (out / "x.txt").write_text("x", encoding="utf-8")
        stats = dict(GOOD_PRETRAIN) if written else {k: v for k, v in GOOD_PRETRAIN.items() if k != "tokens"}
        written.append(stats)
        write_manifest(out, "toy", [file_entry(out / "x.txt", out)], stats=stats)

    swap_registry(stages.Stage("toy", "data", "toy/manifest.json", build=build, stats=PretrainStats))
    cfg = PipelineConfig(name="toy", run_dir=str(tmp_path / "run"))
    paths = stages.RunPaths(cfg.run_dir)
    with pytest.raises(ContractError, match="PretrainStats: tokens: Field required"):
        stages.run_stage("toy", cfg, paths)
    assert stages.current_output("toy", cfg, paths) is None
    assert stages.run_stage("toy", cfg, paths) == paths.root / "toy" / "manifest.json"
    assert len(written) == 2 and stages.current_output("toy", cfg, paths) is not None


def test_every_stage_with_a_manifest_declares_its_stats():
    for st in stages.REGISTRY.values():
        if st.output is not None and st.output.endswith("manifest.json"):
            assert st.stats is not None, st.name
        if st.mapped:
            assert st.shard_result is not None, st.name
