"""Blank filling: KV-cache decoding = full recompute, greedy/sampling/beam, batching, <eop>, several blanks."""

from __future__ import annotations

import math
import random

import pytest
import torch

from glm.core.config import OptimConfig
from glm.core.model import GLM, configure_optimizer, infilling_loss
from glm.core.special_tokens import SPECIAL
from glm.evaluation.generate import (
    GenerationConfig,
    banned_ngram_tokens,
    fill_blanks,
    filter_logits,
    infill_inputs,
    splice,
)
from tests.glm.factories import lively_model, tiny_model

VOCAB = 64
M, S, G, EOP = SPECIAL.mask, SPECIAL.smask, SPECIAL.gmask, SPECIAL.eop
PROMPTS = [[40, 41, M, 42, S, 43], [50, G], [30, 31, 32, M, 33, 34, 35, 36, 37]]  # different lengths
ANSWER = {M: [20, 21], S: [22]}  # what the trained fixture learns to put in each kind of blank


def _rows(n: int, seed: int, T: int = 24) -> dict[str, torch.Tensor]:
    """Prompts with 1-2 blanks of kind [MASK]/[sMASK]; each span is ANSWER[kind] then <eop>."""
    rng = random.Random(seed)
    cols: dict[str, list] = {k: [] for k in ("input_ids", "position_ids", "block_position_ids", "sep", "targets", "loss_mask")}
    for _ in range(n):
        L = rng.randint(4, 12)
        prompt = [rng.randint(30, VOCAB - 1) for _ in range(L)]
        for w in rng.sample(range(L), rng.randint(1, 2)):
            prompt[w] = rng.choice([M, S])
        spans = [ANSWER[t] for t in prompt if t in ANSWER]
        x = infill_inputs(prompt, spans)
        targets, loss = [0] * L, [False] * L
        for s in spans:
            targets += s + [EOP]
            loss += [True] * (len(s) + 1)
        pad = T - len(targets)
        cols["input_ids"].append(x["input_ids"].tolist() + [0] * pad)
        cols["position_ids"].append(x["position_ids"].tolist() + [0] * pad)
        cols["block_position_ids"].append(x["block_position_ids"].tolist() + [0] * pad)
        cols["sep"].append(L)
        cols["targets"].append(targets + [0] * pad)
        cols["loss_mask"].append(loss + [False] * pad)
    return {k: torch.tensor(v) for k, v in cols.items()}


