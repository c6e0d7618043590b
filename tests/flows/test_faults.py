"""Failures and changes: retried transient faults, killed training resumed, deleted outputs refreshed,
a changed config section re-running exactly the stages below it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from glm_pipeline.flows.pipeline import data_flow, pretrain_flow, task_runner
from safetensors.torch import load_file

from glm import stages
from glm.pipeline import pretrain as pipeline_pretrain
from tests.flows.api import artifacts, states, task_runs

# runs `python -m glm.train ARGS` but SIGKILLs itself right after logging step 3 (checkpoint 2 is on disk)
KILLED_AT_STEP_3 = """
import os, signal, sys
import glm.training.train as train
write = train.MetricsLog.write
def write_then_die(self, record):
    write(self, record)
    if record.get("step") == 3 and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)
train.MetricsLog.write = write_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def _state_of(flow_state, prefix: str) -> dict[str, str]:
    return {n: s for n, s in states(task_runs(flow_state.state_details.flow_run_id)).items() if n.startswith(prefix)}


def test_a_transient_ingest_failure_is_retried_and_the_flow_succeeds(prefect_api, make_config, monkeypatch):
    cfg = make_config("quality.enabled=false", "orchestration.retries=2")
    import glm.corpus

    real, calls = glm.corpus.ingest, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("injected: the corpus share went away for a moment")
        return real(*args, **kwargs)

    monkeypatch.setattr(glm.corpus, "ingest", flaky)  # the ingest stage's work
    state = data_flow(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert len(calls) == 2
    ingest_run = next(r for r in task_runs(state.state_details.flow_run_id) if r.name.startswith("ingest-"))
    assert ingest_run.run_count == 2 and ingest_run.state.name == "Completed"


def test_a_permanent_failure_is_not_retried(prefect_api, make_config, monkeypatch):
    cfg = make_config("quality.enabled=false", "orchestration.retries=2")
    import glm.corpus

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ValueError("data.sources[0]: path 'nowhere' does not exist")

    monkeypatch.setattr(glm.corpus, "ingest", broken)
    state = data_flow(cfg, return_state=True)
    assert state.is_failed() and len(calls) == 1


def test_a_failed_quality_gate_stops_the_flow_and_still_shows_its_results(prefect_api, make_config):
    cfg = make_config("quality.min_docs=100000", "orchestration.retries=2", name="gated")
    state = data_flow(cfg, return_state=True)
    assert state.is_failed()
    ran = task_runs(state.state_details.flow_run_id)
    gate = next(r for r in ran if r.name == "validate-corpus-gated")
    assert gate.state.name == "Failed" and gate.run_count == 1  # a data problem is not retried
    assert "expect_table_row_count_to_be_between(min_value=100000): observed 160" in gate.state.message
    assert not any(r.name.startswith("train-tokenizer") for r in ran)  # nothing ran past the gate
    table = artifacts(state.state_details.flow_run_id)["gated-corpus-validation"]
    assert "FAILED" in table.description and "row_count" in table.data


def test_killed_training_resumes_from_its_checkpoint_with_identical_final_weights(prefect_api, make_config, monkeypatch):
    cfg = make_config("quality.enabled=false", "orchestration.retries=0", "orchestration.train_in_process=false")
    assert data_flow(cfg, return_state=True).is_completed()
    real_command = stages.pretrain_command

    def killing_command(run_cfg, paths, python=sys.executable):
        return [python, "-c", KILLED_AT_STEP_3, *real_command(run_cfg, paths)[3:]]  # [python, -m, glm.train, ARGS]

    monkeypatch.setattr(pipeline_pretrain, "pretrain_command", killing_command)
    killed = pretrain_flow(cfg, return_state=True)
    assert killed.is_failed()
    assert "training process crashed (exit code -9" in str(killed.result(raise_on_failure=False))
    paths = stages.RunPaths(cfg.run_dir)
    checkpoints = paths.pretrain / "checkpoints"
    assert (checkpoints / "step-000002").is_dir() and not (checkpoints / "step-000006").exists()

    monkeypatch.setattr(pipeline_pretrain, "pretrain_command", real_command)
    resumed = pretrain_flow(cfg, return_state=True)
    assert resumed.is_completed(), resumed.message
    manifest = stages.read_manifest(paths.pretrain / "manifest.json")
    assert manifest["stats"]["resumed_from"] == 2 and manifest["stats"]["step"] == 6

    reference = Path(cfg.run_dir) / "uninterrupted"
    subprocess.run(real_command(cfg, paths)[:-1] + [str(reference)], check=True, capture_output=True)
    got = load_file(paths.pretrain / "checkpoints" / "step-000006" / "model.safetensors")
    want = load_file(reference / "checkpoints" / "step-000006" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_deleted_output_is_rebuilt_even_though_its_cache_entry_survives(prefect_api, make_config):
    cfg = make_config("quality.enabled=false")
    assert data_flow(cfg, return_state=True).is_completed()
    paths = stages.RunPaths(cfg.run_dir)
    (paths.tokens / "train" / "part-00000.arrow").unlink()
    (paths.infill / "manifest.json").unlink()

    again = data_flow(cfg, return_state=True)
    assert again.is_completed(), again.message
    ran = states(task_runs(again.state_details.flow_run_id))
    assert ran["tokenize-train/part-00000"] == "Completed" and ran["tokenize-valid/part-00000"] == "Cached"
    assert ran["close-infill-tiny"] == "Completed" and ran["ingest-tiny"] == "Cached"
    assert stages.output_ok(paths.tokens / "manifest.json") and stages.output_ok(paths.infill / "manifest.json")


def test_a_changed_section_reruns_exactly_the_stages_below_it(prefect_api, make_config):
    cfg = make_config()
    assert data_flow(cfg, return_state=True).is_completed()
    paths = stages.RunPaths(cfg.run_dir)
    build_key = stages.read_manifest(paths.infill / "manifest.json")["stats"]["build_key"]
    changed = cfg.model_copy(deep=True)
    changed.infilling.seed = 99  # only the blank-infilling shards depend on it
    state = data_flow(changed, return_state=True)
    assert state.is_completed()
    ran = states(task_runs(state.state_details.flow_run_id))
    reran = {name for name, s in ran.items() if s != "Cached"}
    assert reran == {name for name in ran if name.startswith(("infill-", "close-infill-"))}
    assert len(reran) >= 2

    # back to the first config: its cache entries survive, but the shards on disk are the other seed's
    back = data_flow(cfg, return_state=True)
    assert back.is_completed()
    ran = states(task_runs(back.state_details.flow_run_id))
    assert {s for n, s in ran.items() if n.startswith("infill-")} == {"Completed"}
    assert stages.read_manifest(paths.infill / "manifest.json")["stats"]["build_key"] == build_key


def test_the_flow_rejects_an_invalid_config_before_running_anything(prefect_api, make_config):
    cfg = make_config().model_dump(mode="json")
    cfg["pretrain"]["steps"] = 0
    state = pretrain_flow(cfg, return_state=True)
    assert state.is_failed()
    assert "steps" in state.message or "steps" in str(state.result(raise_on_failure=False))
    assert task_runs(state.state_details.flow_run_id) == []
    assert not Path(cfg["run_dir"]).exists()


def test_the_dask_runner_is_optional(make_config):
    cfg = make_config("orchestration.task_runner=dask")
    try:
        import prefect_dask  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install 'glm-pipeline\\[dask\\]'"):
            task_runner(cfg)
    else:
        assert type(task_runner(cfg)).__name__ == "DaskTaskRunner"


@pytest.mark.parametrize("runner", ["processes"])
def test_per_shard_tasks_run_on_the_configured_task_runner(prefect_api, make_config, runner):
    cfg = make_config("quality.enabled=false", f"orchestration.task_runner={runner}", "data.workers=2")
    state = data_flow(cfg, return_state=True)
    assert state.is_completed(), state.message
    shards = _state_of(state, "infill-")
    assert shards and set(shards.values()) == {"Completed"}
    assert stages.output_ok(stages.RunPaths(cfg.run_dir).infill / "manifest.json")


def test_a_shard_edited_in_place_is_rebuilt_by_its_task_and_nothing_is_pickled(prefect_api, make_config):
    cfg = make_config("quality.enabled=false")
    assert data_flow(cfg, return_state=True).is_completed()
    paths = stages.RunPaths(cfg.run_dir)
    shard = paths.tokens / "train" / "part-00000.arrow"
    original = shard.read_bytes()
    shard.write_bytes(original[:-8] + bytes(8))  # same size, other bytes: a re-run used to report it Cached

    again = data_flow(cfg, return_state=True)
    assert again.is_completed(), again.message
    ran = states(task_runs(again.state_details.flow_run_id))
    assert ran["tokenize-train/part-00000"] == "Completed" and ran["tokenize-valid/part-00000"] == "Cached"
    assert shard.read_bytes() == original
    # the repaired shard is what the manifest digest describes: nothing below it runs again
    assert {s for n, s in ran.items() if n.startswith(("infill-", "close-infill-"))} == {"Cached"}
    assert not (Path(cfg.run_dir) / ".prefect-results").exists()


def test_a_wrong_verbalizer_fails_right_after_the_tokenizer_before_any_shard_or_training(prefect_api, make_config):
    # these words are several pieces of a 400-piece vocabulary: single-token scoring cannot score them
    cfg = make_config(
        "quality.enabled=false", "finetune.task.multi_token=false", "finetune.task.verbalizers={'0': terrible, '1': magnificent}"
    )
    state = data_flow(cfg, return_state=True)
    assert state.is_failed()
    ran = states(task_runs(state.state_details.flow_run_id))
    assert ran["check-finetune-task-sentiment"] == "Failed"
    assert not any(n.startswith(("infill-", "close-infill-")) for n in ran)
    paths = stages.RunPaths(cfg.run_dir)
    assert (paths.tokenizer / "manifest.json").is_file() and not (paths.infill / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"verbalizer '\w+' of label '\d' is \d+ tokens .* single-token scoring was requested"):
        state.result()
