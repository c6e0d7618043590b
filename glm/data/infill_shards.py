"""Packing token shards into rows, and writing blank-infilling shards.

Packing. Each split's documents, each followed by <eos>, form one token stream that is cut
into rows of exactly `input_length(cfg)` tokens. A document longer than the rest of a row
simply continues in the next row (the builder treats row boundaries as document
boundaries); the stream's last partial row is padded and its real length passed on. Empty
documents are dropped. For training epoch e the stream order is shuffled with seed
(cfg.seed, e): the token shards' order is permuted, then the documents inside each token
shard. This is a two-level shuffle, not a global one, so that any row range can be read
from one or two memory-mapped token shards (bounded memory, and each output shard is an
independent unit of work), while documents still meet different neighbours and different
row boundaries in every epoch. The validation split is packed in file order, once.

Shard layout (`LAYOUT_VERSION`). One row per sample, fixed length `seq_len`, stored
narrow: input_ids and position_ids as fixed-size lists of uint16 (input_ids uint32 when
the vocabulary exceeds 65536), sep/length as uint16, objective (the layout) and task (the
objective drawn from the mix, which the trainer weighs; it differs only for fallbacks) as
int8: about 4 bytes per position. targets, loss_mask and block_position_ids are not stored: they are derived
from input_ids by `expand_samples` (Part B = [sop] s1..sk per span; target i is input i+1,
or <eop> before the next <sop> or the end; block positions count from each <sop>; loss on
all of Part B). position_ids are stored: Part B's positions depend on the shuffled span
order, which the inputs do not record. Every shard is checked against the builder's own arrays when written; a
shard where a column is not reproduced (e.g. a document that contains a literal <sop>
id) stores that column explicitly, and the loader prefers stored columns.

Over 600 lines on purpose: packing the token stream into rows, encoding the samples, the shard jobs'
keys and the dataset manifest share one shard layout; one module keeps the rules of what makes a
shard stale in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

# glm's modules by their names before the 2026-12 layout (glm.MOVED) on purpose: this module's code is
# hashed into every blank-infilling shard's build key (infill_shards._code_version); the new names would
# change it, rebuild every run's data and make pretraining continue as if on new data.
from glm import infilling, special_tokens
from glm.config import InfillingConfig
from glm.shards import (
    CorruptShardError,
    ManifestError,
    code_of,
    file_entry,
    manifest_digest,
    read_arrow,
    read_manifest,
    remove_stale_temporaries,
    sha256_json,
    stage_is_complete,
    verify_manifest,
    write_arrow,
    write_manifest,
)
from glm.special_tokens import SPECIAL, SpecialTokens

STAGE = "infill"
LAYOUT_VERSION = 2  # 2: the `task` column (the drawn objective, the trainer's loss group)
VALID = "valid"
STORED = ("input_ids", "position_ids", "sep", "length", "objective", "task")
DERIVED = ("targets", "loss_mask", "block_position_ids")
_PACK_STREAM = 0x9AC4  # keeps the packing RNG apart from the builder's, which shares cfg.seed
_VALID_EPOCH = 0  # the validation set is built once, with the builder's epoch-0 seed
_META_KEY = b"glm.build_key"
_META_INFO = b"glm.shard"


def epoch_dir(epoch: int) -> str:
    return f"epoch-{epoch:03d}"


def part_name(index: int) -> str:
    return f"part-{index:05d}.arrow"


# --------------------------------------------------------------------------- packing


def _token_files(tokens_dir: Path, split: str) -> list[dict[str, Any]]:
    manifest = read_manifest(tokens_dir)
    files = [f for f in manifest["files"] if f["path"].startswith(f"{split}/") and f["path"].endswith(".arrow")]
    return sorted(files, key=lambda f: f["path"])


def _token_vocab_size(tokens_dir: Path) -> int | None:
    """The tokenizer's vocabulary size as the token stage recorded it (None if it did not)."""
    vocab = read_manifest(tokens_dir).get("stats", {}).get("vocab_size")
    return int(vocab) if vocab else None