@pytest.fixture(scope="module")
def trained() -> GLM:
    """A tiny model taught to fill [MASK] with 20 21 <eop> and [sMASK] with 22 <eop> (~2 s)."""
    model = tiny_model(VOCAB).train()
    opt = configure_optimizer(model, OptimConfig(lr=5e-3, weight_decay=0.0), "cpu")
    for step in range(240):
        loss, _ = infilling_loss(model, _rows(32, seed=step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        held_out, _ = infilling_loss(model, _rows(64, seed=10_000))
    assert held_out.item() < 0.05
    return model


# --------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("rotary", [False, True])
def test_cached_decoding_equals_full_recompute(rotary):
    model = lively_model(VOCAB, rotary_2d=rotary)
    results = fill_blanks(model, PROMPTS, GenerationConfig(max_new_tokens=4, output_scores=True))
    for prompt, res in zip(PROMPTS, results):
        x = infill_inputs(prompt, res.spans)  # Part A ++ [sop] span ... for every blank
        full = model(x["input_ids"][None], x["position_ids"][None], x["block_position_ids"][None], x["sep"][None])
        part_b = full[0, len(prompt) :]  # (steps, V): one prediction per decoding step
        assert res.step_logits.shape == part_b.shape
        torch.testing.assert_close(res.step_logits, part_b, atol=1e-5, rtol=0)


def test_infill_inputs_and_splice():
    x = infill_inputs([10, M, 11, S], [[20, 21], [22]])
    assert x["input_ids"].tolist() == [10, M, 11, S, SPECIAL.sop, 20, 21, SPECIAL.sop, 22]
    assert x["position_ids"].tolist() == [0, 1, 2, 3, 1, 1, 1, 3, 3]
    assert x["block_position_ids"].tolist() == [0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert int(x["sep"]) == 4
    assert splice([10, M, 11, S], [[20, 21], [22]]) == [10, 20, 21, 11, 22]


# --------------------------------------------------------------------------- greedy, several blanks, <eop>


def test_trained_model_fills_several_blanks_and_stops_at_eop(trained):
    results = fill_blanks(trained, PROMPTS, GenerationConfig(max_new_tokens=8))
    assert results[0].spans == [[20, 21], [22]]  # [MASK] then [sMASK], each stopped by <eop>
    assert results[0].tokens == [40, 41, 20, 21, 42, 22, 43]
    assert results[2].spans == [[20, 21]]
    assert results[2].tokens == [30, 31, 32, 20, 21, 33, 34, 35, 36, 37]
    assert len(results[1].spans) == 1 and len(results[1].spans[0]) <= 8  # [gMASK]: never trained, only bounded


def test_max_new_tokens_cuts_a_span_and_the_next_blank_still_fills(trained):
    prompt = PROMPTS[0]
    (res,) = fill_blanks(trained, [prompt], GenerationConfig(max_new_tokens=1))
    assert res.spans[0] == [20] and len(res.spans) == 2 and len(res.spans[1]) == 1  # cut, then the next blank
    # the second blank is decoded after the cut span, as a full recompute of that context predicts
    # (what it predicts after a span never seen cut is the model's business: it varies with CPU numerics)
    x = infill_inputs(prompt, res.spans)  # Part A ++ [sop] 20 [sop] t
    with torch.no_grad():
        full = trained(x["input_ids"][None], x["position_ids"][None], x["block_position_ids"][None], x["sep"][None])
    assert res.spans[1][0] == int(full[0, len(prompt) + 2].argmax())


def test_greedy_is_deterministic():
    model = lively_model(VOCAB)
    cfg = GenerationConfig(max_new_tokens=5)
    assert [r.spans for r in fill_blanks(model, PROMPTS, cfg)] == [r.spans for r in fill_blanks(model, PROMPTS, cfg)]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_prompts_decode_as_one_by_one(trained, strategy):
    model = lively_model(VOCAB)
    for m in (model, trained):
        cfg = GenerationConfig(strategy=strategy, max_new_tokens=5, num_beams=3)
        batched = fill_blanks(m, PROMPTS, cfg)
        alone = [fill_blanks(m, [p], cfg)[0] for p in PROMPTS]
        assert [r.spans for r in batched] == [r.spans for r in alone]
        if strategy == "beam":
            assert [r.score for r in batched] == pytest.approx([r.score for r in alone], abs=1e-5)


# --------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_seed():
    model = lively_model(VOCAB)
    cfg = lambda seed: GenerationConfig(strategy="sample", max_new_tokens=6, temperature=2.0, seed=seed)  # noqa: E731
    first = [r.spans for r in fill_blanks(model, PROMPTS, cfg(1))]
    assert first == [r.spans for r in fill_blanks(model, PROMPTS, cfg(1))]
    assert first != [r.spans for r in fill_blanks(model, PROMPTS, cfg(2))]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    # nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> two tokens
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_logits(logits)).all()


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.3)])
def test_sampled_tokens_stay_inside_the_filtered_support(top_k, top_p):
    model = lively_model(VOCAB)
    cfg = GenerationConfig(
        strategy="sample", max_new_tokens=6, temperature=3.0, top_k=top_k, top_p=top_p, seed=0, output_scores=True
    )
    for res in fill_blanks(model, PROMPTS * 3, cfg):
        allowed = torch.isfinite(filter_logits(res.step_logits / 3.0, top_k, top_p))  # (steps, V)
        step = 0
        for span in res.spans:
            for tok in span:
                assert bool(allowed[step, tok])
                step += 1
            # the <eop> closing a span is chosen too, unless max_new_tokens forced it
            assert len(span) == cfg.max_new_tokens or bool(allowed[step, EOP])
            step += 1
        assert step == res.step_logits.shape[0]


