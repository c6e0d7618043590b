"""ONNX export of a GLM checkpoint into a verified, self-contained bundle that glm.runtime runs.

One graph serves the prompt pass and every decoding step: the key/value cache is explicit
and updated in place (format 2): inputs `past_length` (B,) and per layer the buffers
`past_key_values.{i}.key/value` (B, H, capacity, D); outputs `present.{i}.key/value`, the same
buffers with this call's keys/values written at past_length (onnxruntime's GroupQueryAttention;
bind one OrtValue as both and nothing is copied per step), with dynamic batch, sequence and
capacity axes; past_length 0 is the prompt pass. Besides input_ids, position_ids,
block_position_ids (B, T) and sep (B,), the graph takes `key_start` (B,): the first key each row
may see, so left-padded batches (batched generation, multi-token cloze scoring) run through the
same graph; feed zeros when rows are unpadded. (Format 1, `export_onnx(in_place=False)`, took
pasts (B, H, P, D) and returned them concatenated (B, H, P+T, D); runtimes still read it.)

The bundle directory (written to a temporary name, renamed into place once verified):

    model.onnx         fp32, one file (external data only past protobuf's 2 GB limit)
    model.int8.onnx    optional: dynamic int8 (onnxruntime quant_pre_process + quantize_dynamic)
    model.cls.onnx     a classifier's classification graph (SelectGLM), model.cls.int8.onnx with int8
    tokenizer.model    the sentencepiece model
    config.json        format version, dimensions, special ids, I/O names, classifier spec
    verification.json  what was checked and the numbers
    SHA256SUMS         `sha256sum -c` format, every other file

Verification runs after every export and a failure raises ExportVerificationError (nothing is
written): fp32 logits and presents against PyTorch at a grid of (batch, seq, past) shapes
(max abs diff <= ExportConfig.atol), greedy decoding against glm.generate step by step with
teacher forcing (both fed glm.generate's tokens: the same argmax at every step, except at
near-ties, where the reference's margin is within a small multiple of the measured logit
error; those are counted and listed), and for a cloze classifier the same test accuracy as
PyTorch (int8: fails only when more than one point worse and a sign test on the changed
predictions says the loss is not chance, INT8_SIGN_TEST_P). A linear-head classifier (glm.heads) exports one more output,
label_logits (B, T, n_labels), held to the same atol over the same grid of shapes.

A classifier bundle also holds the classification graph model.cls.onnx (SelectGLM; int8:
model.cls.int8.onnx): the generation graph's inputs plus select_positions (B, N), returning
select_scores (B, N, K) = log P of the verbalizer rows config.json classifier.rows (linear head:
the label logits (B, N, L)) and the presents. The runtime classifies with it; its scores are held
to the same atol over the same grid of shapes (random positions), and the accuracy check runs through it.

Over 600 lines on purpose: the export wrappers (generation graph, classification graph), the
quantization and the verification are one contract (what verification checks is what the graphs
compute); split them when a second export format arrives.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from glm import runtime
from glm.core.config import ClozeTaskConfig, ExportConfig
from glm.core.model import GLM, InPlaceCache
from glm.core.safety import remove_tree
from glm.core.shards import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    code_version,
    sha256_file,
)
from glm.core.special_tokens import NUM_SPECIAL, PIECES, special_of
from glm.core.tokenizer import Tokenizer, load_tokenizer
from glm.evaluation.generate import GenerationConfig, fill_blanks
from glm.finetuning.heads import GLMClassifier, backbone, load_finetuned
from glm.training.checkpoint import (
    read_meta,
    resolve_checkpoint,
    write_json_in_order,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = runtime.FORMAT_VERSION
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CLS_FILE = "model.cls.onnx"  # a classifier's graph: projects only at the positions it is asked for
CLS_INT8_FILE = "model.cls.int8.onnx"
TOKENIZER_FILE = "tokenizer.model"
REPORT_FILE = "verification.json"
PROTOBUF_LIMIT = 2 * 1024**3  # one ONNX file holds at most 2 GB; above it weights go to external data
INT8_ACCURACY_TOLERANCE = 0.01  # one point of test accuracy
# int8 fails verification only if it loses more than a point AND a one-sided sign test on the changed
# predictions says the loss is not chance at this level: with 37 test examples one flipped prediction
# is 2.7 points, which proves nothing about the quantized model
INT8_SIGN_TEST_P = 0.05


class ExportVerificationError(RuntimeError):
    """The exported model disagrees with PyTorch; `report` holds every number checked."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- the graph


def io_names(n_layer: int, head: bool = False, in_place: bool = True) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order (`head`: a linear-head classifier's label_logits last;
    `in_place`: the cache is buffers written at past_length, format 2)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    lengths = [runtime.PAST_LENGTH] if in_place else []
    return [*runtime.INPUTS, *lengths, *past], ["logits", *present, *([runtime.LABEL_LOGITS] if head else [])]


