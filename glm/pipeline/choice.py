"""Which fine-tuned run the export ships, and why (the evaluation report says it too)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from glm.core.config import PipelineConfig
from glm.core.shards import (
    MANIFEST,
)
from glm.pipeline.common import RUN_DIRS, finetune_results
from glm.pipeline.engine import (
    RunPaths,
    StageInputMissing,
)

# seq2seq runs report a dev loss without per-example losses: 1% of it stands in for its standard error
SEQ2SEQ_LOSS_SE = 0.01


def choose_export(results: dict[str, dict[str, Any]], margin_se: float = 1.0) -> dict[str, Any]:
    """Which fine-tuned run to export, and why: the pretrained run unless another beats it on dev by
    more than the dev set's noise.

    The from-scratch run is a diagnostic of pretraining, not a product: it is exported only when its
    dev score beats the pretrained run's by more than `margin_se` standard errors. For accuracy the
    standard error is the binomial one of the pretrained run's dev accuracy, sqrt(p (1 - p) / n_dev)
    (857 dev sentences at 71%: 1.55 points); for seq2seq's dev loss, without per-example losses,
    a relative margin of `margin_se` x SEQ2SEQ_LOSS_SE. margin_se = 0 is "best on dev, ties to
    pretrained". A run whose kept model collapsed ranks below every run that did not. Test scores
    never choose (the test split stays a fair estimate of the exported model).
    """
    if not results:
        raise ValueError("no fine-tuning results to choose an export from")
    cloze = all("best_val_accuracy" in r for r in results.values())
    key = "best_val_accuracy" if cloze else "best_val_loss"
    sign = 1.0 if cloze else -1.0
    order = list(results)  # "pretrained" first (finetune_results' order)
    dev = {name: results[name][key] for name in order}
    preferred = order[0]
    p = float(dev[preferred])
    n_dev = (results[preferred].get("sizes") or {}).get("dev")
    if cloze:
        se = math.sqrt(max(p * (1.0 - p), 0.0) / n_dev) if n_dev else 0.0
    else:
        se = abs(p) * SEQ2SEQ_LOSS_SE
    margin = margin_se * se

    def rank(name: str) -> tuple[bool, float]:
        r = results[name]
        # the preferred run gets the margin as a head start: another must beat it by more than that
        bonus = margin if name == preferred else 0.0
        return (not r.get("collapsed", False), sign * float(r[key]) + bonus - 1e-12 * order.index(name))

    chosen = max(order, key=rank)
    others = [n for n in order if n != chosen]
    best_other = max((n for n in order if n != preferred), key=lambda n: sign * float(dev[n]), default=None)
    gap = None if best_other is None else sign * (float(dev[best_other]) - p)  # > 0: the other is better on dev
    scores = ", ".join(f"{n} {dev[n]:.4g}" for n in order)
    noise = f"one standard error {se:.3g}" + (f" (n_dev {n_dev})" if cloze and n_dev else "")
    if not others:
        why = f"the only fine-tuned run ({key} {dev[chosen]:.4g})"
    elif any(results[n].get("collapsed") for n in others) and not results[chosen].get("collapsed"):
        why = f"the other run(s) collapsed; {chosen} did not ({key} {dev[chosen]:.4g})"
    elif chosen == preferred and gap is not None and gap > 0:
        why = (
            f"{best_other} is ahead on {key} by {gap:.3g}, within the dev set's noise "
            f"({margin_se:g} x {noise} = {margin:.3g}): {preferred} is preferred ({scores})"
        )
    elif chosen == preferred:
        why = f"{preferred} is best or tied on {key} ({scores})"
    else:
        why = f"{chosen} beats {preferred} on {key} by {gap:.3g}, more than {margin_se:g} x {noise} = {margin:.3g} ({scores})"
    return {
        "run": chosen,
        "dir": RUN_DIRS.get(chosen, chosen),
        "criterion": key,
        "dev": dev,
        "reason": why,
        "margin": {"standard_errors": margin_se, "standard_error": se, "value": margin, "n_dev": n_dev, "dev_gap": gap},
    }


def export_choice(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """choose_export over the fine-tuning stage's results, with the chosen run's directory as "path"."""
    task_dir = paths.finetune(cfg.finetune.task.name)
    if not (task_dir / MANIFEST).is_file():
        raise StageInputMissing(
            f"no fine-tuned model at {task_dir}; run the finetune stage first (glm-pipeline run CONFIG --stage finetune)"
        )
    choice = choose_export(finetune_results(cfg, paths), cfg.export.selection_margin_se)
    return choice | {"path": str(task_dir / choice["dir"])}


def export_source(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """The checkpoint to export: the fine-tuned run best on dev (export_choice); both still fill blanks."""
    return Path(export_choice(cfg, paths)["path"])
