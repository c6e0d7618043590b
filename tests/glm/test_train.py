import itertools
import logging
import math

import pytest
import torch

import glm.train as train
from glm.checkpoint import MODEL_FILE, latest_checkpoint, load_model
from glm.config import ModelConfig, OptimConfig, TrainConfig
from glm.metrics import read_metrics
from glm.train import (
    NonFiniteLossError,
    SyntheticBatches,
    autocast_dtype,
    lr_at,
    pretrain,
)

V, T = 64, 32


def _model(dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(vocab_size=V, max_seq_len=T, dropout=dropout, attention_dropout=dropout)


def _train(**kw) -> TrainConfig:
    base = dict(
        steps=4,
        batch_size=8,
        micro_batch_size=8,
        eval_every=2,
        eval_batches=2,
        checkpoint_every=2,
        log_every=1,
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
    )
    return TrainConfig(**{**base, **kw})


def _data(cfg: TrainConfig, seed: int = 0, **kw) -> SyntheticBatches:
    return SyntheticBatches(V, T, cfg.micro_batch_size, seed=seed, **kw)


def _valid() -> list:
    return list(itertools.islice(SyntheticBatches(V, T, 4, seed=99), 2))


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_model(run_dir)[0].state_dict()


def _untimed(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in read_metrics(run_dir / "metrics.jsonl")]


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


# --------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_then_cosine_to_floor():
    o = OptimConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, o, total_steps=14) for s in range(16)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup, first update lr/warmup
    assert lrs[4] == pytest.approx(1e-3)  # cosine starts at the peak
    assert lrs[9] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 5 / 9)))
    assert lrs[13] == pytest.approx(1e-4) and lrs[15] == pytest.approx(1e-4)  # floor at the last update and after
    assert all(a > b for a, b in zip(lrs[4:13], lrs[5:14]))
    assert lr_at(0, OptimConfig(lr=1e-3, warmup_steps=0), 10) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, o, 10)


# --------------------------------------------------------------------------- the loop


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    # micro-batches hold different numbers of loss tokens, so a mean of means would differ
    counts = [int(b["loss_mask"].sum()) for b in itertools.islice(_data(_train(micro_batch_size=4)), 4)]
    assert len(set(counts)) > 1
    big = pretrain(_train(steps=3), _model(), _data(_train()), tmp_path / "big")
    accum = pretrain(_train(steps=3, micro_batch_size=4), _model(), _data(_train(micro_batch_size=4)), tmp_path / "accum")
    assert accum.loss == pytest.approx(big.loss, rel=1e-6)
    rec_big, rec_acc = read_metrics(tmp_path / "big" / "metrics.jsonl"), read_metrics(tmp_path / "accum" / "metrics.jsonl")
    assert [r["step"] for r in rec_acc] == [r["step"] for r in rec_big] == [1, 2, 3]
    for r1, r2 in zip(rec_big, rec_acc):
        assert r1["loss_tokens"] == r2["loss_tokens"] and r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)  # the gradient's scale, not only its direction
    w_big, w_acc = _weights(tmp_path / "big"), _weights(tmp_path / "accum")
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-5, atol=1e-6)


def test_metrics_checkpoints_and_callback(tmp_path):
    seen = []
    cfg = _train(keep_checkpoints=1)
    result = pretrain(cfg, _model(0.1), _data(cfg), tmp_path, valid_data=_valid(), on_metrics=seen.append)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == seen
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"lr", "grad_norm", "tokens_per_s", "loss_tokens", "elapsed", "mfu", "skipped"} <= set(r)
        assert math.isfinite(r["loss"]) and r["loss_tokens"] > 0 and r["mfu"] is None  # no MFU on CPU
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4] and vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    assert result.step == 4 and result.val_loss == vals[-1]["val_loss"] and result.tokens == 4 * 8 * T
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-000004"]  # keep_checkpoints=1
    assert result.checkpoint == latest_checkpoint(tmp_path)
    # a finished run started again does nothing
    again = pretrain(cfg, _model(0.1), _data(cfg), tmp_path, valid_data=_valid())
    assert again.resumed_from == 4 and again.step == 4 and read_metrics(tmp_path / "metrics.jsonl") == records


class _Killed(Exception):
    pass


