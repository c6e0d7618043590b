"""GLM pretraining: the training loop, in one function (`pretrain`).

The loop is plain PyTorch; device, mixed precision, torch.compile and data parallelism
(glm/distributed.py) are applied to the model from outside. The recipe (docs/method.md section 5):
AdamW with decoupled weight decay, linear warmup then cosine decay to min_lr_ratio x lr,
gradient clipping, gradient accumulation.

Loss normalisation. One optimizer step sees `grad_accum` micro-batches on each of
`world_size` ranks. Each micro-batch backpropagates the SUM of its per-token losses; after
the last one the gradients are multiplied by world_size / (loss tokens in the whole global
batch) (world_size undoes DDP/FSDP's averaging over ranks). The step's gradient is therefore
the gradient of the token-weighted mean loss over the global batch: exactly what one large
batch gives, however it is split into micro-batches and ranks, even when rows hold different
numbers of loss tokens (a mean of per-micro-batch means would weight them unequally).

Objective mix. Blank-infilling batches carry `task` (B,), the objective each sample was drawn
as. The loss is then sum over objectives o of w_o x (token mean of o's loss over the global
batch), w = infilling.objective_mix renormalised over the objectives the batch holds: the paper
(and its 10B recipe 0.5/0.3/0.2) picks one objective per batch and takes its token mean, so each
objective's expected share of the gradient is its weight. A pooled token mean would instead
give long-span objectives most of the gradient (document samples supply ~78% of the loss
tokens at {token: .5, document: .5}). This is implemented as per-token factors
w_o x N / N_o (N_o: o's loss tokens in the global batch, counted from the micro-batches before
any backward and summed over ranks), so the normalisation above and its exactness under
accumulation, DDP and resume carry over unchanged. With one objective in the batch every
factor is exactly 1 and the loop takes the plain token-mean path (bit-identical to it).
The alternative, one objective per optimizer step chosen from (seed, step), would tie the
samples to the batch and world size (a resume on another world size would read other data);
docs/method.md section 5.2.

Resuming. A run restarts from out_dir's latest valid checkpoint, else from train.init_from
(any step directory or run directory: branching or continuing a run). It restores weights,
optimizer, step, every rank's torch/numpy/Python RNG and data position, so with the same
world size the loss trace and final weights equal those of an uninterrupted run; metrics
past the resumed step are dropped from metrics.jsonl and rewritten. The learning-rate
schedule is a pure function of (step, train.steps): raising train.steps on resume
stretches the cosine from there. A non-finite loss or gradient norm skips the update
(counted as a bad step) and stops the run with NonFiniteLossError past train.max_bad_steps.

    python -m glm.train --config RUN.yaml --data INFILL_DIR --out OUT_DIR
    python -m torch.distributed.run --nproc_per_node 4 -m glm.train --config ... (train.distributed=ddp|fsdp)

Exit codes: 0 done; 2 usage, 3 config, 4 data, 5 diverged, 6 read-only/full disk: permanent, also
recorded in OUT/last-error.json (glm.errors); 1 (an uncaught exception) or a signal: a crash, which
a retry resumes from the last checkpoint.

Over 600 lines on purpose: the pretraining loop with its resume, checkpoint, metrics and failure
classification is one state machine; the step itself is glm.step, the budget's measuring glm.pretrain_plan.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from glm.core.config import (
    ConfigError,
    ModelConfig,
    PipelineConfig,
    TrainConfig,
    add_override_argument,
    load_config,
)
from glm.core.errors import (
    ERROR_FILE,
    EXIT_CODES,
    PermanentError,
    disk_error,
    write_error_file,
)
from glm.core.metrics import MetricsLog
from glm.core.model import GLM, configure_optimizer, infilling_loss
from glm.core.shards import ManifestError
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.data.infilling import OBJECTIVES
from glm.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    init_distributed,
    load_full_optimizer_state,
    unwrap,
    wrap_model,
)
from glm.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_model_state,
    load_trainer_state,
    read_meta,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    to_plain,
)
from glm.training.step import StepResult, autocast_dtype, autocast_factory, cpu_has_fast_bf16, lr_at, optimizer_step  # noqa: F401  (glm.train's names too)

log = logging.getLogger("glm.train")  # also when run as __main__

Batch = dict[str, torch.Tensor]
BATCH_KEYS = ("input_ids", "position_ids", "block_position_ids", "sep", "targets", "loss_mask")


@runtime_checkable
class BatchSource(Protocol):
    """What the loop needs from training data: micro-batches and a resumable position.

    `state_dict()` must describe the position after the micro-batches already yielded,
    so that a fresh source given it by `load_state_dict` continues with the next one.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(PermanentError, RuntimeError):
    """The loss or gradient norm became NaN/inf more often than train.max_bad_steps allows."""

    kind = "diverged"


