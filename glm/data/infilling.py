"""Blank-infilling sample builder (docs/method.md sections 2-3), pure vectorised numpy.

A packed row of documents becomes one fixed-length GLM sample in two steps:

1. `sample_spans` draws, per sample, the objective and the spans to blank out (a `SpanPlan`);
2. `assemble` turns rows + spans into Part A ++ Part B with 2D positions (a `SampleBatch`).

`build_samples` does both. There is no Python loop over samples or tokens: every step is a
whole-batch array operation (cumsum / searchsorted / scatter).

Randomness is counter-based: each random number is splitmix64(key(seed, epoch, sample index),
purpose, counter), so a sample is a pure function of (seed, epoch, index) whatever the batch
composition or worker count, and a restarted build reproduces it exactly.

Choices the paper leaves open (all counted in `BuildStats`, nothing is dropped silently):

- token: lengths ~ Poisson(lambda) truncated to 1..max_span_len, drawn until they reach
  floor(mask_ratio * T) (at least 1), T = the row's tokens that are not <eos>. The spans' mass is
  spread over the documents in proportion to their lengths (span i goes to the document holding
  content position (mass before i + len_i / 2) * T / total mass); inside a document the spans are
  placed uniformly with at least one unmasked token between them (stars and bars, as GLM does).
  A span whose document is too short to hold it is dropped ("short_document"); a row where no
  span fits becomes a causal sample ("no_span_fits").
- sentence: a sentence ends after a `sentence_end_ids` token or at a document end. Sentences are
  taken in random order until they cover >= sentence_ratio of T; each chosen sentence is its own
  [sMASK] span (two chosen neighbours are two adjacent spans), as in the reference code.
- document: one [gMASK] span, the suffix of the whole row, covering ceil(r * row length) tokens
  (<eos> tokens counted and crossed), r ~ U[document_min_ratio, document_max_ratio]: nothing
  follows [gMASK] in Part A, as in the paper and in free generation.
- causal: Part A = [gMASK] (sep = 1), Part B = <sop> + the whole row (its <eos> tokens included).
- A row whose spans would not fit seq_len keeps its first spans ("seq_len"); token draws capped
  at `span_cap(cfg)` spans before reaching the target ("span_cap"); a row with no text
  ("empty_row") becomes causal. `input_length(cfg)` sizes rows so the caps bind rarely.

Over 600 lines on purpose: the objectives (token, sentence and document spans) share one keyed random
stream and one Part A / Part B assembly; splitting them would scatter the one sample layout they all write.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import numpy as np

# glm's modules by their names before the 2026-12 layout (glm.MOVED) on purpose: this module's code is
# hashed into every blank-infilling shard's build key (infill_shards._code_version); the new names would
# change it, rebuild every run's data and make pretraining continue as if on new data.
from glm.config import InfillingConfig
from glm.special_tokens import SPECIAL, SpecialTokens

OBJECTIVES = ("token", "sentence", "document", "causal")
TOKEN, SENTENCE, DOCUMENT, CAUSAL = range(4)
MASK_ID_OF_OBJECTIVE = np.array([SPECIAL.mask, SPECIAL.smask, SPECIAL.gmask, SPECIAL.gmask], np.int32)


def mask_id_of_objective(special: SpecialTokens = SPECIAL) -> np.ndarray:
    """The blank token of each objective (token, sentence, document, causal) under `special`'s ids."""
    return np.array([special.mask, special.smask, special.gmask, special.gmask], np.int32)


FALLBACK_REASONS = ("empty_row", "no_span_fits", "short_document", "span_cap", "seq_len")
# Probability that a full-length row at the default ratio needs more spans than `span_cap`.
SPAN_CAP_TAIL = 1e-4


# --------------------------------------------------------------------------- containers


@dataclass
class SampleBatch:
    """N built samples, every (N, L) array of length cfg.seq_len; padding after `length`."""

    input_ids: np.ndarray  # (N, L) int32
    position_ids: np.ndarray  # (N, L) int32
    block_position_ids: np.ndarray  # (N, L) int32
    targets: np.ndarray  # (N, L) int32, SPECIAL.pad where there is no loss
    loss_mask: np.ndarray  # (N, L) bool
    sep: np.ndarray  # (N,) int32, length of Part A
    length: np.ndarray  # (N,) int32, non-pad length
    objective: np.ndarray  # (N,) int8, index into OBJECTIVES: the layout (a fallback is CAUSAL)
    task: np.ndarray  # (N,) int8, the objective drawn from the mix: the loss group the sample counts toward

    def __len__(self) -> int:
        return len(self.sep)


