"""Token shards: every document shard tokenized into one Arrow IPC shard, in parallel, incrementally.

docs/{split}/part-NNNNN.parquet  ->  tokens/{split}/part-NNNNN.arrow with columns
  tokens  list<uint16> (list<uint32> when the vocabulary exceeds 65536 ids): one row per document,
          the document's ids only -- no <eos>; whoever packs documents into rows appends SPECIAL.eos
  doc_id  string
Literal "[MASK]"-like text in documents is spelled out as plain pieces (see glm.tokenizer), so
the only blank ids in training data are the ones the infilling builder puts there.

A shard is re-tokenized only when its input's hash or the tokenizer changed, so a growing
corpus tokenizes only its new shards, and a re-run with nothing new writes nothing.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from glm.core.released_tokenizer import INFO_FILE as RELEASED_INFO
from glm.core.shards import (
    MANIFEST,
    ManifestError,
    check_file,
    file_entry,
    manifest_digest,
    read_manifest,
    remove_stale_temporaries,
    sha256_file,
    write_arrow,
    write_manifest,
)
from glm.core.special_tokens import special_of
from glm.core.tokenizer import MODEL_FILE, Tokenizer, docs_manifest_path, load_tokenizer

log = logging.getLogger(__name__)

STAGE = "tokens"
BATCH_DOCS = 1024  # documents per sentencepiece batch call: large enough to amortise, small enough for memory
_INT32_MAX = 2**31 - 1


def token_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type holding every id of the vocabulary."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, mtime_ns: int, size: int) -> Tokenizer:
    # keyed on the file's stat too, so a worker reloads a tokenizer that changed on disk
    return load_tokenizer(path)


def _identity_file(model_path: Path) -> Path:
    """The file whose change means a new tokenizer: tokenizer.model, or a released GLM tokenizer's info file."""
    info = model_path.parent / RELEASED_INFO
    return info if not model_path.is_file() and info.is_file() else model_path


