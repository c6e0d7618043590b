"""Training budgets and the CPU's precision: measure a few real optimizer steps, then decide.

A budget (`pretrain.budget_minutes`, `finetune.budget_minutes`) becomes a number of steps from
the measured time of a step of the actual model, batch, device and precision, so a run fits the
time a laptop or a GPU has without hand-tuning `steps`. The rule when both are given: an
explicitly set `steps` (`finetune.epochs`) is the most a budget may choose; left at its default,
the budget alone decides.

`precision: auto` on a CPU with native bf16 kernels (AVX512-BF16 or AMX) measures the same steps
in fp32 and under bf16 autocast, from the same weights on the same batches, and trains in bf16
only if it is faster by BF16_MIN_SPEEDUP and its losses stay within BF16_MAX_LOSS_DIFF of fp32's.
Elsewhere `auto` keeps its meaning: fp32 on a CPU, bf16 autocast on a GPU.

The pure decisions (`choose_precision`, `steps_for_budget`) take their measurements as inputs;
glm.pretrain_plan's `measure_pretrain_steps` and `plan_pretrain` measure pretraining's step
(glm.pipeline.pretrain.prepare_pretrain calls the latter once per run and records its result, so a
resumed run never re-measures); `finetune_steps` here measures fine-tuning's (glm.step, the step
fine-tuning trains with: this module needs nothing of the pretraining loop).
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("glm.budget")

WARMUP_STEPS = 1  # not timed: the first step allocates, creates oneDNN primitives, compiles
MEASURE_STEPS = 3  # timed; the median resists a neighbour's burst on a shared machine
BF16_MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by 10%: below that, measurement noise could pick it
# largest relative loss difference of bf16 autocast against fp32 over the measured steps (same weights,
# same batches); measured 1.3e-5 on `tiny` and 6.4e-5 on the demo's `small` (AVX512-BF16 EPYC, 2026-11-30):
# a bf16 path that breaks (overflow, a bad kernel) shows up as whole percents
BF16_MAX_LOSS_DIFF = 0.02
# What decides whether bf16 *trains* as well: its gradient against fp32's on the same weights and batch,
# relative to the minibatch noise SGD lives with anyway (fp32's gradients of two batches). Independent
# errors add in variance: an error of 0.1 x the noise adds 0.5% to the gradient's spread, which no
# validation loss can tell apart. A path that loses precision where training needs it (logits,
# attention scores) shows up here on the first step, where the losses of a few steps agree to 1e-4.
# Measured on the demo's `small` at initialisation (Xeon AMX, 2026-12-07): error 0.0046, noise 0.23.
BF16_MAX_GRADIENT_ERROR = 0.1  # x the minibatch gradient noise
WARMUP_FRACTION = 0.1  # the defaults' ratio: 100 warm-up steps of 1000
EVALS_PER_RUN = 5  # evaluations (and checkpoints) a budgeted run makes when their intervals are not given
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


# --------------------------------------------------------------------------- the CPU


def cpu_kind() -> dict[str, Any]:
    """The CPU's model name, its vector flags of interest, PyTorch's kernel level and whether bf16 is native."""
    from glm.training.step import cpu_has_fast_bf16

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the flags stay unknown, PyTorch's own check still decides
        pass
    return {
        "model": model,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_fast_bf16(),
    }


# --------------------------------------------------------------------------- pure decisions


@dataclass
class Measurement:
    """Timed optimizer steps of one precision (WARMUP_STEPS excluded from the time, not from `losses`)."""

    precision: str  # fp32 or bf16
    seconds_per_step: float  # median of the timed steps
    losses: list[float]  # training loss of every step, warm-up included
    eval_seconds: float = 0.0  # one evaluation (eval_batches forward passes), estimated from a timed forward
    seconds: float = 0.0  # wall time the measurement itself took
    fastest_step: float | None = None  # the least interfered-with timed step: what precisions are compared by
    # |g - g_fp32| / |g_fp32| on the first step's weights and batch (bf16), and fp32's own minibatch noise:
    # |g_fp32(batch 2) - g_fp32(batch 1)| / |g_fp32(batch 1)| (the weights one warm-up step apart)
    gradient_error: float | None = None
    gradient_noise: float | None = None


def choose_precision(
    requested: str, device_type: str, native: bool, fp32: Measurement | None = None, bf16: Measurement | None = None
) -> tuple[str, str]:
    """(precision to train with, why). `auto` on a CPU becomes bf16 only with native kernels, a measured
    speed-up of BF16_MIN_SPEEDUP, losses within BF16_MAX_LOSS_DIFF (relative) of fp32's and, where
    measured, a gradient error within BF16_MAX_GRADIENT_ERROR x fp32's minibatch gradient noise."""
    if requested != "auto":
        return requested, f"precision={requested} was set"
    if device_type != "cpu":
        return "auto", "auto on a GPU: bf16 autocast where the GPU supports it"
    if not native:
        return "fp32", "auto on a CPU without AVX512-BF16/AMX: bf16 would be emulated, far slower than fp32"
    if fp32 is None or bf16 is None:
        return "fp32", "auto on a CPU with native bf16, not measured: fp32"
    # the fastest steps: another process's burst slows some steps, never speeds one up
    speedup = (fp32.fastest_step or fp32.seconds_per_step) / (bf16.fastest_step or bf16.seconds_per_step)
    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(fp32.losses, bf16.losses)]
    diff = max(diffs) if diffs and all(map(math.isfinite, diffs)) else math.inf  # max() would skip a NaN
    figures = (
        f"fp32 {fp32.fastest_step or fp32.seconds_per_step:.3g} s/step, "
        f"bf16 {bf16.fastest_step or bf16.seconds_per_step:.3g} s/step ({speedup:.2f}x), "
        f"loss difference {diff:.1e}"
    )
    if not math.isfinite(diff) or diff > BF16_MAX_LOSS_DIFF:
        return "fp32", f"{figures} > {BF16_MAX_LOSS_DIFF:g}: bf16 not numerically safe here"
    error, noise = bf16.gradient_error, fp32.gradient_noise
    if error is not None and noise is not None:
        figures += f", gradient error {error:.2g} vs minibatch noise {noise:.2g}"
        if not (math.isfinite(error) and math.isfinite(noise)) or error > BF16_MAX_GRADIENT_ERROR * noise:
            return (
                "fp32",
                f"{figures}: bf16's gradient error is above {BF16_MAX_GRADIENT_ERROR:g} x the noise, it would train worse",
            )
    if speedup < BF16_MIN_SPEEDUP:
        return "fp32", f"{figures}: bf16 not {BF16_MIN_SPEEDUP:g}x faster"
    return "bf16", f"{figures}: bf16 is faster and agrees"


