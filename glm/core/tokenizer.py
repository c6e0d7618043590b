"""The sentencepiece tokenizer: trained on a bounded sample of the corpus, GLM special tokens at fixed ids.

Decisions every downstream artefact inherits:

- Normalisation is sentencepiece's `nmt_nfkc` (`nmt_nfkc_cf`, which also case-folds, with
  `tokenizer.lowercase`), stored inside tokenizer.model. The corpus is
  already NFKC, so on training text it only maps tabs/newlines/zero-width characters to spaces
  and collapses runs of spaces; at inference (the ONNX bundle runs raw sentencepiece) it gives
  user input the normalisation the corpus had. Newlines are therefore not representable, and
  `decode(encode(x)) == normalize(x)`.
- `byte_fallback=True`: a character outside the vocabulary becomes its UTF-8 byte pieces
  (`<0xNN>`), never [UNK]. Digits are split into single digits.
- The special tokens sit at the ids of `glm.special_tokens.SPECIAL`. [PAD] [CLS] <eos> are
  control symbols: no text produces them. [MASK] [sMASK] [gMASK] <sop> <eop> are user-defined
  symbols, which sentencepiece matches in text, so the cloze pattern "It was [MASK]." encodes
  to the mask id here and in the plain-sentencepiece runtime alike. Corpus text must not turn
  into blanks: `encode(..., specials=False)` (used by the token-shard stage) spells such
  literals out as ordinary character/byte pieces, which decode back to the same text.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm

from glm.core.config import TokenizerConfig
from glm.core.shards import (
    MANIFEST,
    ManifestError,
    atomic_write_bytes,
    atomic_write_json,
    file_entry,
    manifest_digest,
    read_manifest,
    read_parquet,
    sha256_file,
    sha256_json,
    verify_manifest,
    write_manifest,
)
from glm.core.special_tokens import NUM_SPECIAL, PIECES, SPECIAL

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
SPECIAL_FILE = "special_tokens.json"


def normalization_rule(cfg: TokenizerConfig) -> str:
    """sentencepiece's rule name; user-defined symbols such as [MASK] are matched before it, so never folded."""
    return "nmt_nfkc_cf" if cfg.lowercase else "nmt_nfkc"


_CONTROL = ("pad", "cls", "eos")
_USER_DEFINED = tuple(sorted(("mask", "smask", "gmask", "sop", "eop"), key=lambda n: getattr(SPECIAL, n)))
_LITERAL_LO, _LITERAL_HI = SPECIAL.mask, SPECIAL.eop
# escaping text literals compares ids against one range, so the user-defined ids must be contiguous
assert [getattr(SPECIAL, n) for n in _USER_DEFINED] == list(range(_LITERAL_LO, _LITERAL_HI + 1))

# sentencepiece silently drops training sentences longer than max_sentence_length bytes, so
# documents are cut into chunks well below it (4 UTF-8 bytes per character at most)
_MAX_SENTENCE_BYTES = 16384
_CHUNK_CHARS = 4000

# a piece ends a sentence if, once trailing closing quotes/brackets are removed, it ends with one of these
# (GLM's reference code also ends sentences at ; : and newlines). A character the vocabulary lacks is
# encoded as UTF-8 byte pieces: the one-byte (ASCII) enders count as their byte piece too. Our
# normalisation maps newlines to spaces, so only a tokenizer given as tokenizer.existing can produce
# a newline piece or the <0x0A> byte.
_SENTENCE_END = ".!?。！？…．｡;:；：\n"
_SENTENCE_END_BYTES = {f"<0x{ord(c):02X}>" for c in _SENTENCE_END if ord(c) < 128}
_CLOSERS = "\"'”’」』）)]》〉"


# --------------------------------------------------------------------------- special-token check