@dataclass
class SpanPlan:
    """The random part of a batch: which spans each row loses and in which order Part B lists them."""

    objective: np.ndarray  # (N,) int8, final objective (after fallbacks)
    starts: np.ndarray  # (N, K) int32, row positions, real spans first and sorted by start
    lengths: np.ndarray  # (N, K) int32, 0 = no span in this slot
    order: np.ndarray  # (N, K) int32, Part B lists spans order[n, 0], order[n, 1], ...
    mask_ids: np.ndarray  # (N,) int32, the mask token of each row
    task: np.ndarray  # (N,) int8, the objective drawn from the mix, before fallbacks


@dataclass
class BuildStats:
    """Counters a shard writer aggregates with `merge`."""

    samples: int = 0
    objectives: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OBJECTIVES, 0))
    spans: int = 0
    masked_tokens: int = 0
    text_tokens: int = 0  # non-<eos> tokens of the input rows
    input_tokens: int = 0  # row lengths
    output_tokens: int = 0  # non-pad sample lengths
    dropped_spans: int = 0
    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_REASONS, 0))

    def merge(self, other: "BuildStats") -> "BuildStats":
        """A new BuildStats with both sets of counters added."""
        merged = BuildStats()
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                setattr(merged, f.name, {k: mine.get(k, 0) + theirs.get(k, 0) for k in {**mine, **theirs}})
            else:
                setattr(merged, f.name, mine + theirs)
        return merged

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- counter-based RNG

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# one independent stream per kind of random choice
_PURPOSE = {
    name: np.uint64((i * 0xD1B54A32D192ED03) & _MASK64)
    for i, name in enumerate(("objective", "length", "place", "shuffle", "sentence", "document"), start=1)
}


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """One 64-bit key per sample, a pure function of (seed, epoch, global sample index)."""
    base = _mix(np.array([seed & _MASK64], np.uint64) + _GOLDEN)  # (1,)
    base = _mix(base ^ _mix(np.array([epoch & _MASK64], np.uint64) + _GOLDEN))  # (1,)
    return _mix(base + np.asarray(indices, np.uint64) * _GOLDEN)  # (N,)


def _bits(keys: np.ndarray, purpose: str, counter: np.ndarray) -> np.ndarray:
    """64 random bits for each (key, counter) pair; keys and counter broadcast."""
    stream = _mix(np.asarray(keys, np.uint64) ^ _PURPOSE[purpose])
    return _mix(stream + (np.asarray(counter, np.uint64) + np.uint64(1)) * _GOLDEN)