def failure_kind(exc: BaseException) -> str | None:
    """The permanent kind of a training failure (a key of glm.errors.EXIT_CODES), or None for a
    crash that a retry, resuming from the last checkpoint, may get past."""
    from pydantic import ValidationError

    if isinstance(exc, PermanentError):
        return exc.kind
    if isinstance(exc, (ConfigError, ValidationError)):
        return "config"
    if isinstance(exc, (ManifestError, CheckpointError)):
        return "data"
    if disk_error(exc):
        return "disk"
    return None


@dataclasses.dataclass
class TrainResult:
    step: int  # optimizer steps completed (skipped bad steps included)
    loss: float | None  # last training loss (token-weighted mean over the global batch)
    val_loss: float | None  # last validation loss, if any
    checkpoint: Path | None  # the final checkpoint
    metrics_path: Path
    bad_steps: int
    resumed_from: int | None  # the step a resumed run started from
    tokens: int  # input tokens processed, all ranks, all runs of this training
    elapsed: float  # seconds of training, summed over resumed runs


# --------------------------------------------------------------------------- MFU (schedule and precision: glm.step)


# dense (no sparsity) tensor-core peaks (FLOP/s) from NVIDIA's data sheets, matched as fragments
# of torch.cuda.get_device_name; the first match wins, so a name that contains another comes first
# (A100 before A10, L40S before L4). T4 has no bf16 units: its fp16 peak is the ceiling there.
PEAK_FLOPS: list[tuple[str, float, str]] = [
    ("H100 PCIe", 756e12, "bf16"),
    ("H100 NVL", 835e12, "bf16"),
    ("GH200", 989e12, "bf16"),
    ("H100", 989e12, "bf16"),
    ("H200", 989e12, "bf16"),
    ("B200", 2250e12, "bf16"),
    ("A100", 312e12, "bf16"),
    ("A800", 312e12, "bf16"),
    ("L40S", 362e12, "bf16"),
    ("L4", 121e12, "bf16"),
    ("A10G", 70e12, "bf16"),  # the commonly quoted figure for AWS's A10G (no public data sheet)
    ("A10", 125e12, "bf16"),
    ("4090", 165e12, "bf16"),
    ("3090", 71e12, "bf16"),
    ("T4", 65e12, "fp16"),
]


def peak_flops_of(device_name: str) -> tuple[float, str, str] | None:
    """(peak FLOP/s, its dtype, the table entry) for a CUDA device name, or None if not in the table."""
    return next(((peak, dtype, frag) for frag, peak, dtype in PEAK_FLOPS if frag in device_name), None)


