"""The pretrain flow with pretrain.cluster: Prefect renders and submits the SLURM job, watches it, and the
stage closes on its result, against a fake SLURM on PATH (tests/fake_slurm.py) running two loopback nodes."""

from __future__ import annotations

import json
from pathlib import Path

from glm_pipeline.flows.pipeline import data_flow, pretrain_flow

from tests import fake_slurm
from tests.flows.api import task_runs
from tests.glm.test_multinode import _free_port


def test_the_pretrain_flow_submits_a_slurm_job_and_watches_it(prefect_api, make_config, tmp_path, monkeypatch):
    for k, v in fake_slurm.install(tmp_path / "bin", tmp_path / "slurm-state").items():
        monkeypatch.setenv(k, v)
    cfg = make_config(
        "pretrain.nnodes=2",
        "pretrain.distributed=ddp",
        "pretrain.device=cpu",
        "pretrain.micro_batch_size=4",
        f"pretrain.cluster={{kind: slurm, poll_seconds: 0.2, rdzv_port: {_free_port()}}}",
    )
    assert data_flow(cfg, return_state=True).is_completed()
    state = pretrain_flow(cfg, return_state=True)
    assert state.is_completed(), state.message
    run = Path(cfg.run_dir)
    stats = json.loads((run / "pretrain" / "manifest.json").read_text())["stats"]
    assert stats["step"] == cfg.pretrain.steps and stats["checkpoint"].endswith(f"step-{cfg.pretrain.steps:06d}")
    assert (run / "pretrain" / "cluster" / "pretrain.sbatch").is_file() and (
        run / "pretrain" / "cluster" / "slurm-1001.out"
    ).is_file()
    (pretrain,) = [r for r in task_runs(state.state_details.flow_run_id) if r.name.startswith("pretrain")]
    assert pretrain.state.name == "Completed" and pretrain.run_count == 1
