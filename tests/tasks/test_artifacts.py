"""Artifact helpers that do not need a Prefect server."""

from __future__ import annotations

import base64
import re
import shlex

import pytest
from glm_pipeline.tasks.artifacts import inline_images


def test_plots_are_inlined_as_data_uris_so_the_ui_can_render_them(tmp_path):
    png = b"\x89PNG\r\n\x1a\nnot really a picture"
    (tmp_path / "loss.png").write_bytes(png)
    md = "# Report\n\n![pretraining loss](loss.png)\n\n![missing plot](gone.png)\n\n[a link](loss.png)\n"
    out = inline_images(md, tmp_path)
    assert f"![pretraining loss](data:image/png;base64,{base64.b64encode(png).decode()})" in out
    assert "![missing plot](gone.png)" in out  # left alone: nothing to embed
    assert "[a link](loss.png)" in out  # only images are embedded


def test_artifacts_are_sent_in_order_in_the_callers_context_and_failures_only_warn(caplog):
    import contextvars

    from glm_pipeline.tasks import artifacts

    run = contextvars.ContextVar("run", default=None)
    received = []

    def send(name):
        if name == "broken":
            raise ConnectionError("the API went away")
        received.append((name, run.get()))

    run.set("task-run-1")  # the context a task run would have
    for name in ("first", "broken", "second"):
        artifacts.publish(name, send, name)
    with caplog.at_level("WARNING"):
        assert artifacts.wait_sent() == ["broken"]
    assert received == [("first", "task-run-1"), ("second", "task-run-1")]
    assert "artifact broken was not sent" in caplog.text and "the API went away" in caplog.text
    assert artifacts.wait_sent() == []  # nothing left


def test_training_progress_sends_at_most_one_update_per_interval_and_always_the_last(monkeypatch):
    from glm_pipeline.tasks import artifacts

    from glm.core.config import PipelineConfig

    sent = []
    monkeypatch.setattr(
        artifacts, "create_progress_artifact", lambda value, **kw: sent.append(("create", value, kw["key"])) or "id-1"
    )
    monkeypatch.setattr(artifacts, "update_progress_artifact", lambda artifact_id, value: sent.append((artifact_id, value)))
    progress = artifacts.TrainingProgress(PipelineConfig(name="Demo"), total=20, done=0, min_interval=3600)
    for step in range(1, 20):
        progress.update(step)  # within the interval: not sent
    progress.update(20, final=True)
    progress.update(20, final=True)  # unchanged: not sent again
    artifacts.wait_sent()
    assert sent == [("create", 0.0, "demo-pretrain-progress"), ("id-1", 100.0)]

    sent.clear()
    every = artifacts.TrainingProgress(PipelineConfig(name="Demo"), total=4, done=1, min_interval=0)
    for step in (2, 2, 3):
        every.update(step)
    artifacts.wait_sent()
    assert sent == [("create", 25.0, "demo-pretrain-progress"), ("id-1", 50.0), ("id-1", 75.0)]


def test_fine_tuning_progress_is_one_artifact_per_run(monkeypatch):
    from glm.config import PipelineConfig
    from glm_pipeline.tasks import artifacts
    from glm_pipeline.tasks.finetuning import FinetuneProgress

    sent = []
    ids = iter(["id-1", "id-2"])
    monkeypatch.setattr(
        artifacts, "create_progress_artifact", lambda value, **kw: sent.append(("create", value, kw["key"])) or next(ids)
    )
    monkeypatch.setattr(artifacts, "update_progress_artifact", lambda artifact_id, value: sent.append((artifact_id, value)))
    progress = FinetuneProgress(PipelineConfig(name="Demo"))
    for run in ("pretrained", "from_scratch"):
        for step in range(0, 9):
            progress(run, step, 8)  # within the poll interval: only the first and the last are sent
    artifacts.wait_sent()
    assert sent == [
        ("create", 0.0, "demo-finetune-progress-pretrained"),
        ("id-1", 100.0),
        ("create", 0.0, "demo-finetune-progress-from-scratch"),
        ("id-2", 100.0),
    ]