class KVBuffer(InPlaceCache):
    """One layer's cache as buffers (B, H, capacity, D): this step's keys and values are written at
    past_length and attention runs over every slot (the mask hides the unwritten ones).

    Exported, it is onnxruntime's fused GroupQueryAttention (com.microsoft): q, k, v (B, T, C) in, no
    transposes, no concatenation; when the runtime binds one OrtValue as both a layer's past and its
    present, the op writes the new keys and values into it in place, so a decoding step copies no cache.
    In eager PyTorch it is the same computation written out (tests hold the two to each other)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, past_length: torch.Tensor, n_head: int):
        self.k, self.v, self.past_length, self.n_head = k, v, past_length, n_head  # (B, H, capacity, D) x 2, (B,)

    def attend(self, q, k, v, mask):
        B, T, C = q.shape
        if torch.compiler.is_exporting():
            seqlens = (self.past_length + T - 1).to(torch.int32)  # (B,) the op's "total length - 1" per row
            total = torch.full((), self.k.shape[2], dtype=torch.int32)  # every slot is a key; the mask hides the unwritten
            y, k_buf, v_buf = torch.onnx.ops.symbolic_multi_out(
                "com.microsoft::GroupQueryAttention",
                [q, k, v, self.k, self.v, seqlens, total, None, None, None, mask],  # no rotary caches, no position ids
                {"num_heads": self.n_head, "kv_num_heads": self.n_head, "causal": 0},  # the prefix-LM mask is the bias
                dtypes=[q.dtype] * 3,
                shapes=[q.shape, self.k.shape, self.v.shape],
                version=1,
            )
            return y, (k_buf, v_buf)
        H, D = self.n_head, C // self.n_head
        slots = (self.past_length[:, None] + torch.arange(T, device=q.device))[:, None, :, None].expand(B, H, T, D)
        k_buf = self.k.scatter(2, slots, k.view(B, T, H, D).transpose(1, 2))  # (B, H, capacity, D)
        v_buf = self.v.scatter(2, slots, v.view(B, T, H, D).transpose(1, 2))  # (B, H, capacity, D)
        y = F.scaled_dot_product_attention(q.view(B, T, H, D).transpose(1, 2), k_buf, v_buf, attn_mask=mask)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, C), (k_buf, v_buf)


class CachedGLM(nn.Module):
    """GLM with its key/value cache flattened into positional tensors: the exported forward.

    in_place (format 2): past_length (B,) then per layer key/value buffers (B, H, capacity, D), returned
    with this call's keys/values written at past_length. Otherwise (format 1) per layer (B, H, P, D)
    pasts and (B, H, P+T, D) presents. With a classification head (glm.heads), the graph also returns
    label_logits (B, T, L): the head on every position's final hidden state."""

    def __init__(self, model: GLM, head: nn.Module | None = None, in_place: bool = True):
        super().__init__()
        self.model, self.head, self.in_place = model, head, in_place

    def forward(self, input_ids, position_ids, block_position_ids, sep, key_start, *past: torch.Tensor):
        if self.in_place:
            past_length, *buffers = past
            n_head = self.model.cfg.n_head
            pairs: list[Any] = [KVBuffer(k, v, past_length, n_head) for k, v in zip(buffers[0::2], buffers[1::2])]
        else:
            pairs = list(zip(past[0::2], past[1::2]))  # per layer (k, v), each (B, H, P, D)
        h, presents = self.model.hidden_states(
            input_ids, position_ids, block_position_ids, sep, past_key_values=pairs, key_start=key_start, use_cache=True
        )  # (B, T, C), per layer the buffers or (B, H, P+T, D)
        label_logits = () if self.head is None else (self.head(h),)  # (B, T, L)
        return (self.model.logits(h), *[t for kv in presents for t in kv], *label_logits)  # logits (B, T, V)


def classifier_io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The classification graph's input and output names, in order."""
    inputs, outputs = io_names(n_layer, in_place=False)
    past = inputs[len(runtime.INPUTS) :]
    return [*runtime.INPUTS, runtime.SELECT_INPUT, *past], [runtime.SELECT_OUTPUT, *outputs[1:]]


class SelectGLM(nn.Module):
    """The classification graph: the final hidden states of the `select_positions` (B, N) only, then
    a linear head's label logits, or log P over the vocabulary of the verbalizer rows `rows` (K,).

    PyTorch's scorer (glm.finetune.score_cloze) projects at the [MASK]/<sop> only; the generation
    graph projects every position onto the whole vocabulary (B x T x V), most of a short text's cost.
    Log-probabilities need the normaliser over all V at a selected position (1/T of that projection);
    only the K verbalizer rows leave the graph. The last block runs its queries, output projection and
    MLP at the selected positions only (glm.model's `rows`). Presents are returned for multi-token scoring."""

    def __init__(self, model: GLM, head: nn.Module | None, rows: Sequence[int] | None):
        super().__init__()
        self.model, self.head = model, head
        self.register_buffer("rows", torch.tensor(list(rows or [0]), dtype=torch.long), persistent=False)

    def forward(self, input_ids, position_ids, block_position_ids, sep, key_start, select_positions, *past: torch.Tensor):
        pairs = list(zip(past[0::2], past[1::2]))  # per layer (k, v), each (B, H, P, D)
        h, presents = self.model.hidden_states(
            input_ids,
            position_ids,
            block_position_ids,
            sep,
            past_key_values=pairs,
            key_start=key_start,
            use_cache=True,
            rows=select_positions,
        )  # (B, N, C): the last block at the selected positions only; per layer (B, H, P+T, D)
        return (select_scores(self.model, self.head, self.rows, h), *[t for kv in presents for t in kv])


