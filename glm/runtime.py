"""Run an exported GLM bundle with numpy, onnxruntime and sentencepiece only (and `tokenizers` for
a bundle of a released WordPiece / BPE GLM).

Apps install it as the `glm-runtime` distribution (runtime/pyproject.toml builds a wheel from this
very file, as the module `glm_runtime`), or copy this file on its own: it imports nothing from
`glm` or torch, and reads every id it needs (special tokens, the classifier's pattern
pieces) from the bundle's config.json. A bundle is a directory written by
`glm.export.export_bundle`:

    model.onnx  [model.int8.onnx]  tokenizer.model  config.json  verification.json  SHA256SUMS

The ONNX graph takes input_ids, position_ids, block_position_ids (B, T), sep, key_start (B,)
and past_key_values.{i}.key/value (B, H, P, D); it returns logits (B, T, V) and
present.{i}.key/value (B, H, P+T, D). P=0 is the prompt pass; each decoding step feeds the
previous presents back as the past. key_start hides left padding (0 = no padding). A classifier
fine-tuned with a linear head (config.json classifier.head "linear") also returns label_logits
(B, T, n_labels), read at each text's [MASK]; a verbalizer classifier scores its words' log-probabilities.
A classifier bundle exported since the classification graph also holds model.cls.onnx (config.json
files.classifier): it projects only at the positions fed as select_positions (B, N) and returns only
the verbalizer rows' log-probabilities (or the head's logits); classify/label_scores use it.

Decoding follows glm.generate (docs/method.md section 6): Part A runs once, each blank's span is
decoded from <sop> at the blank's position id with block positions 1, 2, ...; <eop> moves to
the next blank. Greedy decoding follows glm.generate.fill_blanks: export verification feeds both
the same tokens (teacher_forced_logits) and requires the same choice at every step, except where
the two best logits are within float noise (a CPU's kernels can flip such near-ties).
Sampling uses numpy's generator, so seeded draws are reproducible here but differ from
torch's. Prompts longer than the model's max_seq_len are an error (fill_blanks, generate);
classifier inputs are truncated from the end of the text, as in fine-tuning.

Over 600 lines on purpose: this one file is the whole installable runtime (the wheel is built from it,
and apps may copy it alone), so its tokenizers, decoding, classification and batch command cannot
be split into modules without making the copy-one-file promise false.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import sentencepiece as spm
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

__version__ = "1.2.0"  # the glm-runtime distribution's version (runtime/pyproject.toml reads it)
FORMAT = "glm-onnx-bundle"
# the newest bundle format this runtime reads; glm.export writes it into config.json. 2: the generation
# graph's cache is per-layer buffers written in place at past_length (1: pasts concatenated onto; still read)
FORMAT_VERSION = 2
IN_PLACE_FROM = 2  # the first format whose generation graph takes past_length and cache buffers
# format 2's GroupQueryAttention with causal=0 (the prefix-LM mask is its attention_bias): onnxruntime 1.29
# rejects the attribute ("Unrecognized attribute"), 1.30 runs it (both measured)
ONNXRUNTIME_FOR_IN_PLACE = (1, 30)
CONFIG_FILE = "config.json"
SUMS_FILE = "SHA256SUMS"
CURRENT = "current"  # in a run's export/: the symlink to the version apps should load (glm.bundles)
INPUTS = ("input_ids", "position_ids", "block_position_ids", "sep", "key_start")
PAST_LENGTH = "past_length"  # format 2: (B,) cache slots already written; this call writes the next T
GENERATION_BUNDLE = "generation/bundle"  # where a run keeps its pretrained model's bundle, relative to the run directory
LABEL_LOGITS = "label_logits"  # the extra output of a linear-head classifier's graph (B, T, n_labels)
HEADS = ("verbalizer", "linear")
# the classification graph (files.classifier): the generation graph's inputs plus select_positions (B, N);
# select_scores (B, N, K) = log P of the vocabulary rows classifier.rows there (linear head: label logits (B, N, L))
SELECT_INPUT = "select_positions"
SELECT_OUTPUT = "select_scores"


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, corrupt, or made for a newer runtime."""


