"""Stage `ingest`: sources -> cleaned, de-duplicated, split document shards (docs/)."""

from __future__ import annotations

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    CorpusStats,
)
from glm.core.shards import MANIFEST
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
    source_fingerprint,
)


def _build_ingest(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Sources -> cleaned, de-duplicated, split document shards (incremental: only new inputs are read)."""
    from glm.data.corpus import ingest

    ingest(cfg.data, paths.docs, progress=False)


STAGE = Stage(
    "ingest",
    "data",
    f"{LAYOUT['docs']}/{MANIFEST}",
    sections=("data",),
    extra=source_fingerprint,
    build=_build_ingest,
    stats=CorpusStats,
)
