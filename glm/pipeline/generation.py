"""Stage `export-generation`: the pretrained model as a generation bundle (generation/), for fill/generate."""

from __future__ import annotations

from pathlib import Path

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    GenerationStats,
)
from glm.core.safety import remove_tree
from glm.core.shards import (
    MANIFEST,
    file_entry,
    write_manifest,
)
from glm.pipeline.common import pretrained_checkpoint
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
)


def export_generation(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """The pretrained model as a verified generation bundle at generation/bundle, beside the classifier.

    Fine-tuning a cloze classifier trains its language model away (a classifier bundle fills every
    blank with its verbalizer words), so fill/generate use this bundle; the runtime refuses them on a
    classifier bundle and names this one. export.generation_bundle false: nothing is exported.
    """
    from glm.export import export_bundle

    out = paths.generation
    if cfg.export.generation_bundle:
        export_bundle(pretrained_checkpoint(paths), paths.tokenizer_model, out / "bundle", cfg.export)
        files = [file_entry(p, out) for p in sorted((out / "bundle").iterdir()) if p.is_file()]
    else:
        remove_tree(out / "bundle", inside=out, ignore_errors=True)
        files = []
    return write_manifest(
        out,
        "generation",
        files,
        config=cfg.export.model_dump(mode="json"),
        inputs=[paths.pretrain / MANIFEST, paths.tokenizer / MANIFEST],
        stats={"exported": bool(files), "checkpoint": str(pretrained_checkpoint(paths))},
    )


# the pretrained model for fill/generate: the classifier of `export` has lost its language model
STAGE = Stage(
    "export-generation",
    "export",
    f"{LAYOUT['generation']}/{MANIFEST}",
    sections=("export",),
    inputs=("pretrain", "tokenizer"),
    build=export_generation,
    stats=GenerationStats,
)