def peak_flops(device: torch.device) -> float | None:
    """The device's tensor-core peak, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    found = peak_flops_of(torch.cuda.get_device_name(device))
    return found[0] if found else None


# --------------------------------------------------------------------------- metrics


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------- helpers of the loop


def _grad_accum(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not divisible by micro_batch_size x world size = "
            f"{cfg.micro_batch_size} x {world_size}; make it a multiple of {per_step}"
        )
    return cfg.batch_size // per_step


def _seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank torch/numpy/python streams (dropout differs across ranks; reproducible per rank)."""
    s = int(np.random.SeedSequence([seed, rank, 1]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _to_device(batch: Any, device: torch.device, micro_batch_size: int | None, where: str) -> Batch:
    if not isinstance(batch, dict) or not set(BATCH_KEYS) <= set(batch):
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{where}: a batch must be a dict with {list(BATCH_KEYS)}, got {got}")
    keys = (*BATCH_KEYS, "task") if "task" in batch else BATCH_KEYS  # task: optional (B,) objective index
    out = {k: torch.as_tensor(batch[k]).to(device, non_blocking=True) for k in keys}
    rows = out["input_ids"].shape[0]
    if micro_batch_size is not None and rows != micro_batch_size:
        raise ValueError(
            f"{where}: a batch has {rows} rows but train.micro_batch_size={micro_batch_size}; "
            "build the loader with the configured micro-batch size"
        )
    return out


def _next_batch(it: Iterator[Batch], step: int) -> Any:
    try:
        return next(it)
    except StopIteration:
        raise ConfigError(f"training data ran out at step {step + 1}; build more infilling epochs or lower train.steps") from None


def mix_weights(objective_mix: dict[str, float] | None) -> torch.Tensor | None:
    """(K,) float64 weights of OBJECTIVES, summing to 1, from an objective mix (None: no mix)."""
    if objective_mix is None:
        return None
    unknown = set(objective_mix) - set(OBJECTIVES)
    weights = torch.tensor([float(objective_mix.get(name, 0.0)) for name in OBJECTIVES], dtype=torch.float64)
    if unknown or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(
            f"objective_mix={objective_mix} must give non-negative weights to {list(OBJECTIVES)} with a positive sum"
        )
    return weights / weights.sum()


@dataclasses.dataclass
class _Groups:
    """One step's objective weighting: per-token factors relative to the pooled token sum."""

    counts: torch.Tensor  # (K,) float64 loss tokens of each objective in the global batch
    factor: torch.Tensor  # (K,) float64 w_o x N / N_o for present objectives, 0 for absent ones
    weights: torch.Tensor  # (K,) float64 weights renormalised over the present objectives
    single: int | None  # the one objective present, if only one is (then every factor is 1)


def _groups(tasks: list[tuple[torch.Tensor, torch.Tensor]], mix: torch.Tensor, device: torch.device) -> _Groups:
    """Weighting for (task (B,), loss tokens per row (B,)) of every micro-batch of this rank; collective."""
    k = len(OBJECTIVES)
    local = torch.zeros(k, dtype=torch.float64, device=device)
    for task, tokens in tasks:
        local += torch.bincount(task, weights=tokens.double(), minlength=k)[:k]
    counts = all_reduce_sum(local)  # (K,) every rank and micro-batch of the step gets the same factors
    present = counts > 0
    weights = torch.where(present, mix.to(device), 0.0)
    if bool((present & (weights == 0)).any()):
        names = [OBJECTIVES[i] for i in torch.nonzero(present & (weights == 0)).flatten().tolist()]
        raise ConfigError(
            f"training batches hold {names} samples that objective_mix gives no weight; rebuild the data with this mix"
        )
    weights = weights / weights.sum().clamp(min=1e-300)
    factor = torch.where(present, weights * counts.sum() / counts.clamp(min=1.0), 0.0)
    single = int(torch.nonzero(present).flatten()[0]) if int(present.sum()) == 1 else None
    return _Groups(counts, factor, weights, single)


def _token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at every loss position (N,) and the objective of each (N,) (as model.infilling_loss)."""
    select = batch["loss_mask"].bool()  # (B, T)
    logits = model(batch["input_ids"], batch["position_ids"], batch["block_position_ids"], batch["sep"], select=select)  # (N, V)
    token_loss = F.cross_entropy(logits, batch["targets"][select], reduction="none")  # (N,)
    return token_loss, batch["task"][:, None].expand_as(select)[select]


def _accumulate_gradients(
    model: torch.nn.Module,
    it: Iterator[Any],
    accum: int,
    step: int,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
    info: DistInfo,
    mix: torch.Tensor | None,
) -> tuple[torch.Tensor, int, int, _Groups | None, torch.Tensor | None]:
    """Backpropagate the (objective-weighted) summed token losses of `accum` micro-batches (gradients sync on the last).

    Returns (sum of token losses, loss tokens) summed over ranks, this rank's input tokens, the row length,
    and with a mix, the step's weighting and each objective's summed token losses (K,) over ranks.
    """
    # all micro-batches first: the weighting needs every objective's tokens in the step before any backward
    batches = [_to_device(_next_batch(it, step), info.device, cfg.micro_batch_size, "training data") for _ in range(accum)]
    has_task = ["task" in b for b in batches]
    if any(has_task) and mix is None:
        raise ValueError(
            "training batches carry `task` but pretrain got no objective_mix; pass the data's mix (InfillingData.objective_mix)"
        )
    groups = None
    if mix is not None and all(has_task):
        groups = _groups([(b["task"], b["loss_mask"].sum(1)) for b in batches], mix, info.device)
    k = len(OBJECTIVES)
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)  # sum of per-token losses
    n_loss = torch.zeros((), dtype=torch.float64, device=info.device)  # loss tokens
    by_task = torch.zeros(k, dtype=torch.float64, device=info.device)  # (K,) sum of per-token losses per objective
    n_input, seq_len = 0, 0
    for micro, batch in enumerate(batches):
        with gradient_sync(model, enabled=micro == accum - 1):
            if groups is None or groups.single is not None:
                with autocast():
                    loss, n = infilling_loss(model, batch)
                (loss * n).backward()
                # a micro-batch without loss tokens has a NaN mean over nothing; it contributes 0
                summed = torch.where(n > 0, loss.detach().double() * n, 0.0)
                if groups is not None:
                    by_task[groups.single] += summed
            else:
                with autocast():
                    token_loss, task_of = _token_losses(model, batch)  # (N,), (N,)
                (token_loss * groups.factor.to(token_loss.dtype)[task_of]).sum().backward()
                n = torch.tensor(token_loss.numel(), device=info.device)
                summed = token_loss.detach().double().sum()
                by_task.index_add_(0, task_of, token_loss.detach().double())
        loss_sum += summed
        n_loss += n
        n_input += batch["input_ids"].numel()
        seq_len = batch["input_ids"].shape[1]
    totals = all_reduce_sum(torch.cat([torch.stack([loss_sum, n_loss]), by_task]))  # (2 + K,) over all ranks
    return totals[:2], n_input, seq_len, groups, (totals[2:] if groups is not None else None)


def _per_objective(prefix: str, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
    """{prefix/objective: token-mean loss, prefix_tokens/objective: tokens} for the objectives present."""
    out: dict[str, Any] = {}
    for i, name in enumerate(OBJECTIVES):
        if counts[i] > 0:
            out[f"{prefix}/{name}"] = _finite_or_none(float(sums[i] / counts[i]))
            out[f"{prefix}_tokens/{name}"] = int(counts[i])
    return out


def _mixed_loss(sums: torch.Tensor, counts: torch.Tensor, mix: torch.Tensor) -> float:
    """sum_o w_o x mean_o over the objectives present, w renormalised over them (one objective: its mean)."""
    present = counts > 0
    w = torch.where(present, mix.to(counts.device), 0.0)
    w = w / w.sum()
    return float(sum(w[i] * (sums[i] / counts[i]) for i in torch.nonzero(present).flatten().tolist()))


@dataclasses.dataclass
class PretrainStep(StepResult):
    """A pretraining step (glm.step.StepResult) and what its metrics need."""

    totals: torch.Tensor | None = None  # (2,) float64 summed token losses and loss tokens over all ranks
    n_input: int = 0  # this rank's input tokens
    seq_len: int = 0  # the row length
    per_objective: dict[str, Any] = dataclasses.field(default_factory=dict)  # loss/<objective>, with a mix


def pretrain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    it: Iterator[Any],
    step: int,
    lr: float,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
    info: DistInfo,
    mix: torch.Tensor | None,
    accum: int,
    inspect: Callable[[], None] | None = None,
) -> PretrainStep:
    """One pretraining step (glm.step.optimizer_step) over `accum` micro-batches of `it`: the summed token
    losses' gradients become the global token mean's; the loss is the token mean, or with a mix the
    mixed per-objective means. Training and the budget's measurement (glm.pretrain_plan) both take it."""
    seen: dict[str, Any] = {}

    def backward() -> tuple[float, float]:
        totals, n_input, seq_len, groups, by_task = _accumulate_gradients(model, it, accum, step, cfg, autocast, info, mix)
        global_tokens = max(float(totals[1]), 1.0)
        loss = float(totals[0]) / global_tokens
        per_objective: dict[str, Any] = {}
        if groups is not None:
            loss = _mixed_loss(by_task, groups.counts, mix)
            per_objective = _per_objective("loss", by_task, groups.counts)
        seen.update(totals=totals, n_input=n_input, seq_len=seq_len, per_objective=per_objective)
        return loss, info.world_size / global_tokens  # sum of token losses -> global token mean

    done = optimizer_step(model, optimizer, lr, cfg.optim.grad_clip, backward, inspect)
    return PretrainStep(done.loss, done.grad_norm, done.skipped, **seen)


def evaluate(
    model: torch.nn.Module,
    valid_data: Iterable[Any],
    n_batches: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    info: DistInfo,
    mix: torch.Tensor | None = None,
) -> dict[str, float] | None:
    """Validation loss over up to n_batches per rank (ranks stop together).

    Token-weighted over all loss tokens; with a mix and batches that carry `task`, the mix of
    per-objective token means instead (as in training), plus each objective's loss.
    """
    was_training = model.training
    net = unwrap(model)  # DDP: bypass its forward hooks; FSDP2 shards in place and needs its hooks
    net.eval()
    k = len(OBJECTIVES)
    sums = torch.zeros(2 + 2 * k, dtype=torch.float64, device=device)  # (loss x tokens, tokens, K sums, K counts)
    it = iter(valid_data)
    with torch.no_grad():
        for _ in range(n_batches):
            raw = next(it, None)
            # FSDP ranks must run the same number of forwards: stop when any rank runs out
            have = all_reduce_sum(torch.tensor([float(raw is not None)], device=device))
            if int(have.item()) < info.world_size:
                break
            batch = _to_device(raw, device, None, "validation data")
            tasks = batch["task"].unique() if mix is not None and "task" in batch else None
            if tasks is None or len(tasks) == 1:
                with autocast():
                    loss, n = infilling_loss(net, batch)
                if n > 0:
                    summed = loss.double() * n
                    sums[:2] += torch.stack([summed, n.double()])
                    if tasks is not None:
                        sums[2 + int(tasks[0])] += summed
                        sums[2 + k + int(tasks[0])] += n.double()
            else:
                with autocast():
                    token_loss, task_of = _token_losses(net, batch)
                sums[:2] += torch.stack([token_loss.double().sum(), torch.tensor(float(token_loss.numel()), device=device)])
                sums[2 : 2 + k].index_add_(0, task_of, token_loss.double())
                sums[2 + k :] += torch.bincount(task_of, minlength=k)[:k].double()
    model.train(was_training)
    all_reduce_sum(sums)
    if sums[1] == 0:
        return None
    val_loss = float(sums[0] / sums[1])
    extra: dict[str, Any] = {}
    if mix is not None and sums[2 + k :].sum() > 0:
        val_loss = _mixed_loss(sums[2 : 2 + k], sums[2 + k :], mix)
        extra = _per_objective("val_loss", sums[2 : 2 + k], sums[2 + k :])
    ppl = math.exp(val_loss) if val_loss < 700 else math.inf
    return {"val_loss": val_loss, "val_ppl": ppl, "val_tokens": int(sums[1]), **extra}


def _save(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: BatchSource,
    counters: dict[str, Any],
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    info: DistInfo,
) -> Path | None:
    """Gather full state to rank 0 (collective under FSDP) and write one checkpoint there."""
    model_state = full_model_state(model)
    optim_state = full_optimizer_state(model, optimizer)
    per_rank = all_gather_objects({"rng": rng_state(), "loader": to_plain(data.state_dict(), "loader state")})
    path = None
    if info.is_main:
        trainer_state = {"step": step, "optimizer": optim_state, "ranks": per_rank, **counters}
        path = save_checkpoint(
            out_dir / "checkpoints",
            step,
            model_state,
            trainer_state,
            model_config=model_cfg,
            extra_meta={
                "train_config": cfg.model_dump(mode="json"),
                "world_size": info.world_size,
                "loss": _finite_or_none(counters.get("loss")),
            },
            keep=cfg.keep_checkpoints,
        )
    barrier()
    return path


def _find_resume(out_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> Path | None:
    """This run's own latest checkpoint wins (a restarted run continues); else cfg.init_from."""
    path = latest_checkpoint(out_dir / "checkpoints") if (out_dir / "checkpoints").is_dir() else None
    if path is None and cfg.init_from:
        path = resolve_checkpoint(cfg.init_from)
    if path is not None:
        # the architecture must match; dropout may change between runs and preset is only a label
        free = {"preset", "dropout", "attention_dropout", "init"}  # init: where the weights came from, not what they are
        saved = {k: v for k, v in read_meta(path)["model_config"].items() if k not in free}
        wanted = {k: v for k, v in model_cfg.model_dump(mode="json").items() if k not in free}
        if saved != wanted:
            diff = {k: (saved.get(k), wanted.get(k)) for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)}
            raise ConfigError(
                f"checkpoint {path} has another model architecture (checkpoint vs config: {diff}); "
                "use a fresh output directory or the matching model config"
            )
    return path


def _restore(
    resume: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: BatchSource,
    counters: dict[str, Any],
    cfg: TrainConfig,
    info: DistInfo,
    out_dir: Path,
) -> int:
    """Load optimizer, counters, this rank's RNG streams and data position; return the step."""
    state = load_trainer_state(resume)
    if "optimizer" not in state:  # weights only: an imported released GLM (glm.released), a fresh start from it
        if info.is_main:
            log.info("starting from the weights of %s (no optimizer state: an imported model)", resume)
        return 0
    load_full_optimizer_state(model, optimizer, state["optimizer"])
    step = int(state["step"])
    counters.update({k: state[k] for k in counters if k in state})
    if len(state["ranks"]) == info.world_size:
        mine = state["ranks"][info.rank]
        set_rng_state(mine["rng"])
    else:  # weights, optimizer and step carry over; the random streams cannot
        log.warning(
            "checkpoint %s was written by %d ranks, this run has %d: RNG streams are reseeded and the data "
            "position is rank 0's (exact for TrainLoader, whose position is global), so the run is not "
            "bit-identical to an uninterrupted one",
            resume,
            len(state["ranks"]),
            info.world_size,
        )
        mine = state["ranks"][0]
        _seed_rank_streams(cfg.seed + step, info.rank)
    try:
        data.load_state_dict(mine["loader"])
    except ValueError as e:
        if resume.resolve().is_relative_to((out_dir / "checkpoints").resolve()):  # a run's own checkpoint must fit its data
            raise ConfigError(
                f"checkpoint {resume} does not fit the training data ({e}); use a fresh output "
                "directory or the data it was trained on"
            ) from e
        # init_from a run on other data (continued pretraining): start this data at its beginning
        log.warning("data position of %s not restored (%s); reading the data from its start", resume, e)
    if info.is_main:
        log.info("resuming from %s (step %d)", resume, step)
    return step


# --------------------------------------------------------------------------- the loop


CRASH_AFTER_STEP = "GLM_TRAIN_CRASH_AFTER_STEP"


def _injected_crash(step: int, out_dir: Path) -> None:
    """Fault injection for tests of the orchestrator's retries: with GLM_TRAIN_CRASH_AFTER_STEP=N
    in the environment, the first run to finish step N (and its checkpoint, if one falls due)
    raises an uncaught RuntimeError, as a CUDA or NCCL error would. A marker file in out_dir
    (.crash-injected-N) makes it fire once, so the retry resumes and finishes."""
    at = os.environ.get(CRASH_AFTER_STEP)
    if not at or step != int(at):
        return
    marker = out_dir / f".crash-injected-{step}"
    if marker.exists():
        return
    marker.touch()
    raise RuntimeError(f"injected crash after step {step} ({CRASH_AFTER_STEP}={at})")


def pretrain(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    data: BatchSource,
    out_dir: str | Path,
    *,
    valid_data: Iterable[Any] | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    objective_mix: dict[str, float] | None = None,
) -> TrainResult:
    """Train a GLM for cfg.steps optimizer steps; checkpoints and metrics.jsonl go to out_dir.

    `data` yields this rank's micro-batches (dicts of BATCH_KEYS, and `task` for blank-infilling
    shards, which then needs `objective_mix`: the loss mixes per-objective token means, module
    docstring; the metrics add loss/<objective>). `valid_data` is re-iterated
    from its start at every evaluation. A run resumes exactly from out_dir's latest valid
    checkpoint (or cfg.init_from): weights, optimizer, step, RNG streams and data position.
    Under torchrun every rank calls this; only rank 0 writes files and calls `on_metrics`.
    """
    if model_cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is None; set it from the tokenizer before pretraining")
    if cfg.budget_minutes is not None:
        raise ConfigError(
            f"pretrain.budget_minutes={cfg.budget_minutes:g} is turned into steps by the pipeline (glm-pipeline run, "
            "which records them in pretrain/run-config.yaml); to train directly, set pretrain.steps instead"
        )
    if not isinstance(data, BatchSource):
        raise TypeError("data must be iterable and have state_dict()/load_state_dict() (see glm.train.BatchSource)")
    out_dir = Path(out_dir)
    mix = mix_weights(objective_mix)
    owns_group = not dist.is_initialized()
    info = init_distributed(cfg.device)
    metrics, bar = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main), None
    try:
        device = info.device
        accum = _grad_accum(cfg, info.world_size)
        autocast = autocast_factory(cfg.precision, device)

        # ---- model: same init on every rank, resumed weights, then compile and wrap from outside
        resume = _find_resume(out_dir, cfg, model_cfg)
        torch.manual_seed(cfg.seed)
        net = GLM(model_cfg)
        if resume is not None:
            net.load_state_dict(load_model_state(resume), strict=True)
        net.to(device)
        if cfg.compile:
            # the loss gathers only its (data-dependent number of) positions before the vocab
            # projection; without this flag that gather is a graph break
            torch._dynamo.config.capture_dynamic_output_shape_ops = True
            net.compile()  # in place: parameter names (and checkpoints) stay those of the plain module
        model = wrap_model(net, cfg.distributed, info)
        optimizer = configure_optimizer(unwrap(model), cfg.optim, device.type)
        _seed_rank_streams(cfg.seed, info.rank)

        step, counters = 0, {"bad_steps": 0, "tokens": 0, "elapsed": 0.0, "loss": None, "val_loss": None}
        if resume is not None:
            step = _restore(resume, model, optimizer, data, counters, cfg, info, out_dir)

        metrics.truncate_after(step)

        def emit(record: dict[str, Any]) -> None:
            metrics.write(record)
            if on_metrics is not None and info.is_main:
                on_metrics(record)

        flops_per_token = unwrap(model).flops_per_token
        peak = peak_flops(device)
        show_bar = info.is_main and sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=step, disable=not show_bar, desc="pretrain", dynamic_ncols=True)
        resumed_from = step if resume is not None else None
        last_ckpt = resume if step >= cfg.steps else None
        run_start, elapsed_before = time.perf_counter(), float(counters["elapsed"])
        it = iter(data)
        model.train()
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.steps)
            done = pretrain_step(model, optimizer, it, step, lr, cfg, autocast, info, mix, accum)
            loss_value, grad_norm, skipped = done.loss, done.grad_norm, done.skipped
            totals, n_input, seq_len, per_objective = done.totals, done.n_input, done.seq_len, done.per_objective
            if skipped:
                counters["bad_steps"] += 1
            step += 1

            dt = time.perf_counter() - t0
            step_tokens = n_input * info.world_size
            counters["tokens"] += step_tokens
            counters["loss"] = loss_value
            tokens_per_s = step_tokens / dt
            mfu = None
            if peak is not None:
                achieved = flops_per_token(seq_len, float(totals[1]) / step_tokens) * tokens_per_s
                mfu = achieved / (peak * info.world_size)
            emit(
                {
                    "step": step,
                    "loss": _finite_or_none(loss_value),
                    "lr": lr,
                    "grad_norm": _finite_or_none(grad_norm),
                    "tokens_per_s": tokens_per_s,
                    "loss_tokens": int(totals[1]),
                    "tokens": counters["tokens"],
                    "elapsed": elapsed_before + time.perf_counter() - run_start,
                    "mfu": mfu,
                    "skipped": skipped,
                    "bad_steps": counters["bad_steps"],
                    **per_objective,
                }
            )
            if skipped and counters["bad_steps"] > cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step {step} "
                    f"(loss={loss_value}, grad_norm={grad_norm}); {counters['bad_steps']} bad step(s) exceed "
                    f"train.max_bad_steps={cfg.max_bad_steps}. Lower the learning rate, check the data, "
                    "or resume from the last checkpoint"
                )
            if skipped:
                log.warning(
                    "step %d: non-finite loss or gradient, update skipped (%d/%d bad steps allowed)",
                    step,
                    counters["bad_steps"],
                    cfg.max_bad_steps,
                )
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                if info.is_main and not show_bar:
                    log.info(
                        "step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f",
                        step,
                        cfg.steps,
                        loss_value,
                        lr,
                        grad_norm,
                        tokens_per_s,
                    )

            if valid_data is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                per_rank = -(-cfg.eval_batches // info.world_size)  # eval_batches counts all ranks together
                val = evaluate(model, valid_data, per_rank, device, autocast, info, mix)
                if val is not None:
                    counters["val_loss"] = val["val_loss"]
                    emit({"step": step, **{k: _finite_or_none(v) if isinstance(v, float) else v for k, v in val.items()}})
            counters["elapsed"] = elapsed_before + time.perf_counter() - run_start
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                last_ckpt = _save(out_dir, step, model, optimizer, data, counters, cfg, model_cfg, info)
            _injected_crash(step, out_dir)
        return TrainResult(
            step=step,
            loss=counters["loss"],
            val_loss=counters["val_loss"],
            checkpoint=last_ckpt,
            metrics_path=out_dir / "metrics.jsonl",
            bad_steps=counters["bad_steps"],
            resumed_from=resumed_from,
            tokens=int(counters["tokens"]),
            elapsed=float(counters["elapsed"]),
        )
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
        if owns_group:
            destroy_distributed()


# --------------------------------------------------------------------------- synthetic data


class SyntheticBatches:
    """Random infilling-shaped micro-batches: tests and throughput checks without shards.

    Sample i depends only on (seed, i). Rank r of w reads micro-batches r, r+w, r+2w, ...
    of micro_batch_size consecutive samples, so any split of a global batch into ranks and
    accumulation steps covers the same samples. Rows hold different numbers of loss tokens.
    With `objectives` = k, each sample also carries `task`, an objective index in 0..k-1 drawn
    from (seed, i) on a stream of its own (the other columns are those of objectives=None).
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        micro_batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit: int | None = None,
        objectives: int | None = None,
    ):
        if seq_len < 8 or vocab_size <= NUM_SPECIAL:
            raise ValueError("SyntheticBatches needs seq_len >= 8 and vocab_size > the special tokens")
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size, self.limit = seed, rank, world_size, limit
        self.objectives = objectives
        self._next = 0  # micro-batches of this rank already yielded

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batches": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next = int(state["micro_batches"])

    def __iter__(self) -> Iterator[Batch]:
        while self.limit is None or self._next < self.limit:
            block = self._next * self.world_size + self.rank
            self._next += 1
            first = block * self.micro_batch_size
            rows = [self._sample(first + j) for j in range(self.micro_batch_size)]
            batch = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in BATCH_KEYS}
            if self.objectives is not None:
                tasks = [np.random.default_rng([self.seed, first + j, 2]).integers(self.objectives) for j in range(len(rows))]
                batch["task"] = torch.as_tensor(np.array(tasks, np.int64))  # (B,)
            yield batch

    def _sample(self, i: int) -> dict[str, np.ndarray]:
        g = np.random.default_rng([self.seed, i])
        T = self.seq_len
        sep = int(g.integers(T // 2, T - 3))  # Part A length
        span = int(g.integers(2, T - sep + 1))  # Part B length ([sop] + tokens); the rest is padding
        mask_at = int(g.integers(0, sep))
        ids = np.full(T, SPECIAL.pad, dtype=np.int64)  # (T,)
        ids[:sep] = g.integers(NUM_SPECIAL, self.vocab_size, sep)
        ids[mask_at] = SPECIAL.mask
        ids[sep] = SPECIAL.sop
        ids[sep + 1 : sep + span] = g.integers(NUM_SPECIAL, self.vocab_size, span - 1)
        targets = np.zeros(T, dtype=np.int64)  # (T,)
        targets[sep : sep + span - 1] = ids[sep + 1 : sep + span]
        targets[sep + span - 1] = SPECIAL.eop
        pos = np.zeros(T, dtype=np.int64)  # (T,)
        pos[:sep] = np.arange(sep)
        pos[sep : sep + span] = mask_at
        block_pos = np.zeros(T, dtype=np.int64)  # (T,)
        block_pos[sep : sep + span] = np.arange(1, span + 1)
        loss_mask = np.zeros(T, dtype=np.int64)  # (T,)
        loss_mask[sep : sep + span] = 1
        return {
            "input_ids": ids,
            "position_ids": pos,
            "block_position_ids": block_pos,
            "sep": np.int64(sep),
            "targets": targets,
            "loss_mask": loss_mask,
        }


# --------------------------------------------------------------------------- entry point


def vocab_size_from_data(data_dir: str | Path) -> int | None:
    """The tokenizer's vocabulary, rounded up to a multiple of 64, from the token stage that built the shards."""
    from glm.core.shards import read_manifest

    for entry in read_manifest(data_dir).get("inputs", []):
        try:
            stats = read_manifest(entry["manifest"]).get("stats", {})
        except (ManifestError, OSError):  # an input moved since the build: the caller sets the size instead
            continue
        if stats.get("vocab_size"):
            return -(-int(stats["vocab_size"]) // 64) * 64
    return None


def pretrain_on_shards(
    pipeline: PipelineConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Pretrain on a blank-infilling dataset: this rank's TrainLoader, the validation split, `pretrain`."""
    from glm.data.loader import InfillingData, TrainLoader, ValidLoader

    cfg, model_cfg = pipeline.pretrain, pipeline.model
    if model_cfg.vocab_size is None:
        vocab = vocab_size_from_data(data_dir)
        if vocab is None:
            raise ConfigError(
                f"model.vocab_size is not set and the token manifest behind {data_dir} does not record it; "
                "pass --set model.vocab_size=N (the tokenizer's size)"
            )
        model_cfg = model_cfg.model_copy(update={"vocab_size": vocab})
    owns_group = not dist.is_initialized()
    info = init_distributed(cfg.device)
    try:
        shards = InfillingData(data_dir, seq_len=pipeline.infilling.seq_len, max_seq_len=model_cfg.max_seq_len)
        data = TrainLoader(shards, cfg.micro_batch_size, rank=info.rank, world_size=info.world_size, seed=cfg.seed)
        valid = None
        if shards.valid is not None:
            valid = ValidLoader(
                shards,
                cfg.micro_batch_size,
                rank=info.rank,
                world_size=info.world_size,
                max_batches=-(-cfg.eval_batches // info.world_size),
            )
        return pretrain(
            cfg, model_cfg, data, out_dir, valid_data=valid, on_metrics=on_metrics, objective_mix=shards.objective_mix
        )
    finally:
        if owns_group:
            destroy_distributed()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glm.train", description="Pretrain a GLM on blank-infilling shards.")
    p.add_argument("--config", required=True, help="pipeline YAML (its model, infilling and pretrain sections are used)")
    p.add_argument("--data", required=True, help="blank-infilling dataset directory (the infill stage's output)")
    p.add_argument("--out", required=True, help="output directory: checkpoints/ and metrics.jsonl")
    add_override_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the TrainResult as one JSON line (rank 0) for the orchestrator.

    A permanent failure (glm.errors: config 3, data 4, diverged 5, disk 6) prints one line, is
    recorded in OUT/last-error.json and exits with its code; anything else propagates (a traceback,
    exit code 1): a crash, which an orchestrator retries and which resumes from the last checkpoint.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pipeline = load_config(args.config, args.overrides)
        result = pretrain_on_shards(pipeline, args.data, args.out)
    except Exception as e:
        kind = failure_kind(e)
        if kind is None:
            raise
        print(f"glm.train: {kind} error: {e}", file=sys.stderr)
        write_error_file(args.out, kind, str(e), rank=int(os.environ.get("RANK", "0")))
        return EXIT_CODES[kind]
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(args.out) / ERROR_FILE).unlink(missing_ok=True)  # an earlier run's failure is history now
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