def _uniform(keys: np.ndarray, purpose: str, counter: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) with 53 random bits."""
    return (_bits(keys, purpose, counter) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------- length budget


def _span_length_pmf(poisson_lambda: float, max_span_len: int) -> np.ndarray:
    """P(length = k) for k = 0..max_span_len: Poisson(lambda) truncated to 1..max_span_len."""
    k = np.arange(max_span_len + 1)
    log_p = k * math.log(poisson_lambda) - poisson_lambda - np.array([math.lgamma(i + 1) for i in k])
    pmf = np.exp(log_p)
    pmf[0] = 0.0
    return pmf / pmf.sum()


def mean_span_length(cfg: InfillingConfig) -> float:
    """Expected token-level span length (truncated Poisson)."""
    pmf = _span_length_pmf(cfg.poisson_lambda, cfg.max_span_len)
    return float(np.dot(np.arange(len(pmf)), pmf))


def _spans_needed(target: int, pmf: np.ndarray, tail: float) -> int:
    """Smallest k with P(sum of k span lengths < target) < tail."""
    below = np.zeros(target)  # P(S_k = s) for s < target
    below[0] = 1.0
    k = 0
    while below.sum() >= tail:
        below = np.convolve(below, pmf)[:target]
        k += 1
    return k


@functools.lru_cache(maxsize=64)
def _budget(seq_len: int, mask_ratio: float, poisson_lambda: float, max_span_len: int) -> tuple[int, int]:
    """(span cap, input length) with input length = seq_len - 2 * cap, cap the smallest that fits."""
    pmf = _span_length_pmf(poisson_lambda, max_span_len)

    def fits(cap: int) -> bool:
        target = max(1, int(mask_ratio * (seq_len - 2 * cap)))
        return _spans_needed(target, pmf, SPAN_CAP_TAIL) <= cap

    lo, hi = 1, (seq_len - 2) // 2
    if not fits(hi):
        raise ValueError(f"infilling.seq_len={seq_len} is too short for mask_ratio={mask_ratio}; raise seq_len")
    while lo < hi:  # fits() is monotone: a larger cap means a shorter row and fewer spans
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo, seq_len - 2 * lo


def span_cap(cfg: InfillingConfig) -> int:
    """Most token-level spans one sample holds (the Part A + Part B overhead is 2 tokens per span)."""
    return _budget(cfg.seq_len, cfg.mask_ratio, cfg.poisson_lambda, cfg.max_span_len)[0]


def input_length(cfg: InfillingConfig) -> int:
    """Packed row length so that samples fit cfg.seq_len: seq_len - 2 * span_cap(cfg).

    The cap is the smallest for which a full row at cfg.mask_ratio needs more spans than the
    cap with probability < SPAN_CAP_TAIL (exact, by convolving the span-length distribution).
    Each extra span of cap costs 2 tokens of text per row; a smaller cap trims more rows.
    seq_len 512 at 15%: cap 31, input length 450, P(trim) ~8e-5 per full row (a cap of 25
    would give 462 tokens of text but trim ~10% of rows; a cap of 28, 456 tokens and ~0.5%).
    """
    return _budget(cfg.seq_len, cfg.mask_ratio, cfg.poisson_lambda, cfg.max_span_len)[1]


# --------------------------------------------------------------------------- row structure


@dataclass
class _Documents:
    """Documents of all rows, flat and in row-major order (the <eos> is not part of the text)."""

    row: np.ndarray  # (D,) which row
    start: np.ndarray  # (D,) row position of the first token
    content_start: np.ndarray  # (D,) text tokens of the row before it
    length: np.ndarray  # (D,) text tokens (eos excluded)
    row_text: np.ndarray  # (N,) text tokens per row
    width: int  # key stride: row * width + content position is a sorted search key

    @property
    def key(self) -> np.ndarray:
        return self.row.astype(np.int64) * self.width + self.content_start  # (D,)


def _documents(rows: np.ndarray, lengths: np.ndarray, eos: int = SPECIAL.eos) -> _Documents:
    n, width = rows.shape
    in_row = np.arange(width, dtype=np.int32) < lengths[:, None]  # (N, L_in)
    is_eos = (rows == eos) & in_row  # (N, L_in)
    row_text = lengths - is_eos.sum(1, dtype=np.int32)  # (N,)
    starts_doc = np.empty_like(in_row)  # (N, L_in)
    starts_doc[:, 0] = True
    starts_doc[:, 1:] = is_eos[:, :-1]
    starts_doc &= in_row
    row, start = np.nonzero(starts_doc)  # (D,) each
    per_row = np.bincount(row, minlength=n)  # (N,)
    first = np.cumsum(per_row) - per_row  # (N,) flat index of each row's first document
    ordinal = np.arange(len(row)) - first[row]  # (D,) documents before it in its row
    content_start = start - ordinal  # each earlier document ended with exactly one <eos>
    content_end = np.append(content_start[1:], 0)  # (D,)
    last = np.ones(len(row), bool)  # (D,) last document of its row
    last[:-1] = row[1:] != row[:-1]
    content_end[last] = row_text[row[last]]
    return _Documents(row, start, content_start, content_end - content_start, row_text, width + 1)


def _group_starts(group: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(n, K) True where a valid slot begins a new run of equal `group` values along K."""
    first = np.ones_like(valid)
    first[:, 1:] = group[:, 1:] != group[:, :-1]
    return first & valid


# --------------------------------------------------------------------------- span samplers
# Each returns flat spans (row, start, length) sorted by (row, start), plus the rows that could
# not take any span, and updates `stats`.


