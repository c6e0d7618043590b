"""The sentencepiece tokenizer: fixed special ids, round trips, byte fallback, literals, training and loading."""

from __future__ import annotations

import json
import pickle
import random
import signal
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from glm.core.config import TokenizerConfig
from glm.core.shards import read_manifest, verify_manifest
from glm.core.special_tokens import NUM_SPECIAL, PIECES, SPECIAL
from glm.core.tokenizer import (
    MODEL_FILE,
    SPECIAL_FILE,
    Tokenizer,
    _chunks,
    _train_sentencepiece,
    train_tokenizer,
)
from tests.glm.factories import write_docs

ENGLISH = [
    "The film was a quiet triumph of patient storytelling.",
    "I watched it twice and laughed even harder the second time!",
    "Why would anyone cut the best scene from the final version?",
    "The actors deliver their lines with real warmth and timing.",
    "Its music, its colours and its pace all feel exactly right.",
    "A story about 3 brothers who sail north in 1923.",
    "Nothing happens for an hour, and then everything happens at once.",
    'She said the ending was "perfect." I am not so sure.',
]
CHINESE = [
    "这部电影讲述了一个关于友谊的故事。",
    "演员的表演非常自然，音乐也很动人。",
    "你看过这部电影吗？我觉得很好看！",
    "导演用安静的镜头表现人物的内心世界。",
    "故事的结尾让很多观众感到意外。",
    "我们明天一起去电影院看新的电影吧。",
]


def random_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(ENGLISH, k=4)) + " " + "".join(rng.choices(CHINESE, k=3)) for _ in range(n)]


