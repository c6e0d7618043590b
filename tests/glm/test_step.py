"""glm.step: the one training step of pretraining, fine-tuning and the budgets' measurements."""

from __future__ import annotations

import contextlib
import math

import torch

from glm.core.config import FinetuneConfig, OptimConfig, model_config
from glm.core.model import GLM, configure_optimizer, infilling_loss
from glm.training.step import autocast_factory, fine_tuning_step, optimizer_step
from tests.glm.test_model import GOLDEN_LOSSES, VOCAB, synthetic_batch


def _golden_setup():
    torch.manual_seed(0)
    model = GLM(model_config("tiny", vocab_size=VOCAB)).train()
    return model, configure_optimizer(model, OptimConfig(lr=1e-3), "cpu"), synthetic_batch(B=4, T=24, seed=3)


def test_the_step_reproduces_the_golden_loss_trace():
    """Unclipped (grad_clip 0: the norm is measured, the gradients are multiplied by exactly 1): the
    numerics are those of the plain zero_grad / backward / step loop the golden trace pins."""
    model, opt, batch = _golden_setup()
    losses = []
    for _ in range(5):

        def backward():
            loss, _ = infilling_loss(model, batch)
            loss.backward()
            return loss.item(), 1.0

        done = optimizer_step(model, opt, 1e-3, 0.0, backward)
        assert not done.skipped and math.isfinite(done.grad_norm)
        losses.append(round(done.loss, 10))
    torch.testing.assert_close(losses, GOLDEN_LOSSES, rtol=1e-4, atol=0)


def test_a_non_finite_loss_or_gradient_skips_the_update():
    model, opt, batch = _golden_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_backward():
        loss, _ = infilling_loss(model, batch)
        (loss * float("nan")).backward()
        return float("nan"), 1.0

    done = optimizer_step(model, opt, 1e-3, 1.0, nan_backward)
    assert done.skipped and not math.isfinite(done.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update
    assert all(p.grad is None for p in model.parameters())  # nothing leaks into the next step

    def finite_loss_nan_gradient():
        loss, _ = infilling_loss(model, batch)
        (loss * float("inf")).backward()
        return 1.0, 1.0

    assert optimizer_step(model, opt, 1e-3, 1.0, finite_loss_nan_gradient).skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_fine_tuning_step_clips_and_updates_as_the_hand_written_loop_did():
    cfg = FinetuneConfig()
    cfg.optim.grad_clip = 0.01
    model, opt, batch = _golden_setup()
    ref, ref_opt, _ = _golden_setup()

    def loss_fn(m, items):
        return infilling_loss(m, items)[0]

    torch.manual_seed(1)  # the same dropout masks in both
    done = fine_tuning_step(model, opt, 1e-3, cfg, contextlib.nullcontext, loss_fn, batch)
    torch.manual_seed(1)
    loss = loss_fn(ref, batch)
    ref_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    ref_opt.step()
    assert not done.skipped and done.loss == float(loss.detach())
    assert done.grad_norm > 0.01  # the clip was active
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_cpu_bf16_training_attends_with_the_math_kernel_and_evaluation_with_the_default():
    """CPU flash attention's bf16 backward is slower than the math kernel's (glm.training.step.autocast_factory);
    its forward is faster. So: math while gradients are on, the default otherwise, and fp32 untouched."""
    cpu = torch.device("cpu")
    flash = torch.backends.cuda.flash_sdp_enabled  # the switch SDPA's CPU dispatch reads too
    assert flash()
    with autocast_factory("bf16", cpu)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not flash()
    assert flash()
    with torch.no_grad(), autocast_factory("bf16", cpu)():
        assert torch.is_autocast_enabled("cpu") and flash()
    with autocast_factory("fp32", cpu)():
        assert not torch.is_autocast_enabled("cpu") and flash()
    # the same step either way (the kernels differ in rounding only)
    losses = []
    for kernel in (autocast_factory("bf16", cpu), lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        torch.manual_seed(0)
        model = GLM(model_config("tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0))
        batch = synthetic_batch(4, 32, seed=0)
        with kernel():
            loss, _ = infilling_loss(model, batch)
        loss.backward()
        losses.append((loss.item(), model.blocks[0].attn.qkv.weight.grad.norm().item()))
    assert math.isclose(losses[0][0], losses[1][0], rel_tol=1e-2) and math.isclose(losses[0][1], losses[1][1], rel_tol=5e-2)