def _token_spans(idx, keys, lengths, docs: _Documents, cfg: InfillingConfig, stats: BuildStats):
    k_max = span_cap(cfg)
    slot = np.arange(k_max, dtype=np.uint64)  # (K,)
    pmf = _span_length_pmf(cfg.poisson_lambda, cfg.max_span_len)
    cdf = np.cumsum(pmf)[1:]
    cdf[-1] = 1.0
    span_len = (np.searchsorted(cdf, _uniform(keys[:, None], "length", slot), side="right") + 1).astype(np.int64)  # (n, K)

    text = docs.row_text[idx].astype(np.int64)  # (n,)
    target = np.maximum(1, np.floor(cfg.mask_ratio * text)).astype(np.int64)  # (n,)
    mass_after = np.cumsum(span_len, 1)  # (n, K)
    mass_before = mass_after - span_len  # (n, K)
    count = (mass_before < target[:, None]).sum(1)  # (n,) spans needed to reach the target
    stats.fallbacks["span_cap"] += int((mass_after[:, -1] < target).sum())
    allowed = (cfg.seq_len - lengths[idx]) // 2  # (n,) Part A + Part B cost 2 tokens per span
    stats.fallbacks["seq_len"] += int((count > allowed).sum())
    count = np.minimum(count, allowed)
    valid = slot[None, :].astype(np.int64) < count[:, None]  # (n, K)

    # spread the spans' mass over the row's text, then find each span's document
    total = np.take_along_axis(mass_after, (count - 1)[:, None], 1)  # (n, 1)
    at = (2 * mass_before + span_len) * text[:, None] // (2 * total)  # (n, K) content position < text
    doc = np.searchsorted(docs.key, idx[:, None].astype(np.int64) * docs.width + at, side="right") - 1  # (n, K)
    doc_len = docs.length[doc]  # (n, K)

    # a document holds its spans (in draw order) while sum(len + 1) - 1 <= its length
    step = np.where(valid, span_len + 1, 0)  # (n, K)
    used = np.cumsum(step, 1)  # (n, K)
    first = _group_starts(doc, valid)
    base = np.maximum.accumulate(np.where(first, used - step, 0), 1)  # (n, K) used before the group
    keep = valid & (used - base - 1 <= doc_len)  # (n, K), a prefix of every group
    dropped = (valid & ~keep).sum(1)  # (n,)
    stats.dropped_spans += int(dropped.sum())
    stats.fallbacks["short_document"] += int((dropped > 0).sum())

    # move the kept spans to the front of each row (groups stay contiguous and in order)
    front = np.argsort(~keep, axis=1, kind="stable")  # (n, K)
    span_len, doc = np.take_along_axis(span_len, front, 1), np.take_along_axis(doc, front, 1)
    valid = np.take_along_axis(keep, front, 1)  # (n, K)
    doc_len = docs.length[doc]  # (n, K)
    step = np.where(valid, span_len + 1, 0)  # (n, K)
    used = np.cumsum(step, 1)  # (n, K)
    first = _group_starts(doc, valid)
    base = np.maximum.accumulate(np.where(first, used - step, 0), 1)  # (n, K)
    last = np.ones_like(valid)
    last[:, :-1] = doc[:, :-1] != doc[:, 1:]
    last |= ~np.roll(valid, -1, 1)
    last[:, -1] = True
    group_end = np.minimum.accumulate(np.where(last & valid, used, np.iinfo(np.int64).max)[:, ::-1], 1)[:, ::-1]
    free = doc_len - (group_end - base - 1)  # (n, K) unmasked tokens left to spread as gaps

    # stars and bars: sorted uniform places in 0..free, then each span shifts past the earlier ones
    place = np.floor(_uniform(keys[:, None], "place", slot) * (free + 1)).astype(np.int64)  # (n, K)
    sort_key = np.where(valid, doc * docs.width + place, np.iinfo(np.int64).max)  # (n, K)
    place = np.sort(sort_key, 1) - doc * docs.width  # (n, K), sorted within each document
    start = docs.start[doc] + place + (used - step - base)  # (n, K)

    r, k = np.nonzero(valid)
    empty = idx[~valid[:, 0]]
    stats.fallbacks["no_span_fits"] += len(empty)
    return idx[r], start[r, k], span_len[r, k], empty