def _kill_at(step):
    def on_metrics(record):
        if record["step"] == step and "loss" in record:
            raise _Killed

    return on_metrics


def test_exact_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = _train(steps=6, micro_batch_size=4)  # dropout and accumulation: RNG and data position both matter
    full = pretrain(cfg, _model(0.1), _data(cfg), tmp_path / "full", valid_data=_valid())

    with pytest.raises(_Killed):  # dies after step 5's update, before its checkpoint; last one is step 4
        pretrain(cfg, _model(0.1), _data(cfg), tmp_path / "cut", valid_data=_valid(), on_metrics=_kill_at(5))
    resumed = pretrain(cfg, _model(0.1), _data(cfg), tmp_path / "cut", valid_data=_valid())
    assert resumed.resumed_from == 4 and resumed.step == 6
    # the same records, timings aside; step 5's record (written before the kill) is not duplicated
    assert _untimed(tmp_path / "cut") == _untimed(tmp_path / "full")
    w_full, w_cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)

    # init_from: another directory starts from the step-4 checkpoint and lands on the same weights
    branch = pretrain(
        cfg.model_copy(update={"init_from": str(tmp_path / "cut" / "checkpoints" / "step-000004")}),
        _model(0.1),
        _data(cfg),
        tmp_path / "branch",
        valid_data=_valid(),
    )
    assert branch.resumed_from == 4 and branch.loss == full.loss
    w_branch = _weights(tmp_path / "branch")
    assert all(torch.equal(w_full[k], w_branch[k]) for k in w_full)


def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path, caplog):
    cfg = _train(steps=4, checkpoint_every=1)
    with pytest.raises(_Killed):
        pretrain(cfg, _model(), _data(cfg), tmp_path, on_metrics=_kill_at(4))
    (tmp_path / "checkpoints" / "step-000003" / MODEL_FILE).write_bytes(b"garbage")
    result = pretrain(cfg, _model(), _data(cfg), tmp_path)
    assert result.resumed_from == 2 and "step-000003" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


class _OtherData(SyntheticBatches):
    def load_state_dict(self, state):
        raise ValueError("the loader state was saved on another dataset")


def test_init_from_a_run_on_other_data_starts_that_data_afresh(tmp_path, caplog):
    cfg = _train(steps=2)
    pretrain(cfg, _model(), _data(cfg), tmp_path / "first")
    longer = cfg.model_copy(update={"steps": 3, "init_from": str(tmp_path / "first")})
    result = pretrain(longer, _model(), _OtherData(V, T, 8, seed=5), tmp_path / "second")
    assert result.resumed_from == 2 and result.step == 3 and "not restored" in caplog.text
    with pytest.raises(ValueError, match="another dataset"):  # a run's own checkpoint must fit its data
        pretrain(longer.model_copy(update={"steps": 4}), _model(), _OtherData(V, T, 8, seed=5), tmp_path / "second")


def test_resume_refuses_another_model(tmp_path):
    cfg = _train(steps=1)
    pretrain(cfg, _model(), _data(cfg), tmp_path)
    with pytest.raises(ValueError, match="n_layer.*fresh output directory"):
        pretrain(cfg, _model().model_copy(update={"n_layer": 3}), _data(cfg), tmp_path)


# --------------------------------------------------------------------------- non-finite losses


def _nan_at(monkeypatch, bad_steps: set[int], accum: int = 1):
    calls = itertools.count()
    real = train.infilling_loss

    def loss_fn(model, batch):
        loss, n = real(model, batch)
        step = next(calls) // accum + 1
        return (loss * float("nan") if step in bad_steps else loss), n

    monkeypatch.setattr(train, "infilling_loss", loss_fn)


def test_non_finite_loss_stops_naming_the_step(monkeypatch, tmp_path):
    _nan_at(monkeypatch, {3})
    cfg = _train(steps=4)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        pretrain(cfg, _model(), _data(cfg), tmp_path)
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 3 and last["loss"] is None and last["skipped"] and last["bad_steps"] == 1