# --------------------------------------------------------------------------- the ONNX bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tests.glm.test_export import build_bundles

    return build_bundles(tmp_path_factory)


def _blocks(markdown: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)\n```", markdown, flags=re.S)


def test_bundle_markdown_gives_the_path_checksums_verification_and_code_that_runs(built, capsys):
    import json

    from glm_pipeline.flows.cli import main as cli_main
    from glm_pipeline.tasks.artifacts import bundle_markdown

    from glm.core.config import PipelineConfig

    bundle = built.clf_bundle
    report = json.loads((bundle / "verification.json").read_text())
    md = bundle_markdown(PipelineConfig(name="Demo"), bundle, report)
    assert "file://" not in md and "Verification passed" in md
    assert str(bundle.resolve()) in _blocks(md, "text")[0]
    assert _blocks(md, "text")[1] == (bundle / "SHA256SUMS").read_text().strip()
    assert "near-tie(s) accepted" in md and "classifier test accuracy" in md and "int8:" in md

    (python,) = _blocks(md, "python")
    exec(compile(python, "artifact", "exec"), {})  # copied from the UI, it runs as is
    printed = capsys.readouterr().out.splitlines()
    assert printed in (["0"], ["1"])  # a classifier classifies; it refuses to fill (the generation bundle does)
    assert "fill_blanks" not in python and "--fill" not in md
    commands = _blocks(md, "bash")[0].splitlines()
    assert [c.split()[:3] for c in commands] == [["glm-pipeline", "infer", str(bundle.resolve())]]
    for command in commands:
        assert cli_main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.splitlines()[-3].startswith("label: ")


def test_bundle_markdown_lists_near_ties_and_failures(built):
    import json

    from glm_pipeline.tasks.artifacts import bundle_markdown

    from glm.core.config import PipelineConfig

    report = json.loads((built.lm_bundle / "verification.json").read_text())
    tie = {
        "prompt": 6,
        "alone": True,
        "step": 6,
        "reference_token": 182,
        "bundle_token": 218,
        "margin": 0.0,
        "bundle_margin": 2.4e-7,
        "logit_diff": 3e-7,
        "near_tie": True,
    }
    report["fp32"]["greedy"].update(near_ties=[tie], near_tie_count=3, identical=False)
    report.update(passed=False, failures=["fp32 outputs differ from PyTorch by up to 0.02 (logits)"])
    md = bundle_markdown(PipelineConfig(name="Demo"), built.lm_bundle, report)
    assert "Verification **FAILED**" in md and "- failure: fp32 outputs differ from PyTorch by up to 0.02" in md
    assert "3 near-tie(s) accepted" in md and "| 0 (decoded alone) | 6 | 182 | 218 | 0 | 3e-07 |" in md
    assert "(2 more in verification.json's count, not listed)" in md
    assert "--classify" not in md  # not a classifier
    skipped = bundle_markdown(PipelineConfig(name="Demo"), built.lm_bundle, {"passed": None, "skipped": "export.verify is false"})
    assert "Verification not run" in skipped and "Not verified: export.verify is false." in skipped


def test_the_bundle_is_a_markdown_artifact_and_a_link_only_for_an_http_url(built, monkeypatch):
    from glm_pipeline.tasks import artifacts

    from glm.core.config import PipelineConfig

    sent = []
    for name in ("create_markdown_artifact", "create_link_artifact", "create_table_artifact"):
        monkeypatch.setattr(artifacts, name, lambda *a, _name=name, **kw: sent.append((_name, a[0], kw["key"])))
    cfg = PipelineConfig(name="Demo")
    for url in (None, built.lm_bundle.resolve().as_uri(), "https://models.example.org/demo/bundle"):
        artifacts.export_bundle(cfg, built.lm_bundle, url=url)
    artifacts.wait_sent()
    kinds = [(name, key) for name, _, key in sent]
    markdown_and_table = [("create_markdown_artifact", "demo-onnx-bundle"), ("create_table_artifact", "demo-export-verification")]
    assert kinds == markdown_and_table * 2 + [
        markdown_and_table[0],
        ("create_link_artifact", "demo-onnx-bundle-link"),
        markdown_and_table[1],
    ]
    assert sent[-2][1] == "https://models.example.org/demo/bundle"


def test_generation_metrics_become_one_table_row_each(tmp_path, monkeypatch):
    import json

    from glm_pipeline.tasks import artifacts

    from glm.core.config import PipelineConfig

    metrics = {
        "pretrain": {
            "infill_bleu": {
                "docs": 3,
                "ratios": {"0.1": {"bleu": 80.123, "bleu_unfilled": 75.0}, "0.5": {"bleu": 30.0, "bleu_unfilled": 28.5}},
            },
            "lastword": {
                "words": 9,
                "blank": {"accuracy": 0.25, "perplexity": 40.5},
                "left_to_right": {"accuracy": 0.5, "perplexity": 20.0},
            },
        },
        "seq2seq": {"pretrained": {"generation": {"bleu": 12.5, "rouge1": 40.0, "rouge2": 20.0, "rougeL": 35.0}}},
    }
    rows = artifacts.generation_rows(metrics)
    assert rows[0] == {"evaluation": "infilling, 10% blanked", "metric": "BLEU", "value": 80.12, "floor": 75.0}
    assert {"evaluation": "last word (left to right)", "metric": "accuracy", "value": 0.5, "floor": None} in rows
    assert [r["metric"] for r in rows if r["evaluation"] == "seq2seq test (pretrained)"] == ["bleu", "rouge1", "rouge2", "rougeL"]
    assert len(rows) == 2 + 4 + 4 and artifacts.generation_rows({"pretrain": {}}) == []
    sent = []
    for name in ("create_markdown_artifact", "create_table_artifact"):
        monkeypatch.setattr(artifacts, name, lambda *a, _name=name, **kw: sent.append((_name, kw["key"])))
    (tmp_path / "report.md").write_text("# Report\n")
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    artifacts.evaluation_report(PipelineConfig(name="Demo"), tmp_path)
    artifacts.wait_sent()
    assert sent == [("create_markdown_artifact", "demo-evaluation-report"), ("create_table_artifact", "demo-generation-metrics")]


def test_finetune_warnings_reach_the_table_description_and_a_markdown_artifact(monkeypatch, tmp_path):
    from glm_pipeline.tasks import artifacts

    from glm.core.config import PipelineConfig
    from glm.core.shards import write_manifest
    from glm.evaluation import evaluate as ev
    from glm.evaluation import report as rep

    sent = []
    monkeypatch.setattr(artifacts, "publish", lambda what, send, data, **kw: sent.append((what, data, kw["description"])))
    labels = ["a", "b"]
    truth = [0, 0, 0, 1, 1, 1]
    res = {
        "test": ev.classification_metrics(truth, [0] * 6, labels),
        "majority": ev.majority_baseline([0, 0, 1], truth, labels),
        "linear_baseline": ev.classification_metrics(truth, truth, labels),
        "steps": 4,
        "best_step": 0,
        "kept_untrained": True,
    }
    results = {"pretrained": res}
    write_manifest(tmp_path, "finetune", [], stats={"warnings": rep.finetune_warnings(results)})
    artifacts.finetune_summary(PipelineConfig(name="t"), results, tmp_path)
    (_, rows, description), (what, markdown, _) = sent
    assert [r["model"] for r in rows] == ["pretrained", "majority class", "TF-IDF + logistic regression"]
    assert rows[2]["accuracy"] == 1.0 and set(rows[2]) == set(rows[0])
    assert description.startswith("WARNING: 3 problem(s)") and what == "finetune-warnings"
    assert "the kept model is step 0" in markdown and "below the linear baseline (100.0%" in markdown
    assert "Try: lower finetune.optim.lr" in markdown