def _sentence_spans(idx, keys, rows, lengths, cfg: InfillingConfig, sentence_end_ids, stats: BuildStats, eos: int = SPECIAL.eos):
    sub = rows[idx]  # (n, L_in)
    in_row = np.arange(sub.shape[1], dtype=np.int32) < lengths[idx][:, None]  # (n, L_in)
    is_eos = (sub == eos) & in_row  # (n, L_in)
    ends = np.isin(sub, sentence_end_ids) & in_row  # (n, L_in)
    begins = np.empty_like(in_row)  # (n, L_in) a sentence starts after an <eos> or a sentence end
    begins[:, 0] = True
    begins[:, 1:] = is_eos[:, :-1] | ends[:, :-1]
    begins &= in_row & ~is_eos
    eos_before = np.cumsum(is_eos, 1, dtype=np.int32)  # (n, L_in)
    r, p = np.nonzero(begins)  # (S,) sentences, row-major
    text = lengths[idx] - eos_before[:, -1]  # (n,)
    content = p - eos_before[r, p]  # (S,) text position of the sentence start
    last = np.append(r[1:] != r[:-1], True)  # (S,)
    size = np.append(content[1:], 0) - content  # (S,) text tokens up to the next sentence
    size[last] = text[r[last]] - content[last]

    # take sentences in random order until they cover the target
    per_row = np.bincount(r, minlength=len(idx))  # (n,)
    first = np.cumsum(per_row) - per_row  # (n,)
    ordinal = np.arange(len(r)) - first[r]  # (S,)
    priority = _bits(keys[r], "sentence", ordinal) >> np.uint64(24)  # (S,) 40 random bits
    perm = np.argsort((r.astype(np.uint64) << np.uint64(40)) | priority, kind="stable")  # (S,) by row, then priority
    mass = np.cumsum(size[perm])  # (S,)
    before = mass - size[perm]  # (S,)
    before -= before[first[r[perm]]]  # mass of earlier picks in the same row
    target = np.ceil(cfg.sentence_ratio * text - 1e-9).astype(np.int64)  # (n,)
    chosen = np.empty(len(r), bool)
    chosen[perm] = before < target[r[perm]]

    # one [sMASK] span per chosen sentence, as in the reference (two chosen neighbours are two
    # adjacent spans, so the model learns how many sentences a run of [sMASK] stands for)
    span_row, span_start, span_len = r[chosen], p[chosen], size[chosen].astype(np.int64)  # (P,) row-major, by start

    # a row keeps the spans that fit seq_len (rare: short sentences)
    per_row = np.bincount(span_row, minlength=len(idx))  # (n,)
    allowed = (cfg.seq_len - lengths[idx]) // 2  # (n,)
    stats.fallbacks["seq_len"] += int((per_row > allowed).sum())
    rank = np.arange(len(span_row)) - (np.cumsum(per_row) - per_row)[span_row]  # (P,)
    fit = rank < allowed[span_row]
    stats.dropped_spans += int((~fit).sum())
    return idx[span_row[fit]], span_start[fit], span_len[fit]


def _document_spans(idx, keys, lengths, cfg: InfillingConfig):
    # The paper's (and the reference's "suffix" path's) document objective: one span of a U[min, max]
    # fraction of the whole row, taken from its end, so [gMASK] is the last token of Part A as in free
    # generation. The row counts with its <eos> tokens (they are what the model reads), and a span may
    # cross them: Part B then writes on past a document end, as the causal objective does.
    size = lengths[idx]  # (n,)
    ratio = cfg.document_min_ratio + _uniform(keys, "document", 0) * (cfg.document_max_ratio - cfg.document_min_ratio)
    span_len = np.clip(np.ceil(ratio * size - 1e-9), 1, size).astype(np.int64)  # (n,)
    return idx, size - span_len, span_len


# --------------------------------------------------------------------------- the plan