def _document_lists(path: Path) -> pa.Array:
    """The `tokens` list column of one token shard, memory-mapped (one chunk), its structure checked.

    Memory-mapped Arrow is not validated on read: a flipped byte in the offsets would make
    documents of negative or huge length, read silently from anywhere in the file.
    """
    try:
        table = read_arrow(path)
    except ManifestError as e:  # not Arrow at all (truncated, overwritten): as permanent as bad ids
        raise CorruptShardError(path, "it does not read as an Arrow IPC file") from e
    if "tokens" not in table.column_names:
        raise ValueError(f"token shard {path} has no `tokens` column (columns: {table.column_names}); re-run tokenization")
    column = table.column("tokens")
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ValueError(f"token shard {path}: `tokens` must be a list<uint16|uint32> column, got {column.type}")
    try:
        table.validate()  # buffer sizes against lengths: O(columns), not O(data)
    except pa.ArrowInvalid as e:
        raise CorruptShardError(path, f"its Arrow buffers do not match its lengths ({e})") from None
    docs = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    offsets = docs.offsets.to_numpy()  # (D+1,)
    if len(offsets) and (offsets[0] < 0 or offsets[-1] > len(docs.values)):
        raise CorruptShardError(
            path, f"its document offsets run from {offsets[0]} to {offsets[-1]}, outside its {len(docs.values)} token ids"
        )
    if (negative := np.flatnonzero(offsets[1:] < offsets[:-1])).size:
        row = int(negative[0])
        raise CorruptShardError(path, f"row {row} has a negative length ({int(offsets[row + 1]) - int(offsets[row])} token ids)")
    return docs


def _doc_lengths(docs: pa.Array) -> np.ndarray:
    offsets = docs.offsets.to_numpy()  # (D+1,)
    return np.diff(offsets).astype(np.int64)  # (D,)


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Where each packed row of one (split, epoch) comes from: token shards in stream order.

    Small and picklable, so per-shard workers (threads, processes, Prefect tasks) can share it.
    """

    split: str
    epoch: int
    shuffle: bool
    seed: int
    row_len: int
    paths: tuple[str, ...]  # token shards in stream order
    shard_ids: tuple[int, ...]  # their index in the manifest: seeds their document permutation
    starts: tuple[int, ...]  # stream offset of each token shard, plus the total at the end
    id_type: str  # "uint16" or "uint32": the token shards' value type
    n_docs: int
    n_empty_docs: int
    vocab_size: int | None = None  # ids must lie below it (None: the token manifest did not say)

    @property
    def n_tokens(self) -> int:
        """Stream length: document tokens plus one <eos> per document."""
        return self.starts[-1]

    @property
    def n_rows(self) -> int:
        return -(-self.n_tokens // self.row_len)

    def doc_order(self, k: int, n_docs: int) -> np.ndarray | None:
        """The permutation of token shard k's (non-empty) documents, None for file order."""
        if not self.shuffle:
            return None
        rng = np.random.default_rng([self.seed, _PACK_STREAM, self.epoch, self.shard_ids[k]])
        return rng.permutation(n_docs)


