"""Evaluation: held-out losses, classification metrics, samples, generation metrics (the report that
shows them, its plots and warnings: glm.report).

- `infilling_metrics`: token-weighted blank-infilling loss, perplexity and next-token accuracy
  over any iterable of blank-infilling batches (the validation loader, seq2seq batches).
- `lm_metrics`: held-out left-to-right LM loss/perplexity: each token row becomes GLM's causal
  sample, Part A = [gMASK] and Part B = <sop> + the row (as the infilling builder's "causal"
  objective), scored on the row's tokens (no <eop>: a row is a cut of the text, not its end).
- `classification_metrics`, `majority_baseline`: accuracy, macro-F1, confusion matrix.
- `fill_samples`: a few blanks filled by a pretrained model, as text.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from glm.core.config import EvaluateConfig
from glm.core.special_tokens import SPECIAL, SpecialTokens, special_of

BATCH_KEYS = ("input_ids", "position_ids", "block_position_ids", "sep", "targets", "loss_mask")


# --------------------------------------------------------------------------- held-out losses


def _as_tensors(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"evaluation batch is missing {missing}; expected a blank-infilling batch with {list(BATCH_KEYS)}")
    out = {k: torch.as_tensor(np.asarray(batch[k]) if not isinstance(batch[k], torch.Tensor) else batch[k]) for k in BATCH_KEYS}
    out = {k: v.to(device=device, dtype=torch.bool if k == "loss_mask" else torch.long) for k, v in out.items()}
    return out


@torch.no_grad()
def infilling_metrics(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], max_batches: int | None = None, *, exclude_eop: bool = False
) -> dict[str, float]:
    """Loss (mean cross-entropy per target token), perplexity and argmax token accuracy over Part B targets.

    With `exclude_eop` (targets that are never <eop>: a text known to go on), the accuracy's argmax
    skips <eop>, as greedy decoding with <eop> held back would, and `eop_argmax_share` counts the
    targets where <eop> was the model's first choice; the loss stays the full-vocabulary one.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, tokens, n_batches, eop_first = 0.0, 0, 0, 0, 0
    try:
        for raw in batches:
            if max_batches is not None and n_batches >= max_batches:
                break
            b = _as_tensors(raw, device)
            select = b["loss_mask"]  # (B, T)
            n_batches += 1
            if not bool(select.any()):
                continue
            logits = model(b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"], select=select)  # (N, V)
            targets = b["targets"][select]  # (N,)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            if exclude_eop:
                eop = special_of(model).eop
                eop_first += int((logits.argmax(-1) == eop).sum())
                logits = logits.index_fill(-1, torch.tensor([eop], device=device), float("-inf"))  # (N, V)
            correct += int((logits.argmax(-1) == targets).sum())
            tokens += int(targets.numel())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError(f"no loss tokens in {n_batches} evaluation batches; the validation data is empty")
    loss = loss_sum / tokens
    out = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "token_accuracy": correct / tokens,
        "tokens": tokens,
        "batches": n_batches,
    }
    return out | ({"eop_argmax_share": eop_first / tokens} if exclude_eop else {})


def causal_lm_batch(
    rows: Sequence[Sequence[int]], device: torch.device | str = "cpu", special: SpecialTokens = SPECIAL
) -> dict[str, torch.Tensor]:
    """Right-padded causal samples: [gMASK] | <sop> x1 .. x(n-1), predicting x1 .. xn (one row each)."""
    width = 2 + max(len(r) for r in rows) - 1
    B = len(rows)
    ids = torch.full((B, width), special.pad, dtype=torch.long)  # (B, T)
    blk = torch.zeros(B, width, dtype=torch.long)  # (B, T)
    tgt = torch.zeros(B, width, dtype=torch.long)  # (B, T)
    ids[:, 0], ids[:, 1] = special.gmask, special.sop
    for i, row in enumerate(rows):
        n = len(row)
        r = torch.as_tensor(list(row), dtype=torch.long)  # (n,)
        ids[i, 2 : n + 1] = r[:-1]
        tgt[i, 1 : n + 1] = r
        blk[i, 1 : n + 1] = torch.arange(1, n + 1)
    batch = {
        "input_ids": ids,
        "position_ids": torch.zeros(B, width, dtype=torch.long),  # (B, T) every Part B token sits at the [gMASK]
        "block_position_ids": blk,
        "targets": tgt,
        "loss_mask": blk > 0,  # (B, T)
        "sep": torch.ones(B, dtype=torch.long),  # (B,)
    }
    return {k: v.to(device) for k, v in batch.items()}