def _check_rows(rows, row_lengths, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows)
    lengths = np.asarray(row_lengths)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be a 2-D integer array (N, L_in) of token ids, got {rows.dtype} of shape {rows.shape}")
    if lengths.shape != (rows.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"row_lengths must be an integer array of shape ({rows.shape[0]},), got {lengths.dtype} {lengths.shape}")
    lengths = lengths.astype(np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > min(rows.shape[1], seq_len - 2)):
        raise ValueError(
            f"row_lengths must be in 1..min(row width {rows.shape[1]}, seq_len - 2 = {seq_len - 2}), got "
            f"{lengths.min()}..{lengths.max()}; pack rows to input_length(cfg) tokens"
        )
    return rows, lengths


def _pad_spans(n: int, row: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat spans sorted by (row, start) -> (n, K) starts and lengths, real spans first."""
    per_row = np.bincount(row, minlength=n)  # (n,)
    slot = np.arange(len(row)) - (np.cumsum(per_row) - per_row)[row]  # (P,)
    k = max(1, int(per_row.max(initial=0)))
    starts = np.zeros((n, k), np.int32)  # (n, K)
    lengths = np.zeros((n, k), np.int32)  # (n, K)
    starts[row, slot] = start
    lengths[row, slot] = length
    return starts, lengths


def sample_spans(
    rows: np.ndarray,
    row_lengths: np.ndarray,
    cfg: InfillingConfig,
    *,
    seed: int,
    epoch: int,
    first_index: int,
    sentence_end_ids: Sequence[int] = (),
    special: SpecialTokens = SPECIAL,
) -> tuple[SpanPlan, BuildStats]:
    """Draw each row's objective, spans and Part B order (row k is sample first_index + k)."""
    rows, lengths = _check_rows(rows, row_lengths, cfg.seq_len)
    n = len(rows)
    keys = sample_keys(seed, epoch, first_index + np.arange(n, dtype=np.uint64))  # (N,)
    stats = BuildStats(samples=n, input_tokens=int(lengths.sum()))

    weights = np.array([cfg.objective_mix.get(name, 0.0) for name in OBJECTIVES])
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    objective = np.searchsorted(cumulative, _uniform(keys, "objective", 0), side="right").astype(np.int8)  # (N,)
    # A fallback changes a sample's layout, not the loss it counts toward: the trainer weighs each
    # drawn objective by its mix weight (glm/training/train.py), so a rare causal fallback stays in its group.
    task = objective.copy()  # (N,)

    docs = _documents(rows, lengths, special.eos)
    stats.text_tokens = int(docs.row_text.sum())
    no_text = docs.row_text == 0
    stats.fallbacks["empty_row"] += int((no_text & (objective != CAUSAL)).sum())
    objective[no_text] = CAUSAL

    parts = []  # flat (row, start, length) spans of each objective
    idx = np.nonzero(objective == TOKEN)[0]
    if len(idx):
        row, start, length, empty = _token_spans(idx, keys[idx], lengths, docs, cfg, stats)
        objective[empty] = CAUSAL
        parts.append((row, start, length))
    idx = np.nonzero(objective == SENTENCE)[0]
    if len(idx):
        end_ids = np.asarray(sentence_end_ids, dtype=rows.dtype).reshape(-1)
        parts.append(_sentence_spans(idx, keys[idx], rows, lengths, cfg, end_ids, stats, special.eos))
    idx = np.nonzero(objective == DOCUMENT)[0]
    if len(idx):
        parts.append(_document_spans(idx, keys[idx], lengths, cfg))
    idx = np.nonzero(objective == CAUSAL)[0]
    parts.append((idx, np.zeros(len(idx), np.int64), lengths[idx]))  # Part A = just [gMASK]

    row, start, length = (np.concatenate(x) for x in zip(*parts))
    by_row = np.argsort(row, kind="stable")  # each sampler emits its rows' spans sorted by start
    starts, span_lengths = _pad_spans(n, row[by_row], start[by_row], length[by_row])  # (N, K)

    valid = span_lengths > 0  # (N, K)
    if cfg.shuffle_spans:
        priority = _uniform(keys[:, None], "shuffle", np.arange(starts.shape[1], dtype=np.uint64))  # (N, K)
        order = np.argsort(np.where(valid, priority, 2.0), axis=1, kind="stable").astype(np.int32)  # (N, K)
    else:
        order = np.broadcast_to(np.arange(starts.shape[1], dtype=np.int32), starts.shape).copy()  # (N, K)

    for i, name in enumerate(OBJECTIVES):
        stats.objectives[name] += int((objective == i).sum())
    stats.spans = int(valid.sum())
    stats.masked_tokens = int(span_lengths.sum())
    plan = SpanPlan(objective, starts, span_lengths, order, mask_id_of_objective(special)[objective], task)
    return plan, stats


# --------------------------------------------------------------------------- assembly


def assemble(
    rows: np.ndarray,
    row_lengths: np.ndarray,
    span_starts: np.ndarray,
    span_lengths: np.ndarray,
    span_order: np.ndarray,
    mask_ids: np.ndarray | int,
    seq_len: int,
    special: SpecialTokens = SPECIAL,
) -> SampleBatch:
    """Part A ++ Part B with 2D positions, for given spans (docs/method.md section 2.3).

    span_starts/span_lengths (N, K): real spans (length > 0) first, sorted by start and not
    overlapping; length-0 slots are padding. span_order (N, K): a permutation of 0..K-1 per row,
    Part B lists span span_order[n, 0] first. mask_ids: the mask token, per row or one for all.
    The returned `objective` and `task` are filled with -1 (build_samples sets them).
    """
    rows = np.asarray(rows)
    n, width = rows.shape
    lengths = np.asarray(row_lengths).astype(np.int64)  # (N,)
    starts = np.asarray(span_starts).astype(np.int64)  # (N, K)
    span_len = np.asarray(span_lengths).astype(np.int64)  # (N, K)
    order = np.asarray(span_order).astype(np.int64)  # (N, K)
    mask_ids = np.broadcast_to(np.asarray(mask_ids, np.int32), (n,))  # (N,)
    k = starts.shape[1]
    if lengths.shape != (n,) or starts.shape != (n, k) or span_len.shape != (n, k) or order.shape != (n, k):
        raise ValueError(
            f"assemble: rows {rows.shape}, row_lengths {lengths.shape}, span_starts {starts.shape}, "
            f"span_lengths {span_len.shape} and span_order {order.shape} must agree as (N, L_in), (N,), (N, K) x3"
        )
    valid = span_len > 0  # (N, K)
    ends = starts + span_len  # (N, K)
    if (span_len < 0).any() or (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("assemble: span_lengths must be >= 0 with the real (length > 0) spans first in each row")
    if (valid & ((starts < 0) | (ends > lengths[:, None]))).any():
        raise ValueError("assemble: every span must lie inside its row (0 <= start, start + length <= row length)")
    if (valid[:, 1:] & (starts[:, 1:] < ends[:, :-1])).any():
        raise ValueError("assemble: spans must be sorted by start and must not overlap")
    if (np.sort(order, 1) != np.arange(k)).any():
        raise ValueError("assemble: span_order must be a permutation of 0..K-1 in every row")
    n_spans = valid.sum(1)  # (N,)
    total = lengths + 2 * n_spans  # (N,) Part A + Part B
    if (total > seq_len).any():
        raise ValueError(f"assemble: a sample needs {total.max()} > seq_len={seq_len} tokens; use fewer spans or shorter rows")

    # span-level bookkeeping on (N, K): Part A slot of each mask, Part B slot of each <sop>
    shrink = np.where(valid, span_len - 1, 0)  # (N, K) tokens a span removes from Part A
    mask_pos = starts - (np.cumsum(shrink, 1) - shrink)  # (N, K)
    sep = lengths - shrink.sum(1)  # (N,)
    step = np.where(valid, span_len + 1, 0)  # (N, K) Part B tokens of each span
    step_in_order = np.take_along_axis(step, order, 1)  # (N, K)
    sop_pos = np.empty_like(step)  # (N, K)
    np.put_along_axis(sop_pos, order, np.cumsum(step_in_order, 1) - step_in_order, 1)
    sop_pos += sep[:, None]

    # Every output column is piecewise constant between span boundaries: the offset from slot
    # to row position, the mask position (Part B) and the slot before <sop> (Part B). Scatter
    # each one's change at its boundaries, then one cumsum yields all of them for every slot.
    span_row = np.nonzero(valid)[0]  # (P,) real spans, row-major = row order
    b_valid = np.take_along_axis(valid, order, 1)  # (N, K) the same spans, in Part B order
    b_sop = np.take_along_axis(sop_pos, order, 1)  # (N, K)
    b_values = np.stack(
        [
            np.take_along_axis(starts, order, 1) - b_sop - 1,  # row position = slot + this
            np.take_along_axis(mask_pos, order, 1),  # position id
            b_sop - 1,  # block position = slot - this
        ]
    )[:, b_valid]  # (3, P) real spans in Part B order, row-major (same rows as span_row)
    before = np.roll(b_values, 1, 1)  # (3, P) the values of the previous span in Part B
    first = np.ones(len(span_row), bool)  # (P,) first Part B span of its row
    first[1:] = span_row[1:] != span_row[:-1]
    before[:, first] = 0
    before[0, first] = (lengths - sep)[span_row[first]]  # the source offset at the end of Part A
    # (mask_pos + 1 < sep < total <= seq_len and <sop> slots < seq_len: every change lands inside)
    row_base = span_row * seq_len  # (P,) flat index of each span's row
    b_slots = row_base + b_sop[b_valid]  # (P,) flat <sop> slots, Part B order
    source = np.zeros((n, seq_len), np.intp)  # (N, L) row position of each slot's token, minus the slot (intp: take() wants it)
    position_ids = np.zeros((n, seq_len), np.int32)  # (N, L)
    block_position_ids = np.zeros((n, seq_len), np.int32)  # (N, L) first: the slot before the span's <sop>
    source.reshape(-1)[row_base + mask_pos[valid] + 1] += shrink[valid].astype(np.int32)  # Part A skips the span's rest
    for column, change in zip((source, position_ids, block_position_ids), (b_values - before).astype(np.int32)):
        column.reshape(-1)[b_slots] += change
        np.cumsum(column, 1, out=column)

    slot = np.arange(seq_len, dtype=np.int32)  # (L,)
    part_a = slot < sep[:, None]  # (N, L)
    padding = slot >= total[:, None]  # (N, L)
    loss_mask = ~(part_a | padding)  # (N, L) exactly Part B
    source += slot
    np.clip(source, 0, width - 1, out=source)  # slots outside the row are overwritten below
    source += (np.arange(n, dtype=np.intp) * width)[:, None]
    input_ids = np.ascontiguousarray(rows).reshape(-1).take(source).astype(np.int32, copy=False)  # (N, L)
    del source
    np.copyto(input_ids, special.pad, where=padding)
    flat_ids = input_ids.reshape(-1)
    flat_ids[row_base + mask_pos[valid]] = mask_ids[span_row]
    flat_ids[b_slots] = special.sop
    targets = np.full((n, seq_len), special.pad, np.int32)  # (N, L) Part B input shifted left by one
    np.copyto(targets[:, :-1], input_ids[:, 1:], where=loss_mask[:, :-1])
    targets.reshape(-1)[b_slots + np.take_along_axis(span_len, order, 1)[b_valid]] = special.eop
    np.copyto(position_ids, slot, where=part_a)
    np.copyto(position_ids, 0, where=padding)
    np.subtract(slot, block_position_ids, out=block_position_ids)
    block_position_ids *= loss_mask
    length = total.astype(np.int32)  # (N,)
    return SampleBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        block_position_ids=block_position_ids,
        targets=targets,
        loss_mask=loss_mask,
        sep=sep.astype(np.int32),
        length=length,
        objective=np.full(n, -1, np.int8),
        task=np.full(n, -1, np.int8),
    )


def build_samples(
    rows: np.ndarray,
    row_lengths: np.ndarray,
    cfg: InfillingConfig,
    *,
    seed: int,
    epoch: int,
    first_index: int,
    sentence_end_ids: Sequence[int] = (),
    special: SpecialTokens = SPECIAL,
) -> tuple[SampleBatch, BuildStats]:
    """Build one GLM sample per packed row; row k is global sample first_index + k."""
    plan, stats = sample_spans(
        rows,
        row_lengths,
        cfg,
        seed=seed,
        epoch=epoch,
        first_index=first_index,
        sentence_end_ids=sentence_end_ids,
        special=special,
    )
    batch = assemble(rows, row_lengths, plan.starts, plan.lengths, plan.order, plan.mask_ids, cfg.seq_len, special)
    batch.objective, batch.task = plan.objective, plan.task
    stats.output_tokens = int(batch.length.sum())
    return batch, stats
