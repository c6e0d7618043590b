"""Tests of the vectorised blank-infilling builder (docs/method.md sections 2-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glm.core.config import InfillingConfig
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.data.infilling import (
    CAUSAL,
    DOCUMENT,
    OBJECTIVES,
    SENTENCE,
    TOKEN,
    BuildStats,
    assemble,
    build_samples,
    input_length,
    sample_spans,
    span_cap,
)

MIX = {"token": 0.4, "sentence": 0.2, "document": 0.2, "causal": 0.2}
PERIODS = np.arange(NUM_SPECIAL, NUM_SPECIAL + 50)  # 1 token in 20 ends a sentence


def random_rows(n: int, width: int, rng: np.random.Generator, max_docs: int = 4, min_len: int | None = None):
    """Random rows of packed documents: text ids >= NUM_SPECIAL, <eos> between documents."""
    rows = rng.integers(NUM_SPECIAL, NUM_SPECIAL + 1000, size=(n, width)).astype(np.int32)  # (N, W)
    lengths = rng.integers(min_len or max(1, width // 2), width + 1, size=n)  # (N,)
    eos_count = rng.integers(0, max_docs, size=n)  # (N,)
    for i in range(n):
        rows[i, rng.choice(lengths[i], size=min(eos_count[i], lengths[i]), replace=False)] = SPECIAL.eos
        rows[i, lengths[i] :] = SPECIAL.pad
    return rows, lengths


def decode(batch, n: int) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """Rebuild row n from Part A + Part B; also its spans (start, length) and Part A mask positions."""
    sep, length = int(batch.sep[n]), int(batch.length[n])
    ids, pos, block, tgt = (a[n].tolist() for a in (batch.input_ids, batch.position_ids, batch.block_position_ids, batch.targets))
    filled: dict[int, list[int]] = {}
    j = sep
    while j < length:
        assert ids[j] == SPECIAL.sop and block[j] == 1
        mask_pos = pos[j]
        span = []
        k = j
        while tgt[k] != SPECIAL.eop:
            span.append(tgt[k])
            assert ids[k + 1] == tgt[k] and pos[k + 1] == mask_pos and block[k + 1] == k - j + 2
            k += 1
        assert mask_pos not in filled and span
        filled[mask_pos] = span
        j = k + 1
    row, spans = [], []
    for i, token in enumerate(ids[:sep]):
        if i in filled:
            spans.append((len(row), len(filled[i])))
            row.extend(filled[i])
        else:
            row.append(token)
    return row, spans, sorted(filled)


# --------------------------------------------------------------------------- assembly


def test_worked_example_of_glm_md_section_1():
    x = np.array([[11, 12, 13, 14, 15, 16]])  # x1..x6
    batch = assemble(x, [6], span_starts=[[2, 4]], span_lengths=[[1, 2]], span_order=[[1, 0]], mask_ids=SPECIAL.mask, seq_len=12)
    M, S, E, P = SPECIAL.mask, SPECIAL.sop, SPECIAL.eop, SPECIAL.pad
    assert batch.sep.tolist() == [5] and batch.length.tolist() == [10]
    assert batch.input_ids[0].tolist() == [11, 12, M, 14, M, S, 15, 16, S, 13, P, P]
    assert batch.targets[0].tolist() == [P, P, P, P, P, 15, 16, E, 13, E, P, P]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2, 0, 0]
    assert batch.block_position_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2, 0, 0]
    assert batch.loss_mask[0].tolist() == [False] * 5 + [True] * 5 + [False] * 2


def test_assemble_accepts_padding_anywhere_in_the_order():
    x = np.array([[11, 12, 13, 14, 15, 16]])
    kwargs = dict(span_starts=[[2, 4, 0]], span_lengths=[[1, 2, 0]], mask_ids=SPECIAL.mask, seq_len=12)
    reference = assemble(x, [6], span_order=[[1, 0, 2]], **kwargs)
    for order in ([[2, 1, 0]], [[1, 2, 0]]):
        batch = assemble(x, [6], span_order=order, **kwargs)
        for name in ("input_ids", "position_ids", "block_position_ids", "targets", "loss_mask", "sep", "length"):
            assert np.array_equal(getattr(batch, name), getattr(reference, name)), (order, name)


def test_assemble_rejects_bad_spans():
    x = np.arange(10, 20)[None, :]  # (1, 10)
    with pytest.raises(ValueError, match="overlap"):
        assemble(x, [10], [[2, 3]], [[2, 2]], [[0, 1]], SPECIAL.mask, 32)
    with pytest.raises(ValueError, match="inside its row"):
        assemble(x, [8], [[7]], [[2]], [[0]], SPECIAL.mask, 32)
    with pytest.raises(ValueError, match="permutation"):
        assemble(x, [10], [[1, 5]], [[1, 1]], [[0, 0]], SPECIAL.mask, 32)
    with pytest.raises(ValueError, match="seq_len"):
        assemble(x, [10], [[1, 5]], [[1, 1]], [[0, 1]], SPECIAL.mask, 13)


def test_build_rejects_bad_rows():
    cfg = InfillingConfig(seq_len=32)
    with pytest.raises(ValueError, match="2-D integer"):
        build_samples(np.arange(10), [10], cfg, seed=0, epoch=0, first_index=0)
    with pytest.raises(ValueError, match="input_length"):
        build_samples(np.full((1, 40), 20), [31], cfg, seed=0, epoch=0, first_index=0)
    with pytest.raises(ValueError, match="row_lengths"):
        build_samples(np.full((2, 20), 20), [5], cfg, seed=0, epoch=0, first_index=0)


# --------------------------------------------------------------------------- sampling


def test_pinned_small_sample():
    """seqio-style golden output for one small row (changing the RNG or a sampler changes it)."""
    cfg = InfillingConfig(seq_len=48)
    row = np.array([list(range(20, 34)) + [SPECIAL.eos] + list(range(40, 60))])  # 14 + eos + 20 tokens
    plan, stats = sample_spans(row, [35], cfg, seed=0, epoch=0, first_index=3)
    # 34 text tokens -> target floor(0.15 * 34) = 5 masked tokens: spans [24 25], [53 54], [57]
    assert plan.starts.tolist() == [[4, 28, 32]] and plan.lengths.tolist() == [[2, 2, 1]]
    assert plan.order.tolist() == [[1, 0, 2]] and stats.spans == 3 and (input_length(cfg), span_cap(cfg)) == (38, 5)
    batch, _ = build_samples(row, [35], cfg, seed=0, epoch=0, first_index=3)
    M, S, E, P = SPECIAL.mask, SPECIAL.sop, SPECIAL.eop, SPECIAL.pad
    assert batch.objective.tolist() == [TOKEN] and batch.sep.tolist() == [33] and batch.length.tolist() == [41]
    part_a = [20, 21, 22, 23, M, *range(26, 34), SPECIAL.eos, *range(40, 53), M, 55, 56, M, 58, 59]
    assert batch.input_ids[0].tolist() == part_a + [S, 53, 54, S, 24, 25, S, 57] + [P] * 7
    assert batch.targets[0].tolist() == [P] * 33 + [53, 54, E, 24, 25, E, 57, E] + [P] * 7
    assert batch.position_ids[0].tolist() == list(range(33)) + [27, 27, 27, 4, 4, 4, 30, 30] + [0] * 7
    assert batch.block_position_ids[0].tolist() == [0] * 33 + [1, 2, 3, 1, 2, 3, 1, 2] + [0] * 7


def test_same_sample_whatever_the_batch():
    rng = np.random.default_rng(1)
    cfg = InfillingConfig(seq_len=96, objective_mix=MIX)
    rows, lengths = random_rows(100, input_length(cfg), rng)
    whole, _ = build_samples(rows, lengths, cfg, seed=5, epoch=2, first_index=1000, sentence_end_ids=PERIODS)
    parts = [
        build_samples(rows[i : i + 7], lengths[i : i + 7], cfg, seed=5, epoch=2, first_index=1000 + i, sentence_end_ids=PERIODS)[
            0
        ]
        for i in range(0, 100, 7)
    ]
    for name in ("input_ids", "position_ids", "block_position_ids", "targets", "loss_mask", "sep", "length", "objective", "task"):
        assert np.array_equal(getattr(whole, name), np.concatenate([getattr(p, name) for p in parts])), name
    assert set(whole.objective.tolist()) == {TOKEN, SENTENCE, DOCUMENT, CAUSAL}
    other_epoch, _ = build_samples(rows, lengths, cfg, seed=5, epoch=3, first_index=1000, sentence_end_ids=PERIODS)
    other_seed, _ = build_samples(rows, lengths, cfg, seed=6, epoch=2, first_index=1000, sentence_end_ids=PERIODS)
    assert not np.array_equal(whole.input_ids, other_epoch.input_ids)
    assert not np.array_equal(whole.input_ids, other_seed.input_ids)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_sample_decodes_back_to_its_row(shuffle):
    rng = np.random.default_rng(2)
    cfg = InfillingConfig(seq_len=64, objective_mix=MIX, shuffle_spans=shuffle)
    rows, lengths = random_rows(600, input_length(cfg), rng, max_docs=6, min_len=1)
    batch, stats = build_samples(rows, lengths, cfg, seed=3, epoch=0, first_index=0, sentence_end_ids=PERIODS)
    slot = np.arange(cfg.seq_len)
    part_b = (slot >= batch.sep[:, None]) & (slot < batch.length[:, None])  # (N, L)
    assert np.array_equal(batch.loss_mask, part_b)
    assert np.array_equal(batch.loss_mask, batch.targets != SPECIAL.pad)
    padding = slot >= batch.length[:, None]
    assert (batch.input_ids[padding] == SPECIAL.pad).all() and (batch.position_ids[padding] == 0).all()
    assert (batch.block_position_ids[padding] == 0).all() and (batch.block_position_ids[slot < batch.sep[:, None]] == 0).all()
    assert (batch.length <= cfg.seq_len).all()
    in_order = 0
    for n in range(len(rows)):
        row, spans, mask_positions = decode(batch, n)
        text = rows[n, : lengths[n]]
        assert row == text.tolist()
        part_a = batch.input_ids[n, : batch.sep[n]]
        expected_mask = [SPECIAL.mask, SPECIAL.smask, SPECIAL.gmask, SPECIAL.gmask][batch.objective[n]]
        assert (part_a[mask_positions] == expected_mask).all()
        assert np.isin(part_a, SPECIAL.mask_ids).sum() == len(spans)  # every mask has its span
        b_positions = batch.position_ids[n, batch.sep[n] : batch.length[n]]
        assert np.isin(part_a[b_positions], SPECIAL.mask_ids).all()
        if batch.objective[n] == CAUSAL:
            assert batch.sep[n] == 1 and spans == [(0, lengths[n])]
            continue
        if batch.objective[n] == DOCUMENT:  # the row's suffix, <eos> tokens and all: [gMASK] ends Part A
            assert len(spans) == 1 and spans[0][0] + spans[0][1] == lengths[n] and part_a[-1] == SPECIAL.gmask
        else:
            for start, size in spans:
                assert SPECIAL.eos not in text[start : start + size]  # inside one document
        gaps = [b[0] - (a[0] + a[1]) for a, b in zip(spans, spans[1:])]
        # token spans are separated by an unmasked token; sentence spans may touch (one per sentence)
        assert all(g >= (1 if batch.objective[n] == TOKEN else 0) for g in gaps)
        starts = [batch.position_ids[n, j] for j in range(batch.sep[n], batch.length[n]) if batch.block_position_ids[n, j] == 1]
        in_order += starts == sorted(starts)
    assert stats.spans == (batch.input_ids == SPECIAL.sop).sum()
    if not shuffle:
        assert in_order == (batch.objective != CAUSAL).sum()
    else:
        assert in_order < (batch.objective != CAUSAL).sum()


def test_row_dtype_width_and_empty_batch():
    cfg = InfillingConfig(seq_len=64, objective_mix=MIX)
    rows, lengths = random_rows(40, input_length(cfg), np.random.default_rng(5))
    reference, _ = build_samples(rows, lengths, cfg, seed=1, epoch=0, first_index=0, sentence_end_ids=PERIODS)
    wide = np.concatenate([rows, np.zeros((40, 100), rows.dtype)], 1)  # wider than seq_len, same lengths
    for variant in (rows.astype(np.int64), rows.astype(np.uint16), wide):
        batch, _ = build_samples(variant, lengths, cfg, seed=1, epoch=0, first_index=0, sentence_end_ids=PERIODS)
        assert np.array_equal(batch.input_ids, reference.input_ids) and np.array_equal(batch.targets, reference.targets)
    empty, stats = build_samples(np.zeros((0, 10), np.int32), np.zeros(0, np.int64), cfg, seed=1, epoch=0, first_index=0)
    assert empty.input_ids.shape == (0, 64) and stats.samples == 0


def test_causal_objective_is_plain_language_modelling():
    cfg = InfillingConfig(seq_len=32, objective_mix={"causal": 1.0})
    row = np.array([[20, 21, SPECIAL.eos, 22, 23]])
    batch, _ = build_samples(row, [5], cfg, seed=0, epoch=0, first_index=0)
    G, S, E = SPECIAL.gmask, SPECIAL.sop, SPECIAL.eop
    assert batch.sep.tolist() == [1] and batch.length.tolist() == [7]
    assert batch.input_ids[0, :7].tolist() == [G, S, 20, 21, SPECIAL.eos, 22, 23]
    assert batch.targets[0, :7].tolist() == [SPECIAL.pad, 20, 21, SPECIAL.eos, 22, 23, E]
    assert batch.position_ids[0, :7].tolist() == [0] * 7
    assert batch.block_position_ids[0, :7].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_fallbacks_are_counted_and_still_valid():
    cfg = InfillingConfig(seq_len=64)
    eos = SPECIAL.eos
    tiny_docs = np.tile([20, eos], 20)  # twenty 1-token documents: most span lengths do not fit
    no_text = np.full(40, eos)
    text = np.arange(40) + NUM_SPECIAL
    rows = np.stack([tiny_docs, no_text, text] + [tiny_docs] * 20)
    lengths = np.full(len(rows), 40)
    plan, stats = sample_spans(rows, lengths, cfg, seed=0, epoch=0, first_index=0)
    assert stats.fallbacks["empty_row"] == 1 and plan.objective[1] == CAUSAL
    assert stats.fallbacks["short_document"] > 0 and stats.dropped_spans > 0
    tiny = [0] + list(range(3, 23))
    assert stats.fallbacks["no_span_fits"] == (plan.objective[tiny] == CAUSAL).sum() > 0
    assert (plan.objective[tiny] == TOKEN).any() and plan.objective[2] == TOKEN
    assert (plan.lengths[tiny][plan.objective[tiny] == TOKEN] <= 1).all()  # only 1-token spans fit
    batch, _ = build_samples(rows, lengths, cfg, seed=0, epoch=0, first_index=0)
    assert (batch.length <= cfg.seq_len).all() and batch.loss_mask.any(1).all()
    assert sum(stats.objectives.values()) == len(rows)
    assert (plan.task == TOKEN).all() and (batch.task == TOKEN).all()  # fallbacks keep their drawn objective's loss group


def test_seq_len_fallback_trims_spans():
    cfg = InfillingConfig(seq_len=40, mask_ratio=0.5, poisson_lambda=1.0, max_span_len=2)
    rows = np.arange(38)[None, :] % 500 + NUM_SPECIAL  # 38 tokens: room for one span only
    plan, stats = sample_spans(rows, [38], cfg, seed=0, epoch=0, first_index=0)
    assert stats.fallbacks["seq_len"] == 1 and (plan.lengths > 0).sum() == 1


def test_build_stats_merge_and_dict():
    cfg = InfillingConfig(seq_len=64, objective_mix=MIX)
    rows, lengths = random_rows(50, input_length(cfg), np.random.default_rng(4))
    _, a = build_samples(rows[:20], lengths[:20], cfg, seed=0, epoch=0, first_index=0, sentence_end_ids=PERIODS)
    _, b = build_samples(rows[20:], lengths[20:], cfg, seed=0, epoch=0, first_index=20, sentence_end_ids=PERIODS)
    _, whole = build_samples(rows, lengths, cfg, seed=0, epoch=0, first_index=0, sentence_end_ids=PERIODS)
    merged = a.merge(b)
    assert merged.as_dict() == whole.as_dict()
    assert merged.samples == 50 and sum(merged.objectives.values()) == 50
    assert BuildStats().merge(merged).as_dict() == merged.as_dict()
    assert set(merged.as_dict()["objectives"]) == set(OBJECTIVES)


# --------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def corpus_512():
    """10,000 rows at seq_len 512 with a few documents each and ~20-token sentences."""
    cfg = InfillingConfig(seq_len=512)
    rng = np.random.default_rng(0)
    width = input_length(cfg)
    rows = rng.integers(NUM_SPECIAL, NUM_SPECIAL + 1000, size=(10_000, width)).astype(np.int32)  # (N, W)
    doc_breaks = rng.random((10_000, width)) < 3 / width  # ~3 <eos> per row
    rows[doc_breaks] = SPECIAL.eos
    lengths = np.full(10_000, width)
    return cfg, rows, lengths


def _span_tokens(plan):
    """(rows with a span, start, end) of every real span in a plan."""
    r, k = np.nonzero(plan.lengths > 0)
    return r, plan.starts[r, k].astype(np.int64), (plan.starts + plan.lengths)[r, k].astype(np.int64)


def _eos_inside(rows, r, start, end):
    eos_before = np.zeros((rows.shape[0], rows.shape[1] + 1), np.int64)
    eos_before[:, 1:] = np.cumsum(rows == SPECIAL.eos, 1)
    return eos_before[r, end] - eos_before[r, start]


def test_token_level_statistics(corpus_512):
    cfg, rows, lengths = corpus_512
    plan, stats = sample_spans(rows, lengths, cfg, seed=11, epoch=0, first_index=0)
    text = lengths - (rows == SPECIAL.eos).sum(1)
    assert (plan.objective == TOKEN).all()
    fraction = plan.lengths.sum() / text.sum()
    assert 0.14 <= fraction <= 0.16
    lam = cfg.poisson_lambda
    weights = [lam**k / math.factorial(k) for k in range(1, cfg.max_span_len + 1)]
    expected_mean = sum(k * w for k, w in zip(range(1, cfg.max_span_len + 1), weights)) / sum(weights)
    assert abs(plan.lengths.sum() / (plan.lengths > 0).sum() - expected_mean) <= 0.1
    r, start, end = _span_tokens(plan)
    assert (_eos_inside(rows, r, start, end) == 0).all()
    same_row = r[1:] == r[:-1]
    assert (start[1:][same_row] - end[:-1][same_row] >= 1).all()
    rare = stats.fallbacks["span_cap"] + stats.fallbacks["seq_len"]
    assert rare <= 10  # input_length sizes rows so the span cap binds ~1e-4 of the time
    assert stats.masked_tokens == plan.lengths.sum() and stats.spans == len(r)


def test_sentence_level_statistics(corpus_512):
    cfg, rows, lengths = corpus_512
    cfg = cfg.model_copy(update={"objective_mix": {"sentence": 1.0}})
    plan, _ = sample_spans(rows, lengths, cfg, seed=12, epoch=0, first_index=0, sentence_end_ids=PERIODS)
    assert (plan.objective == SENTENCE).all() and (plan.mask_ids == SPECIAL.smask).all()
    text = lengths - (rows == SPECIAL.eos).sum(1)
    assert (plan.lengths.sum(1) >= cfg.sentence_ratio * text).all()
    r, start, end = _span_tokens(plan)
    breaks = np.isin(rows, PERIODS) | (rows == SPECIAL.eos)  # (N, W)
    begins_sentence = (start == 0) | breaks[r, np.maximum(start - 1, 0)]
    followed_by_eos = rows[r, np.minimum(end, rows.shape[1] - 1)] == SPECIAL.eos
    ends_sentence = np.isin(rows[r, end - 1], PERIODS) | (end == lengths[r]) | followed_by_eos
    assert begins_sentence.all() and ends_sentence.all()
    assert (_eos_inside(rows, r, start, end) == 0).all()
    assert (plan.lengths.sum(1) / text).mean() < 0.3  # whole ~20-token sentences, not whole rows


def test_document_level_statistics(corpus_512):
    """One span, the suffix of the whole row (across <eos>), 50-100% of the row's length: the paper's document level."""
    cfg, rows, lengths = corpus_512
    cfg = cfg.model_copy(update={"objective_mix": {"document": 1.0}})
    lengths = np.random.default_rng(3).integers(2, rows.shape[1] + 1, len(rows))  # partial rows too
    plan, _ = sample_spans(rows, lengths, cfg, seed=13, epoch=0, first_index=0)
    assert ((plan.lengths > 0).sum(1) == 1).all() and (plan.mask_ids == SPECIAL.gmask).all()
    r, start, end = _span_tokens(plan)
    assert (r == np.arange(len(rows))).all() and (end == lengths).all()  # nothing after the span stays in Part A
    ratio = (end - start) / lengths
    assert ratio.min() >= cfg.document_min_ratio and ratio.max() <= cfg.document_max_ratio
    long = lengths >= 200  # ceil() adds up to 1 / length to the ratio of a short row
    assert abs(ratio[long].mean() - 0.75) < 0.01  # uniform in [0.5, 1] (standard error ~0.002)
    assert np.histogram(ratio[long], bins=5, range=(0.5, 1.0))[0].min() > 0.18 * long.sum()
    assert (_eos_inside(rows, r, start, end) > 0).mean() > 0.5  # spans cross document ends (~3 <eos> per full row)
    batch, _ = build_samples(rows[:200], lengths[:200], cfg, seed=13, epoch=0, first_index=0)
    assert (batch.input_ids[np.arange(200), batch.sep - 1] == SPECIAL.gmask).all()  # [gMASK] ends Part A


def test_sentence_spans_are_one_per_sentence(corpus_512):
    """Each [sMASK] span is exactly one sentence; chosen neighbours stay two spans (the reference's layout)."""
    cfg, rows, lengths = corpus_512
    cfg = cfg.model_copy(update={"objective_mix": {"sentence": 1.0}})
    plan, _ = sample_spans(rows, lengths, cfg, seed=14, epoch=0, first_index=0, sentence_end_ids=PERIODS)
    r, start, end = _span_tokens(plan)
    ends = np.isin(rows, PERIODS)  # (N, W)
    ends_before = np.zeros((rows.shape[0], rows.shape[1] + 1), np.int64)
    ends_before[:, 1:] = np.cumsum(ends, 1)
    inner_ends = ends_before[r, end - 1] - ends_before[r, start]  # sentence ends before the span's last token
    assert (inner_ends == 0).all() and (_eos_inside(rows, r, start, end) == 0).all()
    same_row = r[1:] == r[:-1]
    touching = (start[1:] == end[:-1]) & same_row
    assert touching.sum() > 1000  # with ~20-token sentences and 15% coverage, neighbours are often both chosen
    assert (start[1:][same_row] >= end[:-1][same_row]).all()
    batch, _ = build_samples(rows[:50], lengths[:50], cfg, seed=14, epoch=0, first_index=0, sentence_end_ids=PERIODS)
    smask = (batch.input_ids == SPECIAL.smask).sum(1)  # (50,) one [sMASK] per span, adjacent ones included
    assert smask.tolist() == (plan.lengths[:50] > 0).sum(1).tolist()
