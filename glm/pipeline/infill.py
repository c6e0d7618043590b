"""Stage `infill`: blank-infilling training shards (infill/), mapped over shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    InfillShardResult,
    InfillStats,
)
from glm.core.shards import (
    MANIFEST,
    remove_stale_temporaries,
)
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
    cache_key,
    is_current,
    stage_key,
)


def _sentence_end_ids(paths: RunPaths) -> tuple[int, ...]:
    from glm.core.tokenizer import load_tokenizer

    return tuple(int(i) for i in load_tokenizer(paths.tokenizer_model).sentence_end_ids())


def infill_jobs(cfg: PipelineConfig, paths: RunPaths) -> list[Any]:
    """Every blank-infilling shard to build (glm.infill_shards.ShardJob, small and picklable)."""
    from glm.data.infill_shards import shard_jobs

    if not is_current("infill", stage_key("infill", cfg, paths), paths.output("infill", cfg), paths):
        (paths.infill / MANIFEST).unlink(missing_ok=True)  # the stage is open until it closes
        if paths.infill.is_dir():
            remove_stale_temporaries(paths.infill)
    return shard_jobs(
        paths.tokens,
        paths.infill,
        cfg.infilling,
        sentence_end_ids=_sentence_end_ids(paths),
        special_tokens=cfg.model.special_tokens,
    )


def infill_shard_key(job: Any, paths: RunPaths | None = None) -> str:
    # job.key already hashes the config, the token manifest, the builder's code and the shard's place
    return cache_key("infill-shard", None, [], {"job": job.key, "out_path": job.out_path})


def build_infill_shard(job: Any, paths: RunPaths) -> dict[str, Any]:
    """Pack, corrupt and write one blank-infilling shard; returns its info."""
    from glm.data.infill_shards import build_shard

    # not provably intact (its stamp did not verify): the builder must not trust the key stored inside the file either
    Path(job.out_path).unlink(missing_ok=True)
    return build_shard(job)


def close_infill(cfg: PipelineConfig, paths: RunPaths, results: Sequence[Mapping[str, Any]]) -> Path:
    """Remove shards of an earlier, larger build and write the dataset manifest."""
    from glm.data.infill_shards import epoch_dir, part_name, write_infilling_manifest

    keep = {paths.infill / ("valid" if r["split"] == "valid" else epoch_dir(r["epoch"])) / part_name(r["shard"]) for r in results}
    for stale in [*paths.infill.glob("epoch-*/part-*.arrow"), *paths.infill.glob("valid/part-*.arrow")]:
        if stale not in keep:
            stale.unlink()
    return write_infilling_manifest(
        paths.tokens,
        paths.infill,
        cfg.infilling,
        list(results),
        sentence_end_ids=_sentence_end_ids(paths),
        special_tokens=cfg.model.special_tokens,
    )


STAGE = Stage(
    "infill",
    "data",
    f"{LAYOUT['infill']}/{MANIFEST}",
    sections=("infilling",),
    inputs=("tokenize", "tokenizer"),
    plan=infill_jobs,
    shard=build_infill_shard,
    shard_key=infill_shard_key,
    shard_output=lambda job: job.out_path,
    close=close_infill,
    stats=InfillStats,
    shard_result=InfillShardResult,
)
