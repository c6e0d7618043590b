"""Stages `validate-corpus` and `validate-tokens`: the Great Expectations gates on documents and tokens."""

from __future__ import annotations

from glm.core.config import PipelineConfig
from glm.pipeline.common import vocab_size, write_skipped_validation
from glm.pipeline.engine import (
    LAYOUT,
    VALIDATION,
    RunPaths,
    Stage,
)


def _validate_corpus(cfg: PipelineConfig, paths: RunPaths) -> None:
    """The Great Expectations document gate; raises glm.quality.ValidationFailed."""
    from glm.data.quality import validate_documents

    write_skipped_validation(paths.docs, validate_documents(paths.docs, cfg.quality))


def _validate_tokens(cfg: PipelineConfig, paths: RunPaths) -> None:
    """The Great Expectations token gate; raises glm.quality.ValidationFailed."""
    from glm.core.special_tokens import special_of
    from glm.data.quality import validate_tokens

    unk = special_of(cfg.model).unk  # a released GLM's [UNK] id, else the pipeline's
    write_skipped_validation(paths.tokens, validate_tokens(paths.tokens, vocab_size(paths), unk, cfg.quality))


CORPUS = Stage(
    "validate-corpus",
    "data",
    f"{LAYOUT['docs']}/{VALIDATION}",
    sections=("quality",),
    inputs=("ingest",),
    build=_validate_corpus,
)
TOKENS = Stage(
    "validate-tokens",
    "data",
    f"{LAYOUT['tokens']}/{VALIDATION}",
    sections=("quality",),
    inputs=("tokenize", "tokenizer"),
    build=_validate_tokens,
)
