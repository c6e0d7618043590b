import contextlib
import functools
import itertools
import logging
import math

import numpy as np
import pytest
import torch

import glm.training.step as step
import glm.training.train as train
from glm.core.config import InfillingConfig, ModelConfig, OptimConfig, TrainConfig
from glm.core.metrics import read_metrics
from glm.core.model import GLM, infilling_loss
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.data import infilling
from glm.distributed import DistInfo
from glm.training.checkpoint import MODEL_FILE, latest_checkpoint, load_model
from glm.training.train import (
    NonFiniteLossError,
    SyntheticBatches,
    autocast_dtype,
    lr_at,
    pretrain,
)

V, T = 64, 32
PAPER_MIX = {"token": 0.5, "sentence": 0.3, "document": 0.2}  # the 10B model's multi-task recipe


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


def _valid(objectives: int | None = None) -> list:
    return list(itertools.islice(SyntheticBatches(V, T, 4, seed=99, objectives=objectives), 2))


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


# --------------------------------------------------------------------------- the objective mix


def test_the_mix_weighs_each_objectives_token_mean():
    """The accumulated gradient is that of sum_o w_o x (token mean of o), not of the pooled token mean."""
    cfg = _train(micro_batch_size=4)
    micro = list(itertools.islice(_data(cfg, objectives=3), 2))  # two micro-batches of one step
    whole = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    assert sorted(whole["task"].unique().tolist()) == [0, 1, 2]
    torch.manual_seed(0)
    net = GLM(_model())
    mix = train.mix_weights(PAPER_MIX)
    totals, _, _, groups, by_task = train._accumulate_gradients(
        net, iter(micro), 2, 0, cfg, contextlib.nullcontext, DistInfo(), mix
    )
    got = {n: p.grad * (1.0 / float(totals[1])) for n, p in net.named_parameters()}  # the loop's final scaling
    net.zero_grad()
    means = [infilling_loss(net, {k: v[whole["task"] == o] for k, v in whole.items()})[0] for o in range(3)]
    mixed = 0.5 * means[0] + 0.3 * means[1] + 0.2 * means[2]
    mixed.backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)
    assert train._mixed_loss(by_task, groups.counts, mix) == pytest.approx(mixed.item())
    pooled = infilling_loss(net, whole)[0]
    assert abs(pooled.item() - train._mixed_loss(by_task, groups.counts, mix)) > 1e-4  # really another loss


def test_one_objective_is_bit_identical_to_the_plain_token_mean(tmp_path):
    """mix {token: 1.0} on batches that carry `task` trains exactly as before the mix existed."""
    cfg = _train(micro_batch_size=4)
    plain = pretrain(cfg, _model(0.1), _data(cfg), tmp_path / "plain", valid_data=_valid())
    tasked = pretrain(
        cfg, _model(0.1), _data(cfg, objectives=1), tmp_path / "tasked", valid_data=_valid(1), objective_mix={"token": 1.0}
    )
    assert tasked.loss == plain.loss and tasked.val_loss == plain.val_loss
    w_plain, w_tasked = _weights(tmp_path / "plain"), _weights(tmp_path / "tasked")
    assert all(torch.equal(w_plain[k], w_tasked[k]) for k in w_plain)
    records = [r for r in read_metrics(tmp_path / "tasked" / "metrics.jsonl") if "loss" in r]
    assert all(r["loss/token"] == r["loss"] and r["loss_tokens/token"] == r["loss_tokens"] for r in records)


def test_mixed_training_is_the_same_under_accumulation_and_logs_each_objective(tmp_path):
    big_cfg, acc_cfg = _train(steps=3), _train(steps=3, micro_batch_size=2)
    run = functools.partial(pretrain, objective_mix=PAPER_MIX, valid_data=_valid(3))
    big = run(big_cfg, _model(), _data(big_cfg, objectives=3), tmp_path / "big")
    acc = run(acc_cfg, _model(), _data(acc_cfg, objectives=3), tmp_path / "acc")
    assert acc.loss == pytest.approx(big.loss, rel=1e-6)
    w_big, w_acc = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-5, atol=1e-6)
    records = read_metrics(tmp_path / "acc" / "metrics.jsonl")
    for r in (r for r in records if "loss" in r):
        present = [o for o in PAPER_MIX if f"loss/{o}" in r]
        w = sum(PAPER_MIX[o] for o in present)
        assert r["loss"] == pytest.approx(sum(PAPER_MIX[o] / w * r[f"loss/{o}"] for o in present), rel=1e-9)
        assert sum(r[f"loss_tokens/{o}"] for o in present) == r["loss_tokens"]
    vals = [r for r in records if "val_loss" in r]
    assert vals and all({"val_loss/token", "val_loss/sentence", "val_loss/document"} <= set(r) for r in vals)


