"""Task options: which failures are retried, artifact keys, the per-run retry/caching configuration."""

from __future__ import annotations

import pytest
from glm_pipeline.tasks.options import artifact_key, configure, retry_transient, slug
from glm_pipeline.tasks.stages import ingest
from prefect.states import Failed

from glm.core.config import ConfigError, PipelineConfig
from glm.data.quality import ValidationFailed
from glm.stages import StageInputMissing


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


def test_configure_applies_the_runs_retry_policy_and_no_prefect_cache_or_result_store(tmp_path):
    from prefect.cache_policies import NO_CACHE

    cfg = PipelineConfig(run_dir=str(tmp_path / "run"))
    cfg.orchestration.retries = 3
    cfg.orchestration.retry_delay_seconds = 2.0
    task = configure(ingest, cfg)
    assert task.retries == 3 and task.retry_delay_seconds == [2.0, 4.0, 8.0]  # exponential backoff
    assert task.retry_condition_fn is retry_transient
    # the stage stamps are the one cache: nothing is pickled into (or loaded from) the run directory
    assert task.persist_result is False and task.cache_policy in (None, NO_CACHE) and task.cache_key_fn is None
    cfg.orchestration.retries = 0
    assert configure(ingest, cfg).retries == 0
