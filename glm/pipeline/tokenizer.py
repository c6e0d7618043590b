"""Stage `tokenizer`: a sentencepiece tokenizer trained on the train split (a released GLM's own, installed)."""

from __future__ import annotations

from glm.config import PipelineConfig
from glm.contracts import (
    TokenizerStats,
)
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
    _file_identity,
)
from glm.shards import MANIFEST


def _train_tokenizer(cfg: PipelineConfig, paths: RunPaths) -> None:
    """A sentencepiece tokenizer trained on a sample of the train split (kept once trained)."""
    from glm.tokenizer import train_tokenizer

    init = cfg.model.init
    if init is not None and init.from_ is not None:  # a released GLM: its own tokenizer, nothing to train
        from glm.released_tokenizer import install_released_tokenizer

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
