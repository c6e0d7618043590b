"""What the Prefect UI shows of a run: tables, Markdown and progress built from stage outputs.

Keys are `CONFIG-NAME-WHAT` (lowercase, dashes), so each config's artifacts form their own
history in the UI's Artifacts page. Everything here reads the files a stage wrote; nothing
here computes science.

Each artifact is one HTTP request to the Prefect API. The task builds the artifact's content
(from its files, now) and a background thread sends it, in order, while the pipeline goes on;
every flow waits for them before it returns (`sent()`), so a finished flow run has all its
artifacts. A failed request is retried by Prefect's client and then reported as a warning in
the run log: a report that did not reach the UI does not fail the stage it describes.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import json
import logging
import re
import shlex
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from glm_pipeline.tasks.options import artifact_key
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from glm.core.config import PipelineConfig
from glm.core.contracts import CorpusStats, TokenStats
from glm.core.shards import MANIFEST, read_manifest, read_stats
from glm.evaluation.report import warnings_markdown

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- sending


_sender: ThreadPoolExecutor | None = None
_pending: list[tuple[str, Future]] = []
_lock = threading.Lock()


def publish(what: str, send: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """Call `send(*args, **kwargs)` (a prefect.artifacts function) on the sender thread, in the
    caller's context: the artifact belongs to the caller's task and flow run."""
    global _sender
    context = contextvars.copy_context()
    with _lock:
        if _sender is None:  # one thread: artifacts arrive in the order they were made
            _sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="artifacts")
        future = _sender.submit(context.run, send, *args, **kwargs)
        _pending.append((what, future))
    return future


def wait_sent() -> list[str]:
    """Wait until every published artifact was sent; returns (and logs) the ones that failed."""
    with _lock:
        pending = list(_pending)
        _pending.clear()
    failed = []
    for what, future in pending:
        error = future.exception()
        if error is not None:
            failed.append(what)
            _run_logger().warning("artifact %s was not sent to the Prefect API: %s", what, error)
    return failed


@contextlib.contextmanager
def sent() -> Iterator[None]:
    """The body of a flow: on the way out, whatever happened, its artifacts are sent."""
    try:
        yield
    finally:
        wait_sent()


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


class TrainingProgress:
    """A live progress artifact: the share of pretrain.steps done (or of a fine-tuning run's steps).

    Updates come from every metrics record (in-process training) or every poll of the metrics
    file (subprocess); at most one per `min_interval` seconds is sent, the last one always.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        total: int,
        done: int = 0,
        min_interval: float = 1.0,
        what: str = "pretrain-progress",
        description: str | None = None,
    ):
        self.total, self.min_interval, self.shown, self.sent_at = max(total, 1), min_interval, done, time.monotonic()
        self.what = what  # the artifact's key after the run's name (fine-tuning: finetune-progress-RUN)
        self.artifact_id = publish(
            what,
            create_progress_artifact,
            self.percent(done),
            key=artifact_key(cfg, what),
            description=description or f"Pretraining steps done of {total}",
        )

    def percent(self, step: int) -> float:
        return 100.0 * min(step, self.total) / self.total

    def update(self, step: int, final: bool = False) -> None:
        now = time.monotonic()
        if step == self.shown or not final and now - self.sent_at < self.min_interval:
            return
        self.shown, self.sent_at = step, now
        publish(self.what, lambda value: update_progress_artifact(self.artifact_id.result(), value), self.percent(step))


# --------------------------------------------------------------------------- what each stage shows


def _rounded(x: Any, digits: int = 4) -> Any:
    return round(x, digits) if isinstance(x, float) else x


def corpus_statistics(cfg: PipelineConfig, docs_dir: Path) -> None:
    """Documents per split and why documents were dropped (with an example of each reason)."""
    st = read_stats(docs_dir, CorpusStats)
    splits = [
        {"split": s, "documents": st["docs"][s], "characters": st["chars"][s], "text bytes": st["text_bytes"][s]}
        for s in ("train", "valid")
    ]
    publish(
        "corpus-statistics",
        create_table_artifact,
        splits,
        key=artifact_key(cfg, "corpus-statistics"),
        description=f"Documents kept per split ({st['read']} records read from {len(st['inputs'])} input(s); "
        f"{st['split']['documents']} long document(s) split into {st['split']['pieces']} pieces)",
    )
    cleaning = [
        {"reason": r, "dropped": n, "example": (st["quarantine"].get(r) or [{}])[0].get("text", "")[:120]}
        for r, n in st["dropped"].items()
    ]
    publish(
        "cleaning-statistics",
        create_table_artifact,
        cleaning,
        key=artifact_key(cfg, "cleaning-statistics"),
        description="Records dropped by cleaning, de-duplication and length limits",
    )


