"""The shapes stages exchange: manifests, each stage's manifest stats, shard and training results.

Stages talk through files (glm/core/shards.py), so a contract is a JSON shape. Each is declared once
here as a TypedDict; the registry (glm.stages.Stage.stats) checks what a stage wrote against its
declaration before stamping it, and readers get typed values from `glm.shards.read_stats`. A renamed or
missing key therefore fails where it is written, naming the stage and the key, instead of as a
KeyError in whichever module reads it next. Extra keys are allowed (a stage may record more than
its contract); the declared keys and their types are what other code may rely on.

TypedDicts rather than dataclasses: the values are JSON in files and in Prefect results, and a
TypedDict is that JSON with a name and a schema (pydantic validates it), without conversions.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict  # pydantic needs these on Python < 3.12


class ContractError(RuntimeError):
    """A stage wrote (or a reader found) data that does not have its declared shape: a bug or a foreign file."""


# --------------------------------------------------------------------------- manifests (glm/core/shards.py)


class FileEntry(TypedDict):
    path: str  # relative to the stage directory, POSIX separators
    bytes: int
    sha256: str
    mtime_ns: NotRequired[int]  # lets a check skip re-hashing an untouched file


class InputEntry(TypedDict):
    manifest: str  # the input manifest's path
    sha256: str  # its content digest (glm.shards.manifest_digest) when this stage was built


class Manifest(TypedDict):
    manifest_version: int
    stage: str
    created: str
    code_version: str
    config: dict[str, Any]
    config_sha256: str
    inputs: list[InputEntry]
    files: list[FileEntry]
    stats: dict[str, Any]  # the stage's own shape: one of the *Stats below


# --------------------------------------------------------------------------- each stage's manifest stats


class CorpusStats(TypedDict):
    """docs/manifest.json (glm.corpus)."""

    cleaning_version: int
    docs: dict[str, int]  # split -> documents kept
    chars: dict[str, int]
    text_bytes: dict[str, int]
    read: int
    dropped: dict[str, int]  # reason -> documents
    quarantine: dict[str, list[dict[str, Any]]]  # reason -> a few examples
    inputs: list[dict[str, Any]]  # every input file read, with its identity


class TokenizerStats(TypedDict):
    """tokenizer/manifest.json (glm.tokenizer)."""

    vocab_size: int
    model_sha256: str
    byte_fallback: bool


class SplitTokens(TypedDict):
    docs: int
    shards: int
    tokens: int


class TokenStats(TypedDict):
    """tokens/manifest.json (glm.tokenize_shards)."""

    vocab_size: int
    docs: int
    tokens: int
    shards: int
    splits: dict[str, SplitTokens]
    unk_rate: float


class InfillStats(TypedDict):
    """infill/manifest.json (glm.infill_shards)."""

    build_key: str  # what pretraining's loader state remembers, to notice new data
    layout_version: int  # the shard layout the loader must understand
    seq_len: int
    vocab_size: int | None  # the loader checks ids against it
    epochs: list[dict[str, Any]]  # one entry per training epoch's shard set
    builder: dict[str, dict[str, Any]]  # split -> glm.infilling.BuildStats as a dict


class PretrainStats(TypedDict):
    """pretrain/manifest.json (glm.stages.close_pretrain)."""

    checkpoint: str  # the final checkpoint, relative to pretrain/
    step: int
    loss: float | None
    val_loss: float | None
    tokens: int
    elapsed: float
    bad_steps: int
    resumed_from: int | None
    precision: NotRequired[dict[str, str]]  # requested, chosen, why (glm.budget)
    budget: NotRequired[dict[str, Any]]  # what pretrain.budget_minutes chose, and the line that says so
    start_step: NotRequired[int]  # the step this run's training started from
    steps_this_run: NotRequired[int]  # steps trained on this run's data (0: the data was not seen)
    continued_from: NotRequired[str | None]  # the archived checkpoint a run on grown data continued from
    lineage: NotRequired[list[dict[str, Any]]]  # every run's data and steps: {from_step, to_step, infill, documents}


class FinetuneRunSummary(TypedDict):
    test: dict[str, float]  # the test split's numeric metrics
    steps: int | None
    best_val_accuracy: NotRequired[float | None]  # cloze
    best_val_loss: NotRequired[float | None]  # seq2seq


class FinetuneStats(TypedDict):
    """finetune/TASK/manifest.json (glm.stages._finetune)."""

    kind: Literal["cloze", "seq2seq"]
    runs: dict[str, str]  # run name ("pretrained", "from scratch") -> its result.json, relative
    summary: dict[str, FinetuneRunSummary]


class EvalStats(TypedDict):
    """eval/manifest.json (glm.stages._evaluate)."""

    # evaluation -> its numeric metrics: infilling, lm, infill_bleu (ratio -> BLEU), lastword_blank, ...
    pretrain: dict[str, dict[str, float]]
    files: dict[str, str]  # what the report wrote: name -> file


class ExportStats(TypedDict):
    """export/manifest.json (glm.stages.verify_and_promote)."""

    verified: bool | None  # None: export.verify is false
    checkpoint: str
    fp32: dict[str, float]
    version: NotRequired[str]  # this run's bundle version (export/versions/NAME)
    blessed: NotRequired[bool]  # the gate's decision (glm.bundles.decide)
    reason: NotRequired[str]  # and why
    current: NotRequired[str | None]  # the version export/current points to after this run


class GenerationStats(TypedDict):
    """generation/manifest.json (glm.stages.export_generation)."""

    exported: bool  # False: export.generation_bundle is off
    checkpoint: str  # the pretrained checkpoint the bundle holds


# --------------------------------------------------------------------------- results passed between tasks


class TokenShardEntry(FileEntry):
    """What one tokenize shard returns: its token manifest's file entry."""

    input: dict[str, Any]  # the document shard it came from (path, sha256)


class InfillShardResult(TypedDict):
    """What one infill shard returns (glm.infill_shards.build_shard)."""

    split: str
    epoch: int | None  # None for the validation split
    shard: int
    samples: int
    tokens: int
    explicit_columns: list[str]
    stats: dict[str, Any]  # glm.infilling.BuildStats as a dict
    skipped: bool


class TrainSummary(TypedDict):
    """What a training run reports (glm.train.TrainResult as JSON: the last line of `python -m glm.train`)."""

    step: int
    loss: float | None
    val_loss: float | None
    checkpoint: str | None
    metrics_path: str
    bad_steps: int
    resumed_from: int | None
    tokens: int
    elapsed: float


# --------------------------------------------------------------------------- checking

T = TypeVar("T")


@cache
def _adapter(shape: type) -> TypeAdapter:
    return TypeAdapter(shape)


def check(shape: type[T], value: Any, what: str) -> T:
    """`value` itself (extra keys kept), once it has `shape`; else ContractError naming `what` and the keys."""
    try:
        _adapter(shape).validate_python(value)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors()[:5])
        raise ContractError(f"{what} does not have the shape of {shape.__name__}: {problems}") from None
    return value
