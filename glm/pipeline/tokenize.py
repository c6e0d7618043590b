"""Stage `tokenize`: each document shard into a token shard (tokens/), mapped over shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    TokenShardEntry,
    TokenStats,
)
from glm.core.shards import (
    MANIFEST,
    read_manifest,
)
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
    cache_key,
)


def tokenize_jobs(cfg: PipelineConfig, paths: RunPaths) -> list[dict[str, str]]:
    """One job per document shard (all of them: the per-shard stamps skip unchanged ones)."""
    docs = read_manifest(paths.docs / MANIFEST)
    return [
        {
            "shard": Path(f["path"]).with_suffix("").as_posix(),
            "doc_shard": str(paths.docs / f["path"]),
            "out_path": str(paths.tokens / Path(f["path"]).with_suffix(".arrow")),
            "input_sha256": f["sha256"],
        }
        for f in docs["files"]
        if f["path"].endswith(".parquet")
    ]


def tokenize_shard_key(job: Mapping[str, str], paths: RunPaths) -> str:
    return cache_key("tokenize-shard", None, [paths.tokenizer / MANIFEST], {k: job[k] for k in ("input_sha256", "out_path")})


def tokenize_shard(job: Mapping[str, str], paths: RunPaths) -> dict[str, Any]:
    """Tokenize one document shard; returns its token-manifest entry."""
    from glm.data.tokenize_shards import tokenize_shard as _tokenize

    return _tokenize(
        job["doc_shard"], paths.tokenizer_model, job["out_path"], root=paths.tokens, input_sha256=job["input_sha256"]
    )


def close_tokenize(cfg: PipelineConfig, paths: RunPaths, entries: Sequence[Mapping[str, Any]]) -> Path:
    """Write the token manifest from the shard entries (left untouched when nothing changed)."""
    from glm.data.tokenize_shards import finish_tokenize, plan_tokenize

    plan = plan_tokenize(paths.docs, paths.tokenizer, paths.tokens)
    fresh = {e["path"]: dict(e) for e in entries}
    expected = sorted([j.out_path.relative_to(paths.tokens).as_posix() for j in plan.jobs] + [e["path"] for e in plan.reused])
    missing = [rel for rel in expected if rel not in fresh]
    if missing:
        raise RuntimeError(f"token shards {missing[:3]} were not produced; re-run the tokenize stage")
    plan.reused = []  # every entry comes from its shard's task, checked against its stamp
    return finish_tokenize(plan, [fresh[rel] for rel in expected])


STAGE = Stage(
    "tokenize",
    "data",
    f"{LAYOUT['tokens']}/{MANIFEST}",
    inputs=("ingest", "tokenizer"),
    plan=tokenize_jobs,
    shard=tokenize_shard,
    shard_key=tokenize_shard_key,
    shard_output=lambda job: job["out_path"],
    close=close_tokenize,
    stats=TokenStats,
    shard_result=TokenShardEntry,
)
