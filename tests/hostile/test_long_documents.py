"""Issue 26 item 5: very long records. With data.cleaning.long_documents: split (the default) a 10 MB
CSV field is split like any long document instead of failing its whole file, and a text file too
long to hold (a single-line document of many megabytes) is streamed in chunks and split; with
long_documents: drop such a record is dropped with a WARNING naming it. Runs the real ingestion."""

from __future__ import annotations

import csv
import logging
import random

import pytest

from glm.core.config import ConfigError, DataConfig, load_config
from glm.data.corpus import ingest, iter_documents, read_manifest

WORDS = "the film was long and the plot was thin but the cast was superb".split()


def _words(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        word = rng.choice(WORDS) + f"{rng.randrange(10**6)}"  # few duplicates
        out.append(word)
        size += len(word) + 1
    return " ".join(out)  # one line: no paragraph, line or sentence break anywhere


def _csv_with_a_huge_field(path, huge: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        for i in range(20):
            w.writerow([f"an ordinary review number {i}, neither long nor short at all."])
        w.writerow([_words(huge)])
        w.writerow(["the last ordinary review, after the huge one."])


def _all_docs(out):
    return [d for split in ("train", "valid") for d in iter_documents(out, split)]


def test_a_10_mb_csv_field_is_split_not_a_failure_of_its_file(tmp_path):
    data = tmp_path / "reviews.csv"
    _csv_with_a_huge_field(data, 10 << 20)
    cfg = DataConfig(sources=[{"kind": "csv", "path": str(data)}], valid_fraction=0.1)
    out = tmp_path / "docs"
    stats = read_manifest(ingest(cfg, out, progress=False))["stats"]
    assert stats["dropped"]["too_long"] == 0 and stats["split"]["documents"] == 1
    assert stats["split"]["pieces"] >= (10 << 20) // cfg.cleaning.max_chars
    docs = _all_docs(out)
    assert "the last ordinary review, after the huge one." in docs and len(docs) == 21 + stats["split"]["pieces"]
    assert max(len(d) for d in docs) <= cfg.cleaning.max_chars


def test_a_huge_field_with_long_documents_drop_warns_and_keeps_the_rest(tmp_path, caplog):
    data = tmp_path / "reviews.csv"
    _csv_with_a_huge_field(data, 10 << 20)
    cfg = DataConfig(sources=[{"kind": "csv", "path": str(data)}], valid_fraction=0.1, cleaning={"long_documents": "drop"})
    with caplog.at_level(logging.WARNING, logger="glm"):
        stats = read_manifest(ingest(cfg, tmp_path / "docs", progress=False))["stats"]
    assert stats["dropped"]["too_long"] == 1 and sum(stats["docs"].values()) == 21
    [warning] = [r.getMessage() for r in caplog.records if "dropped as too_long" in r.getMessage()]
    assert f"{data}:22: a record field of 10" in warning and "set data.cleaning.long_documents: split" in warning


def test_a_single_line_text_document_too_long_to_hold_is_streamed_and_split(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    size = 8 << 20  # over 16 x max_chars = 3.2 MB: read in chunks, never whole
    (corpus / "huge.txt").write_text(_words(size, seed=1), encoding="utf-8")
    (corpus / "small.txt").write_text("a small document beside the huge one, kept as it is.", encoding="utf-8")
    cfg = DataConfig(sources=[{"kind": "text", "path": str(corpus)}], valid_fraction=0.1)
    out = tmp_path / "docs"
    stats = read_manifest(ingest(cfg, out, progress=False))["stats"]
    assert stats["dropped"]["too_long"] == 0
    docs = _all_docs(out)
    assert "a small document beside the huge one, kept as it is." in docs
    pieces = [d for d in docs if not d.startswith("a small document")]
    assert max(len(d) for d in pieces) <= cfg.cleaning.max_chars
    assert abs(sum(len(d) + 1 for d in pieces) - size) < 64  # every word kept, whatever the chunks
    # one document: all its pieces in one split
    in_valid = {d for d in iter_documents(out, "valid")}
    assert all(d in in_valid for d in pieces) or not any(d in in_valid for d in pieces)


def test_max_chars_too_large_to_hold_is_refused():
    with pytest.raises(ConfigError, match=r"data.cleaning.max_chars: Input should be less than or equal to 10000000"):
        load_config("configs/tiny.yaml", ["data.cleaning.max_chars=400000000"])
