"""Evaluation: metrics against hand-computed values, held-out losses, samples, and the written report."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from glm import evaluate as ev
from glm.config import EvaluateConfig
from glm.model import infilling_loss
from glm.special_tokens import SPECIAL
from tests.glm.factories import sentiment_tokenizer, tiny_model

VOCAB = 64


def infill_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows: Part A with one [MASK], Part B = [sop] s1 s2 predicting s1 s2 [eop]; row 1 padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, VOCAB, (2, 12), generator=g)  # (2, 12)
    pos = torch.zeros(2, 12, dtype=torch.long)
    blk = torch.zeros(2, 12, dtype=torch.long)
    tgt = torch.zeros(2, 12, dtype=torch.long)
    seps = [9, 7]
    for r, sep in enumerate(seps):
        ids[r, 3] = SPECIAL.mask
        pos[r, :sep] = torch.arange(sep)
        ids[r, sep] = SPECIAL.sop
        pos[r, sep : sep + 3] = 3
        blk[r, sep : sep + 3] = torch.tensor([1, 2, 3])
        tgt[r, sep : sep + 2] = ids[r, sep + 1 : sep + 3]
        tgt[r, sep + 2] = SPECIAL.eop
        ids[r, sep + 3 :] = SPECIAL.pad
    return dict(input_ids=ids, position_ids=pos, block_position_ids=blk, sep=torch.tensor(seps), targets=tgt, loss_mask=blk > 0)


# --------------------------------------------------------------------------- classification metrics


def test_classification_metrics_against_hand_computed_values():
    m = ev.classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a=2/2 b=1/2 c=1/2; recall a=2/3 b=1/2 c=1; F1 a=0.8 b=0.5 c=2/3
    assert m["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_label"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_a_label_never_predicted_counts_zero_in_macro_f1():
    m = ev.classification_metrics([0, 1, 1, 1], [1, 1, 1, 1], ["neg", "pos"])
    assert m["per_label"]["neg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.0 + 6 / 7) / 2)  # pos: precision 3/4, recall 1


def test_majority_baseline_uses_the_train_labels():
    m = ev.majority_baseline([1, 1, 0], [0, 1, 1, 1], ["neg", "pos"])
    assert m["majority_label"] == "pos" and m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx(3 / 7)
    # on a test set of the minority class, the same baseline scores 0
    assert ev.majority_baseline([1, 1, 0], [0, 0], ["neg", "pos"])["accuracy"] == 0.0


def test_classification_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="equal-length non-empty"):
        ev.classification_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        ev.classification_metrics([0, 2], [0, 1], ["a", "b"])


# --------------------------------------------------------------------------- held-out losses


def test_infilling_metrics_equal_the_training_loss_and_manual_accuracy():
    model = tiny_model(VOCAB, max_seq_len=64)
    batch = infill_batch()
    m = ev.infilling_metrics(model, [batch, {k: v.numpy() for k, v in batch.items()}])
    with torch.no_grad():
        loss, n = infilling_loss(model, batch)
        logits = model(batch["input_ids"], batch["position_ids"], batch["block_position_ids"], batch["sep"])  # (B, T, V)
    sel = batch["loss_mask"]
    correct = (logits[sel].argmax(-1) == batch["targets"][sel]).float().mean()
    assert m["loss"] == pytest.approx(float(loss), rel=1e-5) and m["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert m["token_accuracy"] == pytest.approx(float(correct)) and m["tokens"] == 2 * int(n) and m["batches"] == 2
    assert ev.infilling_metrics(model, iter([batch] * 5), max_batches=1)["batches"] == 1
    with pytest.raises(ValueError, match="missing"):
        ev.infilling_metrics(model, [{"input_ids": batch["input_ids"]}])


def test_causal_lm_batch_layout_and_loss():
    g, s = SPECIAL.gmask, SPECIAL.sop
    b = ev.causal_lm_batch([[11, 12, 13], [21]])
    assert b["input_ids"].tolist() == [[g, s, 11, 12], [g, s, 0, 0]]
    assert b["targets"].tolist() == [[0, 11, 12, 13], [0, 21, 0, 0]]
    assert b["block_position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert b["position_ids"].abs().sum() == 0 and b["sep"].tolist() == [1, 1]
    model = tiny_model(VOCAB, max_seq_len=64)
    m = ev.lm_metrics(model, [list(range(10, 40)), [12, 13, 14]], batch_size=1)
    assert m["tokens"] == 33 and math.log(VOCAB) - 1 < m["loss"] < math.log(VOCAB) + 1  # an untrained model is near uniform


def test_fill_samples_decode_text():
    tok = sentiment_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    samples = ev.fill_samples(model, tok, ["the movie was really good and the acting was fun", "a", "very boring plot"], n=2)
    assert len(samples) == 2
    for s in samples:
        assert "[MASK]" in s["prompt"] and s["reference"] and isinstance(s["filled"], str)


def test_evaluate_pretrained_gathers_the_report_section():
    tok = sentiment_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    texts = ["the movie was really good and the acting was fun", "very boring plot", "a quite fun story !"]
    got = ev.evaluate_pretrained(model, tok, [infill_batch()] * 3, texts, EvaluateConfig(batches=2, fill_samples=2))
    assert got["infilling"]["batches"] == 2 and got["lm"]["tokens"] == sum(len(tok.encode(t)) for t in texts)
    assert len(got["fill_samples"]) == 2


# --------------------------------------------------------------------------- the report


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert ev.read_metrics(p) == [{"step": 1, "loss": 2.0}]


def test_write_report_writes_metrics_markdown_and_plots(tmp_path):
    train_records = [{"step": i, "loss": 6 - i / 20} for i in range(1, 60)]
    pre = _write_jsonl(tmp_path / "pretrain.jsonl", train_records + [{"step": i, "val_loss": 6 - i / 22} for i in (20, 40, 59)])
    curves = {}
    for name, slope in (("pretrained", 0.1), ("from scratch", 0.03)):
        curves[name] = _write_jsonl(
            tmp_path / f"{slope}.jsonl",
            [
                *({"kind": "train", "step": i, "loss": 0.7 - slope * i} for i in range(1, 6)),
                *({"kind": "eval", "step": i, "val_loss": 0.7 - slope * i, "val_accuracy": 0.5 + slope * i} for i in (0, 3, 5)),
            ],
        )
    labels = ["negative", "positive"]
    cloze = {
        name: {
            "task": "sentiment",
            "labels": labels,
            "best_val_accuracy": acc,
            "steps": 5,
            "stopped_early": False,
            "sizes": {"train": 80, "dev": 10, "test": 10},
            "truncated": {"train": 1, "dev": 0, "test": 0},
            "test": ev.classification_metrics(truth, pred, labels),
            "majority": ev.majority_baseline([1, 1, 0], truth, labels),
        }
        for name, acc, truth, pred in (
            ("pretrained", 0.9, [0, 0, 1, 1, 1], [0, 0, 1, 1, 0]),
            ("from scratch", 0.6, [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]),
        )
    }
    results = {
        "title": "Test run",
        "pretrain": {
            "infilling": {"loss": 3.2, "perplexity": math.exp(3.2), "token_accuracy": 0.31, "tokens": 1000},
            "lm": {"loss": 4.1, "perplexity": math.exp(4.1), "token_accuracy": 0.2, "tokens": 900},
            "fill_samples": [{"prompt": "the movie [MASK] good", "reference": "was", "filled": "is | was"}],
        },
        "cloze": cloze,
        "seq2seq": {
            "copy": {
                "test": {"loss": 1.0, "perplexity": math.e, "token_accuracy": 0.5},
                "examples": [{"source": "a b", "reference": "b", "generated": "b"}],
            }
        },
        "not_finite": float("nan"),
        "array": np.arange(3),
    }
    written = ev.write_report(tmp_path / "eval", results, pre, curves)
    for key in ("pretrain_loss", "finetune_curves", "accuracy", "confusion_pretrained", "confusion_from_scratch"):
        png = written[key].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, key
    report = written["report"].read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (tmp_path / "eval" / image).is_file(), image
    assert "pretrained" in report and "80.0%" in report and "majority class (positive)" in report
    assert "is \\| was" in report  # table cells are escaped
    metrics = json.loads(written["metrics"].read_text())
    assert metrics["cloze"]["pretrained"]["test"]["accuracy"] == pytest.approx(0.8)
    assert metrics["not_finite"] is None and metrics["array"] == [0, 1, 2]
    assert set(metrics["plots"]) >= {"pretrain_loss", "finetune_curves", "accuracy"}


def test_write_report_with_nothing_but_a_title(tmp_path):
    written = ev.write_report(tmp_path, {"title": "empty"})
    assert written["report"].read_text().startswith("# empty") and set(written) == {"metrics", "report"}


# --------------------------------------------------------------------------- the linear baseline and the warnings


def _separable(n: int, seed: int, words: dict[str, str], filler: list[str], join: str) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        parts = list(rng.choice(filler, size=int(rng.integers(3, 8))))
        parts.insert(int(rng.integers(len(parts) + 1)), words[str(label)])
        texts.append(join.join(parts))
        labels.append(label)
    return texts, labels


@pytest.mark.parametrize(
    "words, filler, join",
    [
        ({"0": "bad", "1": "good"}, "the movie film was plot acting story really very quite".split(), " "),
        ({"0": "差", "1": "好"}, list("这部电影的剧情演员故事真很非常"), ""),  # no spaces: char n-grams still work
    ],
)
def test_linear_baseline_learns_a_separable_task_in_english_and_chinese(words, filler, join):
    train_x, train_y = _separable(120, 0, words, filler, join)
    test_x, test_y = _separable(60, 1, words, filler, join)
    out = ev.linear_baseline(train_x, train_y, test_x, test_y, ["neg", "pos"], seed=0)
    assert out["accuracy"] >= 0.95 and out["n"] == 60 and out["model"] == ev.LINEAR_BASELINE
    assert out["labels"] == ["neg", "pos"] and len(out["confusion"]) == 2
    again = ev.linear_baseline(train_x, train_y, test_x, test_y, ["neg", "pos"], seed=0)
    assert again["confusion"] == out["confusion"]  # same data, same seed: same predictions
    with pytest.raises(ValueError, match="at least two labels"):
        ev.linear_baseline(train_x, [0] * len(train_x), test_x, test_y, ["neg", "pos"])


def _cloze_result(truth, pred, labels, **extra):
    return {
        "task": "questions",
        "labels": labels,
        "best_val_accuracy": 0.4,
        "steps": 10,
        "test": ev.classification_metrics(truth, pred, labels),
        "majority": ev.majority_baseline([0, 0, 1], truth, labels),
        **extra,
    }


def test_a_model_at_majority_below_the_baselines_is_a_warning_at_the_top_of_the_report(tmp_path):
    labels = ["a", "b", "c"]
    truth = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # majority "a": 40%
    collapsed = {
        "attempt": 3,
        "lr": 6.7e-5,
        "kept": True,
        "collapsed": True,
        "reasons": ["one label: the best dev model predicts 'a' for 97% of dev"],
    }
    cloze = {
        "pretrained": _cloze_result(
            truth,
            [0] * 10,  # one label: 40%, the majority class exactly
            labels,
            attempts=[{**collapsed, "attempt": i, "kept": i == 3} for i in (1, 2, 3)],
            collapsed=True,
            linear_baseline=ev.classification_metrics(truth, [0, 0, 0, 0, 1, 1, 1, 2, 2, 0], labels) | {"model": "tfidf"},
        ),
        "from scratch": _cloze_result(truth, [0, 0, 0, 1, 1, 1, 1, 2, 2, 0], labels),
    }
    warnings = ev.finetune_warnings(cloze)
    assert [(w["run"], w["check"]) for w in warnings] == [
        ("pretrained", "collapsed"),
        ("pretrained", "majority"),
        ("pretrained", "linear"),
        ("pretrained", "from scratch"),
    ]
    assert "after 3 attempt(s): one label" in warnings[0]["message"] and "finetune.optim.lr" in warnings[0]["try"]
    assert "40.0% is at or below the majority class ('a' always: 40.0%)" in warnings[1]["message"]
    assert "below the linear baseline (90.0%" in warnings[2]["message"] and "pretrain.steps" in warnings[3]["try"]
    written = ev.write_report(tmp_path, {"title": "t", "cloze": cloze})
    report = written["report"].read_text()
    assert report.index("## WARNING: 4 problem(s)") < report.index("| model |")
    assert "TF-IDF + logistic regression | 90.0%" in report and "Try: lower finetune.optim.lr" in report
    assert [w["check"] for w in json.loads(written["metrics"].read_text())["warnings"]][:2] == ["collapsed", "majority"]


def test_a_model_above_every_baseline_has_no_warning_and_a_retry_is_a_note(tmp_path):
    labels = ["a", "b"]
    truth = [0, 0, 0, 1, 1, 1]
    linear = ev.classification_metrics(truth, [0, 0, 1, 1, 1, 0], labels)
    good = _cloze_result(truth, truth, labels, linear_baseline=linear, collapsed=False, kept_untrained=False)
    assert ev.finetune_warnings({"pretrained": good, "from scratch": good}) == []
    assert "WARNING" not in ev.write_report(tmp_path, {"cloze": {"pretrained": good}})["report"].read_text()
    retried = good | {
        "attempts": [
            {"attempt": 1, "lr": 1e-3, "kept": False, "collapsed": True, "reasons": ["untrained: step 0 was kept"]},
            {"attempt": 2, "lr": 3.3e-4, "kept": True, "collapsed": False, "reasons": []},
        ]
    }
    (note,) = ev.finetune_warnings({"pretrained": retried})
    assert note["level"] == "note" and "attempt 2 of 2 (lr 0.00033) was kept" in note["message"]
    untrained = good | {"kept_untrained": True}
    assert [w["check"] for w in ev.finetune_warnings({"pretrained": untrained})] == ["untrained"]