@dataclass
class BudgetPlan:
    """What a budget chose: the steps and the intervals and warm-up scaled to them."""

    budget_minutes: float
    seconds_per_step: float
    steps: int  # what fits
    capped_by: int | None  # the explicitly set steps, when it is lower than what fits
    eval_every: int
    checkpoint_every: int
    warmup_steps: int
    notes: list[str] = field(default_factory=list)

    @property
    def line(self) -> str:
        cap = f" (capped by steps={self.capped_by})" if self.capped_by is not None else ""
        return f"budget {self.budget_minutes:g} min: {self.seconds_per_step:.3g} s/step measured -> {self.steps} steps{cap}"


def steps_for_budget(
    budget_minutes: float,
    seconds_per_step: float,
    *,
    eval_seconds: float = 0.0,
    spent_seconds: float = 0.0,
    steps_cap: int | None = None,
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    warmup_steps: int | None = None,
) -> BudgetPlan:
    """Steps that fit `budget_minutes` (minus what the measuring already spent), with the evaluations' time.

    An interval or warm-up given (not None) is kept; otherwise evaluations and checkpoints are
    spread EVALS_PER_RUN over the run and warm-up is WARMUP_FRACTION of it. `steps_cap`, an
    explicitly set step count, bounds the result."""
    if seconds_per_step <= 0 or not math.isfinite(seconds_per_step):
        raise ValueError(f"seconds_per_step must be a positive number, got {seconds_per_step}")
    available = budget_minutes * 60.0 - spent_seconds
    if eval_every is not None:
        fit = available / (seconds_per_step + eval_seconds / eval_every)
    else:
        fit = (available - EVALS_PER_RUN * eval_seconds) / seconds_per_step
    notes = []
    steps = int(fit) if fit >= 1 else 1
    if fit < 1:
        notes.append(f"the budget does not fit one step ({seconds_per_step:.3g} s/step); training 1 step")
    capped = steps_cap if steps_cap is not None and steps_cap < steps else None
    steps = min(steps, steps_cap) if steps_cap is not None else steps
    spread = max(1, math.ceil(steps / EVALS_PER_RUN))
    warmup = warmup_steps if warmup_steps is not None else int(WARMUP_FRACTION * steps)
    if warmup >= steps:
        notes.append(f"optim.warmup_steps={warmup} >= the {steps} steps that fit: the learning rate never peaks")
    return BudgetPlan(
        budget_minutes,
        seconds_per_step,
        steps,
        capped,
        eval_every if eval_every is not None else spread,
        checkpoint_every if checkpoint_every is not None else spread,
        warmup,
        notes,
    )