def test_non_finite_steps_are_skipped_up_to_the_budget(monkeypatch, tmp_path):
    _nan_at(monkeypatch, {2, 3})
    cfg = _train(steps=4, max_bad_steps=2)
    result = pretrain(cfg, _model(), _data(cfg), tmp_path)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["skipped"] for r in records] == [False, True, True, False] and result.bad_steps == 2
    assert records[-1]["loss"] is not None and all(torch.isfinite(w).all() for w in _weights(tmp_path).values())
    _nan_at(monkeypatch, {2, 3, 4})
    with pytest.raises(NonFiniteLossError, match="step 4.*max_bad_steps=2"):
        pretrain(cfg, _model(), _data(cfg), tmp_path / "over")


# --------------------------------------------------------------------------- precision and inputs


def test_bf16_autocast_on_cpu_trains(tmp_path):
    cfg = _train(steps=3, precision="bf16", eval_every=3)
    result = pretrain(cfg, _model(0.1), _data(cfg), tmp_path, valid_data=_valid())
    assert math.isfinite(result.loss) and math.isfinite(result.val_loss)
    first, last = _losses(tmp_path)[0][1], result.loss
    assert last < first  # lr 3e-3 on a 64-token vocabulary learns in 3 steps


def test_bf16_on_a_cpu_without_bf16_kernels_warns(monkeypatch, caplog):
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # asked for: honoured, with a warning
        assert autocast_dtype("auto", torch.device("cpu")) is None
    assert [r.getMessage() for r in caplog.records if "emulates bf16" in r.getMessage()], caplog.text
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert "emulates bf16" not in caplog.text


def test_bad_inputs_have_clear_errors(tmp_path):
    cfg = _train(steps=3)
    with pytest.raises(ValueError, match="micro_batch_size=8"):
        pretrain(cfg, _model(), SyntheticBatches(V, T, 4), tmp_path / "a")
    with pytest.raises(ValueError, match="ran out at step 3"):
        pretrain(cfg, _model(), _data(cfg, limit=2), tmp_path / "b")
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain(cfg, ModelConfig(), _data(cfg), tmp_path / "c")
    with pytest.raises(TypeError, match="state_dict"):
        pretrain(cfg, _model(), list(itertools.islice(_data(cfg), 3)), tmp_path / "d")
    # a budget is turned into steps by the pipeline (glm.stages.prepare_pretrain), never silently ignored
    with pytest.raises(ValueError, match="pretrain.budget_minutes=5 is turned into steps by the pipeline"):
        pretrain(_train(budget_minutes=5), _model(), _data(cfg), tmp_path / "e")


# --------------------------------------------------------------------------- the real loader, through the CLI


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    return build_real_shards(tmp_path_factory.mktemp("real-shards"))


