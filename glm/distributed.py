"""Process groups, devices and data parallelism (DDP or FSDP2), applied from outside the model.

A run is one process (`python -m glm.train`) or N processes started by torchrun, which
sets RANK, WORLD_SIZE and LOCAL_RANK (`python -m torch.distributed.run --nproc_per_node N
-m glm.train ...`). Every rank builds the same model, then `wrap_model` makes it data
parallel. Only rank 0 writes files. Checkpoints hold FULL (unsharded) state dicts, so a
checkpoint written by FSDP on 8 GPUs loads into one CPU process and vice versa.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

Strategy = Literal["none", "ddp", "fsdp"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when present, else CPU; each local rank gets its own GPU."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {choice!r} is not one of auto, cpu, cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use device=auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def init_distributed(device_choice: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Read the torchrun environment; join the process group when there is more than one rank.

    nccl on CUDA, gloo on CPU. A single process (no torchrun) never creates a group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size}); launch with torchrun")
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives and all_gather_object use the current device
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=_dt.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity in one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- wrapping


def wrap_model(model: nn.Module, strategy: Strategy, info: DistInfo) -> nn.Module:
    """Data-parallel `model` (already on info.device) for the chosen strategy.

    ddp: DistributedDataParallel (replicated weights, gradient all-reduce).
    fsdp: FSDP2 `fully_shard`, one unit per child of every ModuleList (the transformer
    blocks) plus the root, the torchtitan layout; parameters become DTensors sharded
    over ranks. One process, or strategy "none", returns the model unchanged.
    """
    if strategy not in ("none", "ddp", "fsdp"):
        raise ValueError(f"train.distributed={strategy!r} is not one of none, ddp, fsdp")
    if not info.enabled:
        return model
    if strategy == "none":
        raise ValueError(
            f"{info.world_size} processes were launched but train.distributed=none; "
            "set train.distributed=ddp (or fsdp), or launch a single process"
        )
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for child in model.modules():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP (FSDP2 shards in place, so it is already the module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for all but the last accumulation micro-batch."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# --------------------------------------------------------------------------- full state dicts


def _state_dict_api() -> Any:
    # imported at the first checkpoint rather than at start-up: torch.distributed.checkpoint
    # costs ~1.5 s, which would delay a training subprocess's first step
    import torch.distributed.checkpoint.state_dict as api

    return api


def _full_options() -> Any:
    return _state_dict_api().StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights keyed by the plain module's names (no `module.`/`_orig_mod.`).

    A collective under FSDP: every rank must call it; only rank 0 receives the tensors.
    """
    return _state_dict_api().get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter names (collective; rank 0 receives it)."""
    return _state_dict_api().get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a name-keyed full optimizer state on every rank (FSDP re-shards it)."""
    api = _state_dict_api()
    api.set_optimizer_state_dict(model, optimizer, state, options=api.StateDictOptions(full_state_dict=is_fsdp(model)))
