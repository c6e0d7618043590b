import logging
import random

import numpy as np
import pytest
import torch

from glm.core.config import ModelConfig, OptimConfig
from glm.core.model import GLM, configure_optimizer
from glm.training.checkpoint import (
    LATEST,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_trainer_state,
    read_meta,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    to_plain,
    verify_checkpoint,
)

CFG = ModelConfig(vocab_size=64, max_seq_len=32)


def _trained_state():
    """A tiny model and an AdamW that has taken one step (so its state holds tensors)."""
    model = GLM(CFG)
    opt = configure_optimizer(model, OptimConfig(), "cpu")
    ids = torch.randint(9, 64, (2, 8))  # (B, T)
    pos = torch.arange(8).expand(2, 8)  # (B, T)
    logits = model(ids, pos, torch.zeros_like(pos), torch.tensor([4, 4]))  # (B, T, V)
    logits.float().pow(2).mean().backward()
    opt.step()
    from glm.distributed import full_model_state, full_optimizer_state

    return model, full_model_state(model), full_optimizer_state(model, opt)


def _save(root, step, keep=3, model_state=None):
    model_state = model_state if model_state is not None else GLM(CFG).state_dict()
    state = {"step": step, "ranks": [{"rng": rng_state(), "loader": {"pos": step}}]}
    return save_checkpoint(root, step, model_state, state, model_config=CFG, keep=keep)


def test_round_trip_weights_and_weights_only_state(tmp_path):
    model, model_state, optim_state = _trained_state()
    trainer_state = {
        "step": 7,
        "optimizer": optim_state,
        "ranks": [{"rng": rng_state(), "loader": {"shard": np.int64(3), "order": np.arange(5), "name": "a"}}],
        "elapsed": 1.5,
    }
    path = save_checkpoint(tmp_path, 7, model_state, trainer_state, model_config=CFG)
    assert path.name == "step-000007" and verify_checkpoint(path) == []
    assert (tmp_path / LATEST).read_text().strip() == "step-000007"

    loaded, cfg = load_model(path)
    assert cfg == CFG and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    state = load_trainer_state(path)  # weights_only=True inside: would raise on any pickled object
    assert state["step"] == 7 and state["elapsed"] == 1.5
    assert state["ranks"][0]["loader"]["shard"] == 3
    assert torch.equal(state["ranks"][0]["loader"]["order"], torch.arange(5))
    saved_avg = state["optimizer"]["state"]["blocks.0.attn.qkv.weight"]["exp_avg"]
    assert torch.equal(saved_avg, optim_state["state"]["blocks.0.attn.qkv.weight"]["exp_avg"])
    torch.load(path / STATE_FILE, weights_only=True)


def test_to_plain_rejects_objects_with_their_key():
    assert to_plain({"a": (np.float32(1.5), [np.int64(2)])}) == {"a": (1.5, [2])}
    with pytest.raises(TypeError, match=r"state\['loader'\]\['gen'\].*Generator"):
        to_plain({"loader": {"gen": np.random.default_rng(0)}})


def test_rng_state_restores_every_stream():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(to_plain(saved))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_keep_last_k_and_drop_abandoned_newer(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).name == "step-000005"
    # resumed from step 4, saving step 5 again replaces it; a later step-7 (abandoned timeline) goes
    _save(tmp_path, 7, keep=5)
    _save(tmp_path, 5, keep=5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).name == "step-000005"


def test_corrupt_checkpoint_falls_back_with_warning(tmp_path, caplog):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    weights = tmp_path / "step-000003" / MODEL_FILE
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # same size, different content: only the checksum can tell
    weights.write_bytes(bytes(blob))
    (tmp_path / "step-000002" / META_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="glm.checkpoint"):
        assert latest_checkpoint(tmp_path).name == "step-000001"
    assert "step-000003" in caplog.text and "sha256" in caplog.text and "step-000002" in caplog.text
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_checkpoint(tmp_path / "step-000003")
    assert resolve_checkpoint(tmp_path).name == "step-000001"


def test_incomplete_writes_are_invisible(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / ".tmp-step-000002-123").mkdir()  # a writer that crashed before the rename
    (tmp_path / "step-000003").mkdir()  # a directory without meta.json
    assert latest_checkpoint(tmp_path).name == "step-000001"
    (tmp_path / LATEST).unlink()  # crashed between the rename and the pointer: highest valid step wins
    assert latest_checkpoint(tmp_path).name == "step-000001"
    _save(tmp_path, 4)
    assert not (tmp_path / ".tmp-step-000002-123").exists()


def test_run_directory_and_missing_paths(tmp_path):
    _save(tmp_path / "run" / "checkpoints", 2)
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"  # a run dir resolves to its checkpoints/
    assert latest_checkpoint(tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        load_model(tmp_path / "empty")


def test_meta_json_keeps_the_key_order_it_was_given(tmp_path):
    """A cloze spec's verbalizers are in label order; meta.json must not sort them (issue 12.9)."""
    spec = {"kind": "cloze", "labels": ["positive", "negative"], "verbalizers": {"positive": "good", "negative": "bad"}}
    path = save_checkpoint(tmp_path, 1, GLM(CFG).state_dict(), {}, model_config=CFG, extra_meta={"finetune": spec})
    meta = read_meta(path)
    assert list(meta["finetune"]["verbalizers"]) == ["positive", "negative"] and meta["finetune"] == spec
    assert verify_checkpoint(path) == []
