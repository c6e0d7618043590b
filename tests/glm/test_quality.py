import json
from pathlib import Path

import pyarrow as pa
import pytest

from glm.core.config import QualityConfig
from glm.core.shards import file_entry, write_arrow, write_manifest, write_parquet
from glm.data.quality import ValidationFailed, validate_documents, validate_tokens

GOOD_DOCS = [f"document number {i} has enough characters to pass" for i in range(40)]
QUALITY = QualityConfig(
    min_docs=10,
    min_chars=16,
    max_chars=1000,
    length_mostly=0.95,
    max_duplicate_ratio=0.05,
    max_unk_rate=0.01,
    min_tokens_per_doc=4,
)


def make_docs(docs_dir: Path, texts: list[str], per_shard: int = 25) -> Path:
    """Document shards shaped like glm.corpus writes them (bypassing its cleaning)."""
    files = []
    for k, start in enumerate(range(0, len(texts), per_shard)):
        chunk = texts[start : start + per_shard]
        table = pa.table(
            {"text": chunk, "doc_id": [f"{start + i:032x}" for i in range(len(chunk))], "source": ["test"] * len(chunk)}
        )
        path = write_parquet(docs_dir / "train" / f"part-{k:05d}.parquet", table)
        files.append(file_entry(path, docs_dir, split="train", rows=len(chunk), text_bytes=sum(len(t.encode()) for t in chunk)))
    write_manifest(docs_dir, "docs", files)
    return docs_dir


def make_tokens(tokens_dir: Path, docs: list[list[int]], per_shard: int = 30, type_=pa.uint16()) -> Path:
    """Token shards as the tokenization stage writes them: Arrow IPC, column tokens: list<uint16>."""
    files = []
    for k, start in enumerate(range(0, len(docs), per_shard)):
        table = pa.table({"tokens": pa.array(docs[start : start + per_shard], pa.list_(type_))})
        path = write_arrow(tokens_dir / "train" / f"part-{k:05d}.arrow", table)
        files.append(file_entry(path, tokens_dir, split="train", rows=table.num_rows))
    write_manifest(tokens_dir, "tokens", files)
    return tokens_dir


def good_token_docs(n: int = 60, vocab: int = 100) -> list[list[int]]:
    return [[9 + (i * 7 + j) % (vocab - 9) for j in range(5 + i % 7)] for i in range(n)]


# --------------------------------------------------------------------------- documents


def test_document_gate_passes_on_good_data_and_saves_json(tmp_path):
    docs = make_docs(tmp_path / "docs", GOOD_DOCS + ["短文本但是有足够的字符数量通过检查"])
    summary = validate_documents(docs, QUALITY)
    assert summary["success"] and summary["sampled_rows"] == summary["total_rows"] == 41
    assert [r["success"] for r in summary["rows"]] == [True] * 5
    assert {r["expectation"].split("(")[0] for r in summary["rows"]} == {
        "expect_table_row_count_to_be_between",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_between",
        "expect_column_proportion_of_unique_values_to_be_between",
        "expect_column_values_to_not_match_regex",
    }
    saved = json.loads((docs / "validation.json").read_text())
    assert saved["success"] and saved["rows"] == summary["rows"] and saved["gx_statistics"]["evaluated_expectations"] == 5


def test_document_gate_failure_names_expectations_values_and_examples(tmp_path):
    bad = GOOD_DOCS[:30] + ["tiny", "short one"] + ["bell\x07 inside a long enough text"] + [GOOD_DOCS[0]] * 3
    docs = make_docs(tmp_path / "docs", bad)
    with pytest.raises(ValidationFailed) as info:
        validate_documents(docs, QUALITY)
    message = str(info.value)
    assert "documents quality gate failed" in message and "3 of 5 expectations" in message
    assert (
        "expect_column_values_to_be_between(length, mostly=0.95, min_value=16, max_value=1000): observed 2 of 36 rows" in message
    )
    assert "a CJK/Japanese/Korean character counts 3" in message
    assert "'length 4: tiny'" in message and "'length 9: short one'" in message
    assert "expect_column_values_to_not_match_regex" in message and "bell\\x07" in message
    assert "expect_column_proportion_of_unique_values_to_be_between(text, min_value=0.95): observed 0.9167" in message
    assert repr(GOOD_DOCS[0]) in message  # the duplicated document is named
    assert "validation.json" in message
    saved = json.loads((docs / "validation.json").read_text())
    assert saved["success"] is False and sum(not r["success"] for r in saved["rows"]) == 3
    assert info.value.summary["rows"] == saved["rows"]