def select_scores(model: GLM, head: nn.Module | None, rows: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(B, N, L) head logits or (B, N, K) log P(rows) from the selected positions' hidden states h (B, N, C)."""
    if head is not None:
        return head(h)  # (B, N, L)
    return model.logits(h).log_softmax(-1).index_select(-1, rows)  # (B, N, K)


def classifier_rows(classifier: dict[str, Any] | None, eop: int) -> list[int] | None:
    """The vocabulary rows a verbalizer classifier scores (its answers' tokens, and <eop> when a
    multi-token score includes it), sorted; None for a linear head or no classifier."""
    if classifier is None or classifier.get("head") == "linear":
        return None
    rows = {t for a in classifier["answer_ids"] for t in a}
    if classifier["multi_token"] and classifier.get("score_eop", True):
        rows.add(eop)
    return sorted(rows)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter warns about optional packages (torchvision) and axis renaming: noise here."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _example(cfg, device: Any, select: bool, in_place: bool = False) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Example inputs and dynamic axes. Example sizes >= 2 on every dynamic axis: torch.export
    specialises axes whose example is 0 or 1. in_place: past_length and cache buffers (capacity P+T+2)."""
    B, T, P = 2, 3, 4
    g = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    ids = torch.randint(NUM_SPECIAL, cfg.vocab_size, (B, T), generator=g)  # (B, T)
    pos = torch.arange(T).repeat(B, 1) + P  # (B, T)
    blk = torch.ones_like(pos)  # (B, T)
    sep, key_start = torch.full((B,), P, dtype=torch.long), torch.zeros(B, dtype=torch.long)  # (B,)
    positions = torch.tensor([[0, T - 1]] * B)  # (B, N=2)
    past = tuple(torch.zeros(B, cfg.n_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer))  # (B, H, P, D) each
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    past_len = torch.export.Dim("past", min=0)
    rows = {0: batch, 1: seq}
    dynamic: dict[str, Any] = {
        "input_ids": rows,
        "position_ids": rows,
        "block_position_ids": rows,
        "sep": {0: batch},
        "key_start": {0: batch},
    }
    example: tuple[torch.Tensor, ...] = (ids, pos, blk, sep, key_start)
    if select:
        dynamic["select_positions"] = {0: batch, 1: torch.export.Dim("select", min=1)}
        example += (positions,)
    dynamic["past"] = tuple({0: batch, 2: past_len} for _ in past)
    if in_place:  # CachedGLM's *past is past_length (B,) then the buffers (B, H, capacity, D)
        capacity = torch.export.Dim("capacity", min=1)
        past = (torch.full((B,), P), *(torch.zeros(B, cfg.n_head, P + T + 2, cfg.head_dim) for _ in past))
        dynamic["past"] = ({0: batch}, *({0: batch, 2: capacity} for _ in past[1:]))
    return tuple(t.to(device) for t in (*example, *past)), dynamic


def _export(model: nn.Module, wrapper: nn.Module, path: str | Path, opset: int, select: bool, inputs, outputs) -> Path:
    in_place = getattr(wrapper, "in_place", False)
    example, dynamic = _example(model.cfg, next(model.parameters()).device, select, in_place)
    was_training = model.training
    model.float().eval()
    wrapper.eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                example,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    finally:
        model.train(was_training)
    got_in = [v.name for v in program.model.graph.inputs]
    got_out = [v.name for v in program.model.graph.outputs]
    if got_in != inputs or got_out != outputs:
        raise RuntimeError(f"the exported graph's I/O {got_in} -> {got_out} is not the expected {inputs} -> {outputs}")
    path = Path(path)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(path), external_data=n_bytes >= PROTOBUF_LIMIT - (64 << 20))  # margin for the graph itself
    return path


def export_onnx(model: GLM | GLMClassifier, path: str | Path, opset: int = 20, in_place: bool = True) -> Path:
    """Export `model` (fp32) with torch.onnx.export(dynamo=True) to one ONNX file at `path`.

    A GLMClassifier (linear head) exports its GLM with the head's label_logits as an extra output.
    in_place=False writes the format-1 graph (a concatenated cache), which runtimes still read."""
    model = model.float()
    head = model.head if isinstance(model, GLMClassifier) else None
    inputs, outputs = io_names(model.cfg.n_layer, head is not None, in_place)
    return _export(model, CachedGLM(backbone(model), head, in_place), path, opset, False, inputs, outputs)


def export_classifier_onnx(model: GLM | GLMClassifier, path: str | Path, rows: Sequence[int] | None, opset: int = 20) -> Path:
    """Export the classification graph (SelectGLM): a GLMClassifier's head logits, or log P of the
    vocabulary `rows`, at the positions it is fed (input select_positions (B, N))."""
    model = model.float()
    head = model.head if isinstance(model, GLMClassifier) else None
    inputs, outputs = classifier_io_names(model.cfg.n_layer)
    return _export(model, SelectGLM(backbone(model), head, rows), path, opset, True, inputs, outputs)


# quantize_dynamic settings compared by `python -m benchmarks onnx_profile --variant NAME`; "default" is what export writes
QUANT_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # every op type onnxruntime quantizes dynamically (MatMul, Gather, ...), per-tensor scales
    "matmul": {"op_types_to_quantize": ["MatMul"]},  # the embedding Gather stays fp32
    "matmul-per-channel": {"op_types_to_quantize": ["MatMul"], "per_channel": True},
    "per-channel": {"per_channel": True},
}


def quantize_int8(src: str | Path, dst: str | Path, variant: str = "default") -> Path:
    """Dynamic int8 weights (activations quantized on the fly) after onnxruntime's pre-processing.

    quant_pre_process folds the tied output projection's transpose into a constant first;
    quantizing the raw export leaves a runtime transpose that makes int8 no faster than fp32.
    `variant`: a QUANT_VARIANTS entry (benchmarks compare them; export uses "default").
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    large = src.stat().st_size >= PROTOBUF_LIMIT or any(src.parent.glob(src.name + ".data"))
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(src), str(pre), save_as_external_data=large, all_tensors_to_one_file=True)
        quantize_dynamic(
            str(pre), str(dst), weight_type=QuantType.QInt8, use_external_data_format=large, **QUANT_VARIANTS[variant]
        )
    return dst


# --------------------------------------------------------------------------- verification


def _grid(max_seq_len: int) -> list[tuple[int, int, int]]:
    """(batch, seq, past) shapes covering batch 1-4, seq 1-128, past 0-128 within the model's length."""
    n = min(128, max_seq_len)
    return sorted({(1, 1, 0), (1, n, 0), (2, 1, n), (3, min(17, n), min(64, n)), (4, n, n), (4, 1, 1), (2, min(5, n), 1)})