# --------------------------------------------------------------------------- checksums


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_sha256sums(path: str | Path) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum`-format file ("HEX  NAME" or "HEX *NAME" per line)."""
    sums = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if m is None:
            raise BundleError(f"{path} line {n} is not 'SHA256  NAME': {line!r}; the bundle is corrupt, re-export it")
        sums[m.group(2)] = m.group(1).lower()
    return sums


def bundle_file(path: str | Path, name: Any, where: str) -> Path:
    """`path / name` if `name` is a relative file name that stays inside the bundle directory.

    Checked before anything is opened: a config.json or SHA256SUMS naming "../x", "/etc/passwd"
    or a symlink out of the bundle would otherwise make the loader read files outside it.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise BundleError(f"{where} must be a file name inside the bundle, got {name!r}; re-export the bundle")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise BundleError(
            f"{where} is {name!r}, outside the bundle (absolute or '..'); bundle files must be relative "
            "names inside the bundle directory: re-export the bundle"
        )
    root = Path(path).resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root) or target == root:
        raise BundleError(
            f"{where} is {name!r}, which resolves to {target}, outside the bundle {root} (a symlink?); "
            "copy the real files into the bundle directory or re-export it"
        )
    return Path(path) / name


def check_bundle_files(path: str | Path, required: Sequence[str] = ()) -> None:
    """Raise BundleError unless every file SHA256SUMS lists (and every `required` one) is present and intact."""
    path = Path(path)
    sums_path = bundle_file(path, SUMS_FILE, f"bundle {path}: {SUMS_FILE}")
    if not sums_path.is_file():
        raise BundleError(f"bundle {path} has no {SUMS_FILE}; it is incomplete: re-export it")
    sums = read_sha256sums(sums_path)
    for n, name in enumerate(sums, 1):
        bundle_file(path, name, f"{sums_path} entry {n}")
    for name in required:
        if name not in sums:
            raise BundleError(f"bundle {path}: {name} is not listed in {SUMS_FILE}; the bundle is corrupt, re-export it")
    for name, want in sums.items():
        f = path / name
        if not f.is_file():
            raise BundleError(
                f"bundle {path} is missing {name} (listed in {SUMS_FILE}); copy the whole bundle directory or re-export it"
            )
        if sha256_file(f) != want:
            raise BundleError(
                f"bundle {path}: {name} does not match its checksum in {SUMS_FILE} (corrupt or modified); re-export it"
            )


# --------------------------------------------------------------------------- released GLM tokenizers


RELEASED_KINDS = ("wordpiece", "roberta", "gpt2", "sp")  # the THUDM GLM families (glm.released_tokenizer)


class CommandTokenizer:
    """A released GLM's tokenizer the reference's way: text is cut at command-token strings ("[MASK]",
    "<|startofpiece|>", ...; whitespace before an lstrip one is dropped), each piece encoded on its own.

    `backend` is a sentencepiece processor (kind "sp") or an HF `tokenizers.Tokenizer` (WordPiece,
    byte-level BPE); `commands` lists (text, id, lstrip). Shared by glm.released_tokenizer and bundles.
    """

    def __init__(self, kind: str, backend: Any, commands: Sequence[tuple[str, int, bool]], size: int):
        self.kind, self.backend, self.size = kind, backend, size
        self.by_text = {text: (i, lstrip) for text, i, lstrip in commands}
        self.by_id = {i: text for text, i, _ in commands}
        texts = sorted(self.by_text, key=len, reverse=True)  # longest first: no command cut by one it contains
        self.split = re.compile("(" + "|".join(re.escape(t) for t in texts) + ")")

    @classmethod
    def from_file(cls, kind: str, path: Path, commands: Sequence[Sequence[Any]], size: int) -> "CommandTokenizer":
        """From a bundle's tokenizer file: a sentencepiece model, or an HF tokenizer.json (needs `tokenizers`)."""
        if kind == "sp":
            backend: Any = spm.SentencePieceProcessor()
            backend.LoadFromSerializedProto(path.read_bytes())
        else:
            from tokenizers import Tokenizer as HFTokenizer  # only bundles of released BPE/WordPiece GLMs need it

            backend = HFTokenizer.from_file(str(path))
        return cls(kind, backend, [(str(t), int(i), bool(ls)) for t, i, ls in commands], size)

    def encode_text(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids as plain text (command strings included)."""
        if not texts:
            return []
        if self.kind == "sp":
            return self.backend.encode(texts, out_type=int)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt: command strings become their ids."""
        if not text.strip():
            return []
        parts = self.split.split(text)
        segs: list[str | int] = []
        for k, part in enumerate(parts):
            if k % 2:
                segs.append(self.by_text[part][0])
                continue
            if k + 1 < len(parts) and self.by_text[parts[k + 1]][1]:
                part = part.rstrip()
            if part:
                segs.append(part)
        encoded = iter(self.encode_text([x for x in segs if isinstance(x, str)]))
        ids: list[int] = []
        for x in segs:
            ids.extend([x] if isinstance(x, int) else next(encoded))
        return ids

    def decode(self, ids: Sequence[int], keep: Sequence[int] = ()) -> str:
        """Text of ids; command ids decode to nothing except those in `keep` (the blanks), written as their text."""
        out, run = [], []
        for i in map(int, ids):
            if i in self.by_id or not 0 <= i < self.size:
                if run:
                    out.append(self._decode_run(run))
                    run = []
                if i in keep:
                    out.append(self.by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_run(run))
        return (" " if self.kind == "wordpiece" else "").join(p for p in out if p)

    def _decode_run(self, ids: list[int]) -> str:
        if self.kind == "sp":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------- config.json schema

# What the runtime reads from config.json: {field: type or nested schema}; "?" after a type: may be null.
_POS_INT, _INT, _BOOL, _STR, _LIST, _DICT = "positive integer", "integer", "boolean", "string", "list", "object"
CONFIG_SCHEMA: dict[str, Any] = {
    "format": _STR,
    "format_version": _POS_INT,
    "files": {"model": _STR, "model_int8": _STR + "?", "tokenizer": _STR},
    "model": {"n_layer": _POS_INT, "n_head": _POS_INT, "head_dim": _POS_INT, "vocab_size": _POS_INT, "max_seq_len": _POS_INT},
    "special_tokens": {k: _INT for k in ("pad", "mask", "smask", "gmask", "sop", "eop")},
    "tokenizer": {"literal_ids": _DICT},
    "classifier": _DICT + "?",
}
CLASSIFIER_SCHEMA: dict[str, Any] = {
    "labels": _LIST,
    "answer_ids": _LIST,
    "segments": _LIST,
    "text_budget": _POS_INT,
    "multi_token": _BOOL,
    "length_normalise": _BOOL,
    "has_pair": _BOOL,
}
_KINDS = {
    _POS_INT: lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    _INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    _BOOL: lambda v: isinstance(v, bool),
    _STR: lambda v: isinstance(v, str),
    _LIST: lambda v: isinstance(v, list),
    _DICT: lambda v: isinstance(v, dict),
}


def _check_fields(node: Any, schema: dict[str, Any], where: str, prefix: str = "") -> None:
    """BundleError naming the first field of `node` that is missing or of the wrong type."""
    if not isinstance(node, dict):
        what = f"field {prefix[:-1]!r}" if prefix else "the top level"
        raise BundleError(
            f"{where}: {what} must be a JSON object, got {type(node).__name__}; "
            "the bundle config is corrupt: re-export the bundle"
        )
    for key, kind in schema.items():
        name = prefix + key
        if key not in node:
            raise BundleError(f"{where} lacks field {name!r}; the bundle config is incomplete: re-export the bundle")
        value = node[key]
        if isinstance(kind, dict):
            _check_fields(value, kind, where, name + ".")
        elif not (kind.endswith("?") and value is None or _KINDS[kind.rstrip("?")](value)):
            raise BundleError(
                f"{where}: field {name!r} must be a {kind.rstrip('?')}{' or null' if kind.endswith('?') else ''}, "
                f"got {value!r}; the bundle config is corrupt: re-export the bundle"
            )


def _is_ids(x: Any, limit: int) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limit for t in x)


def check_config(config: Any, where: str) -> None:
    """Validate config.json's fields that the runtime uses (types, ranges, cross-references)."""
    _check_fields(config, CONFIG_SCHEMA, where)
    vocab = config["model"]["vocab_size"]
    for key, value in config["special_tokens"].items():
        if key in CONFIG_SCHEMA["special_tokens"] and not 0 <= value < vocab:
            raise BundleError(
                f"{where}: field 'special_tokens.{key}' is {value}, outside the vocabulary [0, {vocab}); re-export the bundle"
            )
    for key, ids in config["tokenizer"]["literal_ids"].items():
        if not key.isdigit() or not _is_ids(ids, vocab):
            raise BundleError(
                f"{where}: field 'tokenizer.literal_ids' maps {key!r} to {ids!r}, not token ids; re-export the bundle"
            )
    c = config["classifier"]
    if c is None:
        return
    _check_fields(c, CLASSIFIER_SCHEMA, where, "classifier.")
    head = c.get("head", "verbalizer")  # bundles from before the linear head have no field
    if head not in HEADS:
        raise BundleError(f"{where}: field 'classifier.head' is {head!r}, not one of {list(HEADS)}; re-export the bundle")
    if head == "linear":
        if not c["labels"] or c["answer_ids"] or not all(isinstance(x, str) for x in c["labels"]):
            raise BundleError(
                f"{where}: a linear-head classifier needs string 'classifier.labels' ({c['labels']!r}) and no "
                "'classifier.answer_ids'; re-export the bundle"
            )
    elif not c["labels"] or len(c["labels"]) != len(c["answer_ids"]) or not all(isinstance(x, str) for x in c["labels"]):
        raise BundleError(
            f"{where}: 'classifier.labels' ({c['labels']!r}) needs one string per 'classifier.answer_ids' entry "
            f"({len(c['answer_ids'])}); re-export the bundle"
        )
    if (
        not all(_is_ids(a, vocab) and a for a in c["answer_ids"])
        or not c["multi_token"]
        and any(len(a) != 1 for a in c["answer_ids"])
    ):
        raise BundleError(
            f"{where}: 'classifier.answer_ids' must hold non-empty token-id lists within the vocabulary "
            "(one id each unless multi_token); re-export the bundle"
        )
    rows = c.get("rows")
    if rows is not None and (
        not _is_ids(rows, vocab) or not {t for a in c["answer_ids"] for t in a} <= set(rows) or len(set(rows)) != len(rows)
    ):
        raise BundleError(
            f"{where}: field 'classifier.rows' must list distinct token ids holding every answer id, got {rows!r}; "
            "re-export the bundle"
        )
    segments = c["segments"]
    if segments.count("mask") != 1 or not all(s in ("text", "text_pair", "mask") or _is_ids(s, vocab) for s in segments):
        raise BundleError(
            f"{where}: 'classifier.segments' must be token-id lists and 'text'/'text_pair' slots around "
            "exactly one 'mask'; re-export the bundle"
        )


def _graph_io(
    n_layer: int, n_head: int, head_dim: int, vocab_size: int, n_labels: int | None = None, in_place: bool = False
) -> tuple[list[tuple], list[tuple]]:
    """(name, onnx type, shape with None for dynamic axes) of the graph's inputs and outputs
    (n_labels: a linear-head classifier, whose graph adds label_logits; in_place: format 2's past_length)."""
    cache = ("tensor(float)", [None, n_head, None, head_dim])
    names = [*INPUTS, *([PAST_LENGTH] if in_place else [])]
    inputs = [(n, "tensor(int64)", [None] * (2 if n.endswith("ids") else 1)) for n in names]
    inputs += [(f"past_key_values.{i}.{kv}", *cache) for i in range(n_layer) for kv in ("key", "value")]
    outputs = [("logits", "tensor(float)", [None, None, vocab_size])]
    outputs += [(f"present.{i}.{kv}", *cache) for i in range(n_layer) for kv in ("key", "value")]
    if n_labels is not None:
        outputs.append((LABEL_LOGITS, "tensor(float)", [None, None, n_labels]))
    return inputs, outputs


def _select_graph_io(config: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(name, onnx type, shape) of the classification graph's inputs and outputs."""
    m, c = config["model"], config["classifier"]
    inputs, outputs = _graph_io(m["n_layer"], m["n_head"], m["head_dim"], m["vocab_size"])
    width = len(c["labels"]) if c.get("head") == "linear" else len(c.get("rows") or ())
    n = len(INPUTS)
    inputs = [*inputs[:n], (SELECT_INPUT, "tensor(int64)", [None, None]), *inputs[n:]]
    return inputs, [(SELECT_OUTPUT, "tensor(float)", [None, None, width]), *outputs[1:]]


def check_graph(session: Any, config: dict[str, Any], model_path: Path, select: bool = False) -> None:
    """The ONNX graph's inputs and outputs (names, past count, dtypes, ranks, fixed sizes) match config.json
    (select: the classification graph)."""
    m = config["model"]
    c = config["classifier"]
    n_labels = len(c["labels"]) if c is not None and c.get("head") == "linear" else None
    want_in, want_out = _graph_io(m["n_layer"], m["n_head"], m["head_dim"], m["vocab_size"], n_labels, _in_place(config))
    if select:
        want_in, want_out = _select_graph_io(config)
    for kind, want, got in (("inputs", want_in, session.get_inputs()), ("outputs", want_out, session.get_outputs())):
        have = {a.name: a for a in got}
        missing = [n for n, _, _ in want if n not in have]
        extra = sorted(set(have) - {n for n, _, _ in want})
        if missing or extra:
            n_past = sum(n.startswith(("past_key_values.", "present.")) for n in have) // 2
            raise BundleError(
                f"{model_path}: the graph's {kind} do not match config.json (model.n_layer={m['n_layer']}); missing "
                f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{'...' if len(extra) > 4 else ''} "
                f"(the graph has {n_past} cache layers); config.json and the model come from different exports: re-export the bundle"
            )
        for name, dtype, shape in want:
            a = have[name]
            fixed = [d if isinstance(d, int) else None for d in a.shape]
            if (
                a.type != dtype
                or len(a.shape) != len(shape)
                or any(w is not None and f not in (w, None) for w, f in zip(shape, fixed))
            ):
                raise BundleError(
                    f"{model_path}: graph {kind[:-1]} {name!r} is {a.type} {a.shape}, but config.json implies {dtype} of rank "
                    f"{len(shape)} with sizes {['*' if w is None else w for w in shape]}; re-export the bundle"
                )


def _in_place(config: dict[str, Any]) -> bool:
    """Whether the bundle's generation graph updates its cache in place (format 2 and later)."""
    return config.get("format_version", 1) >= IN_PLACE_FROM


def onnxruntime_too_old(config: dict[str, Any], version: str = ort.__version__) -> str | None:
    """Why this onnxruntime cannot run the bundle's graphs (one line with the fix), or None."""
    have = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if _in_place(config) and have < ONNXRUNTIME_FOR_IN_PLACE:
        need = ".".join(map(str, ONNXRUNTIME_FOR_IN_PLACE))
        return (
            f"bundle format {config['format_version']} needs onnxruntime >= {need} (GroupQueryAttention with "
            f"causal=0), this is onnxruntime {version}: pip install -U 'onnxruntime>={need}' (or onnxruntime-gpu)"
        )
    return None


@dataclass
class DecodeCache:
    """A batch's decoding cache, bound to the generation graph once (format 2): every layer's key and
    value buffer (B, H, capacity, D) is bound as both its past and its present, so onnxruntime's fused
    attention writes each call's keys/values into it at `length` and nothing is copied between steps."""

    binding: Any  # onnxruntime IOBinding: logits first, then the buffers
    buffers: list[Any]  # OrtValues on the bundle's device
    capacity: int
    length: int = 0  # slots written


# --------------------------------------------------------------------------- results


@dataclass
class FillResult:
    text: str  # the prompt with every blank filled
    spans: list[str]  # the text generated for each blank, in order
    span_ids: list[list[int]] = field(repr=False)  # their token ids (<eop> excluded)

    def __str__(self) -> str:
        return self.text


@dataclass
class Classification:
    label: str
    probabilities: dict[str, float]  # softmax of the scores over the labels
    scores: list[float] = field(repr=False)  # log P(verbalizer) (linear head: its logit) per label, in label order


# --------------------------------------------------------------------------- the bundle


def _session(model: Path, providers: Sequence[str] | None, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if providers is not None:
        return ort.InferenceSession(str(model), options, providers=list(providers))
    try_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if try_cuda else ["CPUExecutionProvider"]
    if try_cuda:
        # a GPU build on a machine without CUDA logs a loud load failure, then falls back to CPU;
        # which provider really loaded is read from the session (Bundle.device), never assumed
        ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(str(model), options, providers=wanted)
    finally:
        if try_cuda:
            ort.set_default_logger_severity(2)  # onnxruntime's default: warnings


class Bundle:
    """An exported GLM: tokenizer, ONNX session and the config needed to drive them."""

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        session: ort.InferenceSession,
        tokenizer: Any,  # spm.SentencePieceProcessor, or a CommandTokenizer for a released GLM
        model_path: Path | None = None,
        select_session: ort.InferenceSession | None = None,
    ):
        self.path, self.config, self.session, self.tokenizer = path, config, session, tokenizer
        self.select_session = select_session  # the classification graph, if the bundle has one
        self.requested = path  # what the caller named (a symlink such as export/current): changed() re-resolves it
        self.load_options: dict[str, Any] = {}
        self.model_path = model_path or path / config["files"]["model"]
        m = config["model"]
        self.n_layer, self.n_head, self.head_dim = m["n_layer"], m["n_head"], m["head_dim"]
        self.vocab_size, self.max_seq_len = m["vocab_size"], m["max_seq_len"]
        self.special: dict[str, int] = config["special_tokens"]
        self.mask_ids = {self.special[k] for k in ("mask", "smask", "gmask")}
        self.literal_ids = {int(k): v for k, v in config["tokenizer"]["literal_ids"].items()}
        self.classifier: dict[str, Any] | None = config.get("classifier")
        self.has_head = self.classifier is not None and self.classifier.get("head") == "linear"
        rows = (self.classifier or {}).get("rows") or []
        self.row_column = {t: j for j, t in enumerate(rows)}  # token id -> its column of select_scores
        self.past_names = [n for i in range(self.n_layer) for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")]
        self.present_names = [n for i in range(self.n_layer) for n in (f"present.{i}.key", f"present.{i}.value")]
        # presents stay on the device that computed them (io binding); only logits come back to the host
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.in_place = _in_place(config)  # format 2: the generation graph's cache is buffers written in place
        # format 2's cache is read and written by GroupQueryAttention alone, and onnxruntime's CUDA kernel of it
        # takes fp16/bf16 only: on a GPU the fp32 op runs on the CPU provider, so its buffers live in host memory
        self.cache_device = "cpu" if self.in_place else self.device

    @classmethod
    def load(
        cls,
        path: str | Path,
        providers: Sequence[str] | None = None,
        int8: bool = False,
        threads: int | None = None,
        verify_checksums: bool = True,
    ) -> "Bundle":
        """Open a bundle directory. providers=None: CUDA if it really loads, else CPU. int8: the quantized model.

        `path` may be a bundle directory, a symlink to one (a run's export/current or export/bundle), or a
        run's export directory (its `current` is loaded). A symlink is resolved once, first, and every file
        is read from that one version directory, so a promotion or rollback that switches `current` while
        this loads gives the old or the new bundle, never a mix; `changed()` later tells that it moved.
        """
        requested = Path(path)
        if (requested / CURRENT).exists() and not (requested / CONFIG_FILE).exists():
            requested = requested / CURRENT  # a run's export/ directory: its current version
        for attempt in range(3):
            path = requested.resolve()
            try:
                bundle = cls._load(path, providers, int8, threads, verify_checksums)
            except (BundleError, OSError):
                if attempt < 2 and requested.resolve() != path:  # current moved (and the old version was pruned) mid-load
                    continue
                raise
            bundle.requested = requested
            bundle.load_options = dict(providers=providers, int8=int8, threads=threads, verify_checksums=verify_checksums)
            return bundle
        raise AssertionError("unreachable")

    def changed(self) -> bool:
        """True when the path this bundle was loaded from (e.g. export/current) now resolves to another
        directory: a new version was promoted, or rolled back. A long-running app polls it and reloads."""
        try:
            return self.requested.resolve() != self.path
        except OSError:
            return False

    def reload_if_changed(self, **load_options: Any) -> "Bundle":
        """A newly loaded Bundle (with the same load options, unless given) if `current` moved, else this one."""
        return Bundle.load(self.requested, **(self.load_options | load_options)) if self.changed() else self

    @property
    def version(self) -> str:
        """The bundle's version (export/versions/NAME), or its directory's name."""
        return self.path.name

    @classmethod
    def _load(
        cls, path: Path, providers: Sequence[str] | None, int8: bool, threads: int | None, verify_checksums: bool
    ) -> "Bundle":
        if not path.is_dir():
            raise BundleError(f"bundle directory {path} does not exist; export one with glm.export.export_bundle")
        config_path = bundle_file(path, CONFIG_FILE, f"bundle {path}: {CONFIG_FILE}")
        if not config_path.is_file():
            raise BundleError(f"bundle {path} is missing {CONFIG_FILE}; copy the whole bundle directory or re-export it")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{config_path} is not valid JSON ({e}); the bundle is corrupt, re-export it") from None
        if not isinstance(config, dict):
            raise BundleError(
                f"{config_path} holds a JSON {type(config).__name__}, not a GLM bundle config (an object with "
                f"format {FORMAT!r}); the bundle is corrupt, re-export it"
            )
        if config.get("format") != FORMAT:
            raise BundleError(f"{config_path} is not a GLM bundle config (format {config.get('format')!r}, expected {FORMAT!r})")
        version = config.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise BundleError(
                f"bundle {path} has format version {version}, newer than this runtime understands ({FORMAT_VERSION}, "
                f"glm-runtime {__version__}); upgrade it: pip install -U glm-runtime (or update glm-pipeline)"
            )
        check_config(config, str(config_path))
        too_old = onnxruntime_too_old(config)
        if too_old:
            raise BundleError(f"{path}: {too_old}")
        files = config["files"]
        for key in ("model", "model_int8", "tokenizer"):
            if files[key] is not None:
                bundle_file(path, files[key], f"{config_path} field 'files.{key}'")
        model_file = files["model_int8"] if int8 else files["model"]
        if model_file is None:
            raise BundleError(f"bundle {path} has no int8 model; re-export with export.quantize_int8=true, or load without int8")
        select_file = None  # the classification graph; bundles from before it classify with the generation graph
        if config["classifier"] is not None and files.get("classifier"):
            select_file = files.get("classifier_int8") if int8 else files["classifier"]
            if select_file is not None:
                bundle_file(path, select_file, f"{config_path} field 'files.classifier{'_int8' if int8 else ''}'")
        needed = [files["tokenizer"], model_file, *([select_file] if select_file else [])]
        if verify_checksums:
            check_bundle_files(path, required=(CONFIG_FILE, *needed))
        for name in needed:
            if not (path / name).is_file():
                raise BundleError(f"bundle {path} is missing {name}; copy the whole bundle directory or re-export it")
        kind = config["tokenizer"].get("kind", "glm")
        try:
            if kind in RELEASED_KINDS:  # a released GLM's tokenizer: command ids from config.json
                tokenizer: Any = CommandTokenizer.from_file(
                    kind, path / files["tokenizer"], config["tokenizer"]["commands"], config["tokenizer"]["vocab_size"]
                )
            else:
                tokenizer = spm.SentencePieceProcessor()
                tokenizer.LoadFromSerializedProto((path / files["tokenizer"]).read_bytes())
        except ImportError:
            raise BundleError(
                f"bundle {path} has a {kind} tokenizer, which needs the `tokenizers` package: pip install tokenizers"
            ) from None
        except (RuntimeError, OSError, ValueError, KeyError, TypeError) as e:
            raise BundleError(
                f"{path / files['tokenizer']} is not a loadable {kind} tokenizer ({e}); re-export the bundle"
            ) from None
        sessions = []
        for name in (model_file, select_file):
            if name is None:
                sessions.append(None)
                continue
            try:
                sessions.append(_session(path / name, providers, threads))
            except (_ort_errors.Fail, _ort_errors.InvalidProtobuf, _ort_errors.InvalidGraph) as e:  # e.g. external data outside
                raise BundleError(
                    f"{path / name} is not a loadable ONNX model ({str(e).splitlines()[0][:200]}); re-export the bundle"
                ) from None
            check_graph(sessions[-1], config, path / name, select=name == select_file)
        return cls(path, config, sessions[0], tokenizer, path / model_file, sessions[1])

    # ----------------------------------------------------------------- tokens

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt: "[MASK]", "[sMASK]", "[gMASK]" in it are blanks."""
        if isinstance(self.tokenizer, CommandTokenizer):
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(text, out_type=int)

    def encode_text(self, text: str) -> list[int]:
        """Ids of user text: literal "[MASK]", "<sop>"... stay plain text (as glm.finetune.encode_text)."""
        if isinstance(self.tokenizer, CommandTokenizer):
            return self.tokenizer.encode_text([text])[0]
        out: list[int] = []
        for t in self.tokenizer.encode(text, out_type=int):
            out.extend(self.literal_ids.get(t, (t,)))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        if isinstance(self.tokenizer, CommandTokenizer):
            return self.tokenizer.decode(ids)
        n = self.tokenizer.get_piece_size()
        return self.tokenizer.decode([int(t) for t in ids if 0 <= t < n])  # ids past the tokenizer: padding rows of the table

    # ----------------------------------------------------------------- the model

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_head, 0, self.head_dim), np.float32) for _ in self.past_names]

    def run(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        block_position_ids: np.ndarray,
        sep: np.ndarray,
        key_start: np.ndarray | None = None,
        past: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One plain forward on host arrays: logits (B, T, V) and presents, each (B, H, P+T, D)."""
        rows = self._row_by_row(self.run, input_ids, position_ids, block_position_ids, sep, key_start, past)
        if rows is not None:
            return np.concatenate([lg for lg, _ in rows]), [np.concatenate(cs) for cs in zip(*(ps for _, ps in rows))]
        feeds = self._feeds(input_ids, position_ids, block_position_ids, sep, key_start, past, self.in_place)
        logits, *presents = self.session.run(["logits", *self.present_names], feeds)
        return logits, presents  # format 2: the buffers, sized P+T, written everywhere

    def run_label_logits(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        block_position_ids: np.ndarray,
        sep: np.ndarray,
        key_start: np.ndarray | None = None,
        past: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """A linear-head classifier's label logits (B, T, n_labels) at every position."""
        rows = self._row_by_row(self.run_label_logits, input_ids, position_ids, block_position_ids, sep, key_start, past)
        if rows is not None:
            return np.concatenate(rows)
        if not self.has_head:
            raise BundleError(f"bundle {self.path} has no linear classification head (no {LABEL_LOGITS} output)")
        feeds = self._feeds(input_ids, position_ids, block_position_ids, sep, key_start, past, self.in_place)
        return self.session.run([LABEL_LOGITS], feeds)[0]

    def run_select(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        block_position_ids: np.ndarray,
        sep: np.ndarray,
        positions: np.ndarray,
        key_start: np.ndarray | None = None,
        past: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The classification graph: select_scores (B, N, K) at `positions` (B, N) and the presents."""
        if self.select_session is None:
            raise BundleError(f"bundle {self.path} has no classification graph (files.classifier); re-export it")
        feeds = self._feeds(input_ids, position_ids, block_position_ids, sep, key_start, past)
        feeds[SELECT_INPUT] = np.ascontiguousarray(positions, np.int64)
        scores, *presents = self.select_session.run([SELECT_OUTPUT, *self.present_names], feeds)
        return scores, presents

    def _row_by_row(self, call, input_ids, position_ids, block_position_ids, sep, key_start, past) -> list[Any] | None:
        """`call` on each row alone when the generation graph needs it, else None: onnxruntime's
        GroupQueryAttention extends a non-empty cache by several positions for one row at a time only
        (format 2); rows are independent, so the results are the batch's."""
        B, T = input_ids.shape
        if not (self.in_place and B > 1 and T > 1 and past is not None and past[0].shape[2] > 0):
            return None
        key_start = np.zeros(B, np.int64) if key_start is None else key_start
        arrays = (input_ids, position_ids, block_position_ids, sep, key_start)
        return [call(*(a[r : r + 1] for a in arrays), past=[c[r : r + 1] for c in past]) for r in range(B)]

    def _feeds(
        self, input_ids, position_ids, block_position_ids, sep, key_start, past, in_place: bool = False
    ) -> dict[str, np.ndarray]:
        """Host feeds; in_place (format 2): the pasts (B, H, P, D) copied into buffers of capacity P+T."""
        B, T = input_ids.shape
        key_start = np.zeros(B, np.int64) if key_start is None else key_start
        ints = (input_ids, position_ids, block_position_ids, sep, key_start)
        feeds = {n: np.ascontiguousarray(a, np.int64) for n, a in zip(INPUTS, ints)}
        past = self.empty_past(B) if past is None else past
        if in_place:
            P = past[0].shape[2]
            feeds[PAST_LENGTH] = np.full(B, P, np.int64)
            past = [np.concatenate([a, np.zeros((B, self.n_head, T, self.head_dim), np.float32)], axis=2) for a in past]
        feeds.update(zip(self.past_names, past))
        return feeds

    def new_cache(self, capacity: int, prefix: Sequence[np.ndarray]) -> DecodeCache:
        """A decoding cache of `capacity` positions bound to the generation graph (format 2), holding
        `prefix` (per layer (B, H, P, D): a prompt pass's presents) in its first P slots."""
        if not self.in_place:
            raise BundleError(
                f"bundle {self.path} has format version 1 (a concatenated cache); re-export it for in-place decoding"
            )
        B, _, P, _ = prefix[0].shape
        if P > capacity:
            raise ValueError(f"a cache of {capacity} positions cannot hold a prefix of {P}")
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
        buffers = []
        for past, present, start in zip(self.past_names, self.present_names, prefix):
            host = np.zeros((B, self.n_head, capacity, self.head_dim), np.float32)  # (B, H, capacity, D)
            host[:, :, :P] = start
            buffer = ort.OrtValue.ortvalue_from_numpy(host, self.cache_device)  # on the CPU it shares host's memory
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)  # the same memory: written in place
            buffers.append(buffer)
        return DecodeCache(binding, buffers, capacity, length=P)

    def _run_bound(self, arrays: Sequence[np.ndarray], past: Any) -> tuple[np.ndarray, Any]:
        """A forward whose cache stays on the device, ready for the next call: `past` is a DecodeCache
        (format 2, from new_cache; returned with its length advanced), or for format 1 the previous
        call's presents (OrtValues), None on the first call."""
        if isinstance(past, DecodeCache):
            return self._run_in_place(arrays, past)
        if self.in_place:
            raise ValueError("a format-2 bundle decodes through a DecodeCache: pass bundle.new_cache(capacity, presents)")
        binding = self.session.io_binding()
        B = arrays[0].shape[0]
        for name, a in zip(INPUTS, arrays):
            binding.bind_cpu_input(name, np.ascontiguousarray(a, np.int64))
        if past is None:
            for name, a in zip(self.past_names, self.empty_past(B)):
                binding.bind_cpu_input(name, a)
        else:
            for name, value in zip(self.past_names, past):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        return logits.numpy(), presents

    def _run_in_place(self, arrays: Sequence[np.ndarray], cache: DecodeCache) -> tuple[np.ndarray, DecodeCache]:
        B, T = arrays[0].shape
        if cache.length + T > cache.capacity:
            raise ValueError(f"the decoding cache holds {cache.capacity} positions; {cache.length} written, {T} more asked")
        for name, a in zip(INPUTS, arrays):
            cache.binding.bind_cpu_input(name, np.ascontiguousarray(a, np.int64))
        cache.binding.bind_cpu_input(PAST_LENGTH, np.full(B, cache.length, np.int64))
        self.session.run_with_iobinding(cache.binding)
        cache.length += T
        return cache.binding.get_outputs()[0].numpy(), cache

    # ----------------------------------------------------------------- blank filling

    def _check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise ValueError("no prompt given; pass text with a [MASK], [sMASK] or [gMASK] blank")
        for i, p in enumerate(prompts):
            if not any(t in self.mask_ids for t in p):
                raise ValueError(
                    f"prompt {i} has no blank; put [MASK]/[sMASK] where text is wanted, or use generate() "
                    "(which appends [gMASK]) for free continuation"
                )
            if len(p) > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(p)} tokens, more than the model's max_seq_len={self.max_seq_len}; "
                    "shorten it (the runtime does not truncate prompts)"
                )
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(
                    f"prompt {i} holds ids outside [0, vocab_size={self.vocab_size}); check the tokenizer/bundle pairing"
                )
        if not 1 <= max_new_tokens < self.max_seq_len:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} must be in [1, {self.max_seq_len - 1}] (block positions run to max_seq_len)"
            )

    def fill_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        no_repeat_ngram_size: int = 0,
    ) -> list[list[list[int]]]:
        """Spans (token ids, <eop> excluded) for every blank of every prompt; temperature 0 = greedy.

        Prompts are left-padded into one batch (key_start hides the padding) and decoded in lockstep.
        Per blank, <eop> is held back until it holds min_new_tokens, and with no_repeat_ngram_size = n
        no n-gram occurs twice in it (as glm.generate.GenerationConfig).
        """
        self._check_prompts(prompts, max_new_tokens)
        if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(
                f"need temperature >= 0 (0 = greedy), top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
            )
        if not 0 <= min_new_tokens <= max_new_tokens or no_repeat_ngram_size < 0:
            raise ValueError(
                f"need 0 <= min_new_tokens <= max_new_tokens and no_repeat_ngram_size >= 0; "
                f"got {min_new_tokens}, {max_new_tokens}, {no_repeat_ngram_size}"
            )
        eop = self.special["eop"]
        rng = np.random.default_rng(seed)

        def choose(logits: np.ndarray, force: np.ndarray, spans: list[list[int]]) -> np.ndarray:
            scores = logits.astype(np.float32)  # (B, V) a copy: the caller's logits stay raw
            for r, span in enumerate(spans):
                if len(span) < min_new_tokens:
                    scores[r, eop] = -np.inf
                scores[r, _banned_ngram_tokens(span, no_repeat_ngram_size)] = -np.inf
            stuck = np.isneginf(scores).all(-1)  # (B,) everything banned (tiny vocabularies): end the blank
            scores[force | stuck] = -np.inf  # the blank is full: only <eop> may follow
            scores[force | stuck, eop] = 0.0
            return scores.argmax(-1) if temperature == 0 else _sample(scores / temperature, top_k, top_p, rng)  # (B,)

        rows = self._decode(prompts, max_new_tokens, choose)
        return [_split_spans(row, eop, sum(t in self.mask_ids for t in p)) for row, p in zip(rows, prompts)]

    def teacher_forced_logits(
        self, prompts: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]], max_new_tokens: int = 32
    ) -> list[np.ndarray]:
        """Raw logits (steps, V) of every decoding step when row r is fed `tokens[r]` instead of its own choices.

        tokens[r]: what a decoder chose for prompt r, span after span, each closed by <eop> (as
        glm.generate's greedy history). Step s of row r is the distribution that chose tokens[r][s],
        from the same loop fill_ids runs: comparing two decoders step by step on one token history
        tells a near-tie (both almost equally likely) from a real divergence.
        """
        self._check_prompts(prompts, max_new_tokens)
        eop = self.special["eop"]
        if len(tokens) != len(prompts):
            raise ValueError(f"{len(tokens)} token histories given for {len(prompts)} prompts")
        for r, (p, t) in enumerate(zip(prompts, tokens)):
            spans = _split_spans(list(t), eop, sum(x in self.mask_ids for x in p))
            if list(t) != [x for span in spans for x in [*span, eop]] or any(len(span) > max_new_tokens for span in spans):
                raise ValueError(
                    f"tokens[{r}] is not a complete decoding of prompt {r}: one span per blank, each at most "
                    f"max_new_tokens={max_new_tokens} tokens and closed by <eop> ({eop})"
                )
        history: list[np.ndarray] = []  # (B, V) per step

        def feed(logits: np.ndarray, force: np.ndarray, spans: list[list[int]]) -> np.ndarray:
            step = len(history)
            history.append(logits.copy())
            return np.array([t[step] if step < len(t) else eop for t in tokens], np.int64)  # (B,)

        self._decode(prompts, max_new_tokens, feed)
        steps = np.stack(history, axis=1)  # (B, steps, V)
        return [steps[r, : len(t)] for r, t in enumerate(tokens)]

    def _decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, choose: Any) -> list[list[int]]:
        """The blank-filling loop; `choose(logits (B, V), force (B,), spans)` picks each step's tokens.

        logits are the raw last-position logits; force marks rows whose blank is full (they must
        choose <eop>); spans[r] is what row r's current blank holds so far. Returns each row's chosen
        tokens in order, every span closed by <eop>.
        """
        sp = self.special
        B, L = len(prompts), max(map(len, prompts))
        ids = np.full((B, L), sp["pad"], np.int64)  # (B, L)
        pos = np.zeros((B, L), np.int64)  # (B, L)
        blank_lists = [[i for i, t in enumerate(p) if t in self.mask_ids] for p in prompts]
        blanks = np.zeros((B, max(map(len, blank_lists))), np.int64)  # (B, NB) blank positions, 0-padded
        for r, p in enumerate(prompts):
            ids[r, L - len(p) :] = p
            pos[r, L - len(p) :] = np.arange(len(p))
            blanks[r, : len(blank_lists[r])] = blank_lists[r]
        n_blanks = np.array([len(b) for b in blank_lists])  # (B,)
        sep = np.full(B, L, np.int64)  # (B,) the padded Part A length
        key_start = np.array([L - len(p) for p in prompts], np.int64)  # (B,)
        n_steps = int(n_blanks.max()) * (max_new_tokens + 1)  # the loop's most steps, one position each
        if self.in_place:  # the prompt pass, then buffers for every step that follows (one copy, not one a step)
            _, presents = self.run(ids, pos, np.zeros_like(pos), sep, key_start)
            cache: Any = self.new_cache(L + n_steps, presents)
        else:
            _, cache = self._run_bound((ids, pos, np.zeros_like(pos), sep, key_start), None)

        rows = np.arange(B)
        blank = np.zeros(B, np.int64)  # (B,) blank being filled
        n_gen = np.zeros(B, np.int64)  # (B,) tokens generated in it
        token = np.full(B, sp["sop"], np.int64)  # (B,) next input
        cur_pos, bpos = blanks[:, 0].copy(), np.ones(B, np.int64)  # (B,) its position / block position
        active = np.ones(B, bool)  # (B,)
        history = []
        spans: list[list[int]] = [[] for _ in range(B)]
        for _ in range(n_steps):
            logits, cache = self._run_bound((token[:, None], cur_pos[:, None], bpos[:, None], sep, key_start), cache)
            chosen = np.asarray(choose(logits[:, -1], n_gen >= max_new_tokens, spans), np.int64)  # (B,)
            chosen = np.where(active, chosen, -1)  # (B,) -1: row already finished
            history.append(chosen)
            spans = [[] if t == sp["eop"] else [*span, int(t)] if t >= 0 else span for span, t in zip(spans, chosen)]
            is_eop = chosen == sp["eop"]  # (B,)
            active &= ~(is_eop & (blank == n_blanks - 1))
            if not active.any():
                break
            # <eop> is never fed back: the next blank starts with its own <sop>; finished rows idle on [PAD]
            nxt = np.minimum(blank + is_eop, blanks.shape[1] - 1)  # (B,)
            blank = np.where(active, blank + is_eop, blank)
            token = np.where(active, np.where(is_eop, sp["sop"], chosen), sp["pad"])
            cur_pos = np.where(active, blanks[rows, nxt], cur_pos)
            bpos = np.where(active, np.where(is_eop, 1, bpos + 1), bpos)
            n_gen = np.where(active, np.where(is_eop, 0, n_gen + 1), n_gen)
        steps = np.stack(history, axis=1)  # (B, steps)
        return [[int(t) for t in steps[r] if t >= 0] for r in range(B)]

    def _refuse_generation_on_a_classifier(self, allow: bool) -> None:
        """Fine-tuning a cloze classifier trains its language model toward the label words: its fills are
        those words everywhere ("good good turn turn"). Say which bundle generates instead."""
        if self.classifier is None or allow:
            return
        beside = next((p / GENERATION_BUNDLE for p in self.path.resolve().parents[:3] if (p / GENERATION_BUNDLE).is_dir()), None)
        use = f"use the generation bundle {beside}" if beside else "use a generation bundle (RUN_DIR/generation/bundle)"
        raise BundleError(
            f"{self.path} is a fine-tuned classifier (labels {', '.join(self.labels)}): its language model was trained "
            f"toward the label words, so it cannot fill or generate text; {use}, or pass allow_classifier=True"
        )

    def fill_blanks(
        self,
        text: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        no_repeat_ngram_size: int = 0,
        allow_classifier: bool = False,
    ) -> FillResult:
        """Fill the [MASK] / [sMASK] / [gMASK] blanks of `text`, in order; temperature 0 = greedy.

        A classifier bundle refuses (BundleError naming the generation bundle) unless allow_classifier."""
        self._refuse_generation_on_a_classifier(allow_classifier)
        prompt = self.encode(text)
        spans = self.fill_ids([prompt], max_new_tokens, temperature, top_k, top_p, seed, min_new_tokens, no_repeat_ngram_size)[0]
        filled, k = [], 0
        for t in prompt:
            if t in self.mask_ids and k < len(spans):
                filled += spans[k]
                k += 1
            else:
                filled.append(t)
        return FillResult(self.decode(filled), [self.decode(s) for s in spans], spans)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        no_repeat_ngram_size: int = 0,
        allow_classifier: bool = False,
    ) -> str:
        """The continuation of `prompt`, new text only (with its leading space, if any).

        A [gMASK] (GLM's long-generation blank) is appended; "[MASK]" written in the prompt stays text.
        A classifier bundle refuses (BundleError naming the generation bundle) unless allow_classifier.
        """
        self._refuse_generation_on_a_classifier(allow_classifier)
        ids = self.encode_text(prompt)
        gmask = [ids + [self.special["gmask"]]]
        span = self.fill_ids(gmask, max_new_tokens, temperature, top_k, top_p, seed, min_new_tokens, no_repeat_ngram_size)[0][0]
        head, full = self.decode(ids), self.decode(ids + span)
        # decoding the span alone would drop its leading space (sentencepiece strips it at a text start)
        return full[len(head) :] if full.startswith(head) else self.decode(span)

    def fill_blanks_batch(self, texts: Sequence[str], allow_classifier: bool = False, **decoding: Any) -> list[FillResult]:
        """fill_blanks for many texts, decoded together in one left-padded batch (decoding: fill_ids' options)."""
        self._refuse_generation_on_a_classifier(allow_classifier)
        prompts = [self.encode(t) for t in texts]
        out = []
        for prompt, spans in zip(prompts, self.fill_ids(prompts, **decoding)):
            filled, k = [], 0
            for t in prompt:
                if t in self.mask_ids and k < len(spans):
                    filled += spans[k]
                    k += 1
                else:
                    filled.append(t)
            out.append(FillResult(self.decode(filled), [self.decode(s) for s in spans], spans))
        return out

    def generate_batch(self, prompts: Sequence[str], allow_classifier: bool = False, **decoding: Any) -> list[str]:
        """generate for many prompts, decoded together in one left-padded batch."""
        self._refuse_generation_on_a_classifier(allow_classifier)
        ids = [self.encode_text(p) for p in prompts]
        spans = self.fill_ids([i + [self.special["gmask"]] for i in ids], **decoding)
        out = []
        for i, (span,) in zip(ids, spans):
            head, full = self.decode(i), self.decode(i + span)
            out.append(full[len(head) :] if full.startswith(head) else self.decode(span))
        return out

    # ----------------------------------------------------------------- cloze classification

    @property
    def labels(self) -> list[str]:
        return list(self.classifier["labels"]) if self.classifier else []

    def _part_a(self, text: str, text_pair: str | None) -> tuple[list[int], int]:
        """The pattern with the text filled in (as glm.finetune.ClozeTask.encode) and the mask's index."""
        c = self.classifier
        text_ids = self.encode_text(text.strip())
        pair_ids = self.encode_text(text_pair.strip()) if c["has_pair"] and text_pair else []
        keep_text, keep_pair = _fit_two(len(text_ids), len(pair_ids), c["text_budget"])
        fill = {"text": text_ids[:keep_text], "text_pair": pair_ids[:keep_pair]}
        part_a: list[int] = []
        mask_pos = -1
        for seg in c["segments"]:
            if seg == "mask":
                mask_pos = len(part_a)
                part_a.append(self.special["mask"])
            else:
                part_a.extend(fill[seg] if isinstance(seg, str) else seg)
        return part_a, mask_pos

    def label_scores(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str | None] | None = None,
        batch_size: int = 32,
        sort_by_length: bool = True,
    ) -> np.ndarray:
        """(N, n_labels) log-probabilities of each label's verbalizer, or a linear head's logits
        (glm.finetune.score_cloze's scores), in the order of `texts`.

        Texts are batched by length (shortest first; sort_by_length=False: in input order), so a batch
        is padded to about its own length rather than to its longest text; rows come back in input order."""
        if self.classifier is None:
            raise BundleError(
                f"bundle {self.path} is not a classifier (no cloze pattern in its config); export a fine-tuned checkpoint"
            )
        if isinstance(texts, str):
            raise TypeError("label_scores takes a list of texts; use classify(text) for one")
        pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
        items = [self._part_a(t, p) for t, p in zip(texts, pairs)]
        if self.has_head:
            score = self._head_scores
        else:
            score = self._multi_token_scores if self.classifier["multi_token"] else self._single_token_scores
        order = list(range(len(items)))
        if sort_by_length:
            order.sort(key=lambda i: len(items[i][0]))  # stable: equal lengths keep input order
        scores = np.zeros((len(items), len(self.labels)), np.float32)  # (N, L)
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            scores[chunk] = score([items[j] for j in chunk])
        return scores

    def _single_token_scores(self, items: list[tuple[list[int], int]]) -> np.ndarray:
        """Part A ++ [<sop>] per row, right-padded: padding sits after each row's <sop>, which cannot see it."""
        B, T = len(items), max(len(a) for a, _ in items) + 1
        ids, pos, blk = (np.zeros((B, T), np.int64) for _ in range(3))  # (B, T) each
        sep = np.array([len(a) for a, _ in items], np.int64)  # (B,)
        for r, (a, m) in enumerate(items):
            ids[r, : len(a) + 1] = a + [self.special["sop"]]
            pos[r, : len(a) + 1] = list(range(len(a))) + [m]
            blk[r, len(a)] = 1
        first = [a[0] for a in self.classifier["answer_ids"]]
        if self.select_session is not None:  # project at each <sop> only, the verbalizer rows only
            scores, _ = self.run_select(ids, pos, blk, sep, sep[:, None])  # (B, 1, K)
            return scores[:, 0, [self.row_column[t] for t in first]]  # (B, L)
        logits, _ = self.run(ids, pos, blk, sep)  # (B, T, V)
        logp = _log_softmax(logits[np.arange(B), sep])  # (B, V) at each <sop>
        return logp[:, first]  # (B, L)

    def _head_scores(self, items: list[tuple[list[int], int]]) -> np.ndarray:
        """Linear head: Part A alone per row, right-padded (no real token sees the padding); the label
        logits at each row's [MASK] (as glm.heads.head_scores)."""
        B, T = len(items), max(len(a) for a, _ in items)
        ids, pos = np.full((B, T), self.special["pad"], np.int64), np.zeros((B, T), np.int64)  # (B, T)
        for r, (a, _) in enumerate(items):
            ids[r, : len(a)], pos[r, : len(a)] = a, np.arange(len(a))
        sep = np.array([len(a) for a, _ in items], np.int64)  # (B,)
        mask_pos = np.array([m for _, m in items], np.int64)  # (B,)
        if self.select_session is not None:  # the head at each [MASK] only
            scores, _ = self.run_select(ids, pos, np.zeros_like(pos), sep, mask_pos[:, None])  # (B, 1, L)
            return scores[:, 0].astype(np.float32)  # (B, L)
        label_logits = self.run_label_logits(ids, pos, np.zeros_like(pos), sep)  # (B, T, L)
        return label_logits[np.arange(B), mask_pos].astype(np.float32)  # (B, L)

    def _multi_token_scores(self, items: list[tuple[list[int], int]]) -> np.ndarray:
        """Summed log P(answer) (+ <eop> if the classifier scores it): Part A once (left-padded), its cache
        shared by every candidate (glm.finetune.part_b_rows)."""
        answers = self.classifier["answer_ids"]
        B, L, A = len(items), len(answers), max(len(a) for a, _ in items)
        ids, pos = np.full((B, A), self.special["pad"], np.int64), np.zeros((B, A), np.int64)  # (B, A)
        for r, (a, _) in enumerate(items):
            ids[r, A - len(a) :], pos[r, A - len(a) :] = a, np.arange(len(a))
        key_start = np.array([A - len(a) for a, _ in items], np.int64)  # (B,)
        sep = np.full(B, A, np.int64)  # (B,)
        select = self.select_session is not None
        if select:  # Part A's cache; one (discarded) position projected instead of all
            _, cache = self.run_select(ids, pos, np.zeros_like(pos), sep, np.full((B, 1), A - 1), key_start)
        else:
            _, cache = self.run(ids, pos, np.zeros_like(pos), sep, key_start)
        cache = [np.repeat(c, L, axis=0) for c in cache]  # (B*L, H, A, D) each
        # bundles written before score_eop existed always scored the <eop>
        extra = 1 if self.classifier.get("score_eop", True) else 0
        K = max(map(len, answers)) + extra
        b_ids, b_tgt, b_blk = (np.zeros((L, K), np.int64) for _ in range(3))  # (L, K) each
        for j, a in enumerate(answers):
            n = len(a) + extra
            b_ids[j, :n] = ([self.special["sop"]] + a)[:n]
            b_tgt[j, :n] = (a + [self.special["eop"]])[:n]
            b_blk[j, :n] = np.arange(1, n + 1)
        b_ids, b_tgt, b_blk = (np.tile(x, (B, 1)) for x in (b_ids, b_tgt, b_blk))  # (B*L, K) each
        real = b_blk > 0  # (B*L, K)
        b_pos = np.repeat([m for _, m in items], L)[:, None] * real  # (B*L, K)
        if select:  # every Part B position, the rows of the answers (and <eop>) only
            positions = np.tile(np.arange(K), (B * L, 1))  # (B*L, K)
            rows, _ = self.run_select(b_ids, b_pos, b_blk, np.repeat(sep, L), positions, np.repeat(key_start, L), cache)
            cols = np.vectorize(lambda t: self.row_column.get(int(t), 0), otypes=[np.int64])(b_tgt)  # (B*L, K); padding: any
            logp = np.take_along_axis(rows, cols[..., None], axis=-1)[..., 0].astype(np.float64)  # (B*L, K) log P(rows)
        else:
            logits, _ = self.run(b_ids, b_pos, b_blk, np.repeat(sep, L), np.repeat(key_start, L), cache)  # (B*L, K, V)
            logp = np.take_along_axis(_log_softmax(logits), b_tgt[..., None], axis=-1)[..., 0]  # (B*L, K)
        scores = (logp * real).sum(1)  # (B*L,)
        if self.classifier["length_normalise"]:
            scores = scores / real.sum(1)
        return scores.reshape(B, L).astype(np.float32)  # (B, L)

    def classify(self, text: str, text_pair: str | None = None) -> Classification:
        """The label of `text` under the fine-tuned cloze pattern, with the label probabilities."""
        return self.classify_batch([text], None if text_pair is None else [text_pair])[0]

    def classify_batch(
        self, texts: Sequence[str], text_pairs: Sequence[str | None] | None = None, batch_size: int = 32
    ) -> list[Classification]:
        scores = self.label_scores(texts, text_pairs, batch_size)  # (N, L)
        probs = np.exp(scores - scores.max(1, keepdims=True))  # (N, L)
        probs /= probs.sum(1, keepdims=True)
        labels = self.labels
        return [
            Classification(labels[int(row.argmax())], {lab: float(p) for lab, p in zip(labels, prob)}, row.tolist())
            for row, prob in zip(scores, probs)
        ]


# --------------------------------------------------------------------------- helpers


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sample(logits: np.ndarray, top_k: int, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """One draw per row (B, V) after top-k and nucleus filtering (as glm.generate.filter_logits)."""
    logits = logits.astype(np.float64)
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = -np.partition(-logits, k - 1, axis=-1)[:, k - 1 : k]  # (B, 1) the k-th largest logit
        logits = np.where(logits < kth, -np.inf, logits)  # (B, V)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")  # (B, V)
        probs = np.exp(_log_softmax(np.take_along_axis(logits, order, -1)))  # (B, V)
        drop_sorted = np.cumsum(probs, -1) - probs >= top_p  # (B, V) the best token always survives
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    probs = np.exp(_log_softmax(logits))  # (B, V)
    return np.array([rng.choice(len(p), p=p / p.sum()) for p in probs], np.int64)


def _banned_ngram_tokens(span: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `span` (glm.generate.banned_ngram_tokens, without torch)."""
    if n <= 0 or len(span) < n - 1:
        return []
    if n == 1:
        return sorted(set(span))
    prefix = tuple(span[len(span) - n + 1 :])
    return sorted({span[i + n - 1] for i in range(len(span) - n + 1) if tuple(span[i : i + n - 1]) == prefix})


def _split_spans(chosen: list[int], eop: int, n_blanks: int) -> list[list[int]]:
    """s1 .. sk <eop> t1 .. <eop> ... -> [[s1 .. sk], [t1 ..], ...]."""
    spans: list[list[int]] = [[]]
    for t in chosen:
        if t == eop:
            if len(spans) == n_blanks:
                break
            spans.append([])
        else:
            spans[-1].append(t)
    return spans + [[] for _ in range(n_blanks - len(spans))]


def _fit_two(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths to keep of two texts sharing `budget` tokens: the longer one is cut first."""
    if len_a + len_b <= budget:
        return len_a, len_b
    half = budget // 2
    if len_a <= half:
        return len_a, budget - len_a
    if len_b <= budget - half:
        return budget - len_b, len_b
    return half, budget - half


# --------------------------------------------------------------------------- command line


def infer_command(args: Any) -> int:
    """`glm-pipeline infer BUNDLE --fill|--generate|--classify TEXT`: print the result; exit code."""
    import sys

    try:
        bundle = Bundle.load(args.bundle, int8=args.int8)
        decoding = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            min_new_tokens=args.min_new_tokens,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        if args.fill is not None:
            print(bundle.fill_blanks(args.fill, **decoding).text)
        elif args.generate is not None:
            print(args.generate + bundle.generate(args.generate, **decoding))
        else:
            result = bundle.classify(args.classify)
            print(f"label: {result.label}")
            for label, p in sorted(result.probabilities.items(), key=lambda kv: -kv[1]):
                print(f"  {label}: {p:.4f}")
        return 0
    except (BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- batch inference on files

TABLE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
TASKS = ("classify", "fill", "generate")


class InputError(ValueError):
    """A batch-inference input or output file is unusable; the message names it and the fix."""


def _table_format(path: Path, role: str) -> str:
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{role} file {path} has the extension {path.suffix or '(none)'!r}; use .jsonl (JSON Lines), .csv or .parquet"
        )
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401  (optional: only Parquet files need it)
        except ImportError:
            raise InputError(f"{role} file {path} is Parquet, which needs pyarrow: pip install 'glm-runtime[parquet]'") from None
    return fmt


def count_rows(path: Path) -> int | None:
    """Rows of a table file, cheaply (a progress bar's total); None when not known without parsing."""
    fmt = _table_format(path, "input")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None  # CSV: quoted fields may hold newlines


def read_rows(path: Path, batch_size: int = 1024):
    """Yield lists of row dicts (at most batch_size each) from a JSON Lines, CSV or Parquet file, streaming."""
    import csv

    fmt = _table_format(path, "input")
    if not path.is_file():
        raise InputError(f"input file {path} does not exist; pass a .jsonl, .csv or .parquet file of texts")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow's errors have no common base
            raise InputError(f"input file {path} is not a readable Parquet file ({e}); re-write it") from None
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield batch.to_pylist()
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows: list[dict[str, Any]] = []
        try:
            if fmt == "csv":
                for row in csv.DictReader(f):
                    if None in row:  # more cells than the header names
                        raise InputError(
                            f"input file {path} row {len(rows) + 1}: more fields than the header has columns; quote the text fields"
                        )
                    rows.append(row)
                    if len(rows) == batch_size:
                        yield rows
                        rows = []
            else:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(
                            f"input file {path} line {n} is not valid JSON ({e.msg}); fix or remove that line"
                        ) from None
                    if not isinstance(row, dict):
                        raise InputError(
                            f"input file {path} line {n} is a JSON {type(row).__name__}, not an object; write one "
                            '{"text": ...} object per line'
                        )
                    rows.append(row)
                    if len(rows) == batch_size:
                        yield rows
                        rows = []
        except UnicodeDecodeError as e:
            raise InputError(f"input file {path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
        except csv.Error as e:
            raise InputError(f"input file {path} is not valid CSV ({e}); check its quoting") from None
        if rows:
            yield rows


class _Writer:
    """Rows to a temporary file beside `path`, renamed onto it by close(): a failure leaves nothing."""

    def __init__(self, path: Path):
        import os
        import tempfile

        self.path, self.fmt = path, _table_format(path, "output")
        if not path.parent.is_dir():
            raise InputError(f"output directory {path.parent} does not exist; create it or choose another output path")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.file: Any = None
        self.csv: Any = None
        self.parquet: Any = None
        self.schema: Any = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        import csv

        if self.fmt == "jsonl":
            if self.file is None:
                self.file = open(self.tmp, "w", encoding="utf-8")
            self.file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        elif self.fmt == "csv":
            if self.file is None:
                self.file = open(self.tmp, "w", encoding="utf-8", newline="")
                self.csv = csv.DictWriter(self.file, fieldnames=list(rows[0]), extrasaction="ignore")
                self.csv.writeheader()
            self.csv.writerows(
                {k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in r.items()} for r in rows
            )
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pa.Table.from_pylist(rows, schema=self.schema)  # later batches keep the first one's column types
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise InputError(
                    f"output file {self.path}: a column changes type between rows ({e}); make the input's columns "
                    "consistent or write .jsonl"
                ) from None
            if self.parquet is None:
                self.schema = table.schema
                self.parquet = pq.ParquetWriter(self.tmp, self.schema)
            self.parquet.write_table(table)

    def close(self) -> None:
        import os

        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        if self.parquet is not None:
            self.parquet.close()
        if self.file is None and self.parquet is None:  # no rows at all: an empty file of that format
            if self.fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({}), self.tmp)
            else:
                self.tmp.write_text("")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        for f in (self.file, self.parquet):
            try:
                if f is not None:
                    f.close()
            except Exception:
                pass
        self.tmp.unlink(missing_ok=True)


def _progress(total: int | None, quiet: bool):
    """A tqdm bar on stderr if tqdm is installed, else a plain counter line every few seconds."""
    import sys
    import time

    if quiet:
        return lambda n: None, lambda: None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)
        return bar.update, bar.close
    except ImportError:
        state = {"n": 0, "last": time.monotonic()}

        def update(n: int) -> None:
            state["n"] += n
            if time.monotonic() - state["last"] >= 2.0:
                state["last"] = time.monotonic()
                print(f"{state['n']}{f'/{total}' if total else ''} rows", file=sys.stderr, flush=True)

        return update, lambda: print(f"{state['n']} rows done", file=sys.stderr, flush=True)


def _texts(rows: list[dict[str, Any]], field_name: str, path: Path, first: int, optional: bool = False) -> list[Any]:
    """The `field_name` text of each row; InputError naming the file, row and column otherwise."""
    out = []
    for k, row in enumerate(rows):
        if field_name not in row:
            if optional:
                out.append(None)
                continue
            raise InputError(
                f"input file {path} row {first + k} has no column {field_name!r} (columns: {', '.join(map(str, row)) or 'none'}); "
                "pass --text-field NAME"
            )
        value = row[field_name]
        if value is None and optional:
            out.append(None)
        elif not isinstance(value, str) or not value.strip():
            raise InputError(
                f"input file {path} row {first + k} column {field_name!r} is {value!r}, not a non-empty text; "
                "fix or remove that row"
            )
        else:
            out.append(value)
    return out


SORT_WINDOW = 16  # batches `predict` reads at once to classify: texts sorted by length within them pad less


def predict(
    bundle: Bundle,
    input_path: str | Path,
    output_path: str | Path,
    task: str | None = None,
    text_field: str = "text",
    text_pair_field: str | None = None,
    batch_size: int = 32,
    quiet: bool = False,
    allow_classifier: bool = False,
    **decoding: Any,
) -> int:
    """Score a table file with `bundle`, streaming, and write the rows with the results added; returns the row count.

    task: classify (label, probability, prob_LABEL per label), fill (filled, spans) or generate
    (generated); default classify for a classifier bundle, else fill. The output (.jsonl/.csv/.parquet,
    by extension) is written to a temporary file and renamed into place: an error leaves nothing.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    task = task or ("classify" if bundle.classifier is not None else "fill")
    if task not in TASKS:
        raise InputError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    if task == "classify" and bundle.classifier is None:
        raise InputError(f"bundle {bundle.path} is not a classifier; use --task fill or --task generate with it")
    if task != "classify":
        bundle._refuse_generation_on_a_classifier(allow_classifier)
    _table_format(input_path, "input")
    if not input_path.is_file():
        raise InputError(f"input file {input_path} does not exist; pass a .jsonl, .csv or .parquet file of texts")
    if output_path.resolve() == input_path.resolve():
        raise InputError(f"output file {output_path} is the input file; write the results to another path")
    total = count_rows(input_path)
    writer = _Writer(output_path)
    update, done = _progress(total, quiet)
    n = 0
    try:
        # classification reads SORT_WINDOW batches at a time: label_scores batches them by length
        for rows in read_rows(input_path, batch_size * (SORT_WINDOW if task == "classify" else 1)):
            texts = _texts(rows, text_field, input_path, n + 1)
            if task == "classify":
                pairs = _texts(rows, text_pair_field, input_path, n + 1, optional=True) if text_pair_field else None
                for row, c in zip(rows, bundle.classify_batch(texts, pairs, batch_size)):
                    row.update(label=c.label, probability=c.probabilities[c.label])
                    row.update({f"prob_{lab}": p for lab, p in c.probabilities.items()})
            else:
                if task == "fill":
                    for k, t in enumerate(texts):
                        if not any(i in bundle.mask_ids for i in bundle.encode(t)):
                            raise InputError(
                                f"input file {input_path} row {n + 1 + k} column {text_field!r} has no [MASK], [sMASK] or "
                                "[gMASK] blank; add one, or use --task generate to continue the text"
                            )
                try:
                    if task == "fill":
                        for row, r in zip(rows, bundle.fill_blanks_batch(texts, allow_classifier, **decoding)):
                            row.update(filled=r.text, spans=r.spans)
                    else:
                        for row, g in zip(rows, bundle.generate_batch(texts, allow_classifier, **decoding)):
                            row.update(generated=g)
                except ValueError as e:
                    raise InputError(f"input file {input_path} rows {n + 1}-{n + len(rows)}: {e}") from None
            writer.write(rows)
            n += len(rows)
            update(len(rows))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        done()
    return n


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_predict_arguments(parser: Any) -> None:
    """The batch command's arguments (shared by `glm-runtime predict` and `glm-pipeline predict`)."""
    parser.add_argument("bundle", help="an exported bundle directory (or a run's export/ or export/current)")
    parser.add_argument("input", help="texts to score: .jsonl (one JSON object per line), .csv (with a header) or .parquet")
    parser.add_argument("output", help="where to write the rows with results: .jsonl, .csv or .parquet (written atomically)")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: classify for a classifier bundle, else fill")
    parser.add_argument("--text-field", default="text", help="the column holding the text (default: text)")
    parser.add_argument("--text-pair-field", default=None, help="the column of the second text of a text-pair classifier")
    parser.add_argument("--batch-size", type=int, default=32, help="rows scored together (default: 32)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: every core available)")
    parser.add_argument("--int8", action="store_true", help="use the int8-quantized model if the bundle has one")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--allow-classifier", action="store_true", help="let a classifier bundle fill or generate")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def predict_command(args: Any) -> int:
    """Run the batch command from parsed arguments; errors are one line on stderr, exit code 2."""
    import sys

    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        print("error: --batch-size and --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        bundle = Bundle.load(args.bundle, int8=args.int8, threads=args.threads or _cores())
        n = predict(
            bundle,
            args.input,
            args.output,
            args.task,
            args.text_field,
            args.text_pair_field,
            args.batch_size,
            args.quiet,
            args.allow_classifier,
            **(
                {}
                if (args.task or ("classify" if bundle.classifier else "fill")) == "classify"
                else dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            ),
        )
    except (BundleError, InputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {n} rows to {args.output}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "glm-runtime") -> int:
    """`glm-runtime`: the installed runtime's command line (predict: batch inference on a file)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=f"glm-runtime {__version__}: run an exported GLM bundle")
    parser.add_argument("--version", action="version", version=f"glm-runtime {__version__} (bundle format {FORMAT_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True)
    add_predict_arguments(sub.add_parser("predict", help="classify / fill / generate every row of a JSONL, CSV or Parquet file"))
    args = parser.parse_args(argv)
    return predict_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
