"""orchestration.train_in_process: the pretrain task trains in the flow's process, same outputs and artifacts."""

from __future__ import annotations

import pytest

import tasks.training
from flows.pipeline import data_flow, pretrain_flow
from glm import stages
from tests.flows.api import artifacts


def test_in_process_training_writes_the_pretrain_outputs_and_full_progress(prefect_api, make_config, monkeypatch):
    cfg = make_config("quality.enabled=false", "orchestration.train_in_process=true", name="in-process")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("train_in_process=true launched a training subprocess")

    monkeypatch.setattr(tasks.training, "run_logged", no_subprocess)
    assert data_flow(cfg, return_state=True).is_completed()
    state = pretrain_flow(cfg, return_state=True)
    assert state.is_completed(), state.message
    paths = stages.RunPaths(cfg.run_dir)
    manifest = paths.output("pretrain", cfg)
    assert state.result()["pretrain"] == str(manifest)
    assert stages.output_ok(manifest)
    assert stages.is_current("pretrain", stages.stage_key("pretrain", cfg, paths), manifest, paths)  # stamped: cached next time
    found = artifacts(state.state_details.flow_run_id)
    assert float(found["in-process-pretrain-progress"].data) == pytest.approx(100.0)
    assert f'"step": {cfg.pretrain.steps}' in found["in-process-pretrain-loss"].data