def lm_metrics(model: torch.nn.Module, rows: Sequence[Sequence[int]], batch_size: int = 16) -> dict[str, float]:
    """Held-out LM loss/perplexity of token rows (each cut to model.max_seq_len - 1 tokens).

    The accuracy's argmax skips <eop>: a row never ends where it is scored, and a model pretrained on
    short token-level spans puts <eop> first at almost every step of a long left-to-right span
    (`eop_argmax_share`; the demo's model: 99.5%), which made a plain argmax accuracy read 0.0%.
    """
    limit = model.cfg.max_seq_len - 1
    rows = [list(r[:limit]) for r in rows if len(r) >= 1]
    if not rows:
        raise ValueError("lm_metrics got no non-empty token rows")
    device = next(model.parameters()).device
    batches = (causal_lm_batch(rows[i : i + batch_size], device, special_of(model)) for i in range(0, len(rows), batch_size))
    return infilling_metrics(model, batches, exclude_eop=True)


# --------------------------------------------------------------------------- classification


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (mean over ALL labels; a label never predicted has precision 0),
    per-label precision/recall/F1/support and the confusion matrix (rows: true, columns: predicted)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    L = len(labels)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or y_true.size == 0:
        raise ValueError(f"need two equal-length non-empty label sequences, got {y_true.shape} and {y_pred.shape}")
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= L:
        raise ValueError(f"label indices must lie in [0, {L}) for labels {list(labels)}")
    confusion = np.zeros((L, L), dtype=np.int64)  # (true, predicted)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)  # (L,)
    predicted, support = confusion.sum(0), confusion.sum(1)  # (L,) each
    precision = np.divide(tp, predicted, out=np.zeros(L), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(L), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(L), where=(precision + recall) > 0)
    return {
        "accuracy": float(tp.sum() / y_true.size),
        "macro_f1": float(f1.mean()),
        "n": int(y_true.size),
        "labels": list(labels),
        "confusion": confusion.tolist(),
        "per_label": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
    }


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of always predicting the most frequent TRAIN label (ties: the first label)."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=len(labels))  # (L,)
    majority = int(counts.argmax())
    out = classification_metrics(test_labels, [majority] * len(test_labels), labels)
    return out | {"majority_label": labels[majority]}


LINEAR_BASELINE = "TF-IDF of character 1-4-grams (char_wb) + logistic regression"


def linear_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    test_texts: Sequence[str],
    test_labels: Sequence[int],
    labels: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Test metrics of a TF-IDF + logistic regression classifier trained on the same train split.

    Character n-grams within word boundaries need no word tokenizer, so the same baseline holds for
    Chinese text as for English. A fine-tuned model below it has learned less than word statistics.
    """
    import time

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    t0 = time.perf_counter()
    model = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, min_df=2, max_features=200_000),
        LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
    )
    y_train = np.asarray(train_labels, dtype=np.int64)
    if len(np.unique(y_train)) < 2:
        raise ValueError("the linear baseline needs train examples of at least two labels")
    try:
        model.fit(list(train_texts), y_train)
    except ValueError:  # min_df=2 can leave nothing on a handful of examples; every n-gram then counts
        model.set_params(tfidfvectorizer__min_df=1).fit(list(train_texts), y_train)
    pred = model.predict(list(test_texts))
    out = classification_metrics(test_labels, pred, labels)
    return out | {"model": LINEAR_BASELINE, "fit_seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- samples


def generation_config(cfg: EvaluateConfig, model: torch.nn.Module, max_new_tokens: int | None = None) -> Any:
    """Greedy decoding with the evaluation's min/max new tokens and no-repeat n-gram size."""
    from glm.evaluation.generate import GenerationConfig

    cap = min(max_new_tokens or cfg.max_new_tokens, model.cfg.max_seq_len - 1)
    return GenerationConfig(
        max_new_tokens=cap, min_new_tokens=min(cfg.min_new_tokens, cap), no_repeat_ngram_size=cfg.no_repeat_ngram_size
    )