def worker_tokenizer(model_path: str | Path) -> Tokenizer:
    """The tokenizer at `model_path` (or the released GLM tokenizer beside it), loaded once per process."""
    st = _identity_file(Path(model_path)).stat()
    return _load_tokenizer(str(model_path), st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------- one shard (the unit of work)


def tokenize_shard(
    doc_shard_path: str | Path,
    tokenizer_model_path: str | Path,
    out_path: str | Path,
    *,
    root: str | Path | None = None,
    input_sha256: str | None = None,
) -> dict[str, Any]:
    """Tokenize one document shard into one token shard; returns its manifest file entry with statistics.

    `root` is the token stage directory the entry's path is relative to (default: out_path's
    grandparent, i.e. tokens/ for tokens/train/part-00000.arrow).
    """
    doc_shard_path, out_path = Path(doc_shard_path), Path(out_path)
    root = Path(root) if root is not None else out_path.parent.parent
    tok = worker_tokenizer(tokenizer_model_path)
    try:
        shard = pq.ParquetFile(doc_shard_path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"document shard {doc_shard_path} is unreadable ({e}); re-run ingestion") from None
    flats, lengths, doc_ids, text_bytes = [], [], [], 0
    with shard:
        names = shard.schema_arrow.names
        if "text" not in names or "doc_id" not in names:
            raise ValueError(f"document shard {doc_shard_path} needs columns 'text' and 'doc_id' (has {names}); re-run ingestion")
        for batch in shard.iter_batches(batch_size=BATCH_DOCS, columns=["text", "doc_id"]):
            text = pc.fill_null(batch.column("text"), "")
            flat, n = tok.encode_flat(text.to_pylist(), specials=False)  # (T,), (B,)
            flats.append(flat)
            lengths.append(n)
            doc_ids.append(batch.column("doc_id").cast(pa.string()))
            text_bytes += int(pc.sum(pc.binary_length(text)).as_py() or 0)

    table = _token_table(flats, lengths, doc_ids, token_type(tok.vocab_size))
    write_arrow(out_path, table)
    tokens = int(sum(len(f) for f in flats))
    unk = int(sum(np.count_nonzero(f == special_of(tok).unk) for f in flats))
    return file_entry(
        out_path,
        root,
        docs=table.num_rows,
        tokens=tokens,
        unk_tokens=unk,
        text_bytes=text_bytes,
        # split/part name, as the document manifest lists it
        input={
            "path": f"{doc_shard_path.parent.name}/{doc_shard_path.name}",
            "sha256": input_sha256 or sha256_file(doc_shard_path),
        },
    )


def _token_table(flats: list[np.ndarray], lengths: list[np.ndarray], doc_ids: list[pa.Array], dtype: pa.DataType) -> pa.Table:
    values = np.concatenate(flats).astype(dtype.to_pandas_dtype()) if flats else np.empty(0, dtype.to_pandas_dtype())  # (T,)
    counts = np.concatenate(lengths) if lengths else np.empty(0, np.int64)  # (N,)
    large = values.size > _INT32_MAX  # list<> offsets are int32; past that, large_list<> with int64
    offsets = np.zeros(counts.size + 1, np.int64 if large else np.int32)  # (N+1,)
    np.cumsum(counts, out=offsets[1:])
    list_array = (pa.LargeListArray if large else pa.ListArray).from_arrays(pa.array(offsets), pa.array(values))
    doc_id = pa.concat_arrays(doc_ids) if doc_ids else pa.array([], pa.string())
    return pa.table({"tokens": list_array, "doc_id": doc_id})


# --------------------------------------------------------------------------- the whole corpus


class ShardJob(NamedTuple):
    """One document shard to tokenize: the arguments of tokenize_shard."""

    doc_shard: Path
    out_path: Path
    input_sha256: str


@dataclass
class TokenizePlan:
    """What a run has to do: the shards to tokenize and the entries still valid from an earlier run."""

    docs_manifest: Path
    model_path: Path
    tokenizer_manifest: Path | None
    out_dir: Path
    tokenizer: Tokenizer
    jobs: list[ShardJob] = field(default_factory=list)
    reused: list[dict[str, Any]] = field(default_factory=list)


def tokenize_corpus(
    docs_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Tokenize every document shard listed in docs_dir's manifest into out_dir; returns out_dir/manifest.json.

    The same three steps a Prefect flow takes: plan_tokenize, tokenize_shard mapped over
    plan.jobs, finish_tokenize.
    """
    plan = plan_tokenize(docs_dir, tokenizer_dir, out_dir)
    return finish_tokenize(plan, _run(plan, workers, progress))


def plan_tokenize(docs_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> TokenizePlan:
    """Check the inputs and list the shards whose input or tokenizer changed since the last run."""
    docs_dir, out_dir, tokenizer_dir = Path(docs_dir), Path(out_dir), Path(tokenizer_dir)
    docs_manifest = docs_manifest_path(docs_dir)
    model_path = tokenizer_dir / MODEL_FILE if tokenizer_dir.is_dir() or tokenizer_dir.suffix != ".model" else tokenizer_dir
    if not _identity_file(model_path).is_file():
        raise FileNotFoundError(f"no tokenizer model at {model_path}; train the tokenizer first (glm.tokenizer.train_tokenizer)")
    tok = worker_tokenizer(model_path)  # checks the special ids before any work; in-process shards reuse it
    try:
        docs = read_manifest(docs_manifest)
    except ManifestError as e:
        raise ValueError(str(e)) from None
    if out_dir.is_dir():
        remove_stale_temporaries(out_dir)

    plan = TokenizePlan(docs_manifest, model_path, _tokenizer_manifest(model_path), out_dir, tok)
    previous = _previous_entries(out_dir, tok.sha256)
    for f in docs["files"]:
        if not f["path"].endswith(".parquet"):
            continue
        src = docs_dir / f["path"]
        rel = Path(f["path"]).with_suffix(".arrow").as_posix()
        old = previous.get(rel)
        if old is not None and old["input"]["sha256"] == f["sha256"] and check_file(out_dir / rel, old) is None:
            plan.reused.append(old)
        elif not src.is_file():
            raise FileNotFoundError(f"document shard {src} listed in {docs_manifest} is missing; re-run ingestion")
        else:
            plan.jobs.append(ShardJob(src, out_dir / rel, f["sha256"]))
    return plan


def finish_tokenize(plan: TokenizePlan, entries: list[dict[str, Any]]) -> Path:
    """Close the stage: drop shards no longer in the corpus, write the manifest unless nothing changed."""
    files = sorted(plan.reused + entries, key=lambda e: e["path"])
    _remove_unlisted_shards(plan.out_dir, {f["path"] for f in files})
    inputs = [plan.docs_manifest] + ([plan.tokenizer_manifest] if plan.tokenizer_manifest else [])
    if not entries and _manifest_matches(plan.out_dir, files, inputs):
        log.info("token shards in %s are up to date", plan.out_dir)
        return plan.out_dir / MANIFEST
    tok = plan.tokenizer
    config = {"tokenizer_sha256": tok.sha256, "dtype": str(token_type(tok.vocab_size)), "eos_appended": False}
    stats = _stats(files, tok, plan.docs_manifest)
    return write_manifest(plan.out_dir, STAGE, files, config=config, inputs=inputs, stats=stats)


def _run(plan: TokenizePlan, workers: int, progress: bool) -> list[dict[str, Any]]:
    jobs, model_path, out_dir = plan.jobs, plan.model_path, plan.out_dir
    bar = tqdm(total=len(jobs), desc="tokenize", unit="shard", disable=not progress)
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for src, dst, sha in jobs:
            results.append(tokenize_shard(src, model_path, dst, root=out_dir, input_sha256=sha))
            bar.update()
    else:
        # spawn/forkserver, not fork: the parent may hold threads (Prefect, sentencepiece) that fork would copy broken
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            # imported once by the fork server, inherited by every worker: workers start in milliseconds
            ctx.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=worker_tokenizer, initargs=(str(model_path),)
        ) as pool:
            futures = [
                pool.submit(tokenize_shard, src, model_path, dst, root=out_dir, input_sha256=sha) for src, dst, sha in jobs
            ]
            try:
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
            except BrokenProcessPool:
                raise RuntimeError(
                    f"a tokenization worker process died ({ctx.get_start_method()} start method). From a script, call "
                    "tokenize_corpus under `if __name__ == '__main__':` (workers re-import the main module), "
                    "or use workers=1; a worker can also be killed for lack of memory"
                ) from None
    bar.close()
    return results


def _tokenizer_manifest(model_path: Path) -> Path | None:
    """The tokenizer stage's manifest next to the model, if the model came from that stage."""
    path = model_path.parent / MANIFEST
    try:
        return path if path.is_file() and read_manifest(path).get("stage") == "tokenizer" else None
    except ManifestError:
        return None


def _previous_entries(out_dir: Path, tokenizer_sha256: str) -> dict[str, dict[str, Any]]:
    """Entries of an earlier run's manifest, if it was made with this same tokenizer."""
    if not (out_dir / MANIFEST).is_file():
        return {}
    try:
        m = read_manifest(out_dir)
    except ManifestError:
        return {}
    if m.get("stage") != STAGE or m.get("config", {}).get("tokenizer_sha256") != tokenizer_sha256:
        return {}
    return {f["path"]: f for f in m["files"] if "input" in f}


def _remove_unlisted_shards(out_dir: Path, keep: set[str]) -> None:
    """Delete token shards whose document shard is gone from the corpus (this stage owns out_dir)."""
    for p in out_dir.glob("*/*.arrow"):
        if p.relative_to(out_dir).as_posix() not in keep:
            p.unlink()


def _manifest_matches(out_dir: Path, files: list[dict[str, Any]], inputs: list[Path]) -> bool:
    try:
        m = read_manifest(out_dir)
    except ManifestError:
        return False
    return m["files"] == files and [i["sha256"] for i in m["inputs"]] == [manifest_digest(p) for p in inputs]


def _stats(files: list[dict[str, Any]], tok: Tokenizer, docs_manifest: Path) -> dict[str, Any]:
    def total(key: str, split: str | None = None) -> int:
        return sum(f[key] for f in files if split is None or f["path"].startswith(f"{split}/"))

    splits = sorted({f["path"].split("/")[0] for f in files if "/" in f["path"]})
    tokens = total("tokens")
    return {
        "docs": total("docs"),
        "tokens": tokens,
        "shards": len(files),
        "splits": {
            s: {
                "docs": total("docs", s),
                "tokens": total("tokens", s),
                "shards": sum(f["path"].startswith(f"{s}/") for f in files),
            }
            for s in splits
        },
        "unk_tokens": total("unk_tokens"),
        "unk_rate": total("unk_tokens") / tokens if tokens else 0.0,
        "bytes_per_token": total("text_bytes") / tokens if tokens else 0.0,
        "tokens_per_doc": tokens / total("docs") if total("docs") else 0.0,
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256,
        "docs_manifest_sha256": manifest_digest(docs_manifest),
    }