def validation_results(cfg: PipelineConfig, validation_json: Path, what: str) -> None:
    """One row per expectation of a Great Expectations gate."""
    if not validation_json.is_file():
        return
    report = json.loads(validation_json.read_text(encoding="utf-8"))
    rows = [
        {
            "expectation": r["expectation"],
            "success": r["success"],
            "observed": str(r["observed"]),
            "examples": ", ".join(map(str, r.get("examples") or []))[:200],
        }
        for r in report.get("rows", [])
    ]
    status = "skipped" if report.get("skipped") else "passed" if report.get("success") else "FAILED"
    sampled = f"{report.get('sampled_rows')} of {report.get('total_rows')} rows checked" if "sampled_rows" in report else ""
    publish(
        f"{what}-validation",
        create_table_artifact,
        rows or [{"expectation": "(gate skipped: quality.enabled is false)"}],
        key=artifact_key(cfg, f"{what}-validation"),
        description=f"{what} quality gate: {status}. {sampled}",
    )


def tokenizer_summary(cfg: PipelineConfig, tokenizer_dir: Path) -> None:
    m = read_manifest(tokenizer_dir / MANIFEST)
    st = m["stats"]
    lines = [
        f"# Tokenizer: {cfg.name}",
        "",
        f"sentencepiece {m['config'].get('model_type', '')}, vocabulary **{st['vocab_size']}** pieces, "
        f"byte fallback {st.get('byte_fallback')}, normalization {st.get('normalization', 'n/a')}.",
        "",
        "| | |",
        "|---|---|",
    ]
    for label, k in (
        ("training documents (sampled / train split)", None),
        ("sample characters", "sample_chars"),
        ("training seconds", "train_seconds"),
        ("threads", "num_threads"),
        ("model sha256", "model_sha256"),
    ):
        value = f"{st.get('sample_docs')} / {st.get('train_docs')}" if k is None else st.get(k)
        lines.append(f"| {label} | {value} |")
    publish(
        "tokenizer-summary",
        create_markdown_artifact,
        "\n".join(lines) + "\n",
        key=artifact_key(cfg, "tokenizer-summary"),
        description=f"Tokenizer trained into {tokenizer_dir}",
    )


def token_statistics(cfg: PipelineConfig, tokens_dir: Path) -> None:
    st = read_stats(tokens_dir, TokenStats)
    rows = [{"split": s, **v} for s, v in st["splits"].items()]
    rows.append({"split": "all", "docs": st["docs"], "tokens": st["tokens"], "shards": st["shards"]})
    publish(
        "token-statistics",
        create_table_artifact,
        rows,
        key=artifact_key(cfg, "token-statistics"),
        description=f"unk rate {st['unk_rate']:.5f}, {st['bytes_per_token']:.2f} bytes/token, "
        f"{st['tokens_per_doc']:.1f} tokens/document",
    )