def check_special_tokens(sp: spm.SentencePieceProcessor, origin: str | Path) -> None:
    """Raise ValueError naming `origin` unless every GLM special token sits at its SPECIAL id with the right kind."""
    n = sp.get_piece_size()
    problems = []
    for name, want in SPECIAL.as_dict().items():
        piece = PIECES[name]
        have = sp.id_to_piece(want) if want < n else None
        if have != piece:
            where = sp.piece_to_id(piece)
            found = f"id {where}" if sp.id_to_piece(where) == piece else "absent"
            problems.append(f"{piece} must be id {want}, but id {want} is {have!r} and {piece} is {found}")
        elif name in _CONTROL and not sp.is_control(want):
            problems.append(f"{piece} (id {want}) must be a control symbol")
        elif name == "unk" and not sp.is_unknown(want):
            problems.append(f"{piece} (id {want}) must be the unknown piece")
        elif name in _USER_DEFINED and sp.encode(piece, out_type=int)[-1:] != [want]:
            problems.append(f"{piece} (id {want}) must be a user-defined symbol (matched in text)")
    if problems:
        raise ValueError(
            f"tokenizer {origin} does not use the GLM special tokens:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: train one with glm.tokenizer.train_tokenizer (unset tokenizer.existing), or rebuild yours with "
            "pad_id=0 unk_id=1 bos_id=2 eos_id=3, pieces [PAD] [UNK] [CLS] <eos>, and "
            "user_defined_symbols=[MASK],[sMASK],[gMASK],<sop>,<eop>"
        )


# --------------------------------------------------------------------------- the wrapper


class Tokenizer:
    """A loaded tokenizer.model whose special ids have been checked against SPECIAL."""

    special = SPECIAL
    pad_id, unk_id, cls_id, eos_id = SPECIAL.pad, SPECIAL.unk, SPECIAL.cls, SPECIAL.eos
    mask_id, smask_id, gmask_id, sop_id, eop_id = SPECIAL.mask, SPECIAL.smask, SPECIAL.gmask, SPECIAL.sop, SPECIAL.eop

    def __init__(self, model_proto: bytes, origin: str = "<bytes>"):
        self.origin = origin
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{origin} is not a sentencepiece model ({e}); point to a tokenizer.model file") from None
        check_special_tokens(self._sp, origin)
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self._normalizer = spm.SentencePieceNormalizer(model_proto=model_proto, add_dummy_prefix=False, escape_whitespaces=False)
        # each text literal "[MASK]" etc. spelled as ordinary pieces, indexed by the special id
        self._literal_ids = {getattr(SPECIAL, n): self._spell_out(PIECES[n]) for n in _USER_DEFINED}
        self._literal_extra = np.zeros(NUM_SPECIAL, np.int64)
        for i, ids in self._literal_ids.items():
            self._literal_extra[i] = len(ids) - 1

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.model file, or the one inside a tokenizer directory."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} does not exist; train it first (glm.tokenizer.train_tokenizer) "
                "or point to an existing tokenizer.model"
            )
        return cls(path.read_bytes(), origin=str(path))

    # pickled as the model bytes, so a Tokenizer can be sent to worker processes
    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self._proto, "origin": self.origin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["origin"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def byte_fallback(self) -> bool:
        return self._sp.is_byte(self._sp.piece_to_id("<0x00>"))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it: what decode(encode(text)) returns."""
        return self._normalizer.normalize(text)

    def encode(self, text: str | list[str], specials: bool = True) -> list[int] | list[list[int]]:
        """Ids of one text or of a list of texts. `specials=False` spells literal "[MASK]" etc. as plain text."""
        if isinstance(text, str):
            if specials:
                return self._sp.encode(text, out_type=int)
            return self.encode_flat([text], specials=False)[0].tolist()
        if not isinstance(text, list):
            raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")
        if specials:
            return self._sp.encode(text, out_type=int)
        flat, lengths = self.encode_flat(text, specials=False)
        return [a.tolist() for a in np.split(flat, np.cumsum(lengths)[:-1])]

    def encode_flat(self, texts: Sequence[str], specials: bool = False, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32) and each text's length (int64): no Python work per token."""
        arrays = self._sp.encode(list(texts), out_type="numpy", num_threads=num_threads)
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))  # (N,)
        flat = np.concatenate(arrays) if arrays else np.empty(0, np.int32)  # (sum lengths,)
        if not specials:
            flat, lengths = self._escape_literals(flat, lengths)
        return flat, lengths

    def decode(self, ids: Sequence[int] | np.ndarray | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id sequence (or of each row of a batch). Control tokens decode to nothing."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self._sp.decode(ids)

    def literal_ids(self) -> dict[int, list[int]]:
        """How `encode(..., specials=False)` spells each user-defined special token's text ("[MASK]",
        "<sop>"...) as plain pieces: {special id: piece ids}."""
        return {i: ids.tolist() for i, ids in self._literal_ids.items()}

    def sentence_end_ids(self) -> np.ndarray:
        """Sorted ids of pieces that end a sentence (text ending in . ! ? ; : 。 ！ ？ ； ： … or a newline, closing
        quotes allowed; the byte pieces of the ASCII ones too)."""
        return self._sentence_ends

    @functools.cached_property
    def _sentence_ends(self) -> np.ndarray:
        sp = self._sp
        ids = [
            i
            for i in range(NUM_SPECIAL, sp.get_piece_size())
            if (
                not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
                and _ends_sentence(sp.id_to_piece(i))
            )
            or (sp.is_byte(i) and sp.id_to_piece(i) in _SENTENCE_END_BYTES)
        ]
        out = np.asarray(ids, dtype=np.int64)  # (S,)
        out.flags.writeable = False  # shared by every caller
        return out

    def _spell_out(self, literal: str) -> np.ndarray:
        """Ids spelling `literal` one character per piece, UTF-8 byte pieces for characters without one."""
        sp, ids = self._sp, []
        for ch in literal:
            i = sp.piece_to_id(ch)
            if i >= NUM_SPECIAL and not (sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i)):
                ids.append(i)
            else:
                ids.extend(sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode("utf-8"))
        return np.asarray(ids, dtype=np.int32)

    def _escape_literals(self, flat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replace user-defined special ids that came from literal text by their spelled-out pieces."""
        hits = np.flatnonzero((flat >= _LITERAL_LO) & (flat <= _LITERAL_HI))  # (H,)
        if hits.size == 0:
            return flat, lengths
        text_of_hit = np.searchsorted(np.cumsum(lengths), hits, side="right")  # (H,)
        parts, start = [], 0
        for h in hits.tolist():  # only texts that literally contain "[MASK]" and the like: rare
            parts += [flat[start:h], self._literal_ids[int(flat[h])]]
            start = h + 1
        parts.append(flat[start:])
        lengths = lengths.copy()
        np.add.at(lengths, text_of_hit, self._literal_extra[flat[hits]])
        return np.concatenate(parts), lengths


def _ends_sentence(piece: str) -> bool:
    text = piece.replace("▁", "").rstrip(_CLOSERS)
    return bool(text) and text[-1] in _SENTENCE_END


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer at `path`: this pipeline's tokenizer.model (or its directory), or a released GLM's
    tokenizer directory (glm.released_tokenizer: released_tokenizer.json, or the model's vocabulary files)."""
    from glm.core.released_tokenizer import INFO_FILE, ReleasedTokenizer

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / INFO_FILE).is_file() or (path.is_dir() and not (path / MODEL_FILE).is_file()):
        return ReleasedTokenizer.load(folder)
    return Tokenizer.load(path)


