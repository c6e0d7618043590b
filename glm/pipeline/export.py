"""Stage `export`: the chosen fine-tuned model as an ONNX bundle, verified, versioned and gated (export/)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    ExportStats,
    PretrainStats,
)
from glm.core.shards import (
    MANIFEST,
    atomic_write_json,
    file_entry,
    manifest_digest,
    read_stats,
    sha256_json,
    write_manifest,
)
from glm.pipeline.choice import export_choice
from glm.pipeline.common import finetune_results
from glm.pipeline.engine import (
    LAYOUT,
    REGISTRY,
    RunPaths,
    Stage,
    StageInputMissing,
    stage_code_version,
)

log = logging.getLogger(__name__)


def export_candidate(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """Export the ONNX bundle to export/.candidate (not verified yet, not yet in export/bundle)."""
    from glm.export import export_bundle

    unverified = cfg.export.model_copy(update={"verify": False})
    choice = export_choice(cfg, paths)
    selection = {k: choice[k] for k in ("run", "criterion", "dev", "reason", "margin")}
    return export_bundle(Path(choice["path"]), paths.tokenizer_model, paths.candidate, unverified, selection=selection)


def verify_and_promote(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """Verify export/.candidate against PyTorch, keep it as a new version, and make it current if the gate blesses it.

    The candidate becomes export/versions/vNNNN (immutable, with lineage.json: where it came from and
    the gate's decision); export/current (and export/bundle, a symlink to it) switches to it only when
    it is blessed (glm.bundles.decide): verified, not collapsed, and not worse than the current
    version on the same test examples by more than export.gate.max_drop. Then old versions are
    pruned (export.keep_versions) and export/report.md tells the decision. A refused version stays
    listed, not current, with the reason: a bundle that fails verification too (its
    verification.json has the numbers; `glm-pipeline bundles --promote` refuses it).
    """
    from glm import bundles
    from glm.export import REPORT_FILE, verify_bundle, write_sha256sums
    from glm.training.checkpoint import resolve_checkpoint

    if not (paths.candidate / "SHA256SUMS").is_file():
        raise StageInputMissing(f"no exported bundle at {paths.candidate}; run the export task first")
    choice = export_choice(cfg, paths)
    checkpoint = resolve_checkpoint(Path(choice["path"]))
    if cfg.export.verify:  # a failure is recorded, not raised: the version is kept, refused, with the numbers
        report = verify_bundle(paths.candidate, checkpoint, cfg.export, raise_on_failure=False)
    else:
        report = {"passed": None, "skipped": "export.verify is false"}
    previous = json.loads((paths.candidate / REPORT_FILE).read_text(encoding="utf-8"))
    report.update({k: previous[k] for k in ("export_seconds", "files") if k in previous})
    atomic_write_json(paths.candidate / REPORT_FILE, report)
    write_sha256sums(paths.candidate)
    with bundles.locked(paths.export):
        bundles.adopt_legacy(paths.export)  # a pre-versions export/bundle directory becomes the first version
        name = bundles.next_version(paths.export)
        lineage = bundle_lineage(cfg, paths, choice, checkpoint, report) | {"version": name}
        current = bundles.current_version(paths.export)
        current_lineage = bundles.read_lineage(paths.export, current) if current else None
        compared, note = _compare_with_current(paths, choice, lineage, current_lineage)
        lineage["compared"] = compared or {"skipped": note}
        lineage |= bundles.decide(
            verified=report.get("passed"),
            failures=report.get("failures"),
            collapsed=lineage["collapsed"],
            metric=lineage["metric"]["name"],
            higher_is_better=lineage["metric"]["higher_is_better"],
            value=lineage["metric"]["value"],
            current=current_lineage,
            compared=compared,
            baselines=lineage["baselines"],
            max_drop=cfg.export.gate.max_drop,
            floor=cfg.export.gate.floor,
        )
        atomic_write_json(paths.candidate / bundles.LINEAGE, lineage)
        write_sha256sums(paths.candidate)  # lineage.json is part of the version
        version_dir = bundles.add_version(paths.export, paths.candidate, name)
        if lineage["blessed"]:
            bundles.set_current(paths.export, name, f"blessed by the gate: {lineage['reason']}")
            log.info("export: %s blessed and current (%s)", name, lineage["reason"])
        else:
            log.warning("export: %s NOT promoted, %s stays current: %s", name, current or "no version", lineage["reason"])
        pruned = bundles.prune(paths.export, cfg.export.keep_versions, cfg.export.keep_blessed)
        now_current = bundles.current_version(paths.export)
        written = bundles.write_versions_report(paths.export, lineage | {"current": now_current == name})
    files = [file_entry(p, paths.export) for p in sorted(version_dir.iterdir()) if p.is_file()]
    files += [file_entry(p, paths.export) for p in written]
    stats = {
        "verified": report.get("passed"),
        "checkpoint": str(checkpoint),
        "fp32": {k: v for k, v in (report.get("fp32") or {}).items() if isinstance(v, (int, float))},
        "selection": {k: choice[k] for k in ("run", "criterion", "dev", "reason", "margin")},
        "version": name,
        "blessed": lineage["blessed"],
        "reason": lineage["reason"],
        "current": now_current,
        "previous": current,
        "pruned": pruned,
    }
    return write_manifest(
        paths.export,
        "export",
        files,
        config=cfg.export.model_dump(mode="json"),
        inputs=[paths.finetune(cfg.finetune.task.name) / MANIFEST, paths.tokenizer / MANIFEST],
        stats=stats,
    )


def _test_split_digest(cfg: PipelineConfig, choice: Mapping[str, Any]) -> str | None:
    """sha256 of this run's labelled test split: two versions with the same digest were tested on the same examples."""
    if cfg.finetune.kind == "cloze":
        examples = _test_examples(choice)
        return sha256_json(examples) if examples else None
    from glm.finetuning.finetune import read_labelled, split_examples  # seq2seq: re-derived, as _seq2seq_generation does

    pairs = [(e.text, e.label) for e in read_labelled(cfg.finetune.task.source, cfg.finetune.task.label_field)]
    return sha256_json(split_examples(pairs, cfg.finetune.task.split, key=lambda p: p[0])["test"])


def _test_examples(choice: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chosen run's test split (text, text_pair, label) from its test_predictions.jsonl (cloze only)."""
    path = Path(choice["path"]) / "test_predictions.jsonl"
    if not path.is_file():
        return []
    # split on "\n" only: str.splitlines() also breaks at U+2028 or U+0085, which JSON keeps raw inside strings
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [{k: r.get(k) for k in ("text", "text_pair", "label")} for r in rows]


def bundle_lineage(
    cfg: PipelineConfig, paths: RunPaths, choice: Mapping[str, Any], checkpoint: Path, report: Mapping[str, Any]
) -> dict[str, Any]:
    """Where a bundle came from: data, tokenizer, checkpoints and steps, code, config, the run chosen and
    why, its test metrics and baselines, time (export/versions/vNNNN/lineage.json)."""
    from importlib import metadata

    from glm import bundles
    from glm.core.tokenizer import load_tokenizer

    result = finetune_results(cfg, paths)[choice["run"]]
    cloze = cfg.finetune.kind == "cloze"
    test = {k: v for k, v in (result.get("test") or {}).items() if isinstance(v, (int, float))}
    name = "accuracy" if cloze else "loss"
    pre = read_stats(paths.pretrain, PretrainStats)
    try:
        version = metadata.version("glm-pipeline")
    except metadata.PackageNotFoundError:
        version = None
    baselines: dict[str, float] = {}  # what the gate's floors compare with (cloze): majority class, TF-IDF + LR
    for short, key in (("majority", "majority"), ("linear", "linear_baseline")):
        if isinstance(result.get(key), dict) and isinstance(result[key].get("accuracy"), (int, float)):
            baselines[short] = result[key]["accuracy"]
    return {
        "time": bundles.now(),
        "run_dir": str(paths.root),
        "config_name": cfg.name,
        "data": {
            "documents_manifest": manifest_digest(paths.docs / MANIFEST),
            "labelled_sizes": result.get("sizes"),
            "test_split": _test_split_digest(cfg, choice),
        },
        "tokenizer_sha256": load_tokenizer(paths.tokenizer_model).sha256,  # a released GLM's vocabulary files too
        "pretrained": {"checkpoint": pre["checkpoint"], "step": pre["step"], "lineage": pre.get("lineage")},
        "finetuned": {"checkpoint": str(checkpoint), "best_step": result.get("best_step"), "run": choice["run"]},
        "selection": {k: choice[k] for k in ("run", "criterion", "dev", "reason", "margin") if k in choice},
        "code": {"package_version": version, "glm": sha256_json({s: stage_code_version(s) for s in REGISTRY})[:16]},
        "config_digest": sha256_json(cfg.model_dump(mode="json"))[:16],
        "verified": report.get("passed"),
        "collapsed": bool(result.get("collapsed", False)),
        "test": test,
        "baselines": baselines,
        "metric": {"name": name, "value": test.get(name), "higher_is_better": cloze},
    }


def _compare_with_current(
    paths: RunPaths, choice: Mapping[str, Any], lineage: Mapping[str, Any], current: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, str]:
    """The new and the current model's metric on the same test examples by the same scorer, or (None, why not).

    Same test split as the current version's run: both recorded test metrics (same examples, both
    scored by PyTorch). The labelled data changed: both bundles are re-scored with glm.runtime on
    this run's test split (the candidate from export/.candidate, the current from its version).
    """
    from glm import bundles

    if current is None:
        return None, "no current version"
    metric = lineage["metric"]
    cur_metric = current.get("metric") or {}
    split = lineage["data"]["test_split"]
    if split and split == (current.get("data") or {}).get("test_split") and cur_metric.get("name") == metric["name"]:
        if isinstance(metric["value"], (int, float)) and isinstance(cur_metric.get("value"), (int, float)):
            n = (lineage["data"].get("labelled_sizes") or {}).get("test") or len(_test_examples(choice))
            how = "the same test split: both versions' recorded test metric"
            return {"new": metric["value"], "current": cur_metric["value"], "examples": n, "how": how}, ""
    examples = _test_examples(choice)
    if not examples or metric["name"] != "accuracy":
        return None, "the labelled data changed and only cloze bundles can be re-scored by the runtime: not compared"
    try:
        new = bundles.score_bundle(paths.candidate, examples)
    except Exception as e:  # a new bundle an app cannot run is refused (decide fails the check on "error")
        return {"error": f"the new bundle could not be scored by glm.runtime ({str(e).splitlines()[0][:200]})"}, ""
    try:
        old = bundles.score_bundle(bundles.versions_dir(paths.export) / current["version"], examples)
    except Exception as e:  # a current bundle the runtime cannot score is no reason to keep it
        return None, f"current {current.get('version')} could not be re-scored ({str(e).splitlines()[0][:200]})"
    how = "labelled data changed: both bundles re-scored by glm.runtime on this run's test split"
    return {"new": new, "current": old, "examples": len(examples), "how": how}, ""


# exported first, verified second: only a verified bundle becomes export/bundle
STAGE = Stage(
    "export",
    "export",
    f"{LAYOUT['export']}/{MANIFEST}",
    sections=("export",),
    inputs=("finetune", "tokenizer"),
    steps=(("export-onnx", export_candidate), ("verify-export", verify_and_promote)),
    stats=ExportStats,
)
