"""Token shards: one Arrow shard per document shard, exact ids, parallel = serial, incremental and idempotent."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm

from glm.core.config import TokenizerConfig
from glm.core.shards import (
    file_entry,
    manifest_digest,
    read_arrow,
    read_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
    write_parquet,
)
from glm.core.special_tokens import SPECIAL
from glm.core.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer
from glm.data.tokenize_shards import (
    _token_table,
    finish_tokenize,
    plan_tokenize,
    token_type,
    tokenize_corpus,
    tokenize_shard,
)
from tests.glm.factories import write_docs

WORDS = "the a film story actor scene music night city river light quiet loud slow bright old new great".split()
HANZI = "电影故事演员音乐夜晚城市河流光安静明亮新旧好看我们你他她是的了在有"


def _content(files):
    """Manifest entries without their mtimes (when a file was written, not what it is)."""
    return [{k: v for k, v in f.items() if k != "mtime_ns"} for f in files]


def random_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        english = " ".join(rng.choices(WORDS, k=rng.randint(5, 30))).capitalize() + rng.choice(".!?")
        docs.append(english + " " + "".join(rng.choices(HANZI, k=rng.randint(3, 20))) + "。")
    return docs


SHARDS = {"train": [random_docs(40, 0), random_docs(30, 1)], "valid": [random_docs(10, 2)]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    write_docs(root / "docs", SHARDS)
    train_tokenizer(root / "docs", root / "tokenizer", TokenizerConfig(model_type="bpe", vocab_size=400, num_threads=1))
    return root / "tokenizer"


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture
def docs_dir(tmp_path) -> Path:
    write_docs(tmp_path / "docs", SHARDS)
    return tmp_path / "docs"


def shard_state(out_dir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every output file: unchanged iff the file was not rewritten."""
    return {
        p.relative_to(out_dir).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- content


def test_each_document_shard_becomes_one_token_shard(docs_dir, tokenizer_dir, tok, tmp_path):
    manifest_path = tokenize_corpus(docs_dir, tokenizer_dir, tmp_path / "tokens", workers=1, progress=False)
    manifest = read_manifest(manifest_path)
    assert [f["path"] for f in manifest["files"]] == [
        "train/part-00000.arrow",
        "train/part-00001.arrow",
        "valid/part-00000.arrow",
    ]
    assert verify_manifest(manifest_path, deep=True) == []

    total_tokens = total_bytes = 0
    for entry in manifest["files"]:
        split, name = entry["path"].split("/")
        texts = SHARDS[split][int(name[5:10])]
        table = read_arrow(tmp_path / "tokens" / entry["path"])
        assert table.schema.field("tokens").type == pa.list_(pa.uint16())
        assert table.column("doc_id").to_pylist() == [f"{split}-{int(name[5:10])}-{j}" for j in range(len(texts))]
        assert table.column("tokens").to_pylist() == tok.encode(texts, specials=False)
        n_tokens = sum(map(len, table.column("tokens").to_pylist()))
        assert entry["tokens"] == n_tokens and entry["docs"] == len(texts) and entry["unk_tokens"] == 0
        assert entry["input"]["sha256"] == sha256_file(docs_dir / entry["path"].replace(".arrow", ".parquet"))
        total_tokens += n_tokens
        total_bytes += sum(len(t.encode()) for t in texts)

    stats = manifest["stats"]
    assert stats["tokens"] == total_tokens and stats["docs"] == 80 and stats["shards"] == 3
    assert stats["splits"]["valid"] == {"docs": 10, "tokens": manifest["files"][2]["tokens"], "shards": 1}
    assert stats["bytes_per_token"] == pytest.approx(total_bytes / total_tokens)
    assert stats["tokenizer_sha256"] == tok.sha256 == manifest["config"]["tokenizer_sha256"]
    assert stats["docs_manifest_sha256"] == manifest_digest(docs_dir / "manifest.json")
    assert manifest["config"]["eos_appended"] is False


def test_two_workers_write_the_same_shards_as_one(docs_dir, tokenizer_dir, tmp_path):
    one = read_manifest(tokenize_corpus(docs_dir, tokenizer_dir, tmp_path / "one", workers=1, progress=False))
    two = read_manifest(tokenize_corpus(docs_dir, tokenizer_dir, tmp_path / "two", workers=2, progress=False))
    assert _content(one["files"]) == _content(two["files"])


def test_literal_special_text_in_documents_is_not_a_blank(tmp_path, tokenizer_dir, tok):
    texts = ["BERT replaces words by [MASK] tokens; GLM adds [gMASK], <sop> and <eop>.", "<eos> [CLS] [PAD] plain"]
    write_docs(tmp_path / "docs", {"train": [texts]})
    tokenize_corpus(tmp_path / "docs", tokenizer_dir, tmp_path / "tokens", progress=False)
    rows = read_arrow(tmp_path / "tokens" / "train" / "part-00000.arrow").column("tokens").to_pylist()
    special = set(SPECIAL.as_dict().values())
    assert not special & {i for row in rows for i in row}
    assert [tok.decode(r) for r in rows] == texts


def test_empty_shards_and_empty_documents(tmp_path, tokenizer_dir):
    write_docs(tmp_path / "docs", {"train": [[], ["", "a film"]]})
    manifest = read_manifest(tokenize_corpus(tmp_path / "docs", tokenizer_dir, tmp_path / "tokens", progress=False))
    empty = read_arrow(tmp_path / "tokens" / "train" / "part-00000.arrow")
    assert empty.num_rows == 0 and empty.schema.field("tokens").type == pa.list_(pa.uint16())
    rows = read_arrow(tmp_path / "tokens" / "train" / "part-00001.arrow").column("tokens").to_pylist()
    assert rows[0] == [] and len(rows[1]) > 0
    assert manifest["stats"]["docs"] == 2 and manifest["stats"]["tokens"] == len(rows[1])


def test_tokenize_shard_is_the_unit_of_work(docs_dir, tokenizer_dir, tmp_path):
    entry = tokenize_shard(
        docs_dir / "valid" / "part-00000.parquet", tokenizer_dir / MODEL_FILE, tmp_path / "t" / "valid" / "part-00000.arrow"
    )
    assert entry["path"] == "valid/part-00000.arrow" and entry["docs"] == 10 and entry["tokens"] > 10
    assert entry["input"]["path"] == "valid/part-00000.parquet"
    assert entry["sha256"] == sha256_file(tmp_path / "t" / "valid" / "part-00000.arrow")


def test_plan_map_finish_is_what_tokenize_corpus_does(docs_dir, tokenizer_dir, tmp_path):
    plan = plan_tokenize(docs_dir, tokenizer_dir, tmp_path / "mapped")
    assert len(plan.jobs) == 3 and plan.reused == []
    entries = [
        tokenize_shard(j.doc_shard, plan.model_path, j.out_path, root=plan.out_dir, input_sha256=j.input_sha256)
        for j in plan.jobs
    ]
    mapped = read_manifest(finish_tokenize(plan, entries))
    direct = read_manifest(tokenize_corpus(docs_dir, tokenizer_dir, tmp_path / "direct", progress=False))
    assert _content(mapped["files"]) == _content(direct["files"]) and mapped["stats"] == direct["stats"]
    assert [i["manifest"] for i in mapped["inputs"]] == [str(docs_dir / "manifest.json"), str(tokenizer_dir / "manifest.json")]
    again = plan_tokenize(docs_dir, tokenizer_dir, tmp_path / "mapped")
    assert again.jobs == [] and len(again.reused) == 3


# --------------------------------------------------------------------------- the narrowest id type


def test_id_type_is_the_narrowest_that_fits():
    assert token_type(400) == pa.uint16() and token_type(65536) == pa.uint16() and token_type(65537) == pa.uint32()
    table = _token_table([np.array([70000, 5, 65536], np.int32)], [np.array([2, 1])], [pa.array(["a", "b"])], token_type(70001))
    assert table.schema.field("tokens").type == pa.list_(pa.uint32())
    assert table.column("tokens").to_pylist() == [[70000, 5], [65536]]


# --------------------------------------------------------------------------- incremental and idempotent


def test_rerun_with_nothing_new_rewrites_nothing(docs_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "tokens"
    tokenize_corpus(docs_dir, tokenizer_dir, out, progress=False)
    before = shard_state(out)
    tokenize_corpus(docs_dir, tokenizer_dir, out, progress=False)
    assert shard_state(out) == before


def test_growing_corpus_tokenizes_only_new_and_changed_shards(docs_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "tokens"
    tokenize_corpus(docs_dir, tokenizer_dir, out, progress=False)
    before = shard_state(out)
    # one shard added, one changed, one unchanged
    write_docs(docs_dir, {"train": [SHARDS["train"][0], random_docs(12, 7), random_docs(9, 8)], "valid": SHARDS["valid"]})
    manifest = read_manifest(tokenize_corpus(docs_dir, tokenizer_dir, out, progress=False))
    after = shard_state(out)
    assert after["train/part-00000.arrow"] == before["train/part-00000.arrow"]
    assert after["valid/part-00000.arrow"] == before["valid/part-00000.arrow"]
    assert after["train/part-00001.arrow"] != before["train/part-00001.arrow"]
    assert "train/part-00002.arrow" in after and manifest["stats"]["docs"] == 40 + 12 + 9 + 10
    assert verify_manifest(out, deep=True) == []


def test_shards_gone_from_the_corpus_are_removed(docs_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "tokens"
    tokenize_corpus(docs_dir, tokenizer_dir, out, progress=False)
    shutil.rmtree(docs_dir)
    write_docs(docs_dir, {"train": [SHARDS["train"][0]]})
    manifest = read_manifest(tokenize_corpus(docs_dir, tokenizer_dir, out, progress=False))
    assert [f["path"] for f in manifest["files"]] == ["train/part-00000.arrow"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.arrow")) == ["train/part-00000.arrow"]


def test_a_new_tokenizer_retokenizes_everything(docs_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "tokens"
    tokenize_corpus(docs_dir, tokenizer_dir, out, progress=False)
    before = shard_state(out)
    train_tokenizer(docs_dir, tmp_path / "tok2", TokenizerConfig(model_type="bpe", vocab_size=380, num_threads=1))
    manifest = read_manifest(tokenize_corpus(docs_dir, tmp_path / "tok2", out, progress=False))
    after = shard_state(out)
    assert all(after[k] != before[k] for k in before if k.endswith(".arrow"))
    assert manifest["config"]["tokenizer_sha256"] == Tokenizer.load(tmp_path / "tok2").sha256


# --------------------------------------------------------------------------- bad input


def test_docs_without_manifest_say_run_ingestion(tmp_path, tokenizer_dir):
    (tmp_path / "docs" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run ingestion first"):
        tokenize_corpus(tmp_path / "docs", tokenizer_dir, tmp_path / "tokens", progress=False)


def test_missing_tokenizer_says_train_it(docs_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train the tokenizer first"):
        tokenize_corpus(docs_dir, tmp_path / "no-tokenizer", tmp_path / "tokens", progress=False)


def test_tokenizer_with_other_special_ids_is_rejected(docs_dir, tmp_path):
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(random_docs(50, 3)), model_prefix=str(prefix), vocab_size=200, model_type="bpe", minloglevel=2
    )
    with pytest.raises(ValueError, match=r"(?s)plain\.model does not use the GLM special tokens.*Fix"):
        tokenize_corpus(docs_dir, prefix.with_suffix(".model"), tmp_path / "tokens", progress=False)
    assert not (tmp_path / "tokens").exists()


def test_shard_without_text_column_is_named(tmp_path, tokenizer_dir):
    docs = tmp_path / "docs"
    write_parquet(docs / "train" / "part-00000.parquet", pa.table({"body": ["x"], "doc_id": ["d"]}))
    write_manifest(docs, "docs", [file_entry(docs / "train" / "part-00000.parquet", docs)])
    with pytest.raises(ValueError, match=r"part-00000.parquet needs columns 'text' and 'doc_id'"):
        tokenize_corpus(docs, tokenizer_dir, tmp_path / "tokens", progress=False)


def test_shard_listed_but_missing_is_named(docs_dir, tokenizer_dir, tmp_path):
    (docs_dir / "train" / "part-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"part-00001.parquet listed in .* is missing; re-run ingestion"):
        tokenize_corpus(docs_dir, tokenizer_dir, tmp_path / "tokens", progress=False)