# --------------------------------------------------------------------------- training


def train_tokenizer(docs_dir: str | Path | None, out_dir: str | Path, cfg: TokenizerConfig) -> Path:
    """Train a tokenizer on the train split of `docs_dir` (or install cfg.existing) into `out_dir`.

    Returns out_dir/manifest.json. A tokenizer already in out_dir made from the same config is
    kept even if the corpus has grown since: it was trained on a sample, and retraining would
    change every id, re-tokenize every shard and invalidate every checkpoint. Delete out_dir
    (or change the tokenizer config) to retrain.
    """
    out_dir = Path(out_dir)
    if cfg.existing:
        return install_tokenizer(cfg.existing, out_dir, cfg)
    if docs_dir is None:
        raise ValueError("train_tokenizer needs docs_dir (the document shards) unless tokenizer.existing is set")
    docs_manifest = docs_manifest_path(docs_dir)
    config = cfg.model_dump(mode="json")
    if _up_to_date(out_dir, config):
        if [i["sha256"] for i in read_manifest(out_dir)["inputs"]] != [manifest_digest(docs_manifest)]:
            log.warning("keeping the tokenizer in %s, trained on an earlier version of the corpus; delete it to retrain", out_dir)
        return out_dir / MANIFEST

    files = _train_shards(docs_manifest)
    sample: dict[str, int] = {}
    threads = cfg.num_threads or _available_cores()
    t0 = time.perf_counter()
    proto = _train_sentencepiece(_sample_texts(files, cfg.sample_docs, cfg.seed, sample), cfg, threads, sample)
    seconds = time.perf_counter() - t0
    tok = Tokenizer(proto, origin=f"the tokenizer just trained from {docs_manifest}")  # fails loudly on wrong ids
    stats = {**sample, "train_seconds": round(seconds, 3), "num_threads": threads, "normalization": normalization_rule(cfg)}
    return _save(out_dir, tok, config, [docs_manifest], stats)