def build_real_shards(root):
    """root/infill, a blank-infilling dataset, and root/run.yaml for it: `python -m glm.train`'s inputs."""
    import numpy as np
    import yaml

    from glm import shards
    from glm.config import InfillingConfig
    from glm.infill_shards import build_infilling_dataset
    from tests.glm.test_infill_shards import random_docs, write_token_shards

    rng = np.random.default_rng(0)
    tokens = write_token_shards(root / "tokens", {"train": [random_docs(rng, 60)], "valid": [random_docs(rng, 20)]})
    manifest = shards.read_manifest(tokens)  # record the tokenizer size, as the token stage does
    shards.write_manifest(tokens, "tokens", manifest["files"], stats={"vocab_size": 3000})
    infill_cfg = dict(seq_len=32, epochs=1, samples_per_shard=64)
    build_infilling_dataset(tokens, root / "infill", InfillingConfig(**infill_cfg), progress=False)
    config = {
        "infilling": infill_cfg,
        "model": {"preset": "tiny", "max_seq_len": 32},
        "pretrain": {
            "steps": 4,
            "batch_size": 8,
            "micro_batch_size": 4,
            "eval_every": 2,
            "eval_batches": 2,
            "checkpoint_every": 2,
            "optim": {"lr": 3e-3, "warmup_steps": 1},
        },
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_cli_on_real_shards_resumes_exactly(real_shards, tmp_path, capsys):
    import json

    argv = ["--config", str(real_shards / "run.yaml"), "--data", str(real_shards / "infill")]

    assert train.main([*argv, "--out", str(tmp_path / "full")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and math.isfinite(result["val_loss"])
    model, model_cfg = load_model(tmp_path / "full")
    assert model_cfg.vocab_size == 3008  # the tokenizer's 3000, rounded up to a multiple of 64

    from glm.config import load_config

    with pytest.raises(_Killed):
        train.pretrain_on_shards(
            load_config(real_shards / "run.yaml"), real_shards / "infill", tmp_path / "cut", on_metrics=_kill_at(3)
        )
    assert train.main([*argv, "--out", str(tmp_path / "cut")]) == 0
    assert _untimed(tmp_path / "cut") == _untimed(tmp_path / "full")
    w_full, w_cut = model.state_dict(), _weights(tmp_path / "cut")
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


# --------------------------------------------------------------------------- exit codes: permanent or a crash


def _main_failing(argv: list[str], out) -> tuple[int, dict | None]:
    from glm.errors import read_error_file

    return train.main([*argv, "--out", str(out)]), read_error_file(out)


def test_cli_exit_codes_name_permanent_failures_and_record_them(real_shards, tmp_path, monkeypatch, capsys):
    import shutil

    from glm.errors import EXIT_CODES

    argv = ["--config", str(real_shards / "run.yaml"), "--data", str(real_shards / "infill")]
    code, record = _main_failing([*argv, "--set", "pretrain.nosuch=1"], tmp_path / "config")
    assert code == EXIT_CODES["config"] == 3 and record["kind"] == "config" and "pretrain.nosuch" in record["message"]
    assert "glm.train: config error:" in capsys.readouterr().err

    code, record = _main_failing([*argv, "--set", "infilling.seq_len=16", "--set", "model.max_seq_len=16"], tmp_path / "fit")
    assert code == 3 and "infilling.seq_len=16" in record["message"]  # the shards hold another seq_len

    corrupt = tmp_path / "infill"
    shutil.copytree(real_shards / "infill", corrupt)
    shard = next(corrupt.rglob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn copy
    code, record = _main_failing(["--config", str(real_shards / "run.yaml"), "--data", str(corrupt)], tmp_path / "data")
    assert code == EXIT_CODES["data"] == 4 and record["kind"] == "data" and shard.name in record["message"]

    _nan_at(monkeypatch, {2}, accum=2)  # run.yaml: 2 micro-batches a step
    code, record = _main_failing(argv, tmp_path / "diverged")
    assert code == EXIT_CODES["diverged"] == 5 and "non-finite loss at step 2" in record["message"]
    capsys.readouterr()


def test_an_uncaught_exception_is_a_crash_that_resumes(real_shards, tmp_path):
    """A real `python -m glm.train` that raises after step 3 (GLM_TRAIN_CRASH_AFTER_STEP): exit code 1,
    a traceback and no error file; run again, it resumes from checkpoint 2 and finishes."""
    import json
    import os
    import subprocess
    import sys

    from glm.errors import ERROR_FILE

    cmd = [
        sys.executable,
        "-m",
        "glm.train",
        "--config",
        str(real_shards / "run.yaml"),
        "--data",
        str(real_shards / "infill"),
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "GLM_TRAIN_CRASH_AFTER_STEP": "3", "OMP_NUM_THREADS": "1"}
    crashed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    assert "Traceback" in crashed.stderr and "injected crash after step 3" in crashed.stderr
    assert not (tmp_path / ERROR_FILE).exists() and latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == 2 and result["step"] == 4


def test_failures_are_classified_permanent_or_crash():
    import errno

    from pydantic import ValidationError

    from glm.checkpoint import CheckpointError
    from glm.config import ConfigError, PipelineConfig
    from glm.shards import ManifestError

    with pytest.raises(ValidationError) as invalid:
        PipelineConfig.model_validate({"pretrain": {"steps": 0}})
    assert train.failure_kind(ConfigError("pretrain.steps: bad")) == "config"
    assert train.failure_kind(invalid.value) == "config"
    assert train.failure_kind(ManifestError("shard unreadable")) == "data"
    assert train.failure_kind(CheckpointError("corrupt")) == "data"
    assert train.failure_kind(NonFiniteLossError("nan")) == "diverged"
    assert train.failure_kind(OSError(errno.ENOSPC, "No space left on device")) == "disk"
    for crash in (
        RuntimeError("CUDA out of memory"),
        RuntimeError("NCCL error"),
        TypeError("a bug"),
        ValueError("a bug's ValueError"),
        OSError(errno.EIO, "I/O error"),
    ):
        assert train.failure_kind(crash) is None, crash