CFG = TokenizerConfig(vocab_size=420, sample_docs=150, num_threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    write_docs(root / "docs", {"train": [random_docs(100, 0), random_docs(100, 1)], "valid": [random_docs(10, 2)]})
    train_tokenizer(root / "docs", root / "tokenizer", CFG)
    return root / "docs", root / "tokenizer"


@pytest.fixture(scope="module")
def tok(trained) -> Tokenizer:
    return Tokenizer.load(trained[1])


def plain_model(path: Path) -> Path:
    """A sentencepiece model with sentencepiece's own default ids (unk=0, bos=1, eos=2): not GLM's."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH * 20),
        model_prefix=str(path.with_suffix("")),
        vocab_size=120,
        model_type="bpe",
        minloglevel=2,
    )
    return path


# --------------------------------------------------------------------------- artefacts and ids


def test_special_tokens_sit_at_their_fixed_ids(tok, trained):
    for name, i in SPECIAL.as_dict().items():
        assert tok.id_to_piece(i) == PIECES[name] and getattr(tok, f"{name}_id") == i
    assert tok.vocab_size == len(tok) == CFG.vocab_size
    saved = json.loads((trained[1] / SPECIAL_FILE).read_text())
    assert saved["special_tokens"] == SPECIAL.as_dict()
    assert saved["vocab_size"] == CFG.vocab_size and saved["model_sha256"] == tok.sha256
    assert verify_manifest(trained[1], deep=True) == []
    manifest = read_manifest(trained[1])
    assert manifest["stage"] == "tokenizer" and manifest["stats"]["sample_docs"] == CFG.sample_docs
    assert manifest["stats"]["train_docs"] == 200  # the valid split is not sampled


def test_control_tokens_are_never_produced_by_text(tok):
    ids = tok.encode("<eos> [PAD] [CLS] [UNK] end")
    assert not {SPECIAL.pad, SPECIAL.unk, SPECIAL.cls, SPECIAL.eos} & set(ids)
    assert tok.decode(ids) == "<eos> [PAD] [CLS] [UNK] end"


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "text", ["The film was a quiet triumph, and I watched it twice.", "这部电影讲述了一个关于友谊的故事。你看过吗?"]
)
def test_round_trip_of_normalised_text_is_exact(tok, text):
    assert tok.normalize(text) == text
    assert tok.decode(tok.encode(text)) == text


def test_normalisation_is_nfkc_with_collapsed_whitespace(tok):
    text = "  ＡＢＣ１２３ ﬁlm\nline\ttab，好！  "
    assert tok.normalize(text) == "ABC123 film line tab,好!"
    assert tok.decode(tok.encode(text)) == tok.normalize(text)


def test_unseen_characters_fall_back_to_bytes_never_unk(tok):
    text = "parrot 🦜 and rare 𠀋 龘 ÿ"
    ids = tok.encode(text)
    assert SPECIAL.unk not in ids
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert tok.decode(ids) == text


def test_digits_are_split(tok):
    pieces = [tok.id_to_piece(i).lstrip("▁") for i in tok.encode("1923")]
    assert [p for p in pieces if p] == ["1", "9", "2", "3"]


def test_batch_encode_matches_single_encodes(tok):
    texts = ["It was [MASK].", "", "这部电影", "plain words"]
    for specials in (True, False):
        assert tok.encode(texts, specials=specials) == [tok.encode(t, specials=specials) for t in texts]
    assert tok.decode(tok.encode(texts)) == [tok.normalize(t) for t in texts]


def test_encode_rejects_other_types(tok):
    with pytest.raises(TypeError, match="str or a list"):
        tok.encode(("a", "b"))


# --------------------------------------------------------------------------- special literals in text


def test_mask_literal_matches_in_cloze_patterns(tok):
    ids = tok.encode("It was [MASK].")
    assert ids.count(SPECIAL.mask) == 1
    assert tok.decode(ids) == "It was [MASK]."
    assert SPECIAL.gmask in tok.encode("[gMASK]") and SPECIAL.sop in tok.encode("x<sop>")


def test_literals_are_spelled_out_when_specials_are_off(tok):
    text = "Papers write [MASK], [sMASK], [gMASK], <sop> and <eop>[MASK]."
    ids = np.array(tok.encode(text, specials=False))
    assert not np.any((ids >= SPECIAL.mask) & (ids <= SPECIAL.eop))
    assert tok.decode(ids) == text
    with_specials = tok.encode(text)
    assert sum(i in SPECIAL.mask_ids + (SPECIAL.sop, SPECIAL.eop) for i in with_specials) == 6


def test_literal_ids_are_how_encode_spells_each_special_text(tok):
    literal = tok.literal_ids()
    assert set(literal) == {*SPECIAL.mask_ids, SPECIAL.sop, SPECIAL.eop}
    names = {i: name for name, i in SPECIAL.as_dict().items()}
    for i, ids in literal.items():
        assert min(ids) >= NUM_SPECIAL and tok.decode(ids) == PIECES[names[i]]
        assert tok.encode("x" + PIECES[names[i]], specials=False)[-len(ids) :] == ids


def test_encode_flat_lengths_follow_escaping(tok):
    texts = ["a [MASK] b", "no literal", "[MASK][MASK]"]
    flat, lengths = tok.encode_flat(texts)
    assert flat.dtype == np.int32 and lengths.sum() == flat.size
    rows = np.split(flat, np.cumsum(lengths)[:-1])
    assert [tok.decode(r) for r in rows] == [tok.normalize(t) for t in texts]


# --------------------------------------------------------------------------- sentence ends


def test_sentence_end_ids(tok):
    ends = tok.sentence_end_ids()
    assert ends.dtype == np.int64 and np.all(np.diff(ends) > 0) and np.all(ends >= NUM_SPECIAL)
    for i in ends:
        piece = tok.id_to_piece(int(i))
        if piece.startswith("<0x"):  # a byte piece: an ASCII ender the vocabulary may lack
            assert chr(int(piece[3:5], 16)) in ".!?;:\n"
        else:
            assert piece.replace("▁", "").rstrip("\"'”’")[-1] in ".!?。！？…;:；：\n"
    for p in (".", "。", "!", "<0x0A>", "<0x3B>", "<0x3A>"):  # GLM's reference set includes ; : and newlines
        assert tok.piece_to_id(p) in ends
    for text in ("a; b", "a: b"):  # in the vocabulary or spelled as a byte, the separator ends a sentence
        assert set(tok.encode(text)) & set(ends.tolist())
    words = [i for i in tok.encode("The film was a quiet") if tok.id_to_piece(i).strip("▁")]
    assert not set(words) & set(ends.tolist())


# --------------------------------------------------------------------------- loading and re-use


def test_tokenizer_pickles_as_model_bytes(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256 and clone.encode("这部 film") == tok.encode("这部 film")


def test_training_again_is_a_no_op(trained):
    manifest = trained[1] / "manifest.json"
    before = manifest.stat().st_mtime_ns, manifest.read_bytes()
    train_tokenizer(trained[0], trained[1], CFG)
    assert (manifest.stat().st_mtime_ns, manifest.read_bytes()) == before


def test_existing_tokenizer_is_installed(trained, tmp_path):
    source = trained[1] / MODEL_FILE
    train_tokenizer(None, tmp_path / "tok", TokenizerConfig(existing=str(source)))
    assert (tmp_path / "tok" / MODEL_FILE).read_bytes() == source.read_bytes()
    assert Tokenizer.load(tmp_path / "tok").vocab_size == CFG.vocab_size
    assert verify_manifest(tmp_path / "tok", deep=True) == []


def test_existing_tokenizer_with_other_ids_is_rejected(tmp_path):
    model = plain_model(tmp_path / "plain.model")
    with pytest.raises(ValueError, match=r"(?s)plain\.model.*\[PAD\] must be id 0.*\[MASK\] must be id 4.*Fix"):
        train_tokenizer(None, tmp_path / "tok", TokenizerConfig(existing=str(model)))
    assert not (tmp_path / "tok" / MODEL_FILE).exists()


def test_missing_existing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.model"):
        train_tokenizer(None, tmp_path / "tok", TokenizerConfig(existing=str(tmp_path / "nowhere.model")))
    with pytest.raises(FileNotFoundError, match="train it first"):
        Tokenizer.load(tmp_path / "missing")


def test_a_file_that_is_not_a_model_is_rejected(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model is not a sentencepiece model"):
        Tokenizer.load(tmp_path / "junk.model")


# --------------------------------------------------------------------------- training options and bad input


def test_bpe_training_is_deterministic_with_fixed_ids(trained, tmp_path):
    cfg = TokenizerConfig(model_type="bpe", vocab_size=500, sample_docs=80, num_threads=1, seed=3)
    shas = []
    for name in ("a", "b"):
        train_tokenizer(trained[0], tmp_path / name, cfg)
        bpe = Tokenizer.load(tmp_path / name)
        assert [bpe.id_to_piece(i) for i in range(NUM_SPECIAL)] == list(PIECES.values())
        shas.append(bpe.sha256)
    assert shas[0] == shas[1]
    assert read_manifest(tmp_path / "a")["stats"]["sample_docs"] == 80


def test_changed_config_retrains(trained, tmp_path):
    cfg = TokenizerConfig(model_type="bpe", vocab_size=500, sample_docs=80, num_threads=1)
    train_tokenizer(trained[0], tmp_path / "t", cfg)
    first = Tokenizer.load(tmp_path / "t")
    train_tokenizer(trained[0], tmp_path / "t", cfg.model_copy(update={"vocab_size": 520}))
    assert Tokenizer.load(tmp_path / "t").vocab_size == 520 != first.vocab_size


def test_lowercase_folds_text_but_not_the_special_literals(trained, tmp_path):
    train_tokenizer(trained[0], tmp_path / "lc", CFG.model_copy(update={"lowercase": True}))
    lc = Tokenizer.load(tmp_path / "lc")
    assert read_manifest(tmp_path / "lc")["stats"]["normalization"] == "nmt_nfkc_cf"
    assert lc.encode("THE Film Was A Quiet Triumph") == lc.encode("the film was a quiet triumph")
    ids = lc.encode("It was [MASK]. <sop>")
    assert SPECIAL.mask in ids and SPECIAL.sop in ids
    assert lc.decode(lc.encode("It was [MASK].", specials=False)) == "it was [MASK]."  # a corpus literal stays text
    assert SPECIAL.mask not in lc.encode("It was [MASK].", specials=False)


def test_a_grown_corpus_keeps_the_tokenizer(tmp_path, caplog):
    cfg = TokenizerConfig(model_type="bpe", vocab_size=450, num_threads=1)
    write_docs(tmp_path / "docs", {"train": [random_docs(40, 0)]})
    manifest = train_tokenizer(tmp_path / "docs", tmp_path / "tok", cfg)
    before = manifest.read_bytes()
    write_docs(tmp_path / "docs", {"train": [random_docs(40, 0), random_docs(40, 1)]})
    with caplog.at_level("WARNING", logger="glm.tokenizer"):
        train_tokenizer(tmp_path / "docs", tmp_path / "tok", cfg)
    assert manifest.read_bytes() == before
    assert "earlier version of the corpus" in caplog.text


def test_vocabulary_too_large_for_the_text_is_explained(trained, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=60000 is too large .* at most \d+"):
        train_tokenizer(trained[0], tmp_path / "t", TokenizerConfig(vocab_size=60000, sample_docs=20, num_threads=1))


def test_vocabulary_too_small_for_bytes_is_explained(trained, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=100 is too small"):
        train_tokenizer(trained[0], tmp_path / "t", TokenizerConfig(vocab_size=100, sample_docs=20, num_threads=1))


def test_missing_document_manifest_says_run_ingestion(tmp_path):
    with pytest.raises(FileNotFoundError, match="run ingestion first"):
        train_tokenizer(tmp_path / "docs", tmp_path / "tok", CFG)


def test_docs_without_train_split_are_rejected(tmp_path):
    write_docs(tmp_path / "docs", {"valid": [random_docs(5)]})
    with pytest.raises(ValueError, match="no train/ shards"):
        train_tokenizer(tmp_path / "docs", tmp_path / "tok", CFG)


def test_long_documents_are_chunked_not_dropped():
    text = ("word " * 3000) + "字" * 9000
    chunks = list(_chunks(text, limit=4000))
    assert all(0 < len(c) <= 4000 for c in chunks)
    assert "".join(c.replace(" ", "") for c in chunks) == text.replace(" ", "")


def old_chunks(text: str, limit: int):
    """The quadratic original (it slices off the remainder per chunk), kept as the reference."""
    while len(text) > limit:
        cut = text.rfind(" ", limit // 2, limit)
        cut = cut if cut > 0 else limit
        yield text[:cut]
        text = text[cut:].lstrip(" ")
    if text:
        yield text


def chunk_test_text(rng: random.Random) -> str:
    """Words, CJK runs, newlines and runs of spaces, some longer than the window."""
    parts = []
    for _ in range(rng.randint(0, 60)):
        kind = rng.random()
        if kind < 0.5:
            parts.append("".join(rng.choices("abcdeé", k=rng.randint(1, 12))))
        elif kind < 0.65:
            parts.append("字" * rng.randint(1, 40))
        elif kind < 0.75:
            parts.append("\n" * rng.randint(1, 3))
        parts.append(" " * (rng.randint(1, 3) if rng.random() < 0.8 else rng.randint(4, 90)))
    text = "".join(parts)
    return " " * rng.randint(0, 3) + text if rng.random() < 0.3 else text


@pytest.mark.parametrize("seed", range(5))
def test_chunk_boundaries_match_the_old_implementation(seed):
    rng = random.Random(seed)
    texts = ["", " ", "     ", "x" * 9, "ab cd", " " * 9 + "x"] + [chunk_test_text(rng) for _ in range(200)]
    for text in texts:
        for limit in (1, 2, 3, 5, 8, 13, 64, 4000):
            assert list(_chunks(text, limit)) == list(old_chunks(text, limit)), (text, limit)


def test_chunking_a_20_mb_document_never_copies_the_rest_of_it():
    text = "lorem ipsum dolor sit amet, " * (20_000_000 // 28)  # (20 MB)
    tracemalloc.start()
    try:
        n_chunks = sum(1 for _ in _chunks(text, limit=4000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the quadratic version allocated a copy of the remainder (up to 20 MB) for every chunk
    assert peak < 1 << 20, f"chunking held {peak} bytes at once"
    assert len(text) / 4000 <= n_chunks <= len(text) / 2000 + 1  # cuts in the window's second half


def interrupted_sample(how: str):
    yield from random_docs(50)
    if how == "signal":  # the default SIGINT handler runs in the main thread and raises there
        signal.raise_signal(signal.SIGINT)
        yield from random_docs(50, seed=1)
    elif how == "interrupt":
        raise KeyboardInterrupt
    else:
        raise OSError("disk went away")


@pytest.mark.parametrize("how,error", [("signal", KeyboardInterrupt), ("interrupt", KeyboardInterrupt), ("oserror", OSError)])
def test_an_interrupted_sample_stops_training_with_that_interrupt(how, error):
    # sentencepiece turns an iterator's exception into a RuntimeError, which became a
    # "sentencepiece training failed" ValueError
    with pytest.raises(error):
        _train_sentencepiece(interrupted_sample(how), CFG, 1, {})
    for t in threading.enumerate():
        if t.name == "sentencepiece-trainer":
            t.join(30)  # told to stop reading: it ends while loading the sample
            assert not t.is_alive()