def test_top_k_one_sampling_is_greedy():
    model = lively_model(VOCAB)
    greedy = fill_blanks(model, PROMPTS, GenerationConfig(max_new_tokens=5))
    sampled = fill_blanks(model, PROMPTS, GenerationConfig(strategy="sample", top_k=1, max_new_tokens=5, seed=3))
    assert [r.spans for r in sampled] == [r.spans for r in greedy]


# --------------------------------------------------------------------------- beam search


def test_one_beam_is_greedy(trained):
    for m in (lively_model(VOCAB), trained):
        greedy = fill_blanks(m, PROMPTS, GenerationConfig(max_new_tokens=5))
        beam = fill_blanks(m, PROMPTS, GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=5))
        assert [r.spans for r in beam] == [r.spans for r in greedy]


def test_beam_finds_the_trained_answer_and_scores_it_correctly(trained):
    cfg = GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=6, length_penalty=0.5)
    (res,) = fill_blanks(trained, [PROMPTS[0]], cfg)
    assert res.spans == [[20, 21], [22]]
    # the score is the length-normalised log-probability of s1 s2 <eop> t1 <eop>, teacher-forced
    x = infill_inputs(PROMPTS[0], res.spans)
    logp = trained(x["input_ids"][None], x["position_ids"][None], x["block_position_ids"][None], x["sep"][None])
    logp = logp[0, len(PROMPTS[0]) :].log_softmax(-1)  # (5, V)
    chosen = [20, 21, EOP, 22, EOP]
    total = sum(logp[i, t].item() for i, t in enumerate(chosen))
    assert res.score == pytest.approx(total / len(chosen) ** 0.5, abs=1e-5)


# --------------------------------------------------------------------------- min/max new tokens, no-repeat n-grams, length penalty