def test_document_gate_measures_length_as_ingestion_does(tmp_path):
    # 6 CJK characters = 18 Latin-equivalent characters: long enough for min_chars=16, as in ingestion;
    # 5 = 15 is not (counting plain characters, both would fail)
    docs = make_docs(tmp_path / "docs", GOOD_DOCS + ["今天天气很好"] * 1 + ["天气很好吧"] * 1)
    with pytest.raises(ValidationFailed) as info:
        validate_documents(docs, QUALITY.model_copy(update={"length_mostly": 1.0}))
    (row,) = [r for r in info.value.summary["rows"] if not r["success"]]
    assert row["observed"].startswith("1 of 42 rows unexpected") and row["examples"] == ["length 15: 天气很好吧"]


def test_document_gate_row_count_and_bounded_sample(tmp_path):
    docs = make_docs(tmp_path / "docs", GOOD_DOCS[:5])
    with pytest.raises(ValidationFailed, match=r"expect_table_row_count_to_be_between\(min_value=10\): observed 5"):
        validate_documents(docs, QUALITY)
    docs = make_docs(tmp_path / "many", GOOD_DOCS, per_shard=7)
    summary = validate_documents(docs, QUALITY.model_copy(update={"min_docs": 5}), max_rows=8)
    assert summary["total_rows"] == 40 and summary["sampled_rows"] == 8  # every 5th document, across shard borders


def test_disabled_gate_is_skipped_without_touching_the_data(tmp_path):
    summary = validate_documents(tmp_path / "nothing", QUALITY.model_copy(update={"enabled": False}))
    assert summary == {"gate": "documents", "success": True, "skipped": True, "rows": []}
    assert validate_tokens(tmp_path / "nothing", 100, 1, QUALITY.model_copy(update={"enabled": False}))["skipped"]


def test_gx_writes_nothing_outside_the_data_directory(tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    docs = make_docs(tmp_path / "docs", GOOD_DOCS)
    validate_documents(docs, QUALITY)
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []
    assert sorted(p.name for p in docs.iterdir()) == ["manifest.json", "train", "validation.json"]


# --------------------------------------------------------------------------- tokens


def test_token_gate_passes_and_reports_rates(tmp_path):
    tokens = make_tokens(tmp_path / "tokens", good_token_docs())
    summary = validate_tokens(tokens, vocab_size=100, unk_id=1, cfg=QUALITY)
    assert summary["success"] and summary["total_rows"] == 60 and summary["unk_rate"] == 0.0
    assert summary["total_tokens"] == sum(len(d) for d in good_token_docs()) and summary["max_id"] <= 99
    assert json.loads((tokens / "validation.json").read_text())["success"]


def test_token_gate_fails_on_out_of_vocabulary_ids(tmp_path):
    docs = good_token_docs()
    docs[17] = [9, 10, 250, 11]
    tokens = make_tokens(tmp_path / "tokens", docs, type_=pa.uint32())
    with pytest.raises(ValidationFailed) as info:
        validate_tokens(tokens, vocab_size=100, unk_id=1, cfg=QUALITY)
    message = str(info.value)
    assert "expect_column_values_to_be_between(max_id, min_value=0, max_value=99): observed 1 of 60 rows" in message
    assert "document 17: max_id 250" in message


def test_token_gate_fails_on_high_unknown_rate_and_short_documents(tmp_path):
    docs = good_token_docs()
    for i in range(0, 60, 3):
        docs[i][0] = 1  # 20 unknown tokens of ~480
    docs[5] = docs[7] = docs[8] = docs[10] = [9, 10]
    tokens = make_tokens(tmp_path / "tokens", docs)
    with pytest.raises(ValidationFailed) as info:
        validate_tokens(tokens, vocab_size=100, unk_id=1, cfg=QUALITY)
    message = str(info.value)
    assert "expect_column_sum_to_be_between(unk_count" in message and "20 unknown of" in message and "max 1.0000%" in message
    assert "expect_column_values_to_be_between(length, mostly=0.95, min_value=4): observed 4 of 60 rows" in message
    assert "'document 5: length 2', 'document 7: length 2', 'document 8: length 2'" in message
    assert "max_id" not in message


def test_token_sample_is_bounded_but_keeps_out_of_vocabulary_documents(tmp_path):
    docs = good_token_docs(200)
    docs[123] = [5, 6, 7, 700]
    tokens = make_tokens(tmp_path / "tokens", docs, per_shard=50)
    cfg = QUALITY.model_copy(update={"min_docs": 1})
    with pytest.raises(ValidationFailed, match="document 123: max_id 700") as info:
        validate_tokens(tokens, vocab_size=100, unk_id=1, cfg=cfg, max_rows=16)
    assert info.value.summary["sampled_rows"] <= 17 and info.value.summary["total_rows"] == 200
    with pytest.raises(ValueError, match="outside the vocabulary"):
        validate_tokens(tokens, vocab_size=100, unk_id=100, cfg=cfg)
