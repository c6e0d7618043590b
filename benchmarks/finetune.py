"""Cloze fine-tuning and scoring throughput (examples/s) for the tiny and small presets on CPU.

Synthetic sentence-length inputs (~35 tokens, like Rotten Tomatoes sentences) through the real
ClozeTask / cloze_scores / train step. Multi-token scoring is compared side by side with the naive
way of scoring candidates (one full row Part A ++ <sop> ++ answer per candidate); ratio > 1 means
running Part A once and sharing its KV cache across the candidates is faster.
"""

from __future__ import annotations

import time
import zlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from glm.core.config import ClozeTaskConfig, OptimConfig, model_config
from glm.core.model import GLM, configure_optimizer
from glm.core.special_tokens import NUM_SPECIAL
from glm.finetuning import finetune as ft


class WordTokenizer:
    """One id per whitespace word (a stable hash): enough for throughput, no sentencepiece model needed."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, specials: bool = True) -> list[int]:
        return [NUM_SPECIAL + zlib.crc32(w.encode()) % (self.vocab_size - NUM_SPECIAL) for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join("w" for _ in ids)


def _texts(n: int, words: int = 32, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{x}" for x in rng.integers(0, 5000, words)) for _ in range(n)]


def _naive_multi_token_scores(model: GLM, task: ft.ClozeTask, items) -> torch.Tensor:
    """The reference: one right-padded row per (example, candidate), Part A repeated for every candidate."""
    rows, pos, blk, tgt = [], [], [], []
    inputs, targets = ft.part_b_rows(task.answers, task.task.score_eop)
    for e in items:
        a = len(e.part_a)
        for part_b, target in zip(inputs, targets):
            rows.append(e.part_a + part_b)
            pos.append(list(range(a)) + [e.mask_pos] * len(part_b))
            blk.append([0] * a + list(range(1, len(part_b) + 1)))
            tgt.append([0] * a + target)
    width = max(map(len, rows))
    ids, p, b, t = (ft._pad_rows(x, width) for x in (rows, pos, blk, tgt))  # (B*L, T) each
    sep = torch.tensor([len(e.part_a) for e in items for _ in task.answers])  # (B*L,)
    select = b > 0  # (B*L, T)
    logits = model(ids, p, b, sep, select=select)  # (N, V)
    logp = logits.log_softmax(-1).gather(1, t[select][:, None])[:, 0]  # (N,)
    row = torch.arange(len(rows))[:, None].expand(-1, width)[select]  # (N,)
    return torch.zeros(len(rows)).index_add(0, row, logp).view(len(items), -1)  # (B, L)


def _rate(fn, n_examples: int, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_examples * repeats / (time.perf_counter() - t0)


def _group_by_length_row(
    model: GLM, tok: WordTokenizer, task_cfg: ClozeTaskConfig, max_seq_len: int, preset: str, batch: int, n: int
) -> dict:
    """One epoch of train steps over sentences of 4-60 words: batches grouped by length vs random batches."""
    rng = np.random.default_rng(1)
    task = ft.ClozeTask(tok, task_cfg, max_seq_len)
    items = [task.encode(" ".join(f"w{x}" for x in rng.integers(0, 5000, int(k)))) for k in rng.integers(4, 61, n)]
    labels = torch.tensor([i % 2 for i in range(n)])
    optimizer = configure_optimizer(model, OptimConfig(lr=1e-5), "cpu")
    model.train()

    def epoch(lengths) -> None:
        for b in ft.epoch_batches(n, batch, np.random.default_rng(0), lengths):
            loss = F.cross_entropy(ft.cloze_scores(model, task, [items[i] for i in b]), labels[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    grouped = _rate(lambda: epoch([len(e.part_a) for e in items]), n, 1)
    plain = _rate(lambda: epoch(None), n, 1)
    return {
        "name": f"finetune_cloze_{preset}_group_by_length",
        "metric": "train throughput over one epoch of 4-60 word sentences",
        "unit": "examples/s",
        "value": grouped,
        "reference": plain,
        "ratio": grouped / plain,
        "better": "higher",
        "reference_name": "random batches (finetune.group_by_length=false)",
        "preset": preset,
        "batch_size": batch,
        "examples": n,
    }


def run(quick: bool = False) -> Iterator[dict]:
    torch.manual_seed(0)
    presets = ["tiny"] if quick else ["tiny", "small"]
    for preset in presets:
        vocab = 512 if preset == "tiny" else 16000
        cfg = model_config(preset, vocab_size=vocab)
        model = GLM(cfg)
        tok = WordTokenizer(vocab)
        batch = 8 if quick else 32
        repeats = 2 if quick else (10 if preset == "tiny" else 3)
        texts = _texts(batch)
        single = ClozeTaskConfig(verbalizers={"0": "terrible", "1": "great"})
        multi = ClozeTaskConfig(
            multi_token=True, verbalizers={"0": "very bad indeed", "1": "rather bad", "2": "quite good", "3": "very good indeed"}
        )

        # fine-tuning: forward + backward + AdamW step on single-token cloze batches
        task = ft.ClozeTask(tok, single, cfg.max_seq_len)
        items = [task.encode(t) for t in texts]
        labels = torch.tensor([i % 2 for i in range(batch)])
        optimizer = configure_optimizer(model, OptimConfig(lr=1e-5), "cpu")
        model.train()

        def train_step() -> None:
            loss = F.cross_entropy(ft.cloze_scores(model, task, items), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def train_step_bf16() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                train_step()

        common = {"preset": preset, "batch_size": batch, "tokens_per_example": len(items[0].part_a) + 1}
        fp32 = _rate(train_step, batch, repeats)
        yield {"name": f"finetune_cloze_{preset}", "metric": "train throughput", "unit": "examples/s", "value": fp32, **common}
        bf16 = _rate(train_step_bf16, batch, repeats)
        yield {
            "name": f"finetune_cloze_{preset}_bf16",
            "metric": "train throughput, bf16 autocast (finetune.precision=bf16)",
            "unit": "examples/s",
            "value": bf16,
            "reference": fp32,
            "ratio": bf16 / fp32,
            "better": "higher",
            "reference_name": "fp32",
            **common,
        }
        yield _group_by_length_row(model, tok, single, cfg.max_seq_len, preset, batch, n=4 * batch if quick else 16 * batch)

        model.eval()
        with torch.no_grad():
            yield {
                "name": f"score_cloze_{preset}",
                "metric": "single-token scoring throughput",
                "unit": "examples/s",
                "value": _rate(lambda: ft.cloze_scores(model, task, items), batch, repeats),
                **common,
            }
            mtask = ft.ClozeTask(tok, multi, cfg.max_seq_len)
            mitems = [mtask.encode(t) for t in texts]
            torch.testing.assert_close(
                ft.cloze_scores(model, mtask, mitems), _naive_multi_token_scores(model, mtask, mitems), atol=1e-4, rtol=1e-4
            )
            cached = _rate(lambda: ft.cloze_scores(model, mtask, mitems), batch, repeats)
            naive = _rate(lambda: _naive_multi_token_scores(model, mtask, mitems), batch, repeats)
        yield {
            "name": f"score_cloze_multi_token_{preset}",
            "metric": "4-label multi-token scoring throughput",
            "unit": "examples/s",
            "value": cached,
            "reference": naive,
            "ratio": cached / naive,
            "better": "higher",
            "reference_name": "Part A repeated per candidate",
            **common,
        }