def loss_table(cfg: PipelineConfig, metrics_path: Path, max_rows: int = 200) -> None:
    """Training and validation loss by step (thinned to at most max_rows rows)."""
    from glm.core.metrics import read_metrics

    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        row = by_step.setdefault(r["step"], {"step": r["step"]})
        for k in ("loss", "val_loss", "val_ppl", "lr", "tokens_per_s"):
            if r.get(k) is not None:
                row[k] = _rounded(r[k], 6 if k == "lr" else 4)
    rows = [by_step[s] for s in sorted(by_step)]
    stride = max(1, -(-len(rows) // max_rows))
    thinned = rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else [])
    publish(
        "pretrain-loss",
        create_table_artifact,
        thinned,
        key=artifact_key(cfg, "pretrain-loss"),
        description=f"Pretraining losses ({metrics_path})",
    )


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def inline_images(markdown: str, directory: Path) -> str:
    """Replace `![alt](plot.png)` by a data: URI, which the Prefect UI renders (a file path would not)."""

    def embed(m: re.Match) -> str:
        path = directory / m.group(2)
        if not path.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return _IMAGE.sub(embed, markdown)


def _warning_headline(warnings: list[dict[str, Any]]) -> str:
    serious = [w for w in warnings if w.get("level") == "warning"]
    return f"WARNING: {len(serious)} problem(s) with the fine-tuned classifier. " if serious else ""


def evaluation_report(cfg: PipelineConfig, eval_dir: Path) -> None:
    """report.md, plots inlined; its warnings (glm.report.finetune_warnings) open the report and its description."""
    report = (eval_dir / "report.md").read_text(encoding="utf-8")
    metrics_file = eval_dir / "metrics.json"
    warnings = (json.loads(metrics_file.read_text(encoding="utf-8")).get("warnings") or []) if metrics_file.is_file() else []
    publish(
        "evaluation-report",
        create_markdown_artifact,
        inline_images(report, eval_dir),
        key=artifact_key(cfg, "evaluation-report"),
        description=f"{_warning_headline(warnings)}Evaluation report (files in {eval_dir})",
    )
    rows = generation_rows(json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8")))
    if rows:
        publish(
            "generation-metrics",
            create_table_artifact,
            rows,
            key=artifact_key(cfg, "generation-metrics"),
            description="Generation on held-out data: infilling BLEU by mask ratio, last-word prediction, seq2seq BLEU/ROUGE",
        )


def generation_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per generation metric of metrics.json (what a run can be compared on in the UI)."""
    pretrain = metrics.get("pretrain") or {}
    rows = [
        {
            "evaluation": f"infilling, {float(r):.0%} blanked",
            "metric": "BLEU",
            "value": _rounded(m["bleu"], 2),
            "floor": _rounded(m["bleu_unfilled"], 2),
        }
        for r, m in ((pretrain.get("infill_bleu") or {}).get("ratios") or {}).items()
    ]
    lastword = pretrain.get("lastword") or {}
    for layout in ("blank", "left_to_right"):
        for metric in ("accuracy", "perplexity"):
            if layout in lastword:
                rows.append(
                    {
                        "evaluation": f"last word ({layout.replace('_', ' ')})",
                        "metric": metric,
                        "value": _rounded(lastword[layout][metric]),
                        "floor": None,
                    }
                )
    for name, res in (metrics.get("seq2seq") or {}).items():
        for metric in ("bleu", "rouge1", "rouge2", "rougeL"):
            if (res.get("generation") or {}).get(metric) is not None:
                rows.append(
                    {
                        "evaluation": f"seq2seq test ({name})",
                        "metric": metric,
                        "value": _rounded(res["generation"][metric], 2),
                        "floor": None,
                    }
                )
    return rows


def finetune_summary(cfg: PipelineConfig, results: dict[str, dict[str, Any]], task_dir: Path | None = None) -> None:
    """A table of test metrics per run and beside them the baselines; the warnings the finetune stage
    recorded in its manifest (what to check, what to try) as a Markdown artifact of their own."""
    rows = [
        {
            "model": name,
            **{k: _rounded(v) for k, v in r["test"].items() if isinstance(v, (int, float))},
            "steps": r.get("steps"),
            "best_step": r.get("best_step"),
            "attempts": len(r.get("attempts") or [None]),
            "collapsed": r.get("collapsed", False),
        }
        for name, r in results.items()
    ]
    first = next(iter(results.values()), {})
    for key, name in (("majority", "majority class"), ("linear_baseline", "TF-IDF + logistic regression")):
        if first.get(key):
            row = {"model": name, **{k: _rounded(first[key][k]) for k in ("accuracy", "macro_f1", "n")}}
            rows.append({k: None for k in rows[0]} | row)  # one set of columns for the whole table
    warnings = []
    if task_dir is not None and (task_dir / MANIFEST).is_file():
        warnings = read_manifest(task_dir / MANIFEST).get("stats", {}).get("warnings") or []
    publish(
        "finetune-results",
        create_table_artifact,
        rows,
        key=artifact_key(cfg, "finetune-results"),
        description=f"{_warning_headline(warnings)}Test metrics of {cfg.finetune.kind} task {cfg.finetune.task.name!r}",
    )
    if warnings:
        publish(
            "finetune-warnings",
            create_markdown_artifact,
            "\n".join(warnings_markdown(warnings)),
            key=artifact_key(cfg, "finetune-warnings"),
            description=_warning_headline(warnings) or "Notes on the fine-tuning runs",
        )


def export_bundle(cfg: PipelineConfig, bundle_dir: Path, url: str | None = None, kind: str = "onnx") -> None:
    """The bundle as Markdown (where it is, its checksums, what verification found, how to load it)
    and a table of every verification number. kind "generation": the pretrained model's bundle
    (keys generation-bundle, generation-verification), published beside the classifier's.

    Browsers refuse file:// links from the UI, so a link artifact is made only for an http(s) `url`
    where the bundle is served; a run directory on local disk has none.
    """
    if not (bundle_dir / "verification.json").is_file():  # export.generation_bundle off: nothing to show
        return
    report = json.loads((bundle_dir / "verification.json").read_text(encoding="utf-8"))
    name, table = ("onnx-bundle", "export-verification") if kind == "onnx" else (f"{kind}-bundle", f"{kind}-verification")
    publish(
        name,
        create_markdown_artifact,
        bundle_markdown(cfg, bundle_dir, report),
        key=artifact_key(cfg, name),
        description=f"ONNX bundle at {bundle_dir.resolve()} (verified: {report.get('passed')})",
    )
    if url is not None and urllib.parse.urlsplit(url).scheme in ("http", "https"):
        publish(
            "onnx-bundle-link",
            create_link_artifact,
            url,
            link_text=f"ONNX bundle: {bundle_dir.name}",
            key=artifact_key(cfg, "onnx-bundle-link"),
            description=f"the bundle at {bundle_dir.resolve()}, served",
        )
    rows = list(_verification_rows(report))
    if rows:
        publish(
            table,
            create_table_artifact,
            rows,
            key=artifact_key(cfg, table),
            description="ONNX against PyTorch (atol %s)" % report.get("atol"),
        )


def export_stats(export_dir: Path) -> dict[str, Any]:
    """export/manifest.json's stats: this run's bundle version and the gate's decision (glm.stages.verify_and_promote)."""
    return read_manifest(export_dir / MANIFEST).get("stats") or {}


def gate_headline(cfg: PipelineConfig, stats: dict[str, Any]) -> str:
    """One line: which version this run made, blessed or not and why, which one is current."""
    version, current = stats.get("version"), stats.get("current")
    if stats.get("blessed") and current == version:
        return f"bundle {version} of {cfg.name} blessed and current: {stats.get('reason')}"
    return f"bundle {version} of {cfg.name} NOT promoted ({current or 'no version'} stays current): {stats.get('reason')}"


def bundle_gate(cfg: PipelineConfig, export_dir: Path) -> None:
    """The export's bundle, the gate's decision with every version (export/report.md and its plot), and the
    Prefect event `glm.bundle.blessed` or `glm.bundle.refused` an operator's automation can react to."""
    from prefect.events import emit_event

    stats = export_stats(export_dir)
    version = stats.get("version")
    if not version:  # an export made before versions existed
        export_bundle(cfg, export_dir / "bundle")
        return
    export_bundle(cfg, export_dir / "versions" / version)
    report = (export_dir / "report.md").read_text(encoding="utf-8")
    headline = gate_headline(cfg, stats)
    publish(
        "bundle-gate",
        create_markdown_artifact,
        inline_images(report, export_dir),
        key=artifact_key(cfg, "bundle-gate"),
        description=headline[:500],
    )
    blessed = bool(stats.get("blessed"))
    _run_logger().log(logging.INFO if blessed else logging.WARNING, "%s", headline)
    emit_event(
        event="glm.bundle.blessed" if blessed else "glm.bundle.refused",
        resource={
            "prefect.resource.id": f"glm.bundle.{cfg.name}.{version}",
            "prefect.resource.name": f"{cfg.name} {version}",
            "glm.run-dir": str(Path(cfg.run_dir).resolve()),
        },
        payload={k: stats.get(k) for k in ("version", "blessed", "reason", "current", "previous")},
    )


def bundle_markdown(cfg: PipelineConfig, bundle_dir: Path, report: dict[str, Any]) -> str:
    """Everything a user copies to use the bundle, as text: path, checksums, verification, code."""
    where = bundle_dir.resolve()
    config = json.loads((bundle_dir / "config.json").read_text(encoding="utf-8"))
    sums = (bundle_dir / "SHA256SUMS").read_text(encoding="utf-8").strip()
    status = {True: "passed", False: "**FAILED**", None: "not run"}[report.get("passed")]
    lines = [
        f"# ONNX bundle: {cfg.name}",
        "",
        f"Verification {status}. The bundle directory (copy the path: the UI cannot open local files):",
        "",
        "```text",
        str(where),
        "```",
        "",
        "## Files (SHA256SUMS)",
        "",
        "```text",
        sums,
        "```",
        "",
        f"A copy checks itself with `cd {shlex.quote(str(where))} && sha256sum -c SHA256SUMS`; "
        "`Bundle.load` checks the same sums.",
        "",
        "## Verification",
        "",
    ]
    lines += _verification_summary(report)
    classifier = config.get("classifier")
    python = [
        "from glm.runtime import Bundle  # or runtime.py copied into your app (numpy, onnxruntime, sentencepiece)",
        "",
        f"bundle = Bundle.load({str(where)!r})",
    ]
    shell = []
    if not classifier:  # a classifier refuses fill/generate: the run's generation bundle does that
        python.append('print(bundle.fill_blanks("The film was [MASK].").text)')
        shell.append(f'glm-pipeline infer {shlex.quote(str(where))} --fill "The film was [MASK]."')
    if classifier:
        python.append(f'print(bundle.classify("a wonderful film").label)  # labels: {", ".join(classifier["labels"])}')
        shell.append(f'glm-pipeline infer {shlex.quote(str(where))} --classify "a wonderful film"')
    lines += ["", "## Load it", "", "```python", *python, "```", "", "```bash", *shell, "```", ""]
    return "\n".join(lines)


def _verification_summary(report: dict[str, Any]) -> list[str]:
    if report.get("passed") is None:
        return [f"Not verified: {report.get('skipped', 'no report')}."]
    fp32 = report.get("fp32") or {}
    out = [
        f"- fp32 against PyTorch: max |logit diff| {fp32.get('logits_max_abs_diff', float('nan')):.3g}, "
        f"max |cache diff| {fp32.get('presents_max_abs_diff', float('nan')):.3g} (atol {report.get('atol')})"
    ]
    g = fp32.get("greedy") or {}
    if "near_tie_count" in g:
        out.append(
            f"- greedy decoding, teacher-forced over {g['steps']} steps: {g['divergent_count']} divergent, "
            f"{g['near_tie_count']} near-tie(s) accepted (reference margin <= {g['tie_tolerance']:.3g}), "
            f"token agreement {g['token_agreement']:.4f}"
        )
    elif g:
        out.append(f"- greedy decoding identical to glm.generate: {g.get('identical')}")
    c = fp32.get("classifier") or {}
    if "accuracy" in c:
        out.append(
            f"- classifier test accuracy {c['accuracy']:.4f} (PyTorch {c['accuracy_pytorch']:.4f}, {c['examples']} examples)"
        )
    elif "skipped" in c:
        out.append(f"- classifier accuracy not checked: {c['skipped']}")
    q = report.get("int8") or {}
    if "size_ratio" in q:
        change = (q.get("classifier") or {}).get("accuracy_change")
        out.append(
            f"- int8: {q['size_ratio']:.2f} of the fp32 size, max |logit diff| {q['logits_max_abs_diff']:.3g}"
            + (f", accuracy change {change:+.4f}" if change is not None else "")
        )
    for failure in report.get("failures") or []:
        out.append(f"- failure: {failure}")
    ties = g.get("near_ties") or []
    if ties:
        out += [
            "",
            "Near-ties (the two best logits within float noise; CPUs may break them either way):",
            "",
            "| prompt | step | reference token | bundle token | margin | logit diff |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {'0 (decoded alone)' if t.get('alone') else t['prompt']} | {t['step']} | {t['reference_token']} | "
            f"{t['bundle_token']} | {t['margin']:.3g} | {t['logit_diff']:.3g} |"
            for t in ties
        ]
        if g["near_tie_count"] > len(ties):
            out.append(f"\n({g['near_tie_count'] - len(ties)} more in verification.json's count, not listed)")
    return out


def _verification_rows(report: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for precision in ("fp32", "int8"):
        part = report.get(precision) or {}
        for k, v in part.items():
            if isinstance(v, (int, float)):
                yield {"model": precision, "check": k, "value": _rounded(v, 6)}
            elif isinstance(v, dict):
                for k2, v2 in v.items():
                    if isinstance(v2, (int, float, bool)):
                        yield {"model": precision, "check": f"{k}.{k2}", "value": _rounded(v2, 6)}
