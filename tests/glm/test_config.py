"""PipelineConfig validation: across sections, names that become paths, vocabularies, the config file itself."""

from __future__ import annotations

import pytest

from glm.core.config import ConfigError, load_config


def test_in_process_training_is_a_single_device_option():
    assert load_config("configs/tiny.yaml", ["orchestration.train_in_process=true"]).orchestration.train_in_process
    with pytest.raises(ConfigError, match="pretrain.nproc") as err:
        load_config(
            "configs/tiny.yaml", ["orchestration.train_in_process=true", "pretrain.nproc=2", "pretrain.micro_batch_size=4"]
        )
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


# --------------------------------------------------------------------------- values that become paths


@pytest.mark.parametrize("name", ["..", ".", "/abs/dir", "a/b", "", "a\\b", ".hidden", " padded", "x" * 101, "tab\there"])
def test_a_task_name_must_be_one_plain_folder_name(name):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [f"finetune.task.name={name!r}"])  # quoted: YAML keeps it a string
    message = str(err.value)
    assert "finetune.task.name" in message and "one plain" in message and "e.g. sentiment" in message


@pytest.mark.parametrize("name", ["sentiment", "rt-polarity_v2", "情感", "a.b"])
def test_ordinary_task_names_are_accepted(name):
    assert load_config("configs/tiny.yaml", [f"finetune.task.name={name}"]).finetune.task.name == name


def test_an_unsafe_task_name_is_refused_on_assignment_too():
    cfg = load_config("configs/tiny.yaml")
    with pytest.raises(ValueError, match="name"):
        cfg.finetune.task.name = ".."


def test_run_dir_cannot_be_empty():
    with pytest.raises(ConfigError, match="run_dir: is empty"):
        load_config("configs/tiny.yaml", ["run_dir="])


# --------------------------------------------------------------------------- checks that need only the config


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused():
    with pytest.raises(ConfigError, match=r"model.vocab_size=64 is smaller than tokenizer.vocab_size=600") as err:
        load_config("configs/tiny.yaml", ["model.vocab_size=64"])
    assert "raise model.vocab_size to at least 600 or unset it" in str(err.value)
    assert load_config("configs/tiny.yaml", ["model.vocab_size=640"]).model.vocab_size == 640
    # an existing tokenizer's size is only known from its file: checked when it is loaded, not here
    load_config("configs/tiny.yaml", ["model.vocab_size=64", "tokenizer.existing=/some/tokenizer.model"])


@pytest.mark.parametrize(
    "override, key", [("tokenizer.vocab_size=5", "tokenizer.vocab_size"), ("model.vocab_size=8", "model.vocab_size")]
)
def test_a_vocabulary_without_room_beyond_the_special_tokens_is_refused(override, key):
    from glm.core.special_tokens import NUM_SPECIAL

    assert int(override.split("=")[1]) <= NUM_SPECIAL
    with pytest.raises(ConfigError, match=f"{key}: Input should be greater than or equal to"):
        load_config("configs/tiny.yaml", [override])


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 9\); save it as UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    "text, problem", [("a: [unclosed\n", "is not valid YAML"), ("- just\n- a list\n", "mapping of sections")]
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_a_config_error(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.task.verbalizers={'0': good, '1': good}", "give two labels the same word"),
        ("finetune.task.pattern=no mask here {text}", "exactly one [MASK]"),
        ("finetune.task.pattern=It was [MASK].", "needs one {text}"),
        ("finetune.task.split=[0.5, 0.5, 0.5]", "summing to 1"),
        ("pretrain.steps=[1", "--set 'pretrain.steps=[1': the value is not valid YAML"),
    ],
)
def test_a_task_or_value_that_cannot_work_is_refused_before_any_work(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert message in str(err.value)


def test_run_dir_defaults_to_runs_name_and_cannot_be_or_be_under_a_file(tmp_path):
    assert load_config(None, ["name=nightly"]).run_dir == "runs/nightly"
    (tmp_path / "afile").write_text("x")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ConfigError, match="is a file, not a directory; choose another run_dir"):
            load_config("configs/tiny.yaml", [f"run_dir={run_dir}"])


def test_a_budget_is_positive_and_an_explicit_step_count_is_known_as_such():
    with pytest.raises(ConfigError, match="pretrain.budget_minutes: Input should be greater than 0"):
        load_config(None, ["pretrain.budget_minutes=0"])
    # the rule for a budget with steps: steps set explicitly (YAML or --set) caps it, a default does not
    assert "steps" in load_config("configs/tiny.yaml", ["pretrain.budget_minutes=5"]).pretrain.model_fields_set
    assert "steps" not in load_config(None, ["pretrain.budget_minutes=5"]).pretrain.model_fields_set
    assert "epochs" in load_config(None, ["finetune.epochs=2", "finetune.budget_minutes=5"]).finetune.model_fields_set