def install_tokenizer(model_path: str | Path, out_dir: str | Path, cfg: TokenizerConfig | None = None) -> Path:
    """Copy an existing tokenizer.model into `out_dir` after checking its special ids; returns the manifest."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer.existing={str(model_path)!r} does not exist; fix the path or unset it to train one")
    config = (cfg or TokenizerConfig(existing=str(model_path))).model_dump(mode="json")
    source_sha = sha256_file(model_path)
    if _up_to_date(out_dir, config, model_sha256=source_sha):
        return out_dir / MANIFEST
    tok = Tokenizer.load(model_path)
    return _save(out_dir, tok, config, [], {"existing": str(model_path)})


def docs_manifest_path(docs_dir: str | Path) -> Path:
    """The document stage's manifest, or a FileNotFoundError telling to run ingestion."""
    path = Path(docs_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no document manifest at {path}: the document shards are missing or unfinished; run ingestion first"
        )
    return path


def _train_shards(docs_manifest: Path) -> list[Path]:
    try:
        manifest = read_manifest(docs_manifest)
    except ManifestError as e:
        raise ValueError(str(e)) from None
    root = docs_manifest.parent
    files = [root / f["path"] for f in manifest["files"] if f["path"].startswith("train/") and f["path"].endswith(".parquet")]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"document shard {f} listed in {docs_manifest} is missing; re-run ingestion")
        try:
            names = pq.read_schema(f).names
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"document shard {f} is unreadable ({e}); re-run ingestion") from None
        if "text" not in names:
            raise ValueError(f"document shard {f} has no 'text' column (columns: {names}); re-run ingestion")
    if not files:
        raise ValueError(f"{docs_manifest} lists no train/ shards: nothing to train the tokenizer on; check the corpus sources")
    return files


def _sample_texts(files: list[Path], sample_docs: int, seed: int, stats: dict[str, int]) -> Iterator[str]:
    """A seeded uniform sample of `sample_docs` documents, streamed as chunks sentencepiece accepts."""
    counts = [pq.read_metadata(f).num_rows for f in files]
    total = sum(counts)
    stats.update(train_docs=total, sample_docs=0, sample_chars=0)
    chosen = np.arange(total)
    if sample_docs < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=sample_docs, replace=False))  # (sample_docs,)
    start = 0
    for f, n in zip(files, counts):
        lo, hi = np.searchsorted(chosen, [start, start + n])
        if hi > lo:
            texts = read_parquet(f, columns=["text"]).column("text").take(chosen[lo:hi] - start).to_pylist()
            for text in texts:
                if not text:
                    continue
                stats["sample_docs"] += 1
                stats["sample_chars"] += len(text)
                yield from _chunks(text)
        start += n


_NOT_SPACE = re.compile(r"[^ ]")


def _chunks(text: str, limit: int = _CHUNK_CHARS) -> Iterator[str]:
    """Cut text into pieces of at most `limit` characters, at the last space in the second half
    of the window where there is one, dropping the spaces after each cut.

    Linear in len(text): a position walks the string and each step only reads its window
    (slicing off the remainder per chunk made a 50 MB document take minutes). Each step is a
    bounded amount of C-level work, so a signal handler runs between chunks.
    """
    pos, end = 0, len(text)
    while end - pos > limit:
        space = text.rfind(" ", pos + limit // 2, pos + limit)
        cut = space if space > pos else pos + limit  # no space (CJK, URLs): a hard cut
        yield text[pos:cut]
        more = _NOT_SPACE.search(text, cut)
        pos = more.start() if more else end
    if pos < end:
        yield text[pos:]


class _Feed:
    """The training sample as sentencepiece reads it, keeping whatever the sample raised.

    sentencepiece turns an exception from its sentence iterator into a RuntimeError; without
    this, a KeyboardInterrupt or a termination signal (or an unreadable shard) would surface as
    "sentencepiece training failed", a ValueError an orchestrator may retry. Setting
    `cancelled` makes the next read fail, which stops sentencepiece while it loads the sample.
    """

    def __init__(self, texts: Iterator[str]):
        self.texts, self.error, self.cancelled = texts, None, False

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self) -> str:
        if self.cancelled:
            raise RuntimeError("tokenizer training was interrupted")
        try:
            return next(self.texts)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise


