"""The whole pipeline as a flow under a temporary Prefect server: artifacts, run names, logs, caching."""

from __future__ import annotations

import json
import shutil

import pytest
from glm_pipeline.flows.cli import main as cli_main
from glm_pipeline.flows.pipeline import glm_pipeline, run_stage

from glm import stages
from glm.core.config import load_config
from glm.core.shards import read_manifest
from tests.flows.api import artifacts, client, logs, states, task_runs
from tests.flows.conftest import SMALL

HEAVY = (
    "ingest-",
    "validate-corpus-",
    "train-tokenizer-",
    "check-finetune-task-",
    "tokenize-",
    "close-tokenize-",
    "validate-tokens-",
    "infill-",
    "close-infill-",
    "pretrain-",
    "finetune-",
    "evaluate-",
    "export-onnx-",
    "verify-export-",
    "export-generation-",
)


@pytest.fixture(scope="module")
def two_runs(prefect_api, tmp_path_factory):
    """The tiny config end to end, then once more unchanged."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    cfg = load_config("configs/tiny.yaml", [*SMALL, "name=tiny-e2e", f"run_dir={run_dir}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        first = glm_pipeline(cfg, return_state=True)
        second = glm_pipeline(cfg, return_state=True)
    return cfg, first, second


def test_the_pipeline_completes_and_writes_every_stage(two_runs):
    cfg, first, _ = two_runs
    assert first.is_completed(), first.message
    assert first.name == "Completed" and first.message.startswith("bundle v0001 of tiny-e2e blessed and current")
    outputs = first.result()
    paths = stages.RunPaths(cfg.run_dir)
    for stage in stages.STAGES:
        assert stages.output_ok(paths.output(stage, cfg)), stage
    assert outputs["export"] == str(paths.output("export", cfg))
    assert (paths.bundle / "model.onnx").is_file() and (paths.bundle / "verification.json").is_file()


def test_every_artifact_is_visible_through_the_api(two_runs):
    cfg, first, _ = two_runs
    found = artifacts(first.state_details.flow_run_id)
    expected = {
        "corpus-statistics": "table",
        "cleaning-statistics": "table",
        "corpus-validation": "table",
        "tokenizer-summary": "markdown",
        "token-statistics": "table",
        "token-validation": "table",
        "pretrain-progress": "progress",
        "finetune-progress-pretrained": "progress",
        "pretrain-loss": "table",
        "finetune-results": "table",
        "evaluation-report": "markdown",
        "onnx-bundle": "markdown",
        "export-verification": "table",
        "bundle-gate": "markdown",
        "generation-bundle": "markdown",
        "generation-verification": "table",
    }
    assert {f"tiny-e2e-{k}" for k in expected} <= set(found), sorted(found)
    for key, kind in expected.items():
        assert found[f"tiny-e2e-{key}"].type == kind, key
    assert float(found["tiny-e2e-pretrain-progress"].data) == pytest.approx(100.0)
    assert float(found["tiny-e2e-finetune-progress-pretrained"].data) == pytest.approx(100.0)
    report = found["tiny-e2e-evaluation-report"].data
    assert "data:image/png;base64," in report and "](accuracy.png)" not in report  # plots render in the UI
    bundle = found["tiny-e2e-onnx-bundle"].data  # no file:// link (browsers refuse it): text to copy
    assert "file://" not in bundle and str(stages.RunPaths(cfg.run_dir).bundle.resolve()) in bundle
    assert "SHA256SUMS" in bundle and "Bundle.load(" in bundle and "glm-pipeline infer" in bundle
    loss_rows = found["tiny-e2e-pretrain-loss"].data
    assert '"step": 6' in loss_rows and '"loss"' in loss_rows
    # the baselines sit beside the models; the stage's warnings, if any, are an artifact of their own
    assert "TF-IDF + logistic regression" in found["tiny-e2e-finetune-results"].data
    assert "TF-IDF + logistic regression" in report
    paths = stages.RunPaths(cfg.run_dir)
    warnings = read_manifest(paths.finetune(cfg.finetune.task.name) / "manifest.json")["stats"]["warnings"]
    if any(w["level"] == "warning" for w in warnings):
        assert all(w["message"] in found["tiny-e2e-finetune-warnings"].data for w in warnings)
    # the report's warnings: the classifier's and, for a degenerate generator (a 6-step tiny model), generation's
    reported = json.loads((paths.eval / "metrics.json").read_text())["warnings"]
    assert [w for w in reported if w["check"] != "degenerate fills"] == warnings
    if any(w["level"] == "warning" for w in reported):
        assert "## WARNING:" in report and found["tiny-e2e-evaluation-report"].description.startswith("WARNING:")
    else:
        assert "## WARNING:" not in report


def test_the_bundle_is_the_run_chosen_by_the_selection_rule_and_says_why(two_runs):
    cfg, _, _ = two_runs
    paths = stages.RunPaths(cfg.run_dir)
    results = stages.finetune_results(cfg, paths)
    best = stages.choose_export(results, cfg.export.selection_margin_se)["run"]
    selection = json.loads((paths.bundle / "config.json").read_text())["source"]["selection"]
    assert selection["run"] == best and selection["dev"] == {n: r["best_val_accuracy"] for n, r in results.items()}
    assert selection["margin"]["n_dev"] == results["pretrained"]["sizes"]["dev"]
    assert f"The bundle is the **{best}** run" in (paths.eval / "report.md").read_text()
    assert selection["reason"] and read_manifest(paths.export / "manifest.json")["stats"]["selection"] == selection
    assert json.loads((paths.bundle / "config.json").read_text())["source"]["checkpoint"].startswith(
        str((paths.finetune(cfg.finetune.task.name) / stages.RUN_DIRS[best]).resolve())
    )


def test_the_pretrained_model_is_a_generation_bundle_beside_the_classifier(two_runs, capsys):
    from glm import runtime

    cfg, _, _ = two_runs
    paths = stages.RunPaths(cfg.run_dir)
    generation = paths.generation / "bundle"
    config = json.loads((generation / "config.json").read_text())
    assert "classifier" not in config or config["classifier"] is None
    assert json.loads((generation / "verification.json").read_text())["passed"] is True
    assert config["source"]["checkpoint"].startswith(str(paths.pretrain.resolve()))
    filled = runtime.Bundle.load(generation, threads=1).fill_blanks("the movie was [MASK] .", max_new_tokens=3)
    assert len(filled.spans) == 1
    with pytest.raises(runtime.BundleError, match="use the generation bundle"):
        runtime.Bundle.load(paths.bundle, threads=1).fill_blanks("the movie was [MASK] .")


def test_runs_are_named_after_the_config_and_the_shard(two_runs):
    _, first, _ = two_runs
    names = set(states(task_runs(first.state_details.flow_run_id)))
    assert {"ingest-tiny-e2e", "pretrain-tiny-e2e", "finetune-sentiment", "verify-export-tiny-e2e"} <= names
    assert "tokenize-train/part-00000" in names and "tokenize-valid/part-00000" in names
    assert "infill-epoch-000-shard-00000" in names and "infill-valid-shard-00000" in names
    with client() as c:
        assert c.read_flow_run(first.state_details.flow_run_id).name == "tiny-e2e"


def test_glm_and_training_logs_reach_the_run_logs(two_runs):
    _, first, _ = two_runs
    records = logs(first.state_details.flow_run_id)
    assert any(r.name.startswith("glm.") and "ingest" in r.message for r in records)  # PREFECT_LOGGING_EXTRA_LOGGERS
    # one device trains in the flow's process by default: glm.train's own records
    assert any(r.name == "glm.train" and r.message.startswith("step 6/6") for r in records)


def test_an_unchanged_rerun_is_cached_task_by_task(two_runs):
    _, first, second = two_runs
    assert second.is_completed()
    first_names = states(task_runs(first.state_details.flow_run_id))
    again = states(task_runs(second.state_details.flow_run_id))
    assert set(again) == set(first_names)
    assert all(state == "Completed" for state in first_names.values())
    heavy = {name: state for name, state in again.items() if name.startswith(HEAVY)}
    assert len(heavy) == len(again) >= 16
    assert set(heavy.values()) == {"Cached"}, {n: s for n, s in heavy.items() if s != "Cached"}


def test_run_stage_rejects_an_unknown_stage(make_config):
    with pytest.raises(ValueError, match="unknown stage 'train'.*data, pretrain"):
        run_stage(make_config(), "train")


def test_a_linear_head_run_fine_tunes_evaluates_exports_and_verifies(two_runs, tmp_path, capsys):
    """finetune.task.head=linear on a copy of the tiny run: the data and the pretrained model are reused."""
    cfg, _, _ = two_runs
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run_dir, ignore=shutil.ignore_patterns(".lock", "logs"))
    linear = load_config("configs/tiny.yaml", [*SMALL, "name=tiny-linear", f"run_dir={run_dir}", "finetune.task.head=linear"])
    run_stage(linear, "finetune")
    run_stage(linear, "export")
    result = json.loads((run_dir / "finetune/sentiment/pretrained/result.json").read_text())
    assert result["labels"] == ["0", "1"] and 0.0 <= result["test"]["accuracy"] <= 1.0
    # this run's version (the gate may or may not make it current: a linear head vs the verbalizer model)
    made = read_manifest(run_dir / "export/manifest.json")["stats"]
    bundle = run_dir / "export/versions" / made["version"]
    assert made["version"] == "v0002" and (run_dir / "export/current").is_symlink()  # the copy's links were restored
    assert json.loads((bundle / "config.json").read_text())["classifier"]["head"] == "linear"
    report = json.loads((bundle / "verification.json").read_text())
    assert report["passed"] and report["fp32"]["classifier"]["accuracy"] == report["fp32"]["classifier"]["accuracy_pytorch"]
    assert cli_main(["infer", str(bundle), "--classify", "a fine film"]) == 0
    assert capsys.readouterr().out.startswith("label: ")
