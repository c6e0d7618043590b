"""PipelineConfig validation across sections: orchestration.train_in_process."""

from __future__ import annotations

import pytest

from glm.config import ConfigError, load_config


def test_in_process_training_is_a_single_device_option():
    assert load_config("configs/tiny.yaml", ["orchestration.train_in_process=true"]).orchestration.train_in_process
    with pytest.raises(ConfigError, match="pretrain.nproc") as err:
        load_config("configs/tiny.yaml", ["orchestration.train_in_process=true", "pretrain.nproc=2",
                                           "pretrain.micro_batch_size=4"])
    assert "orchestration.train_in_process" in str(err.value)


def test_auto_trains_in_process_unless_a_subprocess_is_needed():
    assert load_config("configs/tiny.yaml").trains_in_process()
    assert not load_config("configs/tiny.yaml", ["orchestration.train_timeout_seconds=60"]).trains_in_process()
    assert not load_config("configs/tiny.yaml", ["pretrain.nproc=2", "pretrain.micro_batch_size=4"]).trains_in_process()
    assert not load_config("configs/tiny.yaml", ["orchestration.train_in_process=false"]).trains_in_process()
    assert load_config("configs/tiny.yaml", ["orchestration.train_in_process=true"]).trains_in_process()


def test_in_process_training_cannot_enforce_a_timeout():
    with pytest.raises(ConfigError, match="orchestration.train_timeout_seconds=60 cannot be enforced") as err:
        load_config("configs/tiny.yaml", ["orchestration.train_in_process=true", "orchestration.train_timeout_seconds=60"])
    message = str(err.value)
    assert "orchestration.train_in_process" in message and "unset orchestration.train_timeout_seconds" in message
    load_config("configs/tiny.yaml", ["orchestration.train_timeout_seconds=60"])  # the subprocess enforces it
