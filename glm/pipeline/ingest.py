"""Stage `ingest`: sources -> cleaned, de-duplicated, split document shards (docs/)."""

from __future__ import annotations

from glm.config import PipelineConfig
from glm.contracts import (
    CorpusStats,
)
from glm.pipeline.engine import (
    RunPaths,
    Stage,
    source_fingerprint,
)


def _build_ingest(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Sources -> cleaned, de-duplicated, split document shards (incremental: only new inputs are read)."""
    from glm.corpus import ingest

    ingest(cfg.data, paths.docs, progress=False)


STAGE = Stage(
    "ingest",
    "data",
    "docs/manifest.json",
    sections=("data",),
    extra=source_fingerprint,
    build=_build_ingest,
    stats=CorpusStats,
)