def packing_plan(tokens_dir: str | Path, split: str, row_len: int, *, seed: int, epoch: int, shuffle: bool) -> PackingPlan:
    """Plan the packed stream of one split (opens each token shard's offsets, memory-mapped)."""
    tokens_dir = Path(tokens_dir)
    files = _token_files(tokens_dir, split)
    paths, sizes, id_types, n_docs, n_empty = [], [], set(), 0, 0
    for f in files:
        path = tokens_dir / f["path"]
        docs = _document_lists(path)
        lengths = _doc_lengths(docs)  # (D,)
        nonempty = lengths > 0
        paths.append(str(path))
        sizes.append(int(lengths.sum() + nonempty.sum()))
        id_types.add(str(docs.type.value_type))
        n_docs += int(nonempty.sum())
        n_empty += int((~nonempty).sum())
    if len(id_types) > 1 or not id_types <= {"uint16", "uint32"}:
        raise ValueError(f"token shards in {tokens_dir}/{split} must all hold uint16 or uint32 ids, got {sorted(id_types)}")
    order = np.arange(len(paths))
    if shuffle:
        order = np.random.default_rng([seed, _PACK_STREAM, epoch]).permutation(len(paths))
    starts = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64)[order])]) if paths else np.zeros(1, np.int64)
    return PackingPlan(
        split=split,
        epoch=epoch,
        shuffle=shuffle,
        seed=seed,
        row_len=row_len,
        paths=tuple(paths[i] for i in order),
        shard_ids=tuple(int(i) for i in order),
        starts=tuple(int(s) for s in starts),
        id_type=id_types.pop() if id_types else "uint16",
        n_docs=n_docs,
        n_empty_docs=n_empty,
        vocab_size=_token_vocab_size(tokens_dir),
    )


def _stream_slice(plan: PackingPlan, k: int, lo: int, hi: int, eos: int = SPECIAL.eos) -> np.ndarray:
    """Tokens [lo, hi) of token shard k's part of the stream (documents + <eos>, permuted), int32."""
    docs = _document_lists(Path(plan.paths[k]))
    flat = docs.values.to_numpy(zero_copy_only=False)  # (T,) memory-mapped for uint16/uint32
    offsets = docs.offsets.to_numpy().astype(np.int64)  # (D+1,)
    lengths = np.diff(offsets)  # (D,)
    doc_ids = np.flatnonzero(lengths > 0)  # (D',)
    order = plan.doc_order(k, len(doc_ids))
    if order is not None:
        doc_ids = doc_ids[order]
    cum = np.concatenate([[0], np.cumsum(lengths[doc_ids] + 1)])  # (D'+1,) stream offsets with <eos>
    first = int(np.searchsorted(cum, lo, side="right")) - 1
    last = int(np.searchsorted(cum, hi, side="left"))
    sel = doc_ids[first:last]  # (n,) the documents overlapping [lo, hi)
    doc_start = cum[first:last]  # (n,) their stream offsets
    seg_lo = np.maximum(lo - doc_start, 0)  # (n,) the part of each document inside [lo, hi),
    seg_hi = np.minimum(hi - doc_start, lengths[sel] + 1)  # (n,) counting its <eos> as the last token
    seg_len = seg_hi - seg_lo  # (n,)
    out_start = np.cumsum(seg_len) - seg_len  # (n,)
    # source index of every output token: where its document starts plus the offset inside it
    src = np.arange(hi - lo, dtype=np.int64) + np.repeat(offsets[sel] + seg_lo - out_start, seg_len)  # (hi - lo,)
    out = flat[np.minimum(src, len(flat) - 1)]  # (hi - lo,) the shard's id type, so no id wraps before the check
    has_eos = seg_hi == lengths[sel] + 1  # (n,)
    out[(out_start + seg_len - 1)[has_eos]] = eos
    # every token of the stream passes here once per epoch: checking what is used costs no extra read
    if plan.vocab_size is not None and len(out) and int(out.max()) >= plan.vocab_size:
        at = int(np.argmax(out >= plan.vocab_size))
        row = int(sel[np.searchsorted(out_start, at, side="right") - 1])
        raise CorruptShardError(plan.paths[k], f"token id {int(out[at])} >= vocab size {plan.vocab_size} in row {row}")
    return out.astype(np.int32)


