"""Where pretraining runs: in the flow's process (train_in_process=true; `auto`, the default, picks it for one
device without a timeout) or in a subprocess (false); the same outputs and artifacts either way."""

from __future__ import annotations

import pytest
from glm_pipeline.flows.pipeline import data_flow, pretrain_flow

import glm.launch
from glm import stages
from tests.flows.api import artifacts, logs


def _pretrain_outputs_are_complete(cfg, state) -> None:
    assert state.is_completed(), state.message
    paths = stages.RunPaths(cfg.run_dir)
    manifest = paths.output("pretrain", cfg)
    assert state.result()["pretrain"] == str(manifest)
    assert stages.output_ok(manifest)
    assert stages.is_current("pretrain", stages.stage_key("pretrain", cfg, paths), manifest, paths)  # stamped: cached next time
    found = artifacts(state.state_details.flow_run_id)
    assert float(found[f"{cfg.name}-pretrain-progress"].data) == pytest.approx(100.0)
    assert f'"step": {cfg.pretrain.steps}' in found[f"{cfg.name}-pretrain-loss"].data


def test_in_process_training_writes_the_pretrain_outputs_and_full_progress(prefect_api, make_config, monkeypatch):
    cfg = make_config("quality.enabled=false", "orchestration.train_in_process=true", name="in-process")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("train_in_process=true launched a training subprocess")

    monkeypatch.setattr(glm.launch, "run_logged", no_subprocess)
    assert data_flow(cfg, return_state=True).is_completed()
    _pretrain_outputs_are_complete(cfg, pretrain_flow(cfg, return_state=True))


def test_subprocess_training_streams_its_output_to_the_run_log(prefect_api, make_config, monkeypatch):
    cfg = make_config("quality.enabled=false", "orchestration.train_in_process=false", name="subprocess")
    launched = []
    real = glm.launch.run_logged
    monkeypatch.setattr(glm.launch, "run_logged", lambda cmd, **kw: launched.append(cmd) or real(cmd, **kw))
    assert data_flow(cfg, return_state=True).is_completed()
    state = pretrain_flow(cfg, return_state=True)
    _pretrain_outputs_are_complete(cfg, state)
    assert len(launched) == 1 and launched[0][1:3] == ["-m", "glm.train"]
    records = logs(state.state_details.flow_run_id)
    assert any(f"glm.train: step {cfg.pretrain.steps}/{cfg.pretrain.steps}" in r.message for r in records)
