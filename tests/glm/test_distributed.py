import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm.core.config import ModelConfig, OptimConfig, TrainConfig
from glm.core.metrics import read_metrics
from glm.distributed import DistInfo, init_distributed, resolve_device, wrap_model
from glm.training.checkpoint import latest_checkpoint, load_model, load_trainer_state
from glm.training.train import SyntheticBatches, pretrain

V, T, STEPS = 64, 32, 4
PAPER_MIX = {"token": 0.5, "sentence": 0.3, "document": 0.2}
MODEL = ModelConfig(vocab_size=V, max_seq_len=T, dropout=0.0, attention_dropout=0.0)


def _cfg(**kw) -> TrainConfig:
    base = dict(
        steps=STEPS,
        batch_size=8,
        micro_batch_size=8,
        checkpoint_every=2,
        log_every=1,
        eval_every=100,
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
    )
    return TrainConfig(**{**base, **kw})


def test_single_process_needs_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu")) and info.is_main and not dist.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, "ddp", info) is model  # one process: nothing to wrap
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_launch_settings_are_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match=r"RANK=3 is outside \[0, WORLD_SIZE=2\)"):
        init_distributed("cpu")
    info = DistInfo(rank=0, world_size=2)
    with pytest.raises(ValueError, match="train.distributed=none"):
        wrap_model(torch.nn.Linear(2, 2), "none", info)
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(mix, micro: int, **kw) -> SyntheticBatches:
    return SyntheticBatches(V, T, micro, objectives=None if mix is None else 3, **kw)


def _worker(rank: int, world: int, port: int, root: str, mix) -> None:
    """One rank: DDP then FSDP, each with gradient accumulation, interrupted after step 2 and resumed."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")
    try:
        for strategy in ("ddp", "fsdp"):
            cfg = _cfg(micro_batch_size=2, nproc=world, distributed=strategy)  # 2 ranks x 2 accumulation x 2 rows
            out = os.path.join(root, strategy)
            try:  # the data runs out during step 3 on both ranks: a crash after the step-2 checkpoint
                pretrain(cfg, MODEL, _data(mix, 2, rank=rank, world_size=world, limit=5), out, objective_mix=mix)
            except ValueError as e:
                assert "ran out at step 3" in str(e)
            else:
                raise AssertionError("the truncated data should have stopped the first run")
            pretrain(cfg, MODEL, _data(mix, 2, rank=rank, world_size=world), out, objective_mix=mix)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mix", [None, PAPER_MIX])
def test_ddp_and_fsdp_on_two_processes_match_one_process(tmp_path, mix):
    # with a mix, every rank and micro-batch must weigh the objectives by the global batch's token counts
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mix), nprocs=2, join=True)
    single = pretrain(_cfg(), MODEL, _data(mix, 8), tmp_path / "single", objective_mix=mix)
    reference = load_model(tmp_path / "single")[0].state_dict()
    ref_records = read_metrics(tmp_path / "single" / "metrics.jsonl")
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        records = read_metrics(run / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2, 3, 4], strategy  # resumed at 2, nothing repeated
        keys = ["loss", "grad_norm"] + ([] if mix is None else [f"loss/{o}" for o in PAPER_MIX])
        for key in keys:  # the gradient's scale too: Adam would hide a wrong factor
            assert [r[key] for r in records] == pytest.approx([r[key] for r in ref_records], rel=1e-5), (strategy, key)
        weights = load_model(run)[0].state_dict()  # full weights, plain names, whatever the sharding
        for k, w in reference.items():
            torch.testing.assert_close(weights[k], w, rtol=1e-4, atol=1e-5, msg=f"{strategy}: {k}")
        state = load_trainer_state(latest_checkpoint(run))
        assert len(state["ranks"]) == 2 and state["ranks"][1]["loader"] == {"micro_batches": 2 * STEPS}
        assert set(state["optimizer"]["state"]) == set(reference)  # full optimizer state, keyed by name
    assert single.loss == pytest.approx(records[-1]["loss"], rel=1e-5)