def read_rows(plan: PackingPlan, first_row: int, n_rows: int, special: SpecialTokens = SPECIAL) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows [first_row, first_row + n_rows): (n, row_len) int32 padded, and their real lengths (n,)."""
    if first_row < 0 or n_rows < 0 or first_row + n_rows > plan.n_rows:
        raise ValueError(f"rows [{first_row}, {first_row + n_rows}) outside the {plan.n_rows} rows of {plan.split}")
    L = plan.row_len
    lo, hi = first_row * L, min((first_row + n_rows) * L, plan.n_tokens)
    pieces = []
    for k in range(len(plan.paths)):
        a, b = max(lo, plan.starts[k]), min(hi, plan.starts[k + 1])
        if a < b:
            pieces.append(_stream_slice(plan, k, a - plan.starts[k], b - plan.starts[k], special.eos))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)  # (hi - lo,)
    rows = np.full(n_rows * L, special.pad, np.int32)  # (n * L,)
    rows[: len(flat)] = flat
    lengths = np.clip(len(flat) - np.arange(n_rows, dtype=np.int64) * L, 0, L).astype(np.int32)  # (n,)
    return rows.reshape(n_rows, L), lengths


# --------------------------------------------------------------------------- shard layout


def _uint_for(max_value: int) -> pa.DataType:
    return pa.uint16() if max_value < 1 << 16 else pa.uint32()


def expand_samples(
    input_ids: np.ndarray, sep: np.ndarray, length: np.ndarray, special: SpecialTokens = SPECIAL
) -> dict[str, np.ndarray]:
    """Derive targets (int64), loss_mask (bool) and block_position_ids (int64) from the inputs.

    Part B is [sop] s1..sk per span: target i is input i+1, or <eop> where the next input is a
    <sop> or the end; block positions count 1, 2, .. from each <sop>; loss on all of Part B.
    """
    B, L = input_ids.shape
    pos = np.arange(L, dtype=np.int64)  # (L,)
    part_b = (pos >= sep[:, None]) & (pos < length[:, None])  # (B, L)
    is_sop = part_b & (input_ids == special.sop)  # (B, L)
    last_sop = np.maximum.accumulate(np.where(is_sop, pos, -1), axis=1)  # (B, L)
    block = np.where(part_b, pos - last_sop + 1, 0)  # (B, L)
    next_ids = np.empty_like(input_ids, dtype=np.int64)  # (B, L)
    next_ids[:, :-1] = input_ids[:, 1:]
    next_ids[:, -1] = special.pad
    span_ends = np.ones((B, L), bool)  # (B, L) the last input of a span predicts <eop>
    span_ends[:, :-1] = is_sop[:, 1:] | ~part_b[:, 1:]
    targets = np.where(part_b, np.where(span_ends, special.eop, next_ids), special.pad)  # (B, L)
    return {"targets": targets, "loss_mask": part_b, "block_position_ids": block}


def _first_row(bad: np.ndarray) -> int:
    """The first row (axis 0) where the boolean array `bad` (N,) or (N, L) holds."""
    return int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))


def check_samples(path: str | Path, columns: dict[str, np.ndarray], seq_len: int, vocab_size: int | None) -> None:
    """Raise CorruptShardError unless one blank-infilling shard's columns hold possible samples.

    Vectorised over the (memory-mapped) columns, once per shard open: 1 <= sep <= length <=
    seq_len; input ids (and stored targets) below the vocabulary; position ids as the builder
    makes them (Part A counts 0, 1, ..; a Part B token points at its mask, inside Part A;
    padding 0); stored block positions below seq_len; a stored loss mask 0/1; a known objective.
    Catches what changes shape or range, not an in-range flip (only the content hash does).
    """
    sep, length = columns["sep"].astype(np.int64), columns["length"].astype(np.int64)  # (N,), (N,)
    if (bad := (sep < 1) | (sep > length) | (length > seq_len)).any():
        row = _first_row(bad)
        raise CorruptShardError(
            path, f"sep {sep[row]} and length {length[row]} in row {row} break 1 <= sep <= length <= seq_len={seq_len}"
        )
    if vocab_size is not None:
        for name, what in (("input_ids", "token id"), ("targets", "target id")):
            ids = columns.get(name)
            if ids is not None and ids.size and int(ids.max()) >= vocab_size:
                row = _first_row(ids >= vocab_size)
                raise CorruptShardError(path, f"{what} {int(ids[row].max())} >= vocab size {vocab_size} in row {row}")
    slot = np.arange(seq_len)  # (L,)
    part_a = slot < sep[:, None]  # (N, L)
    part_b = ~part_a & (slot < length[:, None])  # (N, L)
    pos = columns["position_ids"]  # (N, L)
    if (bad := np.where(part_a, pos != slot, np.where(part_b, pos >= sep[:, None], pos != 0))).any():
        row = _first_row(bad)
        raise CorruptShardError(path, f"position ids of row {row} do not fit its sep {sep[row]} and length {length[row]}")
    for name, limit in (("block_position_ids", seq_len), ("loss_mask", 2)):
        values = columns.get(name)
        if values is not None and values.size and int(values.max()) >= limit:
            row = _first_row(values >= limit)
            raise CorruptShardError(path, f"{name} {int(values[row].max())} >= {limit} in row {row}")
    for name in ("objective", "task"):
        values = columns.get(name)
        if values is not None and (bad := (values < 0) | (values >= len(infilling.OBJECTIVES))).any():
            row = _first_row(bad)
            raise CorruptShardError(
                path, f"{name} {int(values[row])} in row {row} is none of {len(infilling.OBJECTIVES)} objectives"
            )


def encode_samples(batch: Any, id_type: str, seq_len: int, special: SpecialTokens = SPECIAL) -> tuple[pa.Table, list[str]]:
    """A SampleBatch as a narrow Arrow table; also the derivable columns it had to store."""
    ids = pa.uint32() if id_type == "uint32" else pa.uint16()
    small = _uint_for(seq_len + 1)
    derived = expand_samples(batch.input_ids.astype(np.int64), batch.sep.astype(np.int64), batch.length.astype(np.int64), special)
    explicit = [
        name
        for name in DERIVED
        if not np.array_equal(derived[name], np.asarray(getattr(batch, name)).astype(derived[name].dtype))
    ]

    def fixed(values: np.ndarray, type_: pa.DataType) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1).astype(type_.to_pandas_dtype()), type_)
        return pa.FixedSizeListArray.from_arrays(flat, seq_len)

    columns = {
        "input_ids": fixed(batch.input_ids, ids),
        "position_ids": fixed(batch.position_ids, small),
        "sep": pa.array(batch.sep.astype(small.to_pandas_dtype()), small),
        "length": pa.array(batch.length.astype(small.to_pandas_dtype()), small),
        "objective": pa.array(batch.objective.astype(np.int8), pa.int8()),
        "task": pa.array(batch.task.astype(np.int8), pa.int8()),
    }
    explicit_types = {"targets": ids, "loss_mask": pa.uint8(), "block_position_ids": small}
    for name in explicit:
        columns[name] = fixed(np.asarray(getattr(batch, name)), explicit_types[name])
    return pa.table(columns), explicit


# --------------------------------------------------------------------------- shard jobs


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One output shard: the unit of work a Prefect task maps over (picklable)."""

    plan: PackingPlan
    shard_index: int
    out_path: str
    cfg: InfillingConfig
    sentence_end_ids: tuple[int, ...]
    key: str  # content key: equal keys mean equal shard content
    special_tokens: dict[str, int] | None = None  # a released GLM tokenizer's ids; None: glm.special_tokens

    @property
    def special(self) -> SpecialTokens:
        return SpecialTokens(**self.special_tokens) if self.special_tokens else SPECIAL

    @property
    def first_row(self) -> int:
        return self.shard_index * self.cfg.samples_per_shard

    @property
    def n_rows(self) -> int:
        return min(self.cfg.samples_per_shard, self.plan.n_rows - self.first_row)