def apply_plan(cfg: Any, plan: dict[str, Any]) -> Any:
    """A copy of the pretrain section `cfg` with the plan's precision, steps, intervals and warm-up; no budget left."""
    out = copy.deepcopy(cfg)
    out.precision = plan["precision"]["chosen"]
    budget = plan.get("budget")
    if budget:
        out.budget_minutes = None
        out.steps = budget["steps"]
        out.eval_every = budget["eval_every"]
        out.checkpoint_every = budget["checkpoint_every"]
        out.optim.warmup_steps = budget["warmup_steps"]
    return out


# --------------------------------------------------------------------------- fine-tuning


def finetune_steps(
    cfg: Any,
    model: torch.nn.Module,
    batches: Sequence[Sequence[Any]],
    loss_fn: Callable[[torch.nn.Module, Sequence[Any]], torch.Tensor],
    autocast: Callable[[], Any],
    steps_per_epoch: int,
    eval_seconds: float,
) -> BudgetPlan:
    """The fine-tuning steps that fit `cfg.budget_minutes` (one run), from WARMUP_STEPS + MEASURE_STEPS steps
    of a copy of `model` (its own AdamW) on `batches` (lists of items, as training will batch them: see
    glm.finetune.typical_batches), and the time of one dev evaluation; the model, the caller's optimizer
    and the random streams are left as they were.

    Evaluations run every cfg.eval_every steps, else once an epoch. An explicitly set `finetune.epochs`
    caps the steps, as `pretrain.steps` caps a pretraining budget."""
    from glm.core.model import configure_optimizer
    from glm.training.step import fine_tuning_step

    started = time.perf_counter()
    device = next(model.parameters()).device
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(model).train()
        optimizer = configure_optimizer(probe, cfg.optim, device.type)
        for step in range(WARMUP_STEPS + MEASURE_STEPS):
            batch = list(batches[step % len(batches)])
            t0 = time.perf_counter()
            fine_tuning_step(probe, optimizer, cfg.optim.lr, cfg, autocast, loss_fn, batch)  # the step that trains
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= WARMUP_STEPS:
                times.append(time.perf_counter() - t0)
        del probe, optimizer
    spent = time.perf_counter() - started
    every = cfg.eval_every or steps_per_epoch
    plan = steps_for_budget(
        cfg.budget_minutes,
        statistics.median(times),
        eval_seconds=eval_seconds,
        spent_seconds=spent,
        steps_cap=cfg.epochs * steps_per_epoch if "epochs" in cfg.model_fields_set else None,
        eval_every=every,
        checkpoint_every=every,
        warmup_steps=cfg.optim.warmup_steps,
    )
    plan.notes.append(f"measuring took {spent:.3g} s")
    return plan