def _train_sentencepiece(texts: Iterator[str], cfg: TokenizerConfig, threads: int, sample: dict[str, int]) -> bytes:
    """Train in a helper thread while this one waits in short joins: sentencepiece trains for
    minutes on a large sample without returning to Python, and only the main thread runs signal
    handlers, so a SIGTERM/Ctrl-C would otherwise wait for the whole training. On an interrupt
    the helper is told to stop reading and abandoned (a daemon; it ends with the process)."""
    feed = _Feed(texts)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["model"] = _run_trainer(feed, cfg, threads)
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=run, name="sentencepiece-trainer", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        feed.cancelled = True
        raise
    if feed.error is not None:
        raise feed.error
    if isinstance(outcome.get("error"), RuntimeError):
        raise _training_error(str(outcome["error"]), cfg, sample) from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["model"]


def _run_trainer(feed: _Feed, cfg: TokenizerConfig, threads: int) -> bytes:
    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=feed,
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        num_threads=threads,
        # the sample is drawn (seeded) above, so sentencepiece keeps all of it, in order
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        normalization_rule_name=normalization_rule(cfg),
        byte_fallback=True,
        split_digits=True,
        pad_id=SPECIAL.pad,
        unk_id=SPECIAL.unk,
        bos_id=SPECIAL.cls,
        eos_id=SPECIAL.eos,
        pad_piece=PIECES["pad"],
        unk_piece=PIECES["unk"],
        bos_piece=PIECES["cls"],
        eos_piece=PIECES["eos"],
        user_defined_symbols=[PIECES[n] for n in _USER_DEFINED],
        minloglevel=1,
    )
    return model.getvalue()


def _training_error(msg: str, cfg: TokenizerConfig, sample: dict[str, int]) -> ValueError:
    docs = f"{sample.get('sample_docs', 0)} sampled documents"
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return ValueError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too large for the training text ({docs}): "
            f"sentencepiece can make at most {m.group(1)} pieces; lower tokenizer.vocab_size or add text"
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return ValueError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: the special tokens, 256 byte pieces and the "
            f"characters of the text ({docs}) need {m.group(2)}; raise tokenizer.vocab_size or lower tokenizer.character_coverage"
        )
    return ValueError(f"sentencepiece training failed ({docs}, tokenizer config {cfg.model_dump()}): {msg}")


# --------------------------------------------------------------------------- saving


def _save(out_dir: Path, tok: Tokenizer, config: dict[str, Any], inputs: list[Path], stats: dict[str, Any]) -> Path:
    model_path = atomic_write_bytes(out_dir / MODEL_FILE, tok.model_proto)
    special_path = atomic_write_json(
        out_dir / SPECIAL_FILE,
        {
            "special_tokens": SPECIAL.as_dict(),
            "pieces": PIECES,
            "vocab_size": tok.vocab_size,
            "model_sha256": tok.sha256,
            "byte_fallback": tok.byte_fallback,
        },
    )
    stats = {**stats, "vocab_size": tok.vocab_size, "model_sha256": tok.sha256, "byte_fallback": tok.byte_fallback}
    files = [file_entry(model_path, out_dir), file_entry(special_path, out_dir)]
    return write_manifest(out_dir, "tokenizer", files, config=config, inputs=inputs, stats=stats)


def _up_to_date(out_dir: Path, config: dict[str, Any], model_sha256: str | None = None) -> bool:
    """out_dir holds a tokenizer made from this config (and this model, if given) whose files check out."""
    if not (out_dir / MANIFEST).is_file() or verify_manifest(out_dir, deep=True):
        return False
    try:
        m = read_manifest(out_dir)
    except ManifestError:
        return False
    same_model = model_sha256 is None or m.get("stats", {}).get("model_sha256") == model_sha256
    return m.get("stage") == "tokenizer" and m.get("config_sha256") == sha256_json(config) and same_model


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