def _code_version() -> str:
    """Hash of the code that determines shard content (a model.py edit must not rebuild data)."""
    h = hashlib.sha256()
    for module in (infilling, special_tokens):
        h.update(code_of(Path(module.__file__).read_bytes()))
    h.update(code_of(Path(__file__).read_bytes()))
    return h.hexdigest()[:16]


def _content_config(cfg: InfillingConfig) -> dict[str, Any]:
    # the epoch count decides how many shard sets exist, not what any one of them holds
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k != "epochs"}


def shard_jobs(
    tokens_dir: str | Path,
    out_dir: str | Path,
    cfg: InfillingConfig,
    *,
    sentence_end_ids: Iterable[int] = (),
    special_tokens: dict[str, int] | None = None,
) -> list[ShardJob]:
    """Every shard of the dataset: cfg.epochs training sets, then the validation set."""
    tokens_dir, out_dir = Path(tokens_dir), Path(out_dir)
    sentence_end_ids = tuple(int(i) for i in sentence_end_ids)
    _check_tokens(tokens_dir)
    row_len = infilling.input_length(cfg)
    base = {
        "config": _content_config(cfg),
        "tokens": manifest_digest(tokens_dir),
        "code": _code_version(),
        "layout": LAYOUT_VERSION,
        "sentence_end_ids": sentence_end_ids,
        **({"special_tokens": special_tokens} if special_tokens else {}),
    }
    plans = [
        (packing_plan(tokens_dir, "train", row_len, seed=cfg.seed, epoch=e, shuffle=True), out_dir / epoch_dir(e))
        for e in range(cfg.epochs)
    ]
    if plans[0][0].n_tokens == 0:
        raise ValueError(f"{tokens_dir} has no training tokens; run tokenization on a non-empty corpus first")
    valid = packing_plan(tokens_dir, VALID, row_len, seed=cfg.seed, epoch=_VALID_EPOCH, shuffle=False)
    if valid.n_tokens:
        plans.append((valid, out_dir / VALID))
    jobs = []
    for plan, directory in plans:
        for s in range(-(-plan.n_rows // cfg.samples_per_shard)):
            key = sha256_json({**base, "split": plan.split, "epoch": plan.epoch, "shard": s})
            jobs.append(ShardJob(plan, s, str(directory / part_name(s)), cfg, sentence_end_ids, key, special_tokens))
    return jobs


def _existing_shard(path: Path, key: str) -> dict[str, Any] | None:
    """The info of a complete shard already written with this key, else None."""
    if not path.is_file():
        return None
    try:
        meta = read_arrow(path).schema.metadata or {}
    except (ManifestError, OSError):
        return None
    if meta.get(_META_KEY) != key.encode():
        return None
    return json.loads(meta[_META_INFO])


def build_shard(job: ShardJob) -> dict[str, Any]:
    """Pack, corrupt and write one shard (skipped if already written with the same key).

    Returns its info: split, epoch, shard, samples, tokens (real input tokens), explicit
    columns, the builder's stats (as a dict) and whether it was skipped.
    """
    path = Path(job.out_path)
    if (info := _existing_shard(path, job.key)) is not None:
        return {**info, "skipped": True}
    plan, cfg = job.plan, job.cfg
    rows, lengths = read_rows(plan, job.first_row, job.n_rows, job.special)  # (n, L_in), (n,)
    batch, stats = infilling.build_samples(
        rows,
        lengths,
        cfg,
        seed=cfg.seed,
        epoch=plan.epoch,
        first_index=job.first_row,
        sentence_end_ids=job.sentence_end_ids,
        special=job.special,
    )
    table, explicit = encode_samples(batch, plan.id_type, cfg.seq_len, job.special)
    info = {
        "split": plan.split,
        "epoch": plan.epoch if plan.split != VALID else None,
        "shard": job.shard_index,
        "samples": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "explicit_columns": explicit,
        "stats": stats.as_dict(),
    }
    metadata = {_META_KEY: job.key.encode(), _META_INFO: json.dumps(info).encode()}
    write_arrow(path, table.replace_schema_metadata(metadata))
    return {**info, "skipped": False}


# --------------------------------------------------------------------------- the dataset


def _merge_stats(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    total = infilling.BuildStats()
    for d in dicts:
        total = total.merge(infilling.BuildStats(**d))
    return total.as_dict()


def _check_tokens(tokens_dir: Path) -> None:
    problems = verify_manifest(tokens_dir)
    if problems:
        raise ManifestError(f"token shards at {tokens_dir} are not ready ({problems[0]}); run the tokenize stage first")


def _dataset_key(
    tokens_dir: Path, cfg: InfillingConfig, sentence_end_ids: tuple[int, ...], special_tokens: dict[str, int] | None = None
) -> str:
    return sha256_json(
        {
            "config": cfg.model_dump(mode="json"),
            "tokens": manifest_digest(tokens_dir),
            "code": _code_version(),
            "layout": LAYOUT_VERSION,
            "sentence_end_ids": sentence_end_ids,
            **({"special_tokens": special_tokens} if special_tokens else {}),
        }
    )


def _remove_stale_shards(out_dir: Path, keep: set[Path]) -> int:
    n = 0
    for path in [*out_dir.glob("epoch-*/part-*.arrow"), *out_dir.glob(f"{VALID}/part-*.arrow")]:
        if path.resolve() not in keep:
            path.unlink()
            n += 1
    return n


def _token_summary(tokens_dir: Path) -> dict[str, dict[str, int]]:
    """Per split: bytes, document tokens (no <eos>), documents and empty documents of the token shards."""
    summary = {}
    for split in ("train", VALID):
        s = summary[split] = {"bytes": 0, "tokens": 0, "docs": 0, "empty_docs": 0}
        for f in _token_files(tokens_dir, split):
            path = tokens_dir / f["path"]
            lengths = _doc_lengths(_document_lists(path))  # (D,)
            s["bytes"] += path.stat().st_size
            s["tokens"] += int(lengths.sum())
            s["docs"] += len(lengths)
            s["empty_docs"] += int((lengths == 0).sum())
    return summary


def _split_summary(files: list[dict[str, Any]], row_len: int) -> dict[str, int]:
    samples, tokens = sum(f["samples"] for f in files), sum(f["tokens"] for f in files)
    # only a split's last row can be partial; it is padded and passed on with its real length
    pad = samples * row_len - tokens
    return {"samples": samples, "tokens": tokens, "shards": len(files), "pad_tokens": pad, "partial_rows": int(pad > 0)}


def write_infilling_manifest(
    tokens_dir: str | Path,
    out_dir: str | Path,
    cfg: InfillingConfig,
    results: list[dict[str, Any]],
    *,
    sentence_end_ids: Iterable[int] = (),
    special_tokens: dict[str, int] | None = None,
) -> Path:
    """Close the stage: per-shard counts, merged builder stats, disk cost per token. Written last."""
    tokens_dir, out_dir = Path(tokens_dir), Path(out_dir)
    sentence_end_ids = tuple(int(i) for i in sentence_end_ids)
    files = []
    for r in results:
        directory = VALID if r["split"] == VALID else epoch_dir(r["epoch"])
        path = out_dir / directory / part_name(r["shard"])
        files.append(
            file_entry(
                path,
                out_dir,
                split=r["split"],
                epoch=r["epoch"],
                shard=r["shard"],
                samples=r["samples"],
                tokens=r["tokens"],
                explicit_columns=r["explicit_columns"],
            )
        )
    train = [f for f in files if f["split"] != VALID]
    valid = [f for f in files if f["split"] == VALID]
    row_len = infilling.input_length(cfg)
    epochs = [{"epoch": e, **_split_summary([f for f in train if f["epoch"] == e], row_len)} for e in range(cfg.epochs)]
    token_summary = _token_summary(tokens_dir)
    raw_bytes = sum(s["bytes"] for s in token_summary.values())
    raw_tokens = sum(s["tokens"] for s in token_summary.values())
    built_tokens = sum(f["tokens"] for f in files)
    built_bytes = sum(f["bytes"] for f in files)
    bytes_per_token = built_bytes / max(built_tokens, 1)
    raw_bytes_per_token = raw_bytes / raw_tokens if raw_tokens else None
    stats = {
        "build_key": _dataset_key(tokens_dir, cfg, sentence_end_ids, special_tokens),
        "layout_version": LAYOUT_VERSION,
        "seq_len": cfg.seq_len,
        "vocab_size": _token_vocab_size(tokens_dir),  # the loader checks ids against it
        "input_length": row_len,
        "epochs": epochs,
        "valid": _split_summary(valid, row_len),
        "token_shards": token_summary,
        "stored_columns": list(STORED),
        "derived_columns": list(DERIVED),
        "shards_with_explicit_columns": sum(1 for f in files if f["explicit_columns"]),
        "builder": {
            "train": _merge_stats([r["stats"] for r in results if r["split"] != VALID]),
            "valid": _merge_stats([r["stats"] for r in results if r["split"] == VALID]),
        },
        "bytes": built_bytes,
        "bytes_per_token": bytes_per_token,
        "raw_bytes_per_token": raw_bytes_per_token,
        "disk_ratio": bytes_per_token / raw_bytes_per_token if raw_bytes_per_token else None,
        "sentence_end_ids": list(sentence_end_ids),
        "special_tokens": special_tokens,  # None: glm.special_tokens; else a released GLM tokenizer's (the loader derives targets with them)
    }
    return write_manifest(out_dir, STAGE, files, config=cfg.model_dump(mode="json"), inputs=[tokens_dir], stats=stats)


def build_infilling_dataset(
    tokens_dir: str | Path,
    out_dir: str | Path,
    cfg: InfillingConfig,
    *,
    sentence_end_ids: Iterable[int] = (),
    progress: bool = True,
    special_tokens: dict[str, int] | None = None,
) -> Path:
    """Write out_dir/epoch-EEE/ (one shuffled, re-corrupted set per epoch) and out_dir/valid/; return the manifest.

    Idempotent: a complete matching manifest returns at once, and shards already written with
    the same content key are kept. Crash-safe: shards are renamed into place, the manifest last.
    """
    tokens_dir, out_dir = Path(tokens_dir), Path(out_dir)
    sentence_end_ids = tuple(int(i) for i in sentence_end_ids)
    _check_tokens(tokens_dir)
    key = _dataset_key(tokens_dir, cfg, sentence_end_ids, special_tokens)
    if stage_is_complete(out_dir):
        if read_manifest(out_dir)["stats"].get("build_key") == key:
            return out_dir / "manifest.json"
    (out_dir / "manifest.json").unlink(missing_ok=True)  # the stage is open until the new one is written
    if out_dir.exists():
        remove_stale_temporaries(out_dir)
    jobs = shard_jobs(tokens_dir, out_dir, cfg, sentence_end_ids=sentence_end_ids, special_tokens=special_tokens)
    if progress:
        from tqdm.auto import tqdm

        jobs_iter = tqdm(jobs, desc="blank-infilling shards", unit="shard")
    else:
        jobs_iter = jobs
    results = [build_shard(job) for job in jobs_iter]
    _remove_stale_shards(out_dir, {Path(j.out_path).resolve() for j in jobs})
    return write_infilling_manifest(
        tokens_dir, out_dir, cfg, results, sentence_end_ids=sentence_end_ids, special_tokens=special_tokens
    )
