"""Verbalizer-free classification: a linear head on the [MASK]'s final hidden state.

The cloze task (glm.finetune.ClozeTask) scores labels through verbalizer words, which needs a
natural word per label. `finetune.task.head: linear` instead reads the final hidden state at
the pattern's [MASK] (Part A only, no Part B: Part A is bidirectional, so the blank sees the
whole text) and applies Linear(hidden, n_labels); training is cross-entropy on those logits.

The GLM stays the single nanoGPT-style model: the head is a separate module, composed with it
by `GLMClassifier` for training and scoring. A fine-tuned checkpoint stores the head next to the
model's own weights in the same model.safetensors under `head.*` (covered by the checkpoint's
checksum); `load_finetuned` below composes them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn as nn

from glm.core.config import ClozeTaskConfig, ModelConfig
from glm.core.special_tokens import SPECIAL, special_of
from glm.training.checkpoint import HEAD_PREFIX, CheckpointError, load_model_state, read_meta, resolve_checkpoint, split_state

if TYPE_CHECKING:
    from glm.core.model import GLM
    from glm.finetuning.finetune import EncodedCloze

INIT_STD = 0.02  # the model's own Linear init (glm.model.GLM._init_weights)


# --------------------------------------------------------------------------- labels


def data_labels(labels: Iterable[str]) -> list[str]:
    """The distinct label values in a stable order: numerically if all are integers ("2" < "10"), else as text."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def with_data_labels(task: ClozeTaskConfig, labels: Iterable[str]) -> ClozeTaskConfig:
    """`task` with its label list filled from the data when the linear head is given neither labels nor verbalizers."""
    if task.head != "linear" or task.labels is not None or isinstance(task.verbalizers, dict) and task.verbalizers:
        return task
    return task.model_copy(update={"labels": data_labels(labels)})


def head_labels(task: ClozeTaskConfig) -> list[str]:
    """The linear head's labels, in order: task.labels, else the verbalizers' keys."""
    verbalized = list(task.verbalizers) if isinstance(task.verbalizers, dict) else []  # "auto": no words, no labels
    labels = list(task.labels) if task.labels is not None else verbalized
    if not labels:
        raise ValueError(
            "task.head is linear but the label set is unknown: set task.labels (e.g. ['neg', 'pos']) "
            "or read them from labelled data (glm.heads.with_data_labels)"
        )
    return labels


# --------------------------------------------------------------------------- the modules


class ClassificationHead(nn.Module):
    """Linear(hidden, n_labels) with the model's init: weights N(0, 0.02), bias 0."""

    def __init__(self, hidden_size: int, n_labels: int, seed: int | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, n_labels)
        g = torch.Generator().manual_seed(seed) if seed is not None else None  # leaves the global RNG alone
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) * INIT_STD)
            self.proj.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).float()  # (..., L) float32 like the model's logits


class GLMClassifier(nn.Module):
    """A GLM and a classification head, trained and saved together."""

    def __init__(self, glm: GLM, head: ClassificationHead):
        super().__init__()
        self.glm, self.head = glm, head

    @property
    def cfg(self):
        return self.glm.cfg

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_position_ids: torch.Tensor,
        sep: torch.Tensor,
        mask_pos: torch.Tensor,
    ) -> torch.Tensor:
        """(B, L) label logits from the hidden state at each row's `mask_pos`."""
        h, _ = self.glm.hidden_states(input_ids, position_ids, block_position_ids, sep)  # (B, T, C)
        return self.head(h[torch.arange(h.shape[0], device=h.device), mask_pos])  # (B, L)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The GLM's own state dict plus the head's under `head.*`: one flat safetensors file."""
        return {**self.glm.state_dict(), **{HEAD_PREFIX + k: v for k, v in self.head.proj.state_dict().items()}}


def attach_head(model: GLM, n_labels: int, seed: int) -> GLMClassifier:
    head = ClassificationHead(model.cfg.hidden_size, n_labels, seed)
    return GLMClassifier(model, head.to(next(model.parameters()).device))


