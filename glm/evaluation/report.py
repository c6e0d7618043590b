"""The evaluation report: metrics.json, report.md and the PNG plots it embeds by relative path, and
the warnings that say where the fine-tuned model stands against its baselines.

Apart from glm.evaluate (the metrics) so that the report's wording and plots are in the code version of
the evaluation stage alone: an edit here re-runs the report, not fine-tuning, which computes metrics.

Over 600 lines on purpose: the report's sections, its plots and its warnings are read together (a
warning names the plot and section it refers to); they change together, as the evaluation stage's code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from glm.core.metrics import read_metrics
from glm.core.shards import atomic_path, atomic_write_json, atomic_write_text

BATCH_KEYS = ("input_ids", "position_ids", "block_position_ids", "sep", "targets", "loss_mask")


# --------------------------------------------------------------------------- metrics files


def _curve(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if values.size < 3 or window <= 1:
        return values
    window = min(window, values.size)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 13, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_pretrain_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Training loss (raw and smoothed) and validation loss against the optimizer step."""
    train_x, train_y = _curve(records, "loss")
    val_x, val_y = _curve(records, "val_loss")
    if train_x.size == 0 and val_x.size == 0:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train_x.size:
        ax.plot(train_x, train_y, color="tab:blue", alpha=0.25, linewidth=1, label="training loss (per step)")
        ax.plot(
            train_x, _smooth(train_y, max(1, train_x.size // 25)), color="tab:blue", linewidth=2, label="training loss (smoothed)"
        )
    if val_x.size:
        ax.plot(val_x, val_y, "o-", color="tab:orange", linewidth=2, markersize=5, label="validation loss")
    ax.set(title="Pretraining: blank-infilling loss", xlabel="optimizer step", ylabel="cross-entropy (nats / token)")
    ax.legend()
    return _save_figure(fig, Path(path))


def plot_finetune_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, majority_accuracy: float | None = None
) -> Path | None:
    """Per run: training and validation loss (left) and validation accuracy (right) against the step."""
    if not runs:
        return None
    has_acc = any(_curve(r, "val_accuracy")[0].size for r in runs.values())
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(13 if has_acc else 7.5, 4.5), squeeze=False)
    ax_loss = axes[0, 0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        tx, ty = _curve(records, "loss")
        vx, vy = _curve(records, "val_loss")
        if tx.size:
            ax_loss.plot(tx, ty, color=c, alpha=0.5, linewidth=1.2, label=f"{name}: training")
        if vx.size:
            ax_loss.plot(vx, vy, "o-", color=c, linewidth=2, markersize=4, label=f"{name}: validation")
    ax_loss.set(title="Fine-tuning loss", xlabel="optimizer step", ylabel="cross-entropy")
    ax_loss.legend(fontsize=9)
    if has_acc:
        ax_acc = axes[0, 1]
        for i, (name, records) in enumerate(runs.items()):
            vx, vy = _curve(records, "val_accuracy")
            if vx.size:
                ax_acc.plot(vx, vy, "o-", color=colors[i % len(colors)], linewidth=2, markersize=4, label=name)
        if majority_accuracy is not None:
            ax_acc.axhline(majority_accuracy, color="gray", linestyle="--", label="majority class (test split)")
        ax_acc.set(title="Validation accuracy", xlabel="optimizer step", ylabel="accuracy", ylim=(0, 1.02))
        ax_acc.legend(fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str) -> Path:
    """Counts in each cell, coloured by the share of the true label's examples (rows sum to 1)."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)  # (L, L)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # (L, L)
    size = 2.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.55 else "black",
                fontsize=10,
            )
    ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(title=title, xlabel="predicted label", ylabel="true label")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label")
    return _save_figure(fig, Path(path))


def plot_accuracy_bars(bars: Mapping[str, tuple[float, float]], path: str | Path, title: str) -> Path:
    """Grouped bars of test accuracy and macro-F1 per model."""
    plt = _pyplot()
    names = list(bars)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(names), 4.5))
    for k, (metric, offset, color) in enumerate((("accuracy", -0.2, "tab:blue"), ("macro-F1", 0.2, "tab:green"))):
        values = [bars[n][k] for n in names]
        rects = ax.bar(x + offset, values, width=0.38, color=color, label=metric)
        ax.bar_label(rects, labels=[f"{v:.1%}" for v in values], padding=2, fontsize=9)
    ax.set_xticks(x, names)
    ax.set(title=title, ylabel="test score", ylim=(0, 1.1))
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper right", fontsize=9)
    return _save_figure(fig, Path(path))


def plot_infill_bleu(ratios: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """BLEU of the filled documents and of the documents with the blanks deleted, against the mask ratio."""
    plt = _pyplot()
    x = [float(r) for r in ratios]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [m["bleu"] for m in ratios.values()], "o-", color="tab:blue", linewidth=2, label="filled by the model")
    ax.plot(x, [m["bleu_unfilled"] for m in ratios.values()], "s--", color="gray", linewidth=1.5, label="blanks deleted (floor)")
    ax.set(title="Text infilling on held-out documents", xlabel="share of tokens blanked", ylabel="BLEU", ylim=(0, 100))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.legend()
    return _save_figure(fig, Path(path))


# --------------------------------------------------------------------------- the report


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.1%}" if pct else f"{x:.4g}"
    return str(x)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(str(c)) for c in row) + " |" for row in rows]
    return lines + [""]


def _generation_sections(
    pretrain: Mapping[str, Any], seq2seq: Mapping[str, Mapping[str, Any]], out_dir: Path
) -> tuple[list[str], dict[str, Path]]:
    """The report's generation section: infilling BLEU by mask ratio, last-word prediction, seq2seq BLEU/ROUGE."""
    md: list[str] = []
    plots: dict[str, Path] = {}
    infill, lastword = pretrain.get("infill_bleu") or {}, pretrain.get("lastword") or {}
    generated = {name: res["generation"] for name, res in seq2seq.items() if res.get("generation")}
    if not (infill.get("ratios") or lastword or generated):
        return md, plots
    md += ["## Generation (held-out data, greedy decoding)", ""]
    if infill.get("ratios"):
        md += [
            f"### Text infilling ({infill['docs']} validation documents per ratio)",
            "",
            "Each document's blanked share is removed in 1-3 spans and filled by the model; BLEU compares the "
            "filled document with the original. *Blanks deleted* scores the document with the spans simply "
            "left out: the floor a model has to beat.",
            "",
        ]
        md += _table(
            ["blanked", "BLEU (filled)", "BLEU (blanks deleted)", "spans"],
            [
                [f"{float(r):.0%}", f"{m['bleu']:.1f}", f"{m['bleu_unfilled']:.1f}", m["spans"]]
                for r, m in infill["ratios"].items()
            ],
        )
        plots["infill_bleu"] = plot_infill_bleu(infill["ratios"], out_dir / "infill_bleu.png")
        md += ["![infilling BLEU by mask ratio](infill_bleu.png)", ""]
        if infill.get("samples"):
            md += _table(
                ["blanked", "text with blanks", "model's filled text"],
                [[f"{s['ratio']:.0%}", s["prompt"], s["filled"]] for s in infill["samples"]],
            )
    if lastword:
        md += [
            f"### Last-word prediction ({lastword['words']} validation documents, {lastword['tokens']} word tokens)",
            "",
            "The model predicts each document's final word from the text before it. *Blank*: the text in Part A, "
            "the word generated at a final [gMASK]; *left to right*: text and word in Part B after an empty [gMASK]. "
            "A word counts as right when greedy decoding, with <eop> held back for the word's length, writes it.",
            "",
        ]
        md += _table(
            ["layout", "word accuracy", "token accuracy", "perplexity per word token"],
            [
                [
                    title,
                    _fmt(lastword[key]["accuracy"], True),
                    _fmt(lastword[key]["token_accuracy"], True),
                    _fmt(lastword[key]["perplexity"]),
                ]
                for key, title in (("blank", "blank ([gMASK] after the text)"), ("left_to_right", "left to right"))
                if key in lastword
            ],
        )
    if generated:
        md += ["### Seq2seq test outputs", ""]
        md += _table(
            ["model", "examples", "BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L"],
            [
                [name, g["n"], f"{g['bleu']:.1f}", f"{g['rouge1']:.1f}", f"{g['rouge2']:.1f}", f"{g['rougeL']:.1f}"]
                for name, g in generated.items()
            ],
        )
    return md, plots


# --------------------------------------------------------------------------- warnings: the fine-tuned model against its baselines

TRY_COLLAPSE = (
    "lower finetune.optim.lr (e.g. / 3), set finetune.class_balanced: true, give finetune.collapse_guard.max_attempts "
    "more tries; check that finetune.task.verbalizers are words the tokenizer knows"
)
TRY_WEAK = (
    "more finetune.epochs (early stopping keeps the best dev point), finetune.optim.lr between 1e-4 and 1e-3, "
    "finetune.class_balanced: true for skewed labels, more pretraining (pretrain.steps) or a larger model.preset"
)
TRY_PRETRAINING = (
    "more pretraining (pretrain.steps), pretraining text closer to the task's (data.sources), a lower "
    "finetune.optim.lr so fine-tuning keeps what pretraining learned"
)


def finetune_warnings(cloze: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """What a reader must know before trusting the classification results, each with the config keys to try.

    Per run (finetune_cloze results, e.g. "pretrained", "from scratch"): the kept model collapsed or is the
    untrained one; test accuracy at or below the majority class; below the TF-IDF + logistic regression
    baseline; and for "pretrained", below "from scratch". A run the collapse guard had to retrain is a note.
    """
    out: list[dict[str, str]] = []
    scratch = cloze.get("from scratch")
    for name, res in cloze.items():
        acc = (res.get("test") or {}).get("accuracy")
        if acc is None:
            continue
        attempts = res.get("attempts") or []
        if res.get("collapsed"):
            reasons = next((a.get("reasons") for a in attempts if a.get("kept")), None) or ["collapsed"]
            out.append(
                {
                    "level": "warning",
                    "run": name,
                    "check": "collapsed",
                    "message": f"{name}: the kept model collapsed after {len(attempts)} attempt(s): {'; '.join(reasons)}",
                    "try": TRY_COLLAPSE,
                }
            )
        elif res.get("kept_untrained"):
            out.append(
                {
                    "level": "warning",
                    "run": name,
                    "check": "untrained",
                    "message": f"{name}: no trained step beat the untrained model on dev; the kept model is step 0",
                    "try": TRY_COLLAPSE,
                }
            )
        elif len(attempts) > 1:
            kept = next(a for a in attempts if a.get("kept"))
            out.append(
                {
                    "level": "note",
                    "run": name,
                    "check": "retried",
                    "message": f"{name}: the collapse guard retrained it; attempt {kept['attempt']} of {len(attempts)} "
                    f"(lr {kept['lr']:.3g}) was kept, earlier ones collapsed: "
                    + "; ".join(r for a in attempts if a.get("collapsed") for r in a.get("reasons", [])),
                    "try": TRY_COLLAPSE,
                }
            )
        majority = res.get("majority") or {}
        if majority.get("accuracy") is not None and acc <= majority["accuracy"]:
            out.append(
                {
                    "level": "warning",
                    "run": name,
                    "check": "majority",
                    "message": f"{name}: test accuracy {acc:.1%} is at or below the majority class "
                    f"({majority.get('majority_label')!r} always: {majority['accuracy']:.1%})",
                    "try": TRY_COLLAPSE,
                }
            )
        linear = res.get("linear_baseline") or {}
        if linear.get("accuracy") is not None and acc < linear["accuracy"]:
            out.append(
                {
                    "level": "warning",
                    "run": name,
                    "check": "linear",
                    "message": f"{name}: test accuracy {acc:.1%} is below the linear baseline ({linear['accuracy']:.1%}, "
                    f"{linear.get('model', 'TF-IDF + logistic regression')})",
                    "try": TRY_WEAK,
                }
            )
        misfits = res.get("verbalizers_out_of_context") or []
        if name == "pretrained" and misfits:
            out.append(
                {
                    "level": "warning",
                    "run": name,
                    "check": "verbalizer context",
                    "message": "; ".join(m["message"] for m in misfits),
                    "try": "verbalizers that running text writes as whole tokens where [MASK] is "
                    "(finetune.task.verbalizers and finetune.task.pattern, as each line suggests)",
                }
            )
        if name == "pretrained" and scratch and scratch is not res:
            other = (scratch.get("test") or {}).get("accuracy")
            if other is not None and acc < other:
                out.append(
                    {
                        "level": "warning",
                        "run": name,
                        "check": "from scratch",
                        "message": f"pretrained: test accuracy {acc:.1%} is below the same fine-tuning from random "
                        f"initialisation ({other:.1%}): pretraining did not help this task",
                        "try": TRY_PRETRAINING,
                    }
                )
    return out


DEGENERATE_SHARE = 0.5  # one fill (or one token) in at least half the blanks: the model is not filling, it is repeating
DEGENERATE_MIN_BLANKS = 10  # below this many blanks a share says little
TRY_DEGENERATE = (
    "more pretraining (pretrain.budget_minutes or pretrain.steps), longer spans and the generative objectives "
    "(infilling.objective_mix with sentence/document, e.g. configs/glm-multitask.yaml), "
    "evaluate.no_repeat_ngram_size to stop loops"
)


def generation_warnings(pretrain: Mapping[str, Any]) -> list[dict[str, str]]:
    """A warning when the pretrained model's blank fills are degenerate: one fill or one token for at least
    DEGENERATE_SHARE of the held-out blanks of the infilling evaluation (glm.evaluate.fill_diversity)."""
    fills = (pretrain.get("infill_bleu") or {}).get("fills") or {}
    if fills.get("blanks", 0) < DEGENERATE_MIN_BLANKS:
        return []
    found = []
    if fills.get("top_fill_share", 0.0) >= DEGENERATE_SHARE:
        found.append(f"{fills['top_fill_share']:.0%} of {fills['blanks']} blanks are filled with {fills['top_fill']!r}")
    if fills.get("top_token_share", 0.0) >= DEGENERATE_SHARE:
        found.append(f"{fills['top_token_share']:.0%} of {fills['tokens']} generated tokens are {fills['top_token']!r}")
    if not found:
        return []
    return [
        {
            "level": "warning",
            "run": "pretrained",
            "check": "degenerate fills",
            "message": "the pretrained model's generation is degenerate: "
            + " and ".join(found)
            + f" ({fills['distinct_fills']} distinct fills); do not use it to fill or generate text",
            "try": TRY_DEGENERATE,
        }
    ]


def warnings_markdown(warnings: Sequence[Mapping[str, str]]) -> list[str]:
    """The warnings as a Markdown block for the top of a report (nothing if there are none)."""
    if not warnings:
        return []
    serious = [w for w in warnings if w["level"] == "warning"]
    head = (
        f"## WARNING: {len(serious)} problem(s) with the fine-tuned classifier"
        if serious and all(w["check"] != "degenerate fills" for w in serious)
        else f"## WARNING: {len(serious)} problem(s) with the models"
        if serious
        else "## Note: the collapse guard retrained a classifier"
    )
    lines = [head, ""]
    for w in warnings:
        lines.append(f"> **{'WARNING' if w['level'] == 'warning' else 'note'}** {w['message']}.  ")
        lines.append(f"> Try: {w['try']}.")
        lines.append(">")
    return lines[:-1] + [""]


def _export_choice_section(choice: Mapping[str, Any] | None) -> list[str]:
    """What the export stage will ship and how close the choice was (glm.stages.choose_export)."""
    if not choice:
        return []
    m = choice.get("margin") or {}
    gap = m.get("dev_gap")
    close = ""
    if gap is not None:
        close = f" Dev gap of the other run: {gap:+.3g} against a margin of {m.get('value', 0):.3g} ({m.get('standard_errors', 0):g} standard error(s))."
    return ["## Exported model", "", f"The bundle is the **{choice['run']}** run: {choice['reason']}.{close}", ""]


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Any],
    pretrain_metrics_path: str | Path | None = None,
    finetune_metrics_paths: Mapping[str, str | Path] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, report.md and the PNG plots into out_dir; returns their paths.

    `results` may hold (each optional):
      "title": str;
      "pretrain": evaluate_pretrained(...): {"infilling", "lm", "fill_samples", "infill_bleu", "lastword"};
      "cloze": {run name: finetune_cloze(...) result}, e.g. {"pretrained": ..., "from scratch": ...};
      "seq2seq": {run name: finetune_seq2seq(...) result, optionally with "generation": seq2seq_generation_metrics(...)}.
    Fine-tuning curves come from `finetune_metrics_paths` (run name -> metrics.jsonl), defaulting to
    each result's "metrics_path".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    md = [f"# {results.get('title', 'GLM evaluation report')}", ""]

    cloze: Mapping[str, Mapping[str, Any]] = results.get("cloze") or {}
    seq2seq: Mapping[str, Mapping[str, Any]] = results.get("seq2seq") or {}
    pretrain: Mapping[str, Any] = results.get("pretrain") or {}
    paths = dict(finetune_metrics_paths or {})
    for name, res in {**cloze, **seq2seq}.items():
        if name not in paths and res.get("metrics_path") and Path(res["metrics_path"]).is_file():
            paths[name] = res["metrics_path"]

    # ---- warnings before any table (finetune_warnings): a collapsed or trivial classifier is the headline
    warnings = finetune_warnings(cloze) + generation_warnings(pretrain)
    md += warnings_markdown(warnings)
    md += _export_choice_section(results.get("export_choice"))

    # ---- classification summary first: it is the headline
    majority = next((r["majority"] for r in cloze.values() if r.get("majority")), None)
    linear = next((r["linear_baseline"] for r in cloze.values() if r.get("linear_baseline")), None)
    if cloze:
        task = next(iter(cloze.values())).get("task", "classification")
        md += [f"## Cloze classification: {task}", ""]
        rows, bars = [], {}
        for name, res in cloze.items():
            t = res["test"]
            rows.append(
                [
                    name,
                    _fmt(t["accuracy"], True),
                    _fmt(t["macro_f1"], True),
                    _fmt(res.get("best_val_accuracy"), True),
                    res.get("steps", "n/a"),
                    "yes" if res.get("stopped_early") else "no",
                ]
            )
            bars[name] = (t["accuracy"], t["macro_f1"])
        if majority is not None:
            rows.append(
                [
                    f"majority class ({majority['majority_label']})",
                    _fmt(majority["accuracy"], True),
                    _fmt(majority["macro_f1"], True),
                    "",
                    "",
                    "",
                ]
            )
            bars["majority class"] = (majority["accuracy"], majority["macro_f1"])
        if linear is not None:
            rows.append(
                ["TF-IDF + logistic regression", _fmt(linear["accuracy"], True), _fmt(linear["macro_f1"], True), "", "", ""]
            )
            bars["TF-IDF + LR"] = (linear["accuracy"], linear["macro_f1"])
        md += _table(["model", "test accuracy", "test macro-F1", "best validation accuracy", "steps", "stopped early"], rows)
        first = next(iter(cloze.values()))
        if first.get("sizes"):
            s = first["sizes"]
            cut = first.get("truncated") or {}
            md += [
                f"Examples: {s.get('train')} train / {s.get('dev')} validation / {s.get('test')} test (split by a "
                f"hash of the text); cut to fit the model: {cut.get('train', 0)} / {cut.get('dev', 0)} / {cut.get('test', 0)}.",
                "",
            ]
        if first.get("verbalizers"):
            how = (
                "chosen automatically from the vocabulary by the pretrained model"
                if first.get("verbalizers_auto")
                else "from the config"
            )
            words = ", ".join(f"{label} → {word!r}" for label, word in first["verbalizers"].items())
            md += [f"Verbalizers ({how}): {words}.", ""]
        plots["accuracy"] = plot_accuracy_bars(bars, out_dir / "accuracy.png", f"Test scores: {task}")
        md += ["![test accuracy and macro-F1](accuracy.png)", ""]
        for name, res in cloze.items():
            t = res["test"]
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())
            plots[f"confusion_{slug}"] = plot_confusion(
                t["confusion"],
                t["labels"],
                out_dir / f"confusion_{slug}.png",
                f"{name}: test confusion matrix (accuracy {t['accuracy']:.1%})",
            )
            md += [f"### {name}", "", f"![confusion matrix of {name}](confusion_{slug}.png)", ""]
            md += _table(
                ["label", "precision", "recall", "F1", "support"],
                [
                    [label, _fmt(m["precision"], True), _fmt(m["recall"], True), _fmt(m["f1"], True), m["support"]]
                    for label, m in t["per_label"].items()
                ],
            )

    curves = {name: read_metrics(p) for name, p in paths.items() if Path(p).is_file()}
    cloze_curves = {n: r for n, r in curves.items() if n not in seq2seq}
    if cloze_curves:
        plots["finetune_curves"] = plot_finetune_curves(
            cloze_curves, out_dir / "finetune_curves.png", majority["accuracy"] if majority else None
        )
        md += ["### Fine-tuning curves", "", "![fine-tuning loss and validation accuracy](finetune_curves.png)", ""]

    # ---- pretraining
    if pretrain or pretrain_metrics_path:
        md += ["## Pretraining", ""]
        rows = []
        for key, title in (("infilling", "blank infilling (validation)"), ("lm", "left-to-right LM (held out)")):
            m = pretrain.get(key)
            if m:
                rows.append(
                    [title, _fmt(m["loss"]), _fmt(m["perplexity"]), _fmt(m.get("token_accuracy"), True), m.get("tokens", "")]
                )
        if rows:
            md += _table(["held-out objective", "loss", "perplexity", "token accuracy", "tokens"], rows)
        if (pretrain.get("lm") or {}).get("eop_argmax_share") is not None:
            md += [
                f"Left to right, <eop> was the model's first choice at {pretrain['lm']['eop_argmax_share']:.1%} of the "
                "held-out tokens (a model pretrained on short blanks expects a span to end soon); the token accuracy "
                "takes the best token other than <eop>, since the text goes on.",
                "",
            ]
        if pretrain_metrics_path and Path(pretrain_metrics_path).is_file():
            fig = plot_pretrain_curves(read_metrics(pretrain_metrics_path), out_dir / "pretrain_loss.png")
            if fig is not None:
                plots["pretrain_loss"] = fig
                md += ["![pretraining loss curves](pretrain_loss.png)", ""]
        samples = pretrain.get("fill_samples") or []
        if samples:
            md += ["### Blank-filling samples (greedy)", ""]
            md += _table(
                ["text with a blank", "original", "model's fill"], [[s["prompt"], s["reference"], s["filled"]] for s in samples]
            )

    # ---- seq2seq
    for name, res in seq2seq.items():
        t = res["test"]
        md += [
            f"## Seq2seq: {name}",
            "",
            f"Test loss {_fmt(t['loss'])}, perplexity {_fmt(t['perplexity'])}, token accuracy {_fmt(t['token_accuracy'], True)}.",
            "",
        ]
        if res.get("examples"):
            md += _table(
                ["source", "reference", "generated"], [[e["source"], e["reference"], e["generated"]] for e in res["examples"]]
            )
        if name in curves:
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())
            plots[f"seq2seq_{slug}"] = plot_finetune_curves({name: curves[name]}, out_dir / f"seq2seq_{slug}.png")
            md += [f"![seq2seq loss curves](seq2seq_{slug}.png)", ""]

    generation_md, generation_plots = _generation_sections(pretrain, seq2seq, out_dir)
    md += generation_md
    plots.update(generation_plots)

    metrics = _json_safe({**results, "warnings": warnings, "plots": {k: p.name for k, p in plots.items()}})
    written = {
        "metrics": atomic_write_json(out_dir / "metrics.json", metrics),
        "report": atomic_write_text(out_dir / "report.md", "\n".join(md).rstrip() + "\n"),
    }
    return written | plots
