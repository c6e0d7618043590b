"""The pipeline: one module per stage (its STAGE declaration next to its build code) and the engine
that runs them (glm.pipeline.engine). This file only lists the stages, in the order they run, into
REGISTRY; it is in no stage's code version (the order decides nothing a stage writes).
Adding a stage: docs/architecture.md, "Adding a stage".
"""

from glm.pipeline import (
    check_task,
    evaluate,
    export,
    finetune,
    generation,
    infill,
    ingest,
    pretrain,
    tokenize,
    tokenizer,
    validate,
)
from glm.pipeline.engine import REGISTRY, declare

# The pipeline, in order (docs/architecture.md, "The stages"). Everything else is derived from it:
# the run directory's outputs, the cache keys, the groups of `--stage`, what `verify` checks, the
# plain runner, and the Prefect tasks and flows (tasks/stages.py, flows/pipeline.py).
REGISTRY.update(
    declare(
        ingest.STAGE,
        validate.CORPUS,
        tokenizer.STAGE,
        check_task.STAGE,
        tokenize.STAGE,
        validate.TOKENS,
        infill.STAGE,
        pretrain.STAGE,
        finetune.STAGE,
        evaluate.STAGE,
        export.STAGE,
        generation.STAGE,
    )
)