def head_from_state(state: dict[str, torch.Tensor], where: str) -> ClassificationHead:
    if set(state) != {"weight", "bias"} or state["weight"].dim() != 2:
        raise ValueError(
            f"{where}: the linear head's weights are {sorted(state)}, not head.weight and head.bias; re-run fine-tuning"
        )
    n_labels, hidden = state["weight"].shape
    head = ClassificationHead(hidden, n_labels)
    head.proj.load_state_dict(state, strict=True)
    return head


def backbone(model: nn.Module) -> nn.Module:
    """The GLM of a GLMClassifier, or the model itself."""
    return model.glm if isinstance(model, GLMClassifier) else model


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a fine-tuned checkpoint stores for `model`: a GLM's state dict, or a GLM + head's."""
    return model.checkpoint_state() if isinstance(model, GLMClassifier) else model.state_dict()


# --------------------------------------------------------------------------- scoring


def head_rows(items: Sequence[EncodedCloze], pad: int = SPECIAL.pad) -> dict[str, Any]:
    """Right-padded Part A rows (no Part B): ids, positions, zero block positions, per-row sep, mask positions."""
    B, T = len(items), max(len(e.part_a) for e in items)
    sep = torch.tensor([len(e.part_a) for e in items], dtype=torch.long)  # (B,)
    ids = torch.full((B, T), pad, dtype=torch.long)  # (B, T) padding at j >= sep: no real token sees it
    for r, e in enumerate(items):
        ids[r, : len(e.part_a)] = torch.as_tensor(e.part_a, dtype=torch.long)
    real = torch.arange(T)[None, :] < sep[:, None]  # (B, T)
    return {
        "input_ids": ids,
        "position_ids": torch.arange(T).repeat(B, 1) * real,  # (B, T)
        "block_position_ids": torch.zeros_like(ids),  # (B, T)
        "sep": sep,
        "mask_pos": torch.tensor([e.mask_pos for e in items], dtype=torch.long),  # (B,)
    }


def head_scores(model: nn.Module, items: Sequence[EncodedCloze]) -> torch.Tensor:
    """(B, L) label logits of a GLMClassifier, differentiable."""
    if not isinstance(model, GLMClassifier):
        raise TypeError(
            f"task.head is linear but the model is a {type(model).__name__} without a head; "
            "load a fine-tuned checkpoint with glm.heads.load_finetuned"
        )
    device = next(model.parameters()).device
    rows = head_rows(items, special_of(model).pad)
    return model(*(rows[k].to(device) for k in ("input_ids", "position_ids", "block_position_ids", "sep", "mask_pos")))


def linear_spec(task: Any) -> dict[str, Any]:
    """A linear-head ClozeTask's spec (meta.json "finetune"): no verbalizers, the labels in head order."""
    return {
        "name": task.task.name,
        "pattern": task.task.pattern,
        "head": "linear",
        "labels": task.labels,
        "verbalizers": {},
        "answer_ids": [],
        "multi_token": False,
        "length_normalise": False,
        "max_seq_len": task.max_seq_len,
        "text_pair_field": task.task.text_pair_field,
        "scores": "logits of the linear head (checkpoint head.weight, head.bias) on the final hidden state at [MASK], "
        "Part A only; the label distribution is their softmax",
    }


def load_finetuned(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """What a fine-tuned checkpoint holds, in eval mode: the GLM, or for task.head linear the GLM and its
    classification head (glm.heads.GLMClassifier), as fine-tuning scored with them."""
    from glm.core.model import GLM

    path = resolve_checkpoint(checkpoint_dir)
    meta = read_meta(path)
    cfg = ModelConfig.model_validate(meta["model_config"])
    model_state, head_state = split_state(load_model_state(path))
    model = GLM(cfg)
    model.load_state_dict(model_state, strict=True)
    if (meta.get("finetune") or {}).get("head") == "linear":
        model = GLMClassifier(model, head_from_state(head_state, str(path)))
    elif head_state:
        raise CheckpointError(
            f"{path}: model.safetensors holds head weights but meta.json names no linear head; re-run fine-tuning"
        )
    return model.to(device).eval(), cfg
