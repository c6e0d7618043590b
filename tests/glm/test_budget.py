"""glm.budget: the precision and budget decisions (pure), and the real measurement on a tiny model."""

from __future__ import annotations

import math

import pytest

from glm.core.config import load_config
from glm.training import budget, pretrain_plan
from glm.training.budget import BudgetPlan, Measurement, choose_precision, steps_for_budget
from glm.training.train import SyntheticBatches


def _m(precision: str, s: float, losses: list[float]) -> Measurement:
    return Measurement(precision, s, losses)


# --------------------------------------------------------------------------- precision


def test_an_explicit_precision_and_a_gpu_are_not_measured():
    assert choose_precision("fp32", "cpu", True)[0] == "fp32"
    assert choose_precision("bf16", "cpu", False)[0] == "bf16"  # the user asked: train.py warns if it is emulated
    assert choose_precision("auto", "cuda", False)[0] == "auto"  # bf16 autocast where the GPU has it, as before


def test_auto_stays_fp32_on_a_cpu_without_native_bf16():
    precision, why = choose_precision("auto", "cpu", False, _m("fp32", 2.0, [5.0]), _m("bf16", 1.0, [5.0]))
    assert precision == "fp32" and "emulated" in why


def test_auto_picks_bf16_only_when_faster_by_the_margin_and_the_losses_agree():
    fp32 = _m("fp32", 1.30, [6.0, 5.9, 5.8])
    faster = _m("bf16", 1.0, [6.001, 5.901, 5.799])
    precision, why = choose_precision("auto", "cpu", True, fp32, faster)
    assert precision == "bf16" and "1.30x" in why
    barely = _m("bf16", 1.30 / (budget.BF16_MIN_SPEEDUP - 0.01), faster.losses)
    assert choose_precision("auto", "cpu", True, fp32, barely)[0] == "fp32"
    drifted = _m("bf16", 1.0, [6.0, 5.9, 5.8 * (1 + 2 * budget.BF16_MAX_LOSS_DIFF)])
    precision, why = choose_precision("auto", "cpu", True, fp32, drifted)
    assert precision == "fp32" and "not numerically safe" in why
    assert choose_precision("auto", "cpu", True, fp32, _m("bf16", 1.0, [6.0, math.nan, 5.8]))[0] == "fp32"
    # compared by their fastest steps: a neighbour's burst that slowed bf16's median does not decide
    burst = Measurement("bf16", 1.30, faster.losses, fastest_step=1.0)
    assert choose_precision("auto", "cpu", True, Measurement("fp32", 1.3, fp32.losses, fastest_step=1.3), burst)[0] == "bf16"


def test_auto_refuses_bf16_whose_gradients_stray_from_fp32s_beyond_a_tenth_of_the_minibatch_noise():
    fp32 = Measurement("fp32", 1.3, [6.0, 5.9], gradient_noise=0.25)
    close = Measurement("bf16", 1.0, [6.0, 5.9], gradient_error=0.005)
    precision, why = choose_precision("auto", "cpu", True, fp32, close)
    assert precision == "bf16" and "gradient error 0.005 vs minibatch noise 0.25" in why
    # losses that agree to 1e-5 over the measured steps, gradients that do not: what a few steps cannot see
    lossy = Measurement("bf16", 1.0, [6.00001, 5.90001], gradient_error=0.1 * 0.25 * 1.5)
    precision, why = choose_precision("auto", "cpu", True, fp32, lossy)
    assert precision == "fp32" and "it would train worse" in why
    assert choose_precision("auto", "cpu", True, fp32, Measurement("bf16", 1.0, [6.0, 5.9], gradient_error=math.nan))[0] == "fp32"


def _tiny_plan_inputs():
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=640", "model.n_layer=1", "infilling.seq_len=32"])
    return cfg.pretrain, cfg.model, lambda: iter(SyntheticBatches(640, 32, cfg.pretrain.micro_batch_size, seed=0))


def test_the_measured_gradient_error_is_small_for_bf16_and_large_for_a_path_that_loses_precision(monkeypatch):
    """Real steps of a tiny model in fp32 and under bf16 autocast (native or emulated: the numbers are the same).
    Then a fault injected into the bf16 path where the measured steps cannot see it: a backward through the
    logits that keeps only each gradient's sign (a lossy low-precision kernel). The forward is exact, so
    the losses of the measured steps agree within BF16_MAX_LOSS_DIFF; the gradient error does not pass."""
    import torch

    from glm.core.model import GLM

    pre, model_cfg, batches = _tiny_plan_inputs()
    measured = pretrain_plan.measure_pretrain_steps(pre, model_cfg, batches, ("fp32", "bf16"), torch.device("cpu"))
    noise, error = measured["fp32"].gradient_noise, measured["bf16"].gradient_error
    # measured 2026-12-07: error 0.003, noise 1.2 (random synthetic batches): far inside the bound
    assert 0 < error < budget.BF16_MAX_GRADIENT_ERROR * noise and noise > 0.01

    class SignOnlyBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return torch.sign(grad) * grad.abs().mean()

    logits = GLM.logits
    monkeypatch.setattr(
        GLM,
        "logits",
        lambda self, h: SignOnlyBackward.apply(logits(self, h)) if torch.is_autocast_enabled("cpu") else logits(self, h),
    )
    broken = pretrain_plan.measure_pretrain_steps(pre, model_cfg, batches, ("fp32", "bf16"), torch.device("cpu"))
    diffs = [abs(a - b) / a for a, b in zip(broken["fp32"].losses, broken["bf16"].losses)]
    assert max(diffs) < budget.BF16_MAX_LOSS_DIFF  # measured 0.0045: the loss criterion alone would take it
    # measured 1.07 against a bound of 0.12
    assert broken["bf16"].gradient_error > budget.BF16_MAX_GRADIENT_ERROR * broken["fp32"].gradient_noise
    faster = Measurement(**{**vars(broken["bf16"]), "seconds_per_step": 1e-9, "fastest_step": 1e-9})
    precision, why = choose_precision("auto", "cpu", True, broken["fp32"], faster)
    assert precision == "fp32" and "train worse" in why


