"""Task options: which failures are retried, artifact keys, the per-run retry/caching configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.states import Failed

from glm.config import ConfigError, PipelineConfig
from glm.quality import ValidationFailed
from glm.stages import StageInputMissing
from tasks.options import artifact_key, configure, retry_transient, slug
from tasks.stages import ingest


@pytest.mark.parametrize(
    "error, retried",
    [
        (ConnectionError("share unreachable"), True),
        (RuntimeError("training process died"), True),
        (OSError("disk hiccup"), True),
        (ValidationFailed("documents gate failed", {}), False),
        (ConfigError("pretrain.steps: bad"), False),
        (StageInputMissing("run the data stage first"), False),
        (ValueError("tokenizer.vocab_size too small"), False),
    ],
)
def test_only_transient_failures_are_retried(error, retried):
    assert retry_transient(ingest, None, Failed(data=error)) is retried


def test_artifact_keys_are_lowercase_dashes():
    assert slug("My Run_v2.1") == "my-run-v2-1"
    assert slug("___") == "run"
    assert artifact_key(PipelineConfig(name="Nightly EN"), "corpus-statistics") == "nightly-en-corpus-statistics"


def test_configure_applies_the_runs_retry_policy_and_result_storage(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"))
    cfg.orchestration.retries = 3
    cfg.orchestration.retry_delay_seconds = 2.0
    task = configure(ingest, cfg, refresh_cache=True)
    assert task.retries == 3 and task.retry_delay_seconds == [2.0, 4.0, 8.0]  # exponential backoff
    assert task.persist_result is True and task.refresh_cache is True
    assert Path(task.result_storage) == (tmp_path / "run" / ".prefect-results").resolve()
    assert task.cache_key_fn is ingest.cache_key_fn and task.retry_condition_fn is retry_transient
    cfg.orchestration.retries = 0
    assert configure(ingest, cfg).retries == 0