def test_mix_weights_match_the_configured_mix_over_many_built_batches():
    """On the builder's own samples (paper mix 0.5/0.3/0.2): each objective's average share of the loss is
    its mix weight within 2 points, while its share of loss tokens (the pooled mean's weight) is not."""
    cfg = InfillingConfig(seq_len=128, objective_mix=PAPER_MIX)
    rng = np.random.default_rng(0)
    n, width = 64 * 150, infilling.input_length(cfg)
    rows = rng.integers(NUM_SPECIAL, NUM_SPECIAL + 500, (n, width)).astype(np.int32)  # (N, W)
    rows[rng.random((n, width)) < 0.05] = NUM_SPECIAL  # ~20-token sentences
    rows[rng.random((n, width)) < 1 / 200] = SPECIAL.eos
    batch, _ = infilling.build_samples(
        rows, np.full(n, width), cfg, seed=0, epoch=0, first_index=0, sentence_end_ids=[NUM_SPECIAL]
    )
    task = torch.as_tensor(batch.task.astype(np.int64)).view(-1, 64)  # (150, 64) batches of 64
    tokens = torch.as_tensor(batch.loss_mask.sum(1)).view(-1, 64)
    mix = train.mix_weights(PAPER_MIX)
    shares = torch.stack([train._groups([(t, c)], mix, torch.device("cpu")).weights for t, c in zip(task, tokens)])
    for i, name in enumerate(infilling.OBJECTIVES[:3]):
        assert float(shares[:, i].mean()) == pytest.approx(PAPER_MIX[name], abs=0.02)
    token_share = torch.bincount(task.flatten(), weights=tokens.flatten().double(), minlength=4) / tokens.sum()
    assert float(token_share[infilling.DOCUMENT]) > 0.4  # what the pooled token mean would have given document samples


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


@pytest.mark.parametrize("mix", [None, PAPER_MIX])
def test_exact_resume_reproduces_the_uninterrupted_run(tmp_path, mix):
    cfg = _train(steps=6, micro_batch_size=4)  # dropout and accumulation: RNG and data position both matter
    k = None if mix is None else 3
    run = functools.partial(pretrain, valid_data=_valid(k), objective_mix=mix)
    full = run(cfg, _model(0.1), _data(cfg, objectives=k), tmp_path / "full")

    with pytest.raises(_Killed):  # dies after step 5's update, before its checkpoint; last one is step 4
        run(cfg, _model(0.1), _data(cfg, objectives=k), tmp_path / "cut", on_metrics=_kill_at(5))
    resumed = run(cfg, _model(0.1), _data(cfg, objectives=k), tmp_path / "cut")
    assert resumed.resumed_from == 4 and resumed.step == 6
    # the same records, timings aside; step 5's record (written before the kill) is not duplicated
    assert _untimed(tmp_path / "cut") == _untimed(tmp_path / "full")
    w_full, w_cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)

    # init_from: another directory starts from the step-4 checkpoint and lands on the same weights
    branch = run(
        cfg.model_copy(update={"init_from": str(tmp_path / "cut" / "checkpoints" / "step-000004")}),
        _model(0.1),
        _data(cfg, objectives=k),
        tmp_path / "branch",
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
    """Fault injection: a NaN loss at the given steps, on the plain and on the objective-weighted path."""
    calls = itertools.count()
    real, real_tokens = train.infilling_loss, train._token_losses

    def poisoned(loss):
        step = next(calls) // accum + 1
        return loss * float("nan") if step in bad_steps else loss

    def loss_fn(model, batch):
        loss, n = real(model, batch)
        return poisoned(loss), n

    def token_losses(model, batch):
        losses, task = real_tokens(model, batch)
        return poisoned(losses), task

    monkeypatch.setattr(train, "infilling_loss", loss_fn)
    monkeypatch.setattr(train, "_token_losses", token_losses)


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
    monkeypatch.setattr(step, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # asked for: honoured, with a warning
        assert autocast_dtype("auto", torch.device("cpu")) is None
    assert [r.getMessage() for r in caplog.records if "emulates bf16" in r.getMessage()], caplog.text
    monkeypatch.setattr(step, "cpu_has_fast_bf16", lambda: True)
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

    from glm.core import shards
    from glm.core.config import InfillingConfig
    from glm.data.infill_shards import build_infilling_dataset
    from tests.glm.test_infill_shards import random_docs, write_token_shards

    rng = np.random.default_rng(0)
    tokens = write_token_shards(root / "tokens", {"train": [random_docs(rng, 60)], "valid": [random_docs(rng, 20)]})
    manifest = shards.read_manifest(tokens)  # record the tokenizer size, as the token stage does
    shards.write_manifest(tokens, "tokens", manifest["files"], stats={"vocab_size": 3000})
    infill_cfg = dict(seq_len=32, epochs=1, samples_per_shard=64, objective_mix=PAPER_MIX)
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
    # the shards' drawn objectives reach the loss: each objective's loss is logged, mixed by the build's weights
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    logged = [{o for o in PAPER_MIX if f"loss/{o}" in r} for r in steps]
    assert set().union(*logged) == set(PAPER_MIX) and all(logged)  # a step of 8 samples may lack an objective
    for r, present in zip(steps, logged):
        w = sum(PAPER_MIX[o] for o in present)
        assert r["loss"] == pytest.approx(sum(PAPER_MIX[o] / w * r[f"loss/{o}"] for o in present), rel=1e-9)
    assert any("val_loss/document" in r for r in records)
    model, model_cfg = load_model(tmp_path / "full")
    assert model_cfg.vocab_size == 3008  # the tokenizer's 3000, rounded up to a multiple of 64

    from glm.core.config import load_config

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
    from glm.core.errors import read_error_file

    return train.main([*argv, "--out", str(out)]), read_error_file(out)


def test_cli_exit_codes_name_permanent_failures_and_record_them(real_shards, tmp_path, monkeypatch, capsys):
    import shutil

    from glm.core.errors import EXIT_CODES

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

    from glm.core.errors import ERROR_FILE

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

    from glm.core.config import ConfigError, PipelineConfig
    from glm.core.shards import ManifestError
    from glm.training.checkpoint import CheckpointError

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
