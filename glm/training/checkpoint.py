"""Pretraining checkpoints: one directory per step, written atomically, verified by checksums.

    checkpoints/
      step-000200/
        model.safetensors   full (unsharded) fp32 weights, plain module names
        trainer_state.pt    optimizer, per-rank RNG and loader position, counters;
                            only tensors and plain containers, loaded with weights_only=True
        meta.json           step, model and train config, sha256 + size of the two files
      latest                name of the newest complete checkpoint, written last

A checkpoint is built in a hidden temporary directory and renamed into place, then
`latest` is replaced: a crash leaves either the old or the new checkpoint, never half of
one. A checkpoint whose files do not match meta.json is skipped, with a warning, for the
one before it. Sharded (FSDP) runs save full state dicts gathered to rank 0, so any
checkpoint loads into any world size, or into one process for fine-tuning and export.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from glm.core.config import ModelConfig
from glm.core.safety import fsync_dir, remove_tree
from glm.core.shards import atomic_write_text, code_version, sha256_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its checksums."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_root(directory: str | Path) -> Path:
    """`run/checkpoints` when given a run directory, else the directory itself."""
    directory = Path(directory)
    return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Step directories under `directory` (a run dir or its checkpoints dir), oldest first."""
    root = checkpoints_root(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p))  # type: ignore[arg-type, return-value]


# --------------------------------------------------------------------------- plain (weights_only) state


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def to_plain(obj: Any, where: str = "state") -> Any:
    """`obj` with numpy values turned into tensors / Python scalars, so weights_only can load it.

    Anything else that torch.load(weights_only=True) would refuse is an error naming its key.
    """
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which a weights_only checkpoint cannot hold; "
        "store tensors, numbers, strings, lists or dicts"
    )


# --------------------------------------------------------------------------- save


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_in_order(path: str | Path, obj: Any) -> Path:
    """Atomic JSON that keeps every dict's key order (shards.atomic_write_json sorts keys): a cloze
    spec's verbalizers are in label order, and readers shown the file expect the config's order."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_checkpoint(
    directory: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    *,
    model_config: ModelConfig,
    extra_meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically, point `latest` at it, keep the newest `keep`.

    Call on rank 0 only, with full state dicts. Checkpoints newer than `step` (a timeline
    abandoned by resuming from an older checkpoint) are deleted.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    remove_tree(tmp, inside=root, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
    torch.save(to_plain(trainer_state, "trainer_state"), tmp / STATE_FILE)
    files = {}
    for fname in (MODEL_FILE, STATE_FILE):
        _fsync_file(tmp / fname)
        files[fname] = {"sha256": sha256_file(tmp / fname), "bytes": (tmp / fname).stat().st_size}
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "model_config": model_config.model_dump(mode="json"),
        "files": files,
        **(extra_meta or {}),
    }
    write_json_in_order(tmp / META_FILE, meta)
    final = root / name
    if final.exists():  # the same step saved again after a resume: replace it
        remove_tree(final, inside=root)
    os.rename(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, step, keep)
    return final


def _prune(root: Path, current: int, keep: int) -> None:
    for stale in root.glob(".tmp-step-*"):  # a crashed writer's leftovers
        remove_tree(stale, inside=root, ignore_errors=True)
    ckpts = list_checkpoints(root)
    older = [p for p in ckpts if _step_of(p) <= current]  # type: ignore[operator]
    newer = [p for p in ckpts if _step_of(p) > current]  # type: ignore[operator]
    for p in newer + older[:-keep]:
        remove_tree(p, inside=root, ignore_errors=True)


# --------------------------------------------------------------------------- verify / find


def read_meta(path: str | Path) -> dict[str, Any]:
    mp = Path(path) / META_FILE
    if not mp.is_file():
        raise CheckpointError(f"{path} has no {META_FILE}: not a checkpoint, or an incomplete one")
    try:
        return json.loads(mp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mp} is not valid JSON ({e}); the checkpoint is corrupt") from None


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems with a checkpoint directory ([] when every file matches its recorded hash)."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return [str(e)]
    if meta.get("format_version", 0) > FORMAT_VERSION:
        return [f"{path}: format version {meta['format_version']} is newer than this code; upgrade glm-pipeline"]
    problems = []
    for fname in (MODEL_FILE, STATE_FILE):
        entry = meta.get("files", {}).get(fname)
        f = path / fname
        if entry is None:
            problems.append(f"{path}: {META_FILE} lists no checksum for {fname}")
        elif not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, {META_FILE} says {entry['bytes']}")
        elif sha256_file(f) != entry["sha256"]:
            problems.append(f"{f}: sha256 differs from {META_FILE} (corrupt)")
    return problems


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint that verifies, or None. Corrupt ones are skipped with a warning.

    `latest` is authoritative (it is written last); without it, the highest step is tried first.
    """
    root = checkpoints_root(directory)
    ckpts = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = _step_of(Path(pointer.read_text(encoding="utf-8").strip()))
        if target is not None:
            ckpts = [p for p in ckpts if _step_of(p) <= target]  # type: ignore[operator]
    for path in reversed(ckpts):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        log.warning("skipping corrupt checkpoint %s (%s); trying the previous one", path, "; ".join(problems))
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as given, or the latest valid one under a run / checkpoints directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist; pass a step-NNNNNN directory or a run directory")
    if (path / META_FILE).is_file():
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError("; ".join(problems) + "; pick an earlier checkpoint")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no valid checkpoint under {path}; train first or pass a step-NNNNNN directory")
    return found


# --------------------------------------------------------------------------- load

HEAD_PREFIX = "head."  # a classification head's weights (glm.heads); no GLM parameter name starts with it


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the GLM's weights, the head's weights without the prefix) of a checkpoint's flat state."""
    glm = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return glm, head


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / MODEL_FILE))


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Optimizer / RNG / loader state; weights_only=True, so loading runs no pickled code."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """A GLM in eval mode and its ModelConfig from a step directory or a run's latest checkpoint.

    A linear-head classifier's checkpoint gives its GLM alone (glm.heads.load_finetuned adds the head)."""
    from glm.core.model import GLM

    path = resolve_checkpoint(checkpoint_dir)
    cfg = ModelConfig.model_validate(read_meta(path)["model_config"])
    model = GLM(cfg)
    model.load_state_dict(split_state(load_model_state(path))[0], strict=True)
    return model.to(device).eval(), cfg