def fill_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    n: int = 5,
    *,
    context_tokens: int = 48,
    seed: int = 0,
    cfg: EvaluateConfig | None = None,
) -> list[dict[str, str]]:
    """Blank one short span in each of the first `n` texts with [MASK] and let the model fill it (greedy,
    with cfg's min_new_tokens and no-repeat n-grams; at most 16 tokens).

    Returns per sample: `prompt` (text with [MASK]), `reference` (the removed span) and `filled`.
    """
    from glm.evaluation.generate import fill_blanks

    rng = np.random.default_rng(seed)
    prompts, parts = [], []
    for text in texts:
        if len(prompts) >= n:
            break
        ids = tokenizer.encode(text, specials=False)[:context_tokens]
        if len(ids) < 3:
            continue
        span = int(min(6, max(1, round(0.15 * len(ids)))))
        start = int(rng.integers(1, len(ids) - span))  # at least one token of context before and after
        before, ref, after = ids[:start], ids[start : start + span], ids[start + span :]
        prompts.append(before + [special_of(model).mask] + after)
        parts.append((before, ref, after))
    if not prompts:
        return []
    results = fill_blanks(model, prompts, generation_config(cfg or EvaluateConfig(), model, 16))
    return [
        {
            "prompt": f"{tokenizer.decode(before)} [MASK] {tokenizer.decode(after)}".strip(),
            "reference": tokenizer.decode(ref),
            "filled": tokenizer.decode(r.spans[0]),
        }
        for (before, ref, after), r in zip(parts, results)
    ]


