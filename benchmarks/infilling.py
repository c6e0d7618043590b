"""Blank-infilling sample construction: output tokens/s/core, vectorised builder vs per-sample Python.

Both sides build the same objective from the same packed rows at seq_len 512 in this process.
The reference follows the original GLM collate code (blocklm_utils.py: construct_blocks,
sample_span_in_document, make_block_data): a Python loop per sample that draws span lengths,
places them document by document and concatenates per-sample numpy pieces, then pads the batch.
Throughput counts non-pad output tokens per second of this process's CPU time (one core: numpy
runs these operations single-threaded), best of a few runs after a warm-up; CPU time keeps the
figure honest on a machine shared with other jobs.
"""

from __future__ import annotations

import random
import time
from typing import Iterator

import numpy as np

from glm.core.config import InfillingConfig
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.data.infilling import build_samples, input_length

SEQ_LEN = 512
VOCAB = 32000
SENTENCE_END_IDS = tuple(range(NUM_SPECIAL, NUM_SPECIAL + 1600))  # 1 token in 20 ends a sentence


def packed_rows(n: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random full rows with ~3 documents each."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(NUM_SPECIAL, VOCAB, size=(n, width)).astype(np.int32)  # (N, W)
    rows[rng.random((n, width)) < 3 / width] = SPECIAL.eos
    return rows, np.full(n, width)


# --------------------------------------------------------------------------- the per-sample reference


class ReferenceBuilder:
    """Per-sample Python sample construction in the style of the original GLM implementation."""

    def __init__(self, cfg: InfillingConfig, sentence_end_ids=SENTENCE_END_IDS):
        self.cfg = cfg
        self.sentence_end_ids = set(sentence_end_ids)
        lengths = range(1, cfg.max_span_len + 1)
        pmf = [cfg.poisson_lambda**k / np.prod(np.arange(1, k + 1, dtype=float)) for k in lengths]
        self.span_lengths = list(lengths)
        self.cum_weights = list(np.cumsum(pmf))

    def token_spans(self, tokens: np.ndarray, rng: random.Random) -> list[tuple[int, int]]:
        text = int((tokens != SPECIAL.eos).sum())
        masked_lengths, masked_count = [], 0
        while masked_count < max(1, int(self.cfg.mask_ratio * text)):
            length = rng.choices(self.span_lengths, cum_weights=self.cum_weights)[0]
            masked_lengths.append(length)
            masked_count += length
        rng.shuffle(masked_lengths)
        eos = [-1] + np.nonzero(tokens == SPECIAL.eos)[0].tolist() + [len(tokens)]
        documents = sorted(((a + 1, b - a - 1) for a, b in zip(eos, eos[1:]) if b - a > 1), key=lambda d: d[1])
        spans, used = [], 0
        for i, (offset, length) in enumerate(documents):
            budget = length if i == len(documents) - 1 else int(length * self.cfg.mask_ratio)
            mine, mass = [], 0
            while used < len(masked_lengths) and mass + masked_lengths[used] + len(mine) <= budget:
                mass += masked_lengths[used]
                mine.append(masked_lengths[used])
                used += 1
            places = sorted(rng.randrange(length - mass - len(mine) + 2) for _ in mine)
            for place, span_length in zip(places, mine):
                spans.append((offset + place, offset + place + span_length))
                offset += span_length + 1
        return sorted(spans)

    def sentence_spans(self, tokens: np.ndarray, rng: random.Random) -> list[tuple[int, int]]:
        sentences, last = [], 0
        for i, token in enumerate(tokens.tolist()):
            if token in self.sentence_end_ids:
                if last < i + 1:
                    sentences.append((last, i + 1))
                last = i + 1
            elif token == SPECIAL.eos:
                if last < i:
                    sentences.append((last, i))
                last = i + 1
        if last < len(tokens):
            sentences.append((last, len(tokens)))
        rng.shuffle(sentences)
        target = self.cfg.sentence_ratio * int((tokens != SPECIAL.eos).sum())
        spans, mass = [], 0
        for start, end in sentences:
            spans.append((start, end))
            mass += end - start
            if mass >= target:
                break
        return sorted(spans)

    def document_spans(self, tokens: np.ndarray, rng: random.Random) -> list[tuple[int, int]]:
        eos = [-1] + np.nonzero(tokens == SPECIAL.eos)[0].tolist() + [len(tokens)]
        start, end = max(((a + 1, b) for a, b in zip(eos, eos[1:])), key=lambda d: d[1] - d[0])
        ratio = rng.uniform(self.cfg.document_min_ratio, self.cfg.document_max_ratio)
        length = min(end - start, max(1, int(np.ceil(ratio * (end - start)))))
        return [(end - length, end)]

    def make_block_data(self, tokens: np.ndarray, spans: list[tuple[int, int]], mask_id: int, rng: random.Random):
        positions = np.ones(len(tokens), dtype=np.int64)
        for start, end in spans:
            positions[start + 1 : end] = 0
        positions = np.cumsum(positions) - 1
        order = list(range(len(spans)))
        if self.cfg.shuffle_spans:
            rng.shuffle(order)
        target_tokens, target_positions, target_blocks, targets = [], [], [], []
        for i in order:
            start, end = spans[i]
            target_tokens += [[SPECIAL.sop], tokens[start:end]]
            targets += [tokens[start:end], [SPECIAL.eop]]
            target_positions.append(np.full(end - start + 1, positions[start]))
            target_blocks.append(np.arange(1, end - start + 2))
        source_tokens, source_positions, last = [], [], 0
        for start, end in spans:
            source_tokens += [tokens[last:start], [mask_id]]
            source_positions += [positions[last:start], [positions[start]]]
            last = end
        source_tokens.append(tokens[last:])
        source_positions.append(positions[last:])
        sep = sum(map(len, source_tokens))
        input_ids = np.concatenate(source_tokens + target_tokens)
        target_ids = np.concatenate([np.full(sep, SPECIAL.pad)] + targets)
        position_ids = np.concatenate(source_positions + target_positions)
        block_ids = np.concatenate([np.zeros(sep, dtype=np.int64)] + target_blocks)
        return input_ids, target_ids, position_ids, block_ids, sep

    def build(self, rows: np.ndarray, lengths: np.ndarray, objective: str, seed: int) -> dict[str, np.ndarray]:
        samples = []
        for k, (row, length) in enumerate(zip(rows, lengths)):
            rng = random.Random(seed * 1_000_003 + k)
            tokens = row[:length]
            if objective == "token":
                spans, mask_id = self.token_spans(tokens, rng), SPECIAL.mask
            elif objective == "sentence":
                spans, mask_id = self.sentence_spans(tokens, rng), SPECIAL.smask
            elif objective == "document":
                spans, mask_id = self.document_spans(tokens, rng), SPECIAL.gmask
            else:
                spans, mask_id = [(0, len(tokens))], SPECIAL.gmask
            samples.append(self.make_block_data(tokens, spans, mask_id, rng))
        batch = {
            name: np.full((len(samples), self.cfg.seq_len), fill, np.int32)
            for name, fill in (
                ("input_ids", SPECIAL.pad),
                ("targets", SPECIAL.pad),
                ("position_ids", 0),
                ("block_position_ids", 0),
            )
        }
        batch["sep"] = np.array([s[4] for s in samples], np.int32)
        batch["length"] = np.array([len(s[0]) for s in samples], np.int32)
        for i, (input_ids, target_ids, position_ids, block_ids, _) in enumerate(samples):
            n = len(input_ids)
            batch["input_ids"][i, :n] = input_ids
            batch["targets"][i, :n] = target_ids
            batch["position_ids"][i, :n] = position_ids
            batch["block_position_ids"][i, :n] = block_ids
        batch["loss_mask"] = batch["targets"] != SPECIAL.pad
        return batch


# --------------------------------------------------------------------------- timing


def _tokens_per_second(build, repeats: int) -> float:
    """Best of `repeats` timed calls after one warm-up; build(r) returns the tokens it made."""
    build(0)
    best = float("inf")
    for r in range(repeats):
        start = time.process_time()
        tokens = build(r + 1)
        best = min(best, (time.process_time() - start) / tokens)
    return 1.0 / best


def run(quick: bool = False) -> Iterator[dict]:
    batch, reference_batch, repeats = (64, 8, 1) if quick else (1024, 128, 5)
    for objective in ("token", "sentence", "document", "causal"):
        cfg = InfillingConfig(seq_len=SEQ_LEN, objective_mix={objective: 1.0})
        rows, lengths = packed_rows(batch, input_length(cfg))
        reference = ReferenceBuilder(cfg)

        def ours(r: int) -> int:
            samples, _ = build_samples(rows, lengths, cfg, seed=r, epoch=0, first_index=0, sentence_end_ids=SENTENCE_END_IDS)
            return int(samples.length.sum())

        def theirs(r: int) -> int:
            return int(reference.build(rows[:reference_batch], lengths[:reference_batch], objective, seed=r)["length"].sum())

        value = _tokens_per_second(ours, repeats)
        baseline = _tokens_per_second(theirs, max(1, repeats // 2))
        yield {
            "name": f"infilling_{objective}",
            "metric": "output tokens per second per core",
            "value": round(value),
            "unit": "tokens/s",
            "reference": round(baseline),
            "ratio": round(value, 0) / round(baseline, 0),
            "better": "higher",
            "seq_len": SEQ_LEN,
            "batch": batch,
            "reference_batch": reference_batch,
            "samples_per_s": round(value * batch / ours(0)),
        }


if __name__ == "__main__":
    import json

    for result in run():
        print(json.dumps(result))
