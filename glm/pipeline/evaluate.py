"""Stage `evaluate`: held-out losses, samples, generation metrics, the fine-tuning results: the report (eval/)."""

from __future__ import annotations

from typing import Any

from glm.core.config import PipelineConfig
from glm.core.contracts import (
    EvalStats,
)
from glm.core.shards import (
    MANIFEST,
    file_entry,
    write_manifest,
)
from glm.pipeline.choice import choose_export
from glm.pipeline.common import RUN_DIRS, finetune_results, pretrained_checkpoint
from glm.pipeline.engine import (
    LAYOUT,
    RunPaths,
    Stage,
)


def _seq2seq_generation(cfg: PipelineConfig, paths: RunPaths, results: dict[str, dict[str, Any]], tok: Any) -> None:
    """BLEU and ROUGE of each fine-tuned seq2seq model on its test split (re-derived: the split is a hash
    of the source), added to its result under "generation"."""
    from glm.distributed import resolve_device
    from glm.evaluation.evaluate import seq2seq_generation_metrics
    from glm.finetuning.finetune import encode_seq2seq, read_labelled, split_examples
    from glm.training.checkpoint import load_model

    pairs = [(e.text, e.label) for e in read_labelled(cfg.finetune.task.source, cfg.finetune.task.label_field)]
    test = split_examples(pairs, cfg.finetune.task.split, key=lambda p: p[0])["test"][: cfg.evaluate.seq2seq_test_examples]
    task_dir = paths.finetune(cfg.finetune.task.name)
    for name, res in results.items():
        model, _ = load_model(task_dir / RUN_DIRS.get(name, name), resolve_device(cfg.pretrain.device))
        limit = res.get("max_seq_len") or model.cfg.max_seq_len
        items = [encode_seq2seq(tok, s, t, limit) for s, t in test]
        res["generation"] = seq2seq_generation_metrics(model, tok, items, cfg.evaluate)


def _evaluate(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Held-out infilling and LM losses, samples, infilling BLEU, last-word prediction (glm.evaluate.
    evaluate_pretrained on the corpus's valid documents), the fine-tuning results: the report."""
    from glm.core.tokenizer import load_tokenizer
    from glm.data.corpus import iter_documents
    from glm.data.loader import ValidLoader
    from glm.distributed import resolve_device
    from glm.evaluation.evaluate import evaluate_pretrained
    from glm.evaluation.report import write_report
    from glm.training.checkpoint import load_model

    ev = cfg.evaluate
    model, _ = load_model(pretrained_checkpoint(paths), resolve_device(cfg.pretrain.device))
    tok = load_tokenizer(paths.tokenizer_model)
    valid = ValidLoader(paths.infill, cfg.pretrain.micro_batch_size, max_batches=ev.batches)
    # enough documents for every part, short ones being skipped by infilling and last-word prediction
    wanted = max(16 * ev.batches, 4 * ev.fill_samples, 2 * ev.infill_docs, 2 * ev.lastword_docs)
    texts = [t for _, t in zip(range(wanted), iter_documents(paths.docs, "valid"))]
    pretrain_results = evaluate_pretrained(model, tok, valid, texts, ev)
    del model
    finetuned = finetune_results(cfg, paths)
    if cfg.finetune.kind == "seq2seq" and ev.seq2seq_test_examples:
        _seq2seq_generation(cfg, paths, finetuned, tok)
    results: dict[str, Any] = {
        "title": f"GLM evaluation: {cfg.name}",
        "pretrain": pretrain_results,
        cfg.finetune.kind: finetuned,
        "export_choice": choose_export(finetuned, cfg.export.selection_margin_se),
    }
    written = write_report(paths.eval, results, pretrain_metrics_path=paths.pretrain / "metrics.jsonl")
    numbers = lambda d: {m: v for m, v in d.items() if isinstance(v, (int, float))}  # noqa: E731
    stats = {
        "pretrain": {
            k: numbers(d) for k, d in pretrain_results.items() if isinstance(d, dict) and k not in ("infill_bleu", "lastword")
        },
        "files": {name: p.name for name, p in written.items()},
    }
    if "infill_bleu" in pretrain_results:
        stats["pretrain"]["infill_bleu"] = {r: m["bleu"] for r, m in pretrain_results["infill_bleu"].get("ratios", {}).items()}
    if "lastword" in pretrain_results:
        for layout, m in pretrain_results["lastword"].items():  # flat, as EvalStats declares: lastword_blank, ...
            if isinstance(m, dict):
                stats["pretrain"][f"lastword_{layout}"] = numbers(m)
    inputs = [paths.pretrain / MANIFEST, paths.finetune(cfg.finetune.task.name) / MANIFEST, paths.infill / MANIFEST]
    write_manifest(
        paths.eval,
        "eval",
        [file_entry(p, paths.eval) for p in written.values()],
        config=cfg.evaluate.model_dump(mode="json"),
        inputs=inputs,
        stats=stats,
    )


STAGE = Stage(
    "evaluate",
    "finetune",
    f"{LAYOUT['eval']}/{MANIFEST}",
    sections=("evaluate", "export"),  # export: the report says which run the export ships (choose_export)
    inputs=("pretrain", "finetune", "infill"),
    build=_evaluate,
    stats=EvalStats,
)