# --------------------------------------------------------------------------- budget


def test_a_budget_becomes_steps_from_the_step_time():
    plan = steps_for_budget(20, 1.5)
    assert plan.steps == 800 and plan.capped_by is None
    assert plan.line == "budget 20 min: 1.5 s/step measured -> 800 steps"
    # not given: intervals spread EVALS_PER_RUN over the run, warm-up a fraction of it
    assert plan.eval_every == plan.checkpoint_every == 800 // budget.EVALS_PER_RUN
    assert plan.warmup_steps == int(budget.WARMUP_FRACTION * 800)


def test_the_measuring_and_the_evaluations_come_out_of_the_budget():
    assert steps_for_budget(20, 1.5, spent_seconds=30).steps == 780
    assert steps_for_budget(20, 1.5, eval_seconds=15).steps == (1200 - 15 * budget.EVALS_PER_RUN) // 1.5
    # a given interval is kept, and its evaluations cost per step
    plan = steps_for_budget(20, 1.5, eval_seconds=15, eval_every=10, checkpoint_every=7, warmup_steps=3)
    assert plan.steps == int(1200 / 3.0) and (plan.eval_every, plan.checkpoint_every, plan.warmup_steps) == (10, 7, 3)


def test_explicit_steps_cap_a_budget_and_a_tiny_budget_still_trains():
    plan = steps_for_budget(20, 1.5, steps_cap=600)
    assert plan.steps == 600 and plan.capped_by == 600 and "capped by steps=600" in plan.line
    assert steps_for_budget(20, 1.5, steps_cap=5000).capped_by is None
    tiny = steps_for_budget(0.001, 1.5)
    assert tiny.steps == 1 and tiny.notes
    with pytest.raises(ValueError, match="seconds_per_step"):
        steps_for_budget(20, 0.0)
    assert isinstance(tiny, BudgetPlan)


# --------------------------------------------------------------------------- measuring, for real


def test_auto_on_this_cpu_records_a_decision_and_a_budget_from_measured_steps():
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "model.vocab_size=640",
            "model.n_layer=1",
            "infilling.seq_len=32",
            "pretrain.budget_minutes=0.5",
            "pretrain.eval_batches=1",
            "pretrain.precision=auto",
        ],
    )
    pre = cfg.pretrain

    def batches():
        return iter(SyntheticBatches(640, 32, pre.micro_batch_size, seed=0))

    out = pretrain_plan.plan_pretrain(pre, cfg.model, batches)
    cpu = out["cpu"]
    assert cpu["model"] and cpu["torch_capability"] and isinstance(cpu["native_bf16"], bool)
    p = out["precision"]
    assert p["requested"] == "auto" and p["chosen"] in ("fp32", "bf16") and p["why"]
    if cpu["native_bf16"]:  # both measured from the same weights on the same batches
        fp32, bf16 = p["measured"]["fp32"], p["measured"]["bf16"]
        assert len(fp32["losses"]) == len(bf16["losses"]) == budget.WARMUP_STEPS + budget.MEASURE_STEPS
        assert fp32["losses"][0] == pytest.approx(bf16["losses"][0], rel=budget.BF16_MAX_LOSS_DIFF)
    else:
        assert p["chosen"] == "fp32" and "measured" not in p
    b = out["budget"]
    assert b["seconds_per_step"] > 0 and b["measuring_seconds"] > 0
    # steps is explicit in tiny.yaml (20): the budget may choose fewer, never more
    expected = steps_for_budget(0.5, b["seconds_per_step"], eval_seconds=b["eval_seconds"], spent_seconds=b["measuring_seconds"])
    expected_steps = min(expected.steps, 20)
    assert b["steps"] == expected_steps and b["line"].endswith(
        f"-> {expected_steps} steps" + (" (capped by steps=20)" if expected.steps > 20 else "")
    )
    trained = budget.apply_plan(pre, out)
    assert trained.budget_minutes is None and trained.steps == b["steps"] and trained.precision == p["chosen"]
    assert pre.budget_minutes == 0.5  # the config itself is untouched
