"""Stage `ingest`: sources -> cleaned, de-duplicated, split document shards (docs/)."""

from __future__ import annotations

from glm.config import PipelineConfig
from glm.contracts import (
    CorpusStats,
)
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
    source_fingerprint,
)
from glm.shards import MANIFEST


def _build_ingest(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Sources -> cleaned, de-duplicated, split document shards (incremental: only new inputs are read)."""
    from glm.corpus import ingest

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
