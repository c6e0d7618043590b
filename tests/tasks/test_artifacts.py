"""Artifact helpers that do not need a Prefect server."""

from __future__ import annotations

import base64

from tasks.artifacts import inline_images


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

    from tasks import artifacts

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
    from glm.config import PipelineConfig
    from tasks import artifacts

    sent = []
    monkeypatch.setattr(artifacts, "create_progress_artifact", lambda value, **kw: sent.append(("create", value, kw["key"])) or "id-1")
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
