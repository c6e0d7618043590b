"""One training step, shared by pretraining (glm.train), fine-tuning (glm.finetune) and the budget's
measurements (glm.budget): the learning-rate schedule, the precision, and the optimizer step itself.

Fine-tuning must not need the pretraining loop for a learning-rate function, and a budget must be
measured on the step that trains: both import this module, which imports nothing of glm's but the
config (for ConfigError).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable

import torch

from glm.config import ConfigError, OptimConfig

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
    """A zero-argument factory of the autocast context for `precision` on `device` (a no-op for fp32)."""
    dtype = autocast_dtype(precision, device)
    return lambda: torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
