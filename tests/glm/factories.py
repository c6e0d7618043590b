"""Small builders shared by the tests in tests/glm: tiny models, tiny tokenizers, document shards, examples.

One thread per test process is set once for the whole session in tests/conftest.py.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import sentencepiece as spm
import torch

from glm.core.config import model_config
from glm.core.model import GLM
from glm.core.shards import file_entry, write_manifest, write_parquet
from glm.core.tokenizer import Tokenizer
from glm.finetuning.finetune import LabelledExample

FILLER = "the movie film was plot acting story really very quite an a".split()
SENTIMENT_WORDS = FILLER + "good bad great terrible fun boring not".split()


# --------------------------------------------------------------------------- models


def tiny_model(vocab_size: int, seed: int = 0, **overrides: Any) -> GLM:
    """The "tiny" preset (2 layers, width 32) without dropout, in eval mode, its weights drawn
    after torch.manual_seed(seed). `overrides` replace any ModelConfig field (dropout included)."""
    torch.manual_seed(seed)
    cfg = model_config("tiny", vocab_size=vocab_size, **{"dropout": 0.0, "attention_dropout": 0.0, **overrides})
    return GLM(cfg).eval()


def lively_model(vocab_size: int, seed: int = 0, **overrides: Any) -> GLM:
    """A random tiny model whose blocks dominate the residual stream (weights x10), so greedy decoding
    varies from step to step instead of echoing its input as a freshly initialised tied model does."""
    model = tiny_model(vocab_size, seed, **overrides)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(10.0)
    return model


# --------------------------------------------------------------------------- tokenizers


def train_tiny_sentencepiece(sentences: Iterable[str], vocab_size: int) -> bytes:
    """A unigram sentencepiece model (tokenizer.model bytes) with GLM's special ids and byte fallback."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        pad_piece="[PAD]",
        unk_id=1,
        unk_piece="[UNK]",
        bos_id=2,
        bos_piece="[CLS]",
        eos_id=3,
        eos_piece="<eos>",
        user_defined_symbols=["[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>"],
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


def sentiment_tokenizer() -> Tokenizer:
    """A ~300-piece tokenizer (256 byte pieces + the sentiment words) with the GLM special ids."""
    rng = random.Random(0)
    sentences = [
        " ".join(rng.choice(SENTIMENT_WORDS) for _ in range(rng.randint(4, 12))) + rng.choice([".", "!", "?"]) for _ in range(200)
    ]
    return Tokenizer(train_tiny_sentencepiece(sentences, vocab_size=330))


# --------------------------------------------------------------------------- data


def write_docs(docs_dir: Path, splits: dict[str, list[list[str]]]) -> Path:
    """Document shards {split}/part-NNNNN.parquet with a manifest, as the corpus stage writes them."""
    files = []
    for split, shards in splits.items():
        for i, texts in enumerate(shards):
            table = pa.table(
                {
                    "text": pa.array(texts, pa.string()),
                    "doc_id": [f"{split}-{i}-{j}" for j in range(len(texts))],
                    "source": ["test"] * len(texts),
                }
            )
            files.append(file_entry(write_parquet(docs_dir / split / f"part-{i:05d}.parquet", table), docs_dir))
    return write_manifest(docs_dir, "docs", files)


def sentiment_examples(n: int, seed: int = 1) -> list[LabelledExample]:
    """Filler words plus one "good" (label 1) or "bad" (label 0): trivially separable."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        out.append(LabelledExample(" ".join(words), str(label)))
    return out


BILINGUAL_SENTENCES = [
    "这部电影很好。",
    "这部电影很差。",
    "故事很好，演员也好。",
    "情节很差，音乐也差。",
    "the movie was good .",
    "the plot was bad .",
]


def bilingual_tokenizer() -> Tokenizer:
    """A ~330-piece unigram tokenizer trained on Chinese (unspaced) and English sentences: every CJK
    character stands alone after the dummy prefix, e.g. "好" -> ["▁", "好"]."""
    rng = random.Random(0)
    sentences = [rng.choice(BILINGUAL_SENTENCES[:4]) + rng.choice(BILINGUAL_SENTENCES[:4]) for _ in range(150)]
    sentences += [rng.choice(BILINGUAL_SENTENCES[4:]) for _ in range(50)]
    return Tokenizer(train_tiny_sentencepiece(sentences, vocab_size=330))