class TableModel(torch.nn.Module):
    """A model whose next-token distribution depends only on the current input token (a bigram table),
    so the sequence probabilities under each decoding option can be computed by hand.
    Whatever mass a row leaves (all of it for tokens not listed) goes to <eop>."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 16):
        super().__init__()
        self.cfg = type("Cfg", (), {"max_seq_len": 64, "vocab_size": vocab})()
        logp = torch.full((vocab, vocab), float("-inf"))
        logp[:, EOP] = 0.0
        for tok, dist in table.items():
            logp[tok] = float("-inf")
            for nxt, p in {EOP: 1.0 - sum(dist.values()), **dist}.items():
                logp[tok, nxt] = math.log(p) if p > 1e-9 else float("-inf")
        self.logp = torch.nn.Parameter(logp, requires_grad=False)

    def hidden_states(
        self, input_ids, position_ids, block_position_ids, sep, *, past_key_values=None, key_start=None, use_cache=False
    ):
        cache = [(input_ids[:, :, None].float(), input_ids[:, :, None].float())]  # the decoder only reorders it by row
        return self.logp[input_ids], cache  # (B, T, V): "hidden state" = next-token log-probabilities

    def logits(self, h):
        return h


SOP, A, B_, C = SPECIAL.sop, 10, 11, 12


def test_banned_ngram_tokens():
    assert banned_ngram_tokens([5, 6, 5], 2) == [6]  # 5 6 exists: after 5, 6 would repeat it
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert banned_ngram_tokens([5, 6], 3) == [] and banned_ngram_tokens([5], 2) == []
    assert banned_ngram_tokens([5, 6, 5], 1) == [5, 6]


def test_no_repeat_ngram_blocks_the_repetition_a_model_prefers():
    # greedy: A A A A ... (A -> A is the best bigram); with no 2-gram twice: A A, then B, then A B is new...
    model = TableModel({SOP: {A: 1.0}, A: {A: 0.6, B_: 0.3, C: 0.1}, B_: {A: 0.7, C: 0.3}, C: {A: 1.0}})
    prompt = [[13, M]]
    assert fill_blanks(model, prompt, GenerationConfig(max_new_tokens=6))[0].spans == [[A] * 6]
    got = fill_blanks(model, prompt, GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=2))[0].spans[0]
    # A A | A B (A A banned) | B A | A C (A A, A B banned) | C A | A: A A, A B, A C all banned -> <eop>
    assert got == [A, A, B_, A, C, A]
    for cfg in (GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=2, strategy="beam", num_beams=3),):
        span = fill_blanks(model, prompt, cfg)[0].spans[0]
        assert len(set(zip(span, span[1:]))) == len(span) - 1


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_no_repeat_ngram_never_repeats_with_a_real_model(strategy):
    model = tiny_model(VOCAB)  # freshly initialised and tied: echoes its input, so it repeats readily
    cfg = GenerationConfig(max_new_tokens=12, strategy=strategy, no_repeat_ngram_size=2, seed=0, temperature=0.7, num_beams=2)
    repeats = lambda span: len(span[1:]) - len(set(zip(span, span[1:])))  # noqa: E731
    plain = [s for r in fill_blanks(model, PROMPTS * 2, GenerationConfig(max_new_tokens=12)) for s in r.spans]
    assert sum(map(repeats, plain)) > 0  # the option has something to prevent
    for res in fill_blanks(model, PROMPTS * 2, cfg):
        assert all(repeats(span) == 0 for span in res.spans), res.spans


def test_min_new_tokens_suppresses_eop_until_reached(trained):
    # the trained model ends a [MASK] after 20 21 and a [sMASK] after 22
    for strategy in ("greedy", "beam"):
        cfg = GenerationConfig(max_new_tokens=5, min_new_tokens=3, strategy=strategy, output_scores=strategy == "greedy")
        (res,) = fill_blanks(trained, [PROMPTS[0]], cfg)
        assert all(3 <= len(span) <= 5 for span in res.spans), res.spans
        if strategy == "greedy":  # the first two steps are unconstrained choices; beam may prefer another whole span
            assert res.spans[0][:2] == [20, 21]
    (plain,) = fill_blanks(trained, [PROMPTS[0]], GenerationConfig(max_new_tokens=5, output_scores=True))
    assert int(plain.step_logits[2].argmax()) == EOP  # without the option, <eop> was the choice at the 3rd step
    model = TableModel({SOP: {A: 0.2}, A: {B_: 0.4}, B_: {C: 0.1}})  # <eop> is always the most likely next token
    assert fill_blanks(model, [[13, M, 14, M]], GenerationConfig(max_new_tokens=4))[0].spans == [[], []]
    got = fill_blanks(model, [[13, M, 14, M]], GenerationConfig(max_new_tokens=4, min_new_tokens=2))[0].spans
    assert got == [[A, B_], [A, B_]]  # every blank, not just the first


def test_length_penalty_ranks_beams_by_its_formula():
    # two finished hypotheses: <eop> (log 0.4, length 1) and A <eop> (log 0.6 + log 0.5, length 2);
    # score = sum log p / length ** lp, so the short one wins iff lp < log2(log 0.3 / log 0.4) = 0.394
    model = TableModel({SOP: {EOP: 0.4, A: 0.6}, A: {EOP: 0.5, B_: 0.5}, B_: {EOP: 1.0}})
    short, long_ = math.log(0.4), math.log(0.6 * 0.5)
    for lp, span, score in ((0.0, [], short), (0.3, [], short), (0.5, [A], long_ / 2**0.5), (1.0, [A], long_ / 2)):
        (res,) = fill_blanks(
            model, [[13, M]], GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=3, length_penalty=lp)
        )
        assert res.spans == [span], lp
        assert res.score == pytest.approx(score, abs=1e-6), lp


# --------------------------------------------------------------------------- errors


def test_clear_errors():
    model = lively_model(VOCAB)
    with pytest.raises(ValueError, match="no blank"):
        fill_blanks(model, [[10, 11]])
    with pytest.raises(ValueError, match="max_seq_len"):
        fill_blanks(model, [[10] * 200 + [G]])
    with pytest.raises(ValueError, match="vocab_size"):
        fill_blanks(model, [[10, VOCAB + 5, G]])
    with pytest.raises(ValueError, match="strategy"):
        GenerationConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0.0)
    with pytest.raises(ValueError, match="prompts"):
        fill_blanks(model, [])
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        GenerationConfig(no_repeat_ngram_size=-1)
