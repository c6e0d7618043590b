"""A pretraining run's plan: its precision (`auto` on a CPU with native bf16) and its budget's steps,
from a few measured optimizer steps of pretraining's own step (glm.train's gradient accumulation).

Apart from glm.budget (the decisions, and fine-tuning's budget) so that fine-tuning, which imports
glm.budget, does not depend on the pretraining loop.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from typing import Any, Callable, Iterator, Sequence

import torch

from glm.training.budget import (
    MEASURE_STEPS,
    WARMUP_STEPS,
    Measurement,
    choose_precision,
    cpu_kind,
    log,
    steps_for_budget,
)


def measure_pretrain_steps(
    cfg: Any,
    model_cfg: Any,
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]],
    precisions: Sequence[str],
    device: torch.device,
    objective_mix: dict[str, float] | None = None,
) -> dict[str, Measurement]:
    """Time WARMUP_STEPS + MEASURE_STEPS real optimizer steps (glm.train.pretrain_step: the step training
    takes, with its gradient accumulation, clipping, non-finite skip and AdamW) of a fresh model per precision, initialised as training initialises it, each on `batches()` (a
    fresh iterator of micro-batches) with the same dropout masks; nothing is kept. The precisions alternate
    step by step, so load from other processes hits them alike. One process: with several, each rank's
    step adds the gradient all-reduce to this."""
    from glm.core.model import GLM, configure_optimizer
    from glm.distributed import DistInfo
    from glm.training.train import autocast_factory, evaluate, mix_weights, pretrain_step

    started = time.perf_counter()
    info = DistInfo(device=device)
    mix = mix_weights(objective_mix)  # the data's objective mix weighs the loss, as in training
    runs = {}
    gradients: dict[int, list[torch.Tensor]] = {}
    lr = cfg.optim.lr / max(1, cfg.optim.warmup_steps)  # the first step's rate
    for precision in precisions:
        torch.manual_seed(cfg.seed)
        model = GLM(model_cfg).to(device).train()
        if cfg.compile:
            torch._dynamo.config.capture_dynamic_output_shape_ops = True
            model.compile()
        optimizer = configure_optimizer(model, cfg.optim, device.type)
        runs[precision] = (model, optimizer, autocast_factory(precision, device), batches(), [], [])
    for step in range(WARMUP_STEPS + MEASURE_STEPS):
        for model, optimizer, autocast, it, times, losses in runs.values():
            torch.manual_seed(cfg.seed + 1 + step)  # the same dropout masks in every precision
            t0 = time.perf_counter()
            keep = None
            if step < 2 and len(runs) > 1:  # the first step's gradients of all precisions, fp32's second

                def keep(m: torch.nn.Module = model) -> None:
                    gradients.setdefault(id(m), []).append(_flat_gradient(m))

            done = pretrain_step(model, optimizer, it, step, lr, cfg, autocast, info, mix, cfg.grad_accum, inspect=keep)
            losses.append(done.loss)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= WARMUP_STEPS:
                times.append(time.perf_counter() - t0)
    out = {}
    for precision, (model, _, autocast, it, times, losses) in runs.items():
        t0 = time.perf_counter()  # one evaluation = eval_batches forward passes: time one and scale
        evaluate(model, [next(it)], 1, device, autocast, info)
        eval_seconds = (time.perf_counter() - t0) * cfg.eval_batches
        out[precision] = Measurement(precision, statistics.median(times), losses, eval_seconds, fastest_step=min(times))
    if "fp32" in runs and len(gradients.get(id(runs["fp32"][0]), [])) == 2:
        g32, g32_next = gradients[id(runs["fp32"][0])]
        scale = float(g32.norm()) or math.inf
        out["fp32"].gradient_noise = float((g32_next - g32).norm()) / scale
        for precision, run in runs.items():
            if precision != "fp32":
                out[precision].gradient_error = float((gradients[id(run[0])][0] - g32).norm()) / scale
    spent = time.perf_counter() - started
    for m in out.values():
        m.seconds = spent
    return out


def _flat_gradient(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient as one float32 vector (zeros where a parameter got none)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for p in model.parameters()]
    )


def plan_pretrain(
    cfg: Any,
    model_cfg: Any,
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]],
    objective_mix: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Resolve `pretrain.precision: auto` on a CPU and `pretrain.budget_minutes`, measuring only what needs it.

    Returns {"precision": {...}, "budget": {...} or None, "cpu": cpu_kind()} for the run plan, the
    run config, the manifest and the log: the chosen precision and why, the budget's measured step
    time, chosen steps, intervals and warm-up, and what the measuring cost."""
    from glm.distributed import resolve_device

    device = resolve_device(cfg.device)
    cpu = cpu_kind()
    native = device.type == "cpu" and cpu["native_bf16"]
    both = cfg.precision == "auto" and native
    try:
        if both:
            measured = measure_pretrain_steps(cfg, model_cfg, batches, ("fp32", "bf16"), device, objective_mix)
        elif cfg.budget_minutes is not None:
            measured = measure_pretrain_steps(cfg, model_cfg, batches, (cfg.precision,), device, objective_mix)
        else:
            measured = {}
    finally:
        if device.type == "cuda":  # the training processes need this GPU's memory, not this process's cache
            torch.cuda.empty_cache()
    precision, why = choose_precision(cfg.precision, device.type, native, measured.get("fp32"), measured.get("bf16"))
    out: dict[str, Any] = {
        "precision": {"requested": cfg.precision, "chosen": precision, "why": why},
        "cpu": cpu if device.type == "cpu" else {"device": str(device)},
        "budget": None,
    }
    if both:
        out["precision"]["measured"] = {p: asdict(m) for p, m in measured.items()}
    if cfg.budget_minutes is None:
        return out
    m = measured[precision] if both else measured[cfg.precision]
    given = cfg.model_fields_set
    plan = steps_for_budget(
        cfg.budget_minutes,
        m.seconds_per_step,
        eval_seconds=m.eval_seconds,
        spent_seconds=m.seconds,
        steps_cap=cfg.steps if "steps" in given else None,
        eval_every=cfg.eval_every if "eval_every" in given else None,
        checkpoint_every=cfg.checkpoint_every if "checkpoint_every" in given else None,
        warmup_steps=cfg.optim.warmup_steps if "warmup_steps" in cfg.optim.model_fields_set else None,
    )
    out["budget"] = {**asdict(plan), "eval_seconds": m.eval_seconds, "measuring_seconds": m.seconds, "line": plan.line}
    for note in plan.notes:
        log.warning("budget: %s", note)
    return out