def evaluate_pretrained(
    model: torch.nn.Module,
    tokenizer: Any,
    valid_batches: Iterable[Mapping[str, Any]],
    texts: Sequence[str],
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    """The pretraining section of the report, on held-out `texts` (the corpus's valid documents):
    blank-infilling metrics on up to cfg.batches validation batches, left-to-right LM metrics on the
    first 16 x cfg.batches texts (each cut to the model's length), cfg.fill_samples blank-filling
    samples, infilling BLEU by mask ratio (cfg.infill_docs per ratio) and last-word prediction
    (cfg.lastword_docs)."""
    out: dict[str, Any] = {"infilling": infilling_metrics(model, valid_batches, cfg.batches)}
    rows = [r for r in tokenizer.encode(list(texts[: 16 * cfg.batches]), specials=False) if r] if texts else []
    if rows:
        out["lm"] = lm_metrics(model, rows)
    out["fill_samples"] = fill_samples(model, tokenizer, texts, cfg.fill_samples, cfg=cfg) if cfg.fill_samples else []
    if cfg.infill_docs:
        out["infill_bleu"] = infill_bleu(model, tokenizer, texts, cfg)
    if cfg.lastword_docs:
        items = lastword_items(tokenizer, texts, cfg.lastword_docs, cfg.lastword_context_tokens, model.cfg.max_seq_len)
        if items:
            out["lastword"] = lastword_metrics(model, items)
    return out


# --------------------------------------------------------------------------- generation metrics (BLEU, ROUGE, last word)


def text_scores(hypotheses: Sequence[str], references: Sequence[str], rouge: bool = True) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 13a tokenisation, 0-100) and, with `rouge`, mean ROUGE-1/2/L F1 (rouge-score,
    0-100; its tokenizer keeps only [a-z0-9], so text in other scripts scores 0)."""
    import sacrebleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references, at least one; got {len(hypotheses)} and {len(references)}")
    out = {"bleu": float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score), "n": len(references)}
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
        scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = 100.0 * float(np.mean([s[key].fmeasure for s in scores]))
    return out


def mask_spans(
    ids: Sequence[int], ratio: float, rng: np.random.Generator, mask: int = SPECIAL.mask
) -> tuple[list[int], list[list[int]]]:
    """Blank round(ratio x len) tokens (at least 1) of `ids` in 1-3 spans, each replaced by one [MASK], with at
    least one kept token between two spans. Returns the prompt and the removed spans, in text order."""
    n = len(ids)
    m = max(1, min(n - 1, round(ratio * n)))
    k = int(rng.integers(1, min(3, m, n - m + 1) + 1))  # spans: k - 1 kept tokens must separate them
    cuts = np.sort(rng.choice(np.arange(1, m), size=k - 1, replace=False)) if k > 1 else np.zeros(0, np.int64)
    lengths = np.diff(np.concatenate([[0], cuts, [m]])).astype(int)  # (k,) each >= 1, sum m
    free = n - m - (k - 1)  # kept tokens beyond the mandatory separators, spread over the k + 1 gaps
    gaps = np.bincount(rng.integers(0, k + 1, size=free), minlength=k + 1) + np.r_[0, np.ones(k - 1, int), 0]  # (k+1,)
    prompt, spans, at = [], [], 0
    for i in range(k):
        prompt += list(ids[at : at + gaps[i]])
        at += gaps[i]
        spans.append(list(ids[at : at + lengths[i]]))
        prompt.append(mask)
        at += lengths[i]
    prompt += list(ids[at:])
    return prompt, spans


def infill_bleu(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], cfg: EvaluateConfig, batch_size: int = 16
) -> dict[str, Any]:
    """Text infilling (the GLM paper's Yahoo Answers protocol on the user's held-out documents): for
    each ratio, blank that share of each of cfg.infill_docs documents (cut to cfg.infill_context_tokens)
    in 1-3 spans, fill them greedily, and score the filled documents against the originals with
    corpus BLEU. `bleu_unfilled` scores the documents with the blanks simply deleted: the floor a
    model has to beat. A blank may hold up to twice the longest removed span of its batch."""
    from glm.evaluation.generate import fill_blanks

    limit = min(cfg.infill_context_tokens, model.cfg.max_seq_len)
    docs = [ids[:limit] for ids in tokenizer.encode(list(texts), specials=False) if len(ids) >= 8][: cfg.infill_docs]
    if not docs:
        return {}
    out: dict[str, Any] = {"docs": len(docs), "ratios": {}, "samples": []}
    fills: list[list[int]] = []  # every blank's generated span, all ratios: what fill_diversity judges
    for r_index, ratio in enumerate(cfg.infill_ratios):
        hyps, unfilled, refs, masked, n_spans = [], [], [], 0, 0
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            masks = [
                mask_spans(ids, ratio, np.random.default_rng([cfg.seed, r_index, start + j]), special_of(model).mask)
                for j, ids in enumerate(chunk)
            ]
            longest = max(len(s) for _, spans in masks for s in spans)
            gen = generation_config(cfg, model, 2 * longest)
            for ids, (prompt, spans), res in zip(chunk, masks, fill_blanks(model, [p for p, _ in masks], gen)):
                hyps.append(tokenizer.decode(res.tokens))
                fills.extend(list(span) for span in res.spans)
                unfilled.append(tokenizer.decode([t for t in prompt if t != special_of(model).mask]))
                refs.append(tokenizer.decode(ids))
                masked += sum(map(len, spans))
                n_spans += len(spans)
                if start == 0 and len(refs) == 1:  # one sample per ratio: its first document
                    out["samples"].append(
                        {"ratio": ratio, "prompt": _blanked_text(tokenizer, prompt), "reference": refs[-1], "filled": hyps[-1]}
                    )
        out["ratios"][f"{ratio:g}"] = {
            "bleu": text_scores(hyps, refs, rouge=False)["bleu"],
            "bleu_unfilled": text_scores(unfilled, refs, rouge=False)["bleu"],
            "masked_share": masked / sum(map(len, docs)),
            "spans": n_spans,
        }
    out["fills"] = fill_diversity(fills, tokenizer)
    return out


def fill_diversity(fills: Sequence[Sequence[int]], tokenizer: Any) -> dict[str, Any]:
    """How varied a model's blank fills are: the share of blanks filled with the single most common
    fill (as text) and the share of all fill tokens that are the single most common token. A model that
    writes "the" into every blank has both near 1; healthy fills of real text stay far below 0.5."""
    from collections import Counter

    texts = [tokenizer.decode(list(f)).strip() for f in fills]
    tokens = [t for f in fills for t in f]
    if not texts:
        return {"blanks": 0}
    top_fill, top_fill_n = Counter(texts).most_common(1)[0]
    out: dict[str, Any] = {
        "blanks": len(texts),
        "distinct_fills": len(set(texts)),
        "top_fill": top_fill,
        "top_fill_share": top_fill_n / len(texts),
        "tokens": len(tokens),
    }
    if tokens:
        top_token, top_token_n = Counter(tokens).most_common(1)[0]
        out |= {"top_token": tokenizer.decode([top_token]).strip(), "top_token_share": top_token_n / len(tokens)}
    return out


def _blanked_text(tokenizer: Any, prompt: Sequence[int]) -> str:
    """A prompt as text with its blanks spelled [MASK] (the tokenizer decodes control tokens to nothing)."""
    parts, current = [], []
    for t in prompt:
        if t in special_of(tokenizer).mask_ids:
            parts.append(current)
            current = []
        else:
            current.append(t)
    return " [MASK] ".join(tokenizer.decode(p) for p in [*parts, current]).strip()


def lastword_items(
    tokenizer: Any, texts: Sequence[str], n: int, context_tokens: int, max_seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """(context ids, last-word ids) of the first `n` texts that end in a word (LAMBADA-style): the word is
    the text's last run of letters (trailing punctuation dropped), encoded on its own as it reads after a
    space; the context is the text before it, its last `context_tokens` tokens, cut to fit max_seq_len."""
    items = []
    for text in texts:
        if len(items) >= n:
            break
        found = re.search(r"([^\W\d_]+)[^\w]*$", text)
        if not found or not text[: found.start(1)].strip():
            continue
        word = tokenizer.encode(found.group(1), specials=False)
        context = tokenizer.encode(text[: found.start(1)].rstrip(), specials=False)
        room = max_seq_len - len(word) - 2  # + [gMASK] (or <sop>) and <sop>
        if not word or room < 1:
            continue
        items.append((context[-min(context_tokens, room) :], word))
    return items


def _word_batch(
    items: Sequence[tuple[list[int], list[int]]], blank: bool, device: torch.device, special: SpecialTokens = SPECIAL
) -> dict[str, torch.Tensor]:
    """Teacher-forced rows scoring only the word's tokens. blank: Part A = context ++ [gMASK], Part B =
    <sop> word (the free-generation layout); else the causal layout of causal_lm_batch over context ++ word."""
    if not blank:
        batch = causal_lm_batch([c + w for c, w in items], device, special)
        for i, (c, w) in enumerate(items):
            batch["loss_mask"][i, : len(c) + 1] = False  # (T,) targets up to the context's last token
        return batch
    width = max(len(c) + 1 + len(w) for c, w in items)
    cols = {
        k: torch.zeros(len(items), width, dtype=torch.long)
        for k in ("input_ids", "position_ids", "block_position_ids", "targets")
    }
    for i, (c, w) in enumerate(items):
        a = len(c) + 1
        cols["input_ids"][i, : a + len(w)] = torch.tensor(c + [special.gmask, special.sop] + w[:-1])
        cols["position_ids"][i, : a + len(w)] = torch.tensor(list(range(a)) + [a - 1] * len(w))
        cols["block_position_ids"][i, a : a + len(w)] = torch.arange(1, len(w) + 1)
        cols["targets"][i, a : a + len(w)] = torch.tensor(w)
    batch = cols | {"loss_mask": cols["block_position_ids"] > 0, "sep": torch.tensor([len(c) + 1 for c, _ in items])}
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def lastword_metrics(
    model: torch.nn.Module, items: Sequence[tuple[list[int], list[int]]], batch_size: int = 16
) -> dict[str, Any]:
    """Last-word prediction in two layouts: "blank" (context in Part A, the word generated at a final
    [gMASK]) and "left_to_right" (context and word in Part B after an empty [gMASK]). accuracy: share
    of words whose every token is the argmax with <eop> skipped, i.e. what greedy decoding with
    <eop> held back for the word's length writes; perplexity: exp of the mean loss per word token."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    try:
        for name, blank in (("blank", True), ("left_to_right", False)):
            nll, words_right, tokens_right, tokens = 0.0, 0, 0, 0
            for i in range(0, len(items), batch_size):
                b = _word_batch(items[i : i + batch_size], blank, device, special_of(model))
                select = b["loss_mask"]  # (B, T)
                logits = model(b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"], select=select)  # (N, V)
                targets = b["targets"][select]  # (N,)
                nll += float(F.cross_entropy(logits, targets, reduction="sum"))
                eop = torch.tensor([special_of(model).eop], device=device)
                right = logits.index_fill(-1, eop, float("-inf")).argmax(-1) == targets
                per_row = select.sum(1)  # (B,) word tokens per row
                row_of = torch.repeat_interleave(torch.arange(len(per_row), device=device), per_row)  # (N,)
                wrong_per_row = torch.zeros(len(per_row), dtype=torch.long, device=device).index_add_(0, row_of, (~right).long())
                words_right += int((wrong_per_row == 0).sum())
                tokens_right += int(right.sum())
                tokens += int(targets.numel())
            out[name] = {
                "accuracy": words_right / len(items),
                "token_accuracy": tokens_right / tokens,
                "perplexity": math.exp(min(nll / tokens, 700.0)),
                "loss": nll / tokens,
            }
    finally:
        model.train(was_training)
    return out | {"words": len(items), "tokens": sum(len(w) for _, w in items)}


def seq2seq_generation_metrics(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[Any], cfg: EvaluateConfig, batch_size: int = 16
) -> dict[str, Any]:
    """BLEU and ROUGE-1/2/L of greedy outputs on up to cfg.seq2seq_test_examples seq2seq test items
    (glm.finetune.EncodedSeq2Seq: source -> [gMASK] -> target), with a few examples."""
    from glm.evaluation.generate import fill_blanks

    items = list(items)[: cfg.seq2seq_test_examples]
    if not items:
        return {}
    hyps, refs, examples = [], [], []
    gen = generation_config(cfg, model)
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        for e, res in zip(chunk, fill_blanks(model, [e.source + [special_of(model).gmask] for e in chunk], gen)):
            hyps.append(tokenizer.decode(res.spans[0]))
            refs.append(tokenizer.decode(e.target))
            if len(examples) < 3:
                examples.append({"source": tokenizer.decode(e.source), "reference": refs[-1], "generated": hyps[-1]})
    return text_scores(hyps, refs) | {"examples": examples}
