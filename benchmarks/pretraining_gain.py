"""What pretraining buys: the demo's fine-tuning from its pretrained checkpoint vs from random initialisation, over seeds.

One demo run compares one fine-tuning of each (seed 0): with ~870 test sentences a single
comparison moves by a point or two with the seed alone. This benchmark repeats the demo's
fine-tuning (configs/demo.yaml's `finetune` section, unchanged but for `finetune.seed`) on the
checkpoint `make demo` wrote in runs/demo, for SEEDS seeds, both initialisations per seed (the
seed sets the batch order, dropout and the random initialisation), and reports test accuracy
per seed, the means (ratio = pretrained / from scratch, higher is better) and the mean gain in
points with its standard error over seeds.
Needs runs/demo (`make demo`); without it the rows say so instead.
quick=True: the tiny preset, untrained, on 64 synthetic sentences (mechanics only).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from glm.core.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
SEEDS = (0, 1, 2)


def _rows(name: str, accuracies: dict[str, list[float]], seeds: list[int], extra: dict) -> Iterator[dict]:
    pre, scratch = accuracies["pretrained"], accuracies["from scratch"]
    gains = [100.0 * (p - s) for p, s in zip(pre, scratch)]
    common = {"name": name, "seeds": seeds, **extra}
    yield {
        **common,
        "metric": "test_accuracy_mean",
        "value": round(statistics.mean(pre), 4),
        "unit": "accuracy",
        "reference": round(statistics.mean(scratch), 4),
        "ratio": round(statistics.mean(pre) / statistics.mean(scratch), 4),
        "better": "higher",
        "pretrained": [round(a, 4) for a in pre],
        "from_scratch": [round(a, 4) for a in scratch],
        "note": "reference: the same fine-tuning from random initialisation",
    }
    sem = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
    yield {
        **common,
        "metric": "pretraining_gain_points",
        "value": round(statistics.mean(gains), 2),
        "unit": "points",
        "per_seed": [round(g, 2) for g in gains],
        "standard_error": round(sem, 2),
        "note": "test accuracy, pretrained minus from scratch, per seed; standard error of the mean over seeds",
    }


def _demo() -> Iterator[dict]:
    from glm.core.tokenizer import Tokenizer
    from glm.finetuning.finetune import finetune_from_checkpoint
    from glm.stages import RunPaths, pretrained_checkpoint

    cfg = load_config(DEMO_CONFIG)
    paths = RunPaths(ROOT / cfg.run_dir)
    try:
        checkpoint = pretrained_checkpoint(paths)
    except Exception as err:  # no demo run yet
        yield {
            "name": "pretraining_gain/demo",
            "metric": "test_accuracy_mean",
            "value": None,
            "unit": "accuracy",
            "note": f"no pretrained demo checkpoint in {paths.root} ({err}): run `make demo` first",
        }
        return
    tokenizer = Tokenizer.load(paths.tokenizer_model)
    accuracies: dict[str, list[float]] = {"pretrained": [], "from scratch": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gain-") as tmp:
        for seed in SEEDS:
            ft = cfg.finetune.model_copy(update={"seed": seed, "from_scratch_baseline": True})
            results = finetune_from_checkpoint(checkpoint, tokenizer, ft, Path(tmp) / f"seed-{seed}")
            for name in accuracies:
                accuracies[name].append(results[name]["test"]["accuracy"])
    yield from _rows(
        "pretraining_gain/demo",
        accuracies,
        list(SEEDS),
        {"checkpoint": str(checkpoint), "minutes": round((time.perf_counter() - t0) / 60, 1)},
    )


def _quick() -> Iterator[dict]:
    import random

    import torch

    from benchmarks.finetune import WordTokenizer
    from glm.core.config import model_config
    from glm.core.model import GLM
    from glm.finetuning.finetune import LabelledExample, finetune_from_checkpoint
    from glm.training.checkpoint import save_checkpoint

    tokenizer = WordTokenizer(64)
    rng = random.Random(0)
    examples = [
        LabelledExample(
            " ".join(rng.choice("the plot acting was it film".split()) for _ in range(5)) + (" good" if i % 2 else " bad"),
            str(i % 2),
        )
        for i in range(64)
    ]
    cfg = load_config(
        None, ["finetune.epochs=1", "finetune.batch_size=16", "finetune.task.verbalizers={'0': 'bad', '1': 'good'}"]
    ).finetune
    accuracies: dict[str, list[float]] = {"pretrained": [], "from scratch": []}
    with tempfile.TemporaryDirectory(prefix="bench-gain-") as tmp:
        torch.manual_seed(0)
        model = GLM(model_config("tiny", vocab_size=tokenizer.vocab_size))
        checkpoint = save_checkpoint(Path(tmp) / "pretrained", 1, model.state_dict(), {}, model_config=model.cfg)
        for seed in (0, 1):
            results = finetune_from_checkpoint(
                checkpoint, tokenizer, cfg.model_copy(update={"seed": seed}), Path(tmp) / f"seed-{seed}", examples=examples
            )
            for name in accuracies:
                accuracies[name].append(results[name]["test"]["accuracy"])
    yield from _rows(
        "pretraining_gain/tiny-synthetic", accuracies, [0, 1], {"quick": "mechanics only: an untrained 'pretrained' model"}
    )


def run(quick: bool = False) -> Iterator[dict]:
    yield from (_quick() if quick else _demo())
