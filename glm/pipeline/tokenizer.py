"""Stage `tokenizer`: a sentencepiece tokenizer trained on the train split (a released GLM's own, installed)."""

from __future__ import annotations

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    TokenizerStats,
)
from glm.core.shards import MANIFEST
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
    _file_identity,
)


def _train_tokenizer(cfg: PipelineConfig, paths: RunPaths) -> None:
    """A sentencepiece tokenizer trained on a sample of the train split (kept once trained)."""
    from glm.core.tokenizer import train_tokenizer

    init = cfg.model.init
    if init is not None and init.from_ is not None:  # a released GLM: its own tokenizer, nothing to train
        from glm.core.released_tokenizer import install_released_tokenizer

        install_released_tokenizer(init.tokenizer or init.from_, paths.tokenizer)
        return
    train_tokenizer(paths.docs, paths.tokenizer, cfg.tokenizer)


STAGE = Stage(
    "tokenizer",
    "data",
    f"{LAYOUT['tokenizer']}/{MANIFEST}",
    sections=("tokenizer",),
    inputs=("ingest",),
    extra=lambda cfg: _file_identity(cfg.tokenizer.existing),
    build=_train_tokenizer,
    stats=TokenizerStats,
)