def _random_inputs(cfg, B: int, T: int, P: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hi = cfg.max_seq_len + 1  # the position tables' rows
    return {
        "input_ids": rng.integers(0, cfg.vocab_size, (B, T)),
        "position_ids": rng.integers(0, hi, (B, T)),
        "block_position_ids": rng.integers(0, hi, (B, T)),
        "sep": rng.integers(0, P + T + 1, B),
        "key_start": rng.integers(0, P + 1, B) * rng.integers(0, 2, B),  # half the rows unpadded
        "past": [rng.standard_normal((B, cfg.n_head, P, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)],
    }


@torch.no_grad()
def _torch_forward(model: GLM | GLMClassifier, x: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    """Logits, presents and (linear head) label logits of every position."""
    t = {k: torch.from_numpy(np.asarray(x[k], np.int64)) for k in runtime.INPUTS}
    P = x["past"][0].shape[2]
    past = None if P == 0 else [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(x["past"][0::2], x["past"][1::2])]
    h, presents = backbone(model).hidden_states(
        t["input_ids"],
        t["position_ids"],
        t["block_position_ids"],
        t["sep"],
        past_key_values=past,
        key_start=t["key_start"],
        use_cache=True,
    )
    label_logits = model.head(h).numpy() if isinstance(model, GLMClassifier) else None  # (B, T, L)
    return backbone(model).logits(h).numpy(), [a.numpy() for kv in presents for a in kv], label_logits


@torch.no_grad()
def _torch_select(model: GLM | GLMClassifier, rows: Sequence[int] | None, x: dict[str, Any], positions: np.ndarray) -> np.ndarray:
    """The classification graph's select_scores (B, N, K or L), computed in PyTorch."""
    t = {k: torch.from_numpy(np.asarray(x[k], np.int64)) for k in runtime.INPUTS}
    P = x["past"][0].shape[2]
    past = None if P == 0 else [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(x["past"][0::2], x["past"][1::2])]
    lm = backbone(model)
    h, _ = lm.hidden_states(
        t["input_ids"], t["position_ids"], t["block_position_ids"], t["sep"], past_key_values=past, key_start=t["key_start"]
    )  # (B, T, C): every position, as the generation graph; the classification graph must agree with it
    h = h.gather(1, torch.from_numpy(positions)[..., None].expand(-1, -1, h.shape[-1]))  # (B, N, C)
    head = model.head if isinstance(model, GLMClassifier) else None
    rows_t = torch.tensor(list(rows or [0]), dtype=torch.long)
    return select_scores(lm, head, rows_t, h).numpy()


def _bundle_forward(bundle: runtime.Bundle, x: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    ints = [x[k] for k in runtime.INPUTS]
    logits, presents = bundle.run(*ints, past=x["past"])
    return logits, presents, bundle.run_label_logits(*ints, past=x["past"]) if bundle.has_head else None


def check_parity(
    model: GLM | GLMClassifier, bundle: runtime.Bundle, shapes: Iterable[tuple[int, int, int]], seed: int = 0
) -> list[dict[str, Any]]:
    """Max abs differences of logits and presents (and a linear head's label logits), bundle vs PyTorch,
    at each (batch, seq, past)."""
    rng = np.random.default_rng(seed)
    rows = []
    for B, T, P in shapes:
        x = _random_inputs(model.cfg, B, T, P, rng)
        ref_logits, ref_presents, ref_labels = _torch_forward(model, x)
        logits, presents, labels = _bundle_forward(bundle, x)
        row = {
            "batch": B,
            "seq": T,
            "past": P,
            "logits_max_abs_diff": float(np.abs(logits - ref_logits).max()),
            "presents_max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(presents, ref_presents)),
            "top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        }
        if ref_labels is not None and labels is not None:
            row["label_logits_max_abs_diff"] = float(np.abs(labels - ref_labels).max())
        if bundle.select_session is not None:  # the classification graph at a few positions of each row
            positions = rng.integers(0, T, (B, min(3, T)))  # (B, N)
            ref = _torch_select(model, bundle.classifier.get("rows"), x, positions)
            ids, pos, blk, sep, key_start = (x[k] for k in runtime.INPUTS)
            got, _ = bundle.run_select(ids, pos, blk, sep, positions, key_start, past=x["past"])
            row["select_scores_max_abs_diff"] = float(np.abs(got - ref).max())
        rows.append(row)
    return rows


def _generation_prompts(model: GLM, tokenizer: Tokenizer | None, seed: int = 0) -> list[list[int]]:
    """Real text with blanks (when a tokenizer is given) and random-id prompts of different lengths."""
    limit = model.cfg.max_seq_len
    prompts = []
    if tokenizer is not None:
        texts = ("The film was [MASK] and the music was [MASK].", "这部电影[MASK]，我很喜欢。", "Once upon a time [gMASK]")
        prompts += [tokenizer.encode(text)[:limit] for text in texts]
    rng = np.random.default_rng(seed)
    top = tokenizer.vocab_size if tokenizer is not None else model.cfg.vocab_size
    for n in (5, 23, min(60, limit)):
        p = rng.integers(NUM_SPECIAL, top, n).tolist()
        for w in rng.choice(n, size=1 + (n > 10), replace=False):
            p[int(w)] = int(rng.choice(special_of(model).mask_ids))
        prompts.append(p)
    return [p for p in prompts if any(t in special_of(model).mask_ids for t in p)]


TIE_FACTOR = 4.0  # an argmax flip needs a margin <= 2 x that step's logit error; twice that for headroom
TIE_FLOOR = 1e-6  # float32 noise on logits of order 1, when the measured error is (near) zero
MAX_LISTED_STEPS = 20  # steps listed per kind in the report (the counts are always complete)


def tie_tolerance(logit_error: float, cap: float | None = None) -> float:
    """The largest reference margin (top choice minus the bundle's choice) accepted as a near-tie.

    Where two runs' logits differ by at most e, their argmaxes can differ only if the reference's
    margin is <= 2e; so a multiple of the measured error, never below TIE_FLOOR. `cap` (the parity
    atol) keeps a badly wrong bundle, whose error is large, from excusing real divergences.
    """
    e = logit_error if cap is None else min(logit_error, cap)
    return max(TIE_FLOOR, TIE_FACTOR * e)


def compare_greedy_steps(
    ref_logits: np.ndarray, got_logits: np.ndarray, tokens: Sequence[int], skip: Sequence[bool], tolerance: float
) -> list[dict[str, Any]]:
    """The steps where the bundle's argmax differs from the reference's greedy choice `tokens`.

    ref_logits, got_logits: (S, V) raw logits of each step, both fed `tokens` (teacher forcing);
    skip: (S,) steps whose choice was forced (a full blank must end). Each step reports the
    reference's margin (logit of its choice minus that of the bundle's), the bundle's own margin,
    the step's max |logit diff|, and near_tie: the margin is within `tolerance`.
    """
    out = []
    got_choice = got_logits.argmax(-1)  # (S,)
    for s, (tok, alt) in enumerate(zip(tokens, got_choice.tolist())):
        if skip[s] or tok == alt:
            continue
        margin = float(ref_logits[s, tok] - ref_logits[s, alt])
        out.append(
            {
                "step": s,
                "reference_token": int(tok),
                "bundle_token": int(alt),
                "margin": margin,
                "bundle_margin": float(got_logits[s, alt] - got_logits[s, tok]),
                "logit_diff": float(np.abs(ref_logits[s] - got_logits[s]).max()),
                "near_tie": margin <= tolerance,
            }
        )
    return out


def _forced_steps(tokens: Sequence[int], max_new_tokens: int, eop: int) -> list[bool]:
    """Steps at which the blank being filled was full, so <eop> was forced rather than chosen."""
    forced, n = [], 0
    for t in tokens:
        forced.append(n >= max_new_tokens)
        n = 0 if t == eop else n + 1
    return forced


def check_greedy(
    model: GLM,
    bundle: runtime.Bundle,
    prompts: list[list[int]],
    max_new_tokens: int,
    logit_error: float = 0.0,
    cap: float | None = None,
) -> dict[str, Any]:
    """Greedy decoding of the bundle against glm.generate, step by step with teacher forcing.

    glm.generate decodes the prompts (batched, and the first one alone); the bundle is fed the
    same tokens and must pick the same argmax at every step, except at near-ties: where the
    reference's margin is within tie_tolerance(max(logit_error, the steps' own error), cap).
    Exact free-running identity is too strict: a tie within float noise flips with the CPU's
    kernels, and every later token follows the flip. Sequence index len(prompts) is prompt 0 alone.
    """
    gen = GenerationConfig(max_new_tokens=max_new_tokens, strategy="greedy", output_scores=True)
    eop = special_of(model).eop
    seqs = []  # (tokens, reference logits (S, V), bundle logits (S, V)) per sequence
    for batch in (prompts, prompts[:1]):
        ref = fill_blanks(model, batch, gen)
        tokens = [[t for span in r.spans for t in [*span, eop]] for r in ref]
        got = bundle.teacher_forced_logits(batch, tokens, max_new_tokens)
        seqs += [(t, r.step_logits.float().numpy(), g) for t, r, g in zip(tokens, ref, got)]
    step_error = max(float(np.abs(r - g).max()) for _, r, g in seqs)
    tol = tie_tolerance(max(logit_error, step_error), cap)
    differing = []
    compared = 0
    for i, (tokens, ref_logits, got_logits) in enumerate(seqs):
        skip = _forced_steps(tokens, max_new_tokens, eop)
        compared += len(tokens) - sum(skip)
        differing += [
            {"prompt": i, "alone": i == len(prompts), **d}
            for d in compare_greedy_steps(ref_logits, got_logits, tokens, skip, tol)
        ]
    ties = [d for d in differing if d["near_tie"]]
    divergent = [d for d in differing if not d["near_tie"]]
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "method": "teacher-forced",
        "passed": not divergent,
        "identical": not differing,  # every step agreed, so free-running decoding gives the same tokens
        "token_agreement": 1.0 - len(differing) / max(compared, 1),
        "steps": compared,
        "mismatched_prompts": sorted({d["prompt"] for d in divergent}),
        "generated_tokens": sum(t != eop for tokens, _, _ in seqs for t in tokens),
        "logits_max_abs_diff": step_error,
        "tie_tolerance": tol,
        "near_tie_count": len(ties),
        "near_ties": ties[:MAX_LISTED_STEPS],
        "divergent_count": len(divergent),
        "divergent_steps": divergent[:MAX_LISTED_STEPS],
    }


def _labelled(verify_data: Any) -> tuple[list[str], list[str | None], list[str]]:
    """texts, text pairs, labels from (text, label) / (text, pair, label) tuples, objects with
    .text/.label(/.text_pair), or a dict of lists {texts, labels[, text_pairs]}."""
    if isinstance(verify_data, dict):
        texts, labels = list(verify_data["texts"]), [str(x) for x in verify_data["labels"]]
        pairs = list(verify_data.get("text_pairs") or [None] * len(texts))
        return texts, pairs, labels
    texts, pairs, labels = [], [], []
    for item in verify_data:
        if hasattr(item, "text") and hasattr(item, "label"):
            texts.append(item.text), pairs.append(getattr(item, "text_pair", None)), labels.append(str(item.label))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            texts.append(item[0]), pairs.append(item[1] if len(item) == 3 else None), labels.append(str(item[-1]))
        else:
            raise ValueError(
                f"verify_data item {item!r}: expected (text, label), (text, text_pair, label) or an object with .text and .label"
            )
    return texts, pairs, labels


def _default_verify_data(checkpoint: Path | None) -> list[tuple[str, str | None, str]] | None:
    """The fine-tuning run's held-out test split (finetune_cloze writes test_predictions.jsonl next to checkpoints/)."""
    if checkpoint is None:
        return None
    for run_dir in (checkpoint.parent.parent, checkpoint.parent):
        f = run_dir / "test_predictions.jsonl"
        if f.is_file():
            rows = [json.loads(line) for line in f.read_text(encoding="utf-8").split("\n") if line.strip()]
            return [(r["text"], r.get("text_pair"), str(r["label"])) for r in rows]
    return None


def _verbalizers_in_label_order(spec: dict[str, Any]) -> dict[str, str]:
    """spec["verbalizers"] in the order of spec["labels"], the list that fixes the label order.

    A JSON object's key order is not reliable: meta.json and config.json files written before
    this fix sorted their keys, which reordered the verbalizers but not the labels list.
    """
    verbalizers = spec["verbalizers"]
    labels = [str(x) for x in spec.get("labels") or verbalizers]
    if sorted(labels) != sorted(verbalizers):
        raise ValueError(
            f"classifier labels {labels} and verbalizer keys {list(verbalizers)} differ; the cloze spec "
            "is corrupt: re-run fine-tuning or pass classifier= with matching labels and verbalizers"
        )
    return {label: verbalizers[label] for label in labels}


def _cloze_task_config(spec: dict[str, Any]) -> ClozeTaskConfig:
    if spec.get("head") == "linear":
        return ClozeTaskConfig(
            name=spec.get("name", "classifier"),
            pattern=spec["pattern"],
            head="linear",
            labels=[str(x) for x in spec["labels"]],
            verbalizers={},
            text_pair_field=spec.get("text_pair_field"),
        )
    return ClozeTaskConfig(
        name=spec.get("name", "classifier"),
        pattern=spec["pattern"],
        verbalizers=_verbalizers_in_label_order(spec),
        multi_token=spec.get("multi_token", False),
        length_normalise=spec.get("length_normalise", False),
        # a spec without the key was fine-tuned when multi-token scores always included <eop>
        score_eop=spec.get("score_eop", True),
        text_pair_field=spec.get("text_pair_field"),
    )


def check_classifier(model: GLM, tokenizer: Tokenizer, bundle: runtime.Bundle, verify_data: Any) -> dict[str, Any]:
    """Test accuracy of the bundle and of PyTorch (glm.finetune.score_cloze) on labelled data."""
    from glm.finetuning.finetune import score_cloze

    spec = bundle.classifier
    texts, pairs, labels = _labelled(verify_data)
    unknown = sorted(set(labels) - set(spec["labels"]))
    if unknown:
        raise ValueError(f"verify_data has labels {unknown} that the classifier does not know (labels: {spec['labels']})")
    truth = np.array([spec["labels"].index(y) for y in labels])
    has_pairs = any(p is not None for p in pairs)
    ref = score_cloze(
        model,
        tokenizer,
        texts,
        _cloze_task_config(spec),
        text_pairs=pairs if has_pairs else None,
        max_seq_len=spec["max_seq_len"],
    )  # (N, L)
    got = bundle.label_scores(texts, pairs if has_pairs else None)  # (N, L)
    ref_right, got_right = ref.argmax(1) == truth, got.argmax(1) == truth  # (N,) each
    return {
        "examples": len(texts),
        "accuracy_pytorch": float(ref_right.mean()),
        "accuracy": float(got_right.mean()),
        "prediction_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "scores_max_abs_diff": float(np.abs(ref - got).max()) if len(texts) else 0.0,
        "became_wrong": int((ref_right & ~got_right).sum()),  # right in PyTorch, wrong in the bundle
        "became_right": int((~ref_right & got_right).sum()),
    }


def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test (McNemar's exact test) on paired predictions: the chance of at least
    `worse` losses among the worse + better changed predictions if a change were as likely to help as
    to hurt. Small p: the quantized model is really worse, not unlucky on a few examples."""
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n if n else 1.0


def verify_bundle(
    bundle_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    cfg: ExportConfig | None = None,
    *,
    model: GLM | GLMClassifier | None = None,
    verify_data: Any = None,
    raise_on_failure: bool = True,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Check a bundle against the PyTorch model it came from; returns the report (see module docstring).

    The model is `model`, else `checkpoint_dir`, else the checkpoint recorded in config.json.
    verify_data (classifier bundles): labelled examples; default: the fine-tuning run's test split.
    """
    cfg = cfg or ExportConfig()
    bundle_dir = Path(bundle_dir)
    fp32 = runtime.Bundle.load(bundle_dir, providers=["CPUExecutionProvider"])
    checkpoint = None
    if model is None:
        checkpoint = resolve_checkpoint(checkpoint_dir or fp32.config["source"]["checkpoint"])
        model, _ = load_finetuned(checkpoint)
    elif checkpoint_dir is not None:
        checkpoint = resolve_checkpoint(checkpoint_dir)
    model = model.float().eval()
    if model.cfg.vocab_size != fp32.vocab_size or model.cfg.n_layer != fp32.n_layer:
        raise ValueError(
            f"the model (vocab {model.cfg.vocab_size}, {model.cfg.n_layer} layers) is not the one this bundle "
            f"was exported from (vocab {fp32.vocab_size}, {fp32.n_layer} layers)"
        )
    if fp32.has_head != isinstance(model, GLMClassifier):
        raise ValueError(
            f"the bundle {'has' if fp32.has_head else 'has no'} linear classification head but the model "
            f"{'has none' if fp32.has_head else 'has one'}; verify it against the checkpoint it was exported from"
        )
    if tokenizer is None:
        kind = fp32.config["tokenizer"].get("kind")
        if kind in runtime.RELEASED_KINDS:  # its vocabulary files travel in the bundle beside tokenizer.json
            from glm.core.released_tokenizer import ReleasedTokenizer

            tokenizer = ReleasedTokenizer(bundle_dir, kind)
        else:
            tokenizer = Tokenizer.load(bundle_dir / fp32.config["files"]["tokenizer"])
    max_new = min(16, model.cfg.max_seq_len - 1)
    prompts = _generation_prompts(model, tokenizer)
    t0 = time.perf_counter()

    parity = check_parity(model, fp32, _grid(model.cfg.max_seq_len))
    report: dict[str, Any] = {"atol": cfg.atol, "fp32": {"parity": parity}}
    report["fp32"]["logits_max_abs_diff"] = max(r["logits_max_abs_diff"] for r in parity)
    report["fp32"]["presents_max_abs_diff"] = max(r["presents_max_abs_diff"] for r in parity)
    if fp32.has_head:
        report["fp32"]["label_logits_max_abs_diff"] = max(r["label_logits_max_abs_diff"] for r in parity)
    if fp32.select_session is not None:
        report["fp32"]["select_scores_max_abs_diff"] = max(r["select_scores_max_abs_diff"] for r in parity)
    lm = backbone(model)
    g = report["fp32"]["greedy"] = check_greedy(lm, fp32, prompts, max_new, report["fp32"]["logits_max_abs_diff"], cfg.atol)
    failures = []
    if report["fp32"]["logits_max_abs_diff"] > cfg.atol or report["fp32"]["presents_max_abs_diff"] > cfg.atol:
        worst = max(parity, key=lambda r: max(r["logits_max_abs_diff"], r["presents_max_abs_diff"]))
        failures.append(
            f"fp32 outputs differ from PyTorch by up to {report['fp32']['logits_max_abs_diff']:.3g} (logits) / "
            f"{report['fp32']['presents_max_abs_diff']:.3g} (presents), above atol={cfg.atol:g}; worst at "
            f"batch={worst['batch']} seq={worst['seq']} past={worst['past']}"
        )
    if report["fp32"].get("label_logits_max_abs_diff", 0.0) > cfg.atol:
        failures.append(
            f"fp32 label logits (linear head) differ from PyTorch by up to {report['fp32']['label_logits_max_abs_diff']:.3g}, "
            f"above atol={cfg.atol:g}"
        )
    if report["fp32"].get("select_scores_max_abs_diff", 0.0) > cfg.atol:
        failures.append(
            f"fp32 classification graph ({fp32.config['files']['classifier']}) scores differ from PyTorch by up to "
            f"{report['fp32']['select_scores_max_abs_diff']:.3g}, above atol={cfg.atol:g}"
        )
    if g["logits_max_abs_diff"] > cfg.atol:
        failures.append(
            f"greedy decoding steps' logits differ from glm.generate by up to {g['logits_max_abs_diff']:.3g}, "
            f"above atol={cfg.atol:g} (the runtime's decoding loop or its cache disagrees with PyTorch)"
        )
    if not g["passed"]:
        worst = max(g["divergent_steps"], key=lambda d: d["margin"])
        failures.append(
            f"greedy generations differ from glm.generate on prompts {g['mismatched_prompts']} at {g['divergent_count']} "
            f"teacher-forced step(s) beyond near-ties (worst: prompt {worst['prompt']} step {worst['step']}, the reference "
            f"prefers token {worst['reference_token']} to {worst['bundle_token']} by {worst['margin']:.3g} > tie tolerance "
            f"{g['tie_tolerance']:.3g}; token agreement {g['token_agreement']:.4f})"
        )

    data = verify_data if verify_data is not None else _default_verify_data(checkpoint)
    if fp32.classifier is not None:
        if data is None:
            report["fp32"]["classifier"] = {
                "skipped": "no labelled data: pass verify_data or keep the fine-tuning run's test_predictions.jsonl"
            }
        else:
            c = report["fp32"]["classifier"] = check_classifier(model, tokenizer, fp32, data)
            if c["accuracy"] != c["accuracy_pytorch"]:
                failures.append(
                    f"classifier test accuracy {c['accuracy']:.4f} differs from PyTorch's {c['accuracy_pytorch']:.4f} "
                    f"({c['examples']} examples)"
                )

    if fp32.config["files"].get("model_int8"):
        int8 = runtime.Bundle.load(bundle_dir, providers=["CPUExecutionProvider"], int8=True, verify_checksums=False)
        files = fp32.config["files"]
        q = report["int8"] = {
            "bytes": (bundle_dir / files["model_int8"]).stat().st_size,
            "fp32_bytes": (bundle_dir / files["model"]).stat().st_size,
        }
        q["size_ratio"] = q["bytes"] / q["fp32_bytes"]
        q["parity"] = check_parity(model, int8, [(1, 1, 0), (2, min(17, model.cfg.max_seq_len), 1)], seed=1)
        q["logits_max_abs_diff"] = max(r["logits_max_abs_diff"] for r in q["parity"])
        if int8.select_session is not None:  # reported, as the int8 logits; the accuracy check below judges it
            q["select_scores_max_abs_diff"] = max(r["select_scores_max_abs_diff"] for r in q["parity"])
        q["greedy"] = check_greedy(lm, int8, prompts, max_new, q["logits_max_abs_diff"])  # reported, never a failure
        if "classifier" in report["fp32"] and "accuracy" in report["fp32"]["classifier"]:
            c = q["classifier"] = check_classifier(model, tokenizer, int8, data)
            c["accuracy_change"] = c["accuracy"] - c["accuracy_pytorch"]
            c["sign_test_p"] = sign_test_p(c["became_wrong"], c["became_right"])
            # a gain never fails; a loss fails when it is over a point and too consistent to be chance
            if -c["accuracy_change"] > INT8_ACCURACY_TOLERANCE + 1e-9 and c["sign_test_p"] < INT8_SIGN_TEST_P:
                failures.append(
                    f"int8 classifier test accuracy {c['accuracy']:.4f} is {-100 * c['accuracy_change']:.1f} points "
                    f"below PyTorch's {c['accuracy_pytorch']:.4f} ({c['examples']} examples: {c['became_wrong']} "
                    f"predictions became wrong, {c['became_right']} right; sign test p={c['sign_test_p']:.2g} < "
                    f"{INT8_SIGN_TEST_P}); set export.quantize_int8: false to ship the fp32 model only"
                )
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["passed"] = not failures
    report["failures"] = failures
    if failures and raise_on_failure:
        raise ExportVerificationError(f"bundle {bundle_dir} failed verification: " + "; ".join(failures), report)
    return report


# --------------------------------------------------------------------------- the bundle


def _classifier_config(spec: dict[str, Any], tokenizer: Tokenizer, max_seq_len: int) -> dict[str, Any]:
    """The fine-tuned spec plus the pattern pre-tokenized exactly as glm.finetune.ClozeTask does."""
    from glm.finetuning.finetune import ClozeTask

    missing = {"pattern", "verbalizers", "labels"} - set(spec)
    if missing:
        raise ValueError(f"classifier spec lacks {sorted(missing)}; pass the dict saved under meta.json's 'finetune' key")
    task = ClozeTask(tokenizer, _cloze_task_config(spec), spec.get("max_seq_len") or max_seq_len)
    if "answer_ids" in spec and [list(a) for a in spec["answer_ids"]] != task.answers:
        raise ValueError(
            "the classifier's verbalizers tokenize differently with this tokenizer than at fine-tuning; "
            "export with the tokenizer the model was fine-tuned with"
        )
    return {
        **{k: v for k, v in spec.items() if k not in ("answer_ids", "scores")},
        "labels": task.labels,
        "verbalizers": dict(task.task.verbalizers),  # in label order
        "answer_ids": task.answers,
        "max_seq_len": task.max_seq_len,
        "multi_token": task.task.multi_token,
        "length_normalise": task.task.length_normalise,
        "score_eop": task.task.score_eop,
        "has_pair": task.has_pair,
        "head": task.task.head,  # linear: the graph's label_logits at the [MASK] are the scores
        # the vocabulary rows the classification graph scores (its select_scores columns); None: linear head
        "rows": classifier_rows(
            {
                "head": task.task.head,
                "answer_ids": task.answers,
                "multi_token": task.task.multi_token,
                "score_eop": task.task.score_eop,
            },
            special_of(tokenizer).eop,
        ),
        "segments": task.segments,  # token-id lists for the pattern's literal text, or "text"/"text_pair"/"mask"
        "text_budget": task.text_budget,  # text tokens kept; longer texts are cut from their end
    }


def _bundle_config(
    model: GLM,
    tokenizer: Tokenizer,
    checkpoint: Path,
    meta: dict[str, Any],
    cfg: ExportConfig,
    classifier: dict[str, Any] | None,
    int8: bool,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    c = model.cfg
    head = isinstance(model, GLMClassifier)
    inputs, outputs = io_names(c.n_layer, head)
    cache = ["batch", c.n_head, "capacity", c.head_dim]
    return {
        "format": runtime.FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "files": {
            "model": MODEL_FILE,
            "model_int8": INT8_FILE if int8 else None,
            "tokenizer": _tokenizer_file(tokenizer)[0],
            # the classification graph (SelectGLM): inputs + select_positions (B, N) -> select_scores
            **({"classifier": CLS_FILE, "classifier_int8": CLS_INT8_FILE if int8 else None} if classifier else {}),
        },
        "model": {
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "head_dim": c.head_dim,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "max_seq_len": c.max_seq_len,
            "rotary_2d": c.rotary_2d,
            "num_params": backbone(model).num_params(),
            "config": c.model_dump(mode="json"),
        },
        "special_tokens": special_of(tokenizer).as_dict(),
        "special_pieces": _special_pieces(tokenizer),
        "tokenizer": {
            "vocab_size": tokenizer.vocab_size,
            "sha256": tokenizer.sha256,
            "byte_fallback": tokenizer.byte_fallback,
            # how literal "[MASK]", "<sop>"... in user text are spelled as plain pieces (glm.tokenizer)
            "literal_ids": {str(i): ids for i, ids in tokenizer.literal_ids().items()},
            # a released GLM's tokenizer (glm.released_tokenizer): its family and command tokens [text, id, lstrip]
            **({"kind": tokenizer.kind, "commands": tokenizer.commands_json()} if _released(tokenizer) else {}),
        },
        "io": {
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                {"name": "block_position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                {"name": "sep", "dtype": "int64", "shape": ["batch"], "doc": "Part A length (absolute, past included)"},
                {
                    "name": "key_start",
                    "dtype": "int64",
                    "shape": ["batch"],
                    "doc": "first visible key (left padding); 0 if unpadded",
                },
                {
                    "name": runtime.PAST_LENGTH,
                    "dtype": "int64",
                    "shape": ["batch"],
                    "doc": "cache slots already written; this call writes slots past_length .. past_length + seq - 1",
                },
                *(
                    {
                        "name": n,
                        "dtype": "float32",
                        "shape": cache,
                        "doc": "the cache buffer: bind the same memory as its present",
                    }
                    for n in inputs[len(runtime.INPUTS) + 1 :]
                ),
            ],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", c.vocab_size]},
                *(
                    {"name": n, "dtype": "float32", "shape": cache, "doc": "the buffer with this call's keys/values written"}
                    for n in outputs[1 : 1 + 2 * c.n_layer]
                ),
                *(
                    [
                        {
                            "name": runtime.LABEL_LOGITS,
                            "dtype": "float32",
                            "shape": ["batch", "seq", len(classifier["labels"]) if classifier else None],
                            "doc": "the linear classification head on each position's final hidden state",
                        }
                    ]
                    if head
                    else []
                ),
            ],
            "attention": "key j is visible to query i iff (j < sep or j <= i) and j >= key_start (absolute positions)",
        },
        "classifier": classifier,
        "source": {
            "checkpoint": str(checkpoint.resolve()),
            "step": meta.get("step"),
            "checkpoint_code_version": meta.get("code_version"),
            "selection": selection,  # which fine-tuned run this is and why it was chosen (None: exported directly)
        },
        "export": cfg.model_dump(mode="json"),
    }


def _released(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "released", False))


def _tokenizer_file(tokenizer: Any) -> tuple[str, bytes]:
    """The bundle's tokenizer file: the pipeline's tokenizer.model, or a released GLM's (tokenizer.json / .model)."""
    return tokenizer.bundle_file() if _released(tokenizer) else (TOKENIZER_FILE, tokenizer.model_proto)


def _special_pieces(tokenizer: Any) -> dict[str, str]:
    if not _released(tokenizer):
        return PIECES
    return {name: tokenizer.id_to_piece(i) for name, i in tokenizer.special.as_dict().items()}


def write_sha256sums(directory: str | Path) -> Path:
    """SHA256SUMS over every other regular file of `directory`, sorted, in `sha256sum` format."""
    directory = Path(directory)
    names = sorted(
        p.name for p in directory.iterdir() if p.is_file() and p.name != runtime.SUMS_FILE and not p.name.startswith(".")
    )
    return atomic_write_text(directory / runtime.SUMS_FILE, "".join(f"{sha256_file(directory / n)}  {n}\n" for n in names))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        remove_tree(old, inside=final.parent, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        remove_tree(old, inside=final.parent, ignore_errors=True)


def export_bundle(
    checkpoint_dir: str | Path,
    tokenizer_model_path: str | Path,
    out_dir: str | Path,
    cfg: ExportConfig | None = None,
    *,
    classifier: dict[str, Any] | None = None,
    verify_data: Any = None,
    selection: dict[str, Any] | None = None,
) -> Path:
    """Export a pretrained or fine-tuned checkpoint into a verified bundle at `out_dir`; returns out_dir.

    checkpoint_dir: a step directory or a run / checkpoints directory (its latest valid step).
    classifier: a cloze spec (pattern, verbalizers, labels...); default: the one a fine-tuned
    checkpoint carries in meta.json ("finetune", kind "cloze"), if any.
    verify_data: labelled examples for the classifier accuracy check (default: the run's test split).
    selection: why this checkpoint was chosen (glm.stages.choose_export), kept as config.json's source.selection.
    Raises ExportVerificationError (and leaves out_dir untouched) if the bundle disagrees with PyTorch.
    """
    cfg = cfg or ExportConfig()
    checkpoint = resolve_checkpoint(checkpoint_dir)
    meta = read_meta(checkpoint)
    model, model_cfg = load_finetuned(checkpoint)
    tokenizer = load_tokenizer(tokenizer_model_path)
    if special_of(tokenizer) != special_of(model_cfg):
        raise ValueError(
            f"tokenizer {tokenizer_model_path} has special ids {special_of(tokenizer).as_dict()} but the model was trained "
            f"with {special_of(model_cfg).as_dict()}; pass the tokenizer the model was trained with"
        )
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_model_path} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
            f"{model_cfg.vocab_size}: they were not trained together; pass the run's tokenizer/tokenizer.model"
        )
    spec = classifier
    if spec is None and (meta.get("finetune") or {}).get("kind") == "cloze":
        spec = meta["finetune"]
    classifier_cfg = _classifier_config(spec, tokenizer, model_cfg.max_seq_len) if spec is not None else None
    if isinstance(model, GLMClassifier) != ((classifier_cfg or {}).get("head") == "linear"):
        raise ValueError(
            f"classifier head {(classifier_cfg or {}).get('head')!r} does not match {checkpoint}, which "
            f"{'holds' if isinstance(model, GLMClassifier) else 'holds no'} linear head; export with classifier=None "
            "(the spec the checkpoint was fine-tuned with)"
        )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the shipped bundle owner-only
    try:
        t0 = time.perf_counter()
        export_onnx(model, tmp / MODEL_FILE, cfg.opset)
        if classifier_cfg is not None:
            export_classifier_onnx(model, tmp / CLS_FILE, classifier_cfg["rows"], cfg.opset)
        export_seconds = time.perf_counter() - t0
        if cfg.quantize_int8:
            quantize_int8(tmp / MODEL_FILE, tmp / INT8_FILE)
            if classifier_cfg is not None:
                quantize_int8(tmp / CLS_FILE, tmp / CLS_INT8_FILE)
        name, data = _tokenizer_file(tokenizer)
        atomic_write_bytes(tmp / name, data)
        if _released(tokenizer):  # the vocabulary files as released too: glm.released_tokenizer reloads them
            for extra, blob in tokenizer.files().items():
                atomic_write_bytes(tmp / extra, blob)
        config = _bundle_config(model, tokenizer, checkpoint, meta, cfg, classifier_cfg, cfg.quantize_int8, selection)
        write_json_in_order(tmp / runtime.CONFIG_FILE, config)  # the classifier's verbalizers stay in label order
        write_sha256sums(tmp)  # the runtime refuses a bundle without checksums, verification included
        if cfg.verify:
            report = verify_bundle(tmp, checkpoint, cfg, model=model, verify_data=verify_data, tokenizer=tokenizer)
        else:
            report = {"passed": None, "skipped": "export.verify is false"}
        report["export_seconds"] = round(export_seconds, 2)
        report["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / REPORT_FILE, report)
        write_sha256sums(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        remove_tree(tmp, inside=out_dir.parent, ignore_errors=True)
    log.info("exported %s -> %s (%s)", checkpoint, out_dir, "verified" if cfg.verify else "not verified")
    return out_dir
