"""One training step, shared by pretraining (glm.train), fine-tuning (glm.finetune) and the budget's
measurements (glm.budget): the learning-rate schedule, the precision, and the optimizer step itself.

Fine-tuning must not need the pretraining loop for a learning-rate function, and a budget must be
measured on the step that trains: both import this module, which imports nothing of glm's but the
config (for ConfigError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import torch

from glm.core.config import ConfigError, OptimConfig

log = logging.getLogger("glm.train")  # its warnings read as the trainer's


# --------------------------------------------------------------------------- schedule, precision


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for the update that follows `step` completed updates (0-based).

    Linear warmup to optim.lr over warmup_steps updates (the first update uses lr/warmup),
    then cosine decay reaching min_lr_ratio x lr at the last update and staying there.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    min_lr = optim.lr * optim.min_lr_ratio
    decay_steps = total_steps - optim.warmup_steps - 1
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - optim.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (optim.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls with AVX512/AMX kernels on this CPU (else PyTorch emulates bf16)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # a build without oneDNN
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for plain fp32. `auto`: bf16 on CUDA (if supported), fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if device.type == "cpu" and not cpu_has_fast_bf16():
        # measured on an AVX2-only EPYC: 50 s per `small` step in bf16 against 1.3 s in fp32 (benchmarks/pretrain.py)
        log.warning(
            "precision=bf16 on a CPU without AVX512/AMX bf16 kernels: PyTorch emulates bf16 and "
            "trains ~40x slower than fp32; set precision=auto (fp32 on CPU) or fp32"
        )
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise ConfigError("train.precision=bf16 but this GPU has no bf16 support; use precision=fp32")
        log.warning("this GPU has no bf16 support; training in fp32")
        return None
    return torch.bfloat16


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the autocast context for `precision` on `device` (a no-op for fp32).

    bf16 on a CPU also picks SDPA's math kernel while gradients are on: PyTorch's CPU flash-attention
    backward in bf16 is the slow part of a step (29% of the demo's; the kernel alone, (32, 4, 128, 64):
    forward + backward 41.7 ms flash vs 28.2 ms math), while its forward is faster (3.4 vs 10.9 ms), so
    evaluation (no gradients) keeps it. The same losses either way; fp32 keeps the default (flash is
    faster there)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext
    if device.type == "cpu":
        return lambda: _cpu_bf16_autocast(dtype)
    return lambda: torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _cpu_bf16_autocast(dtype: torch.dtype) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.autocast("cpu", dtype=dtype):
        if torch.is_grad_enabled():
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        else:
            yield


# --------------------------------------------------------------------------- the optimizer step


@dataclasses.dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float  # the step's loss, as `backward` reported it
    grad_norm: float  # the gradients' total norm before clipping (after scaling)
    skipped: bool  # the loss or the gradient norm was not finite: no update was made


def grad_norm_value(norm: torch.Tensor) -> float:
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP returns a DTensor
    return float(full)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    grad_clip: float,
    backward: Callable[[], tuple[float, float]],
    inspect: Callable[[], None] | None = None,
) -> StepResult:
    """One training step, the same for pretraining, fine-tuning and a budget's measurement.

    `backward()` runs the forward passes, the loss and its backward over the step's micro-batches
    (gradient accumulation is the caller's: a token sum for pretraining, one mean for fine-tuning)
    and returns (the step's loss, the factor that turns the accumulated gradients into the mean's).
    Then the gradients are scaled, clipped to `grad_clip` (0: not clipped, the norm still measured),
    `inspect()` may look at them, and the update is made unless the loss or the gradient norm is not
    finite (a skipped step: the caller decides how many it tolerates). Gradients are cleared before
    and after, so nothing leaks into the next step.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss, grad_scale = backward()
    if grad_scale != 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(grad_scale)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    if inspect is not None:
        inspect()
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, norm, skipped)


def fine_tuning_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    cfg: Any,  # finetune config: its optim.grad_clip
    autocast: Callable[[], Any],
    loss_fn: Callable[[torch.nn.Module, Sequence[Any]], torch.Tensor],
    batch: Sequence[Any],
) -> StepResult:
    """One fine-tuning step (glm.step.optimizer_step): the batch's mean loss under `autocast`, its
    gradients clipped to cfg.optim.grad_clip. Fine-tuning (glm.finetune.train_loop) and its budget's measurement (glm.budget) both take it."""

    def backward() -> tuple[float, float]:
        with autocast():
            loss = loss_fn(model, batch)
        loss.backward()
        return float(loss.detach()), 1.0

    return optimizer_step(model, optimizer, lr, cfg.optim.grad_clip, backward)
