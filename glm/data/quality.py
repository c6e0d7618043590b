"""Great Expectations gates on the document and token shards.

Each gate builds one small pandas frame from a bounded, deterministic sample of the
shards (every k-th row, k chosen so the sample holds at most `max_rows` rows and, for
documents, about `max_text_bytes` of text), runs one expectation suite on it in one
ephemeral GX context (nothing written to disk, no analytics, no progress bars), writes
`validation.json` next to the shards and raises `ValidationFailed` with a readable
summary when an expectation fails.

GX costs about 3 s to import the first time in a process; a suite on 100k documents
then takes a fraction of a second to a few seconds.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from glm.core.config import LENGTH_RULE, QualityConfig
from glm.core.shards import atomic_write_json, read_manifest
from glm.data.corpus import text_length

logger = logging.getLogger(__name__)

MAX_ROWS = 100_000
MAX_TEXT_BYTES = 128 << 20
VALIDATION = "validation.json"
EXAMPLES = 3
# C0/C1 control characters other than tab and newline; cleaning removes them
CONTROL_REGEX = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"


class ValidationFailed(RuntimeError):
    """A quality gate failed; `summary` holds the per-expectation rows."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


# --------------------------------------------------------------------------- GX plumbing


def _gx_context() -> Any:
    """One ephemeral, in-memory context: no files in the repo or home, no analytics, no progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suite(name: str, frame: Any, expectations: list[Any]) -> Any:
    import great_expectations as gx

    context = _gx_context()
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("sample")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(name=name)
    for e in expectations:
        suite.add_expectation(e)
    return batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES})


def _short(value: Any, n: int = 120) -> Any:
    """Values for a JSON report: long strings cut, numpy scalars made plain."""
    if isinstance(value, str):
        return value if len(value) <= n else value[:n] + f"... ({len(value)} chars)"
    if isinstance(value, dict):
        return {k: _short(v, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_short(v, n) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _describe(result: Any) -> dict[str, Any]:
    """One summary row: expectation (with its arguments), success, observed value, examples."""
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    # GX stores bounds as floats; 99 reads better than 99.0
    kwargs = {k: int(v) if isinstance(v, float) and v.is_integer() and k != "mostly" else v for k, v in kwargs.items()}
    args = ", ".join(f"{k}={v!r}" if k != "column" else str(v) for k, v in kwargs.items())
    r = result.result or {}
    if "observed_value" in r:
        observed = r["observed_value"]
    elif "unexpected_count" in r:
        observed = (
            f"{r['unexpected_count']} of {r.get('element_count')} rows unexpected ({r.get('unexpected_percent') or 0:.2f}%)"
        )
    else:
        observed = None
    if isinstance(observed, (float, np.floating)):
        observed = round(float(observed), 4)
    if result.exception_info and result.exception_info.get("raised_exception"):
        observed = f"error: {result.exception_info.get('exception_message')}"
    return {
        "expectation": f"{cfg.type}({args})",
        "success": bool(result.success),
        "observed": _short(observed),
        "examples": _short(list(r.get("partial_unexpected_list") or [])[:EXAMPLES], 80),
    }


def _finish(
    gate: str, directory: Path, result: Any, rows: list[dict[str, Any]], info: dict[str, Any], t0: float
) -> dict[str, Any]:
    """Write validation.json; return the summary or raise ValidationFailed with a readable message."""
    summary = {
        "gate": gate,
        "success": all(r["success"] for r in rows),
        "rows": rows,
        **info,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    path = atomic_write_json(directory / VALIDATION, {**summary, "gx_statistics": _short(result.statistics)})
    summary["path"] = str(path)
    logger.info("%s gate on %s: %s in %.2fs", gate, directory, "passed" if summary["success"] else "FAILED", summary["seconds"])
    if summary["success"]:
        return summary
    failed = [r for r in rows if not r["success"]]
    lines = [
        f"{gate} quality gate failed for {directory}: {len(failed)} of {len(rows)} expectations "
        f"({info['sampled_rows']} rows checked of {info['total_rows']})"
    ]
    for r in failed:
        lines.append(f"  - {r['expectation']}: observed {r['observed']}")
        if r["examples"]:
            lines.append(f"      e.g. {', '.join(repr(e) for e in r['examples'])}")
    lines.append(f"fix the data (data.cleaning, tokenizer) or relax the quality.* thresholds; details in {path}")
    raise ValidationFailed("\n".join(lines), summary)


def _skipped(gate: str) -> dict[str, Any]:
    logger.info("%s gate skipped (quality.enabled is false)", gate)
    return {"gate": gate, "success": True, "skipped": True, "rows": []}


# --------------------------------------------------------------------------- documents


def _document_sample(docs_dir: Path, max_rows: int, max_text_bytes: int) -> tuple[pa.Table, int]:
    """The text of every k-th document across all shards, and the total document count."""
    files = [pq.ParquetFile(docs_dir / f["path"]) for f in read_manifest(docs_dir)["files"] if f["path"].endswith(".parquet")]
    total = sum(pf.metadata.num_rows for pf in files)
    for pf in files:
        if "text" not in pf.schema_arrow.names:
            raise ValueError(
                f"document shard in {docs_dir} has no 'text' column (columns: {pf.schema_arrow.names}); re-run ingestion"
            )
    text_bytes = sum(  # uncompressed size of the text column, from the Parquet footers
        pf.metadata.row_group(g).column(pf.schema_arrow.get_field_index("text")).total_uncompressed_size
        for pf in files
        for g in range(pf.metadata.num_row_groups)
    )
    stride = max(1, math.ceil(total / max_rows), math.ceil(text_bytes / max_text_bytes))
    parts, seen = [], 0
    for pf in files:
        table = pf.read(columns=["text"])
        first = (-seen) % stride  # keeps the global every-k-th pattern across shard borders
        parts.append(table.take(pa.array(np.arange(first, table.num_rows, stride))))
        seen += table.num_rows
    return (pa.concat_tables(parts) if parts else pa.schema([("text", pa.string())]).empty_table()), total


def validate_documents(
    docs_dir: str | Path, cfg: QualityConfig, max_rows: int = MAX_ROWS, max_text_bytes: int = MAX_TEXT_BYTES
) -> dict[str, Any]:
    """The document gate: non-null text, length bounds (mostly; in ingestion's unit, `text_length`),
    duplicate ratio, no control characters, minimum row count. Runs on a sample of at most
    `max_rows` documents."""
    if not cfg.enabled:
        return _skipped("documents")
    t0 = time.perf_counter()
    docs_dir = Path(docs_dir)
    table, total = _document_sample(docs_dir, max_rows, max_text_bytes)
    frame = table.to_pandas()
    # ingestion's script-aware length, so that its min_chars/max_chars and these agree on every script
    frame["length"] = [0 if t is None else text_length(t) for t in frame["text"]]
    import great_expectations as gx

    E = gx.expectations
    result = _run_suite(
        "documents",
        frame,
        [
            E.ExpectTableRowCountToBeBetween(min_value=min(cfg.min_docs, max_rows)),
            E.ExpectColumnValuesToNotBeNull(column="text"),
            E.ExpectColumnValuesToBeBetween(
                column="length", min_value=cfg.min_chars, max_value=cfg.max_chars, mostly=cfg.length_mostly
            ),
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(column="text", min_value=1.0 - cfg.max_duplicate_ratio),
            E.ExpectColumnValuesToNotMatchRegex(column="text", regex=CONTROL_REGEX),
        ],
    )
    rows = [_describe(r) for r in result.results]
    for r, row in zip(result.results, rows):
        if row["success"]:
            continue
        if "proportion_of_unique" in row["expectation"]:  # GX reports only the ratio: name some duplicates
            dup = frame["text"][frame["text"].duplicated()].unique()[:EXAMPLES]
            row["examples"] = _short(list(dup), 80)
        elif r.expectation_config.kwargs.get("column") == "length":  # show the documents, not just their lengths
            at = (r.result or {}).get("partial_unexpected_index_list") or []
            row["examples"] = [f"length {int(frame['length'][i])}: {_short(frame['text'][i], 60)}" for i in at[:EXAMPLES]]
            row["observed"] = f"{row['observed']}; lengths count {LENGTH_RULE}"
    info = {"sampled_rows": len(frame), "total_rows": total}
    return _finish("documents", docs_dir, result, rows, info, t0)


# --------------------------------------------------------------------------- tokens


def _token_stats(batch: pa.RecordBatch, unk_id: int) -> dict[str, np.ndarray]:
    """Per-document length, min id, max id and unknown-token count of one batch of token lists."""
    tokens = batch.column("tokens")
    lengths = pc.list_value_length(tokens).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (D,)
    flat = pc.list_flatten(tokens)  # (N,)
    per_doc = (
        pa.table({"doc": pc.list_parent_indices(tokens), "id": flat, "unk": pc.cast(pc.equal(flat, unk_id), pa.int64())})
        .group_by("doc")
        .aggregate([("id", "min"), ("id", "max"), ("unk", "sum")])
    )
    n = len(batch)
    doc = per_doc.column("doc").to_numpy()  # (D',) documents with at least one token
    out = {
        "length": lengths,
        "min_id": np.zeros(n, np.int64),
        "max_id": np.zeros(n, np.int64),
        "unk_count": np.zeros(n, np.int64),
    }
    out["min_id"][doc] = per_doc.column("id_min").to_numpy()
    out["max_id"][doc] = per_doc.column("id_max").to_numpy()
    out["unk_count"][doc] = per_doc.column("unk_sum").to_numpy()
    return out


def _token_sample(tokens_dir: Path, vocab_size: int, unk_id: int, max_rows: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per-document stats of every k-th document, plus every document holding an id outside
    the vocabulary (up to max_rows of them, so the gate sees them whatever the sample), and
    exact totals. k doubles whenever the sample outgrows max_rows: bounded memory without
    knowing the total first."""
    files = [f for f in read_manifest(tokens_dir)["files"] if f["path"].endswith(".arrow")]
    columns = ("index", "length", "min_id", "max_id", "unk_count")
    sampled: dict[str, np.ndarray] = {k: np.zeros(0, np.int64) for k in columns}
    flagged: dict[str, np.ndarray] = {k: np.zeros(0, np.int64) for k in columns}
    totals = {"docs": 0, "tokens": 0, "unk": 0, "max_id": 0}
    stride = 1
    for f in files:
        path = tokens_dir / f["path"]
        with pa.memory_map(str(path), "r") as source:
            reader = ipc.open_file(source)
            if "tokens" not in reader.schema.names:
                raise ValueError(
                    f"token shard {path} has no 'tokens' column (columns: {reader.schema.names}); re-run tokenization"
                )
            for b in range(reader.num_record_batches):
                stats = _token_stats(reader.get_batch(b), unk_id)
                n = len(stats["length"])
                stats["index"] = np.arange(totals["docs"], totals["docs"] + n)  # (n,) global document index
                totals["docs"] += n
                totals["tokens"] += int(stats["length"].sum())
                totals["unk"] += int(stats["unk_count"].sum())
                totals["max_id"] = max(totals["max_id"], int(stats["max_id"].max(initial=0)))
                take, bad = stats["index"] % stride == 0, stats["max_id"] >= vocab_size
                for k in columns:
                    sampled[k] = np.concatenate([sampled[k], stats[k][take]])
                    flagged[k] = np.concatenate([flagged[k], stats[k][bad]])[:max_rows]
                while len(sampled["index"]) > max_rows:  # thin to every (2k)-th document
                    stride *= 2
                    keep = sampled["index"] % stride == 0
                    sampled = {k: v[keep] for k, v in sampled.items()}
    extra = ~np.isin(flagged["index"], sampled["index"])
    return {k: np.concatenate([sampled[k], flagged[k][extra]]) for k in columns}, totals


def validate_tokens(
    tokens_dir: str | Path, vocab_size: int, unk_id: int, cfg: QualityConfig, max_rows: int = MAX_ROWS
) -> dict[str, Any]:
    """The token gate: ids inside the vocabulary, documents of at least min_tokens_per_doc
    tokens (mostly), unknown-token rate (unknown tokens / all tokens) at most max_unk_rate."""
    if not cfg.enabled:
        return _skipped("tokens")
    if not 0 <= unk_id < vocab_size:
        raise ValueError(f"unk_id={unk_id} is outside the vocabulary of {vocab_size} ids")
    t0 = time.perf_counter()
    tokens_dir = Path(tokens_dir)
    sample, totals = _token_sample(tokens_dir, vocab_size, unk_id, max_rows)
    import pandas as pd

    frame = pd.DataFrame({k: v for k, v in sample.items() if k != "index"})
    sampled_tokens = int(frame["length"].sum()) if len(frame) else 0
    import great_expectations as gx

    E = gx.expectations
    result = _run_suite(
        "tokens",
        frame,
        [
            E.ExpectTableRowCountToBeBetween(min_value=min(cfg.min_docs, max_rows)),
            E.ExpectColumnValuesToBeBetween(column="max_id", min_value=0, max_value=vocab_size - 1),
            E.ExpectColumnValuesToBeBetween(column="length", min_value=cfg.min_tokens_per_doc, mostly=cfg.length_mostly),
            # a sum bound on the sample = a bound on the token-level (not per-document) rate
            E.ExpectColumnSumToBeBetween(
                column="unk_count", min_value=0, max_value=math.floor(cfg.max_unk_rate * sampled_tokens)
            ),
        ],
    )
    rows = [_describe(r) for r in result.results]
    for r, row in zip(result.results, rows):
        column = r.expectation_config.kwargs.get("column")
        if column == "unk_count":
            rate = (row["observed"] or 0) / max(sampled_tokens, 1)
            row["observed"] = (
                f"{row['observed']} unknown of {sampled_tokens} tokens (rate {rate:.4%}, max {cfg.max_unk_rate:.4%})"
            )
        elif column and not row["success"]:  # name the offending documents, not just their values
            at = (r.result or {}).get("partial_unexpected_index_list") or []
            row["examples"] = [f"document {int(sample['index'][i])}: {column} {int(frame[column][i])}" for i in at[:EXAMPLES]]
    info = {
        "sampled_rows": len(frame),
        "total_rows": totals["docs"],
        "total_tokens": totals["tokens"],
        "unk_rate": totals["unk"] / max(totals["tokens"], 1),
        "max_id": totals["max_id"],
        "vocab_size": vocab_size,
    }
    return _finish("tokens", tokens_dir, result, rows, info, t0)
