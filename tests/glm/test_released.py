"""Importing and exporting the released GLM layout (glm/released.py) on tiny random models."""

import json

import pytest
import torch
from safetensors.torch import save_file

from glm.core.config import ModelConfig
from glm.core.model import GLM
from glm.released import (
    ReleasedCheckpointError,
    export_released,
    import_released,
    local_to_reference,
    released_model_config,
)


def _tiny(vocab=96, max_seq_len=32) -> GLM:
    cfg = ModelConfig(
        vocab_size=vocab, n_layer=2, n_head=2, hidden_size=16, max_seq_len=max_seq_len, dropout=0.0, attention_dropout=0.0
    )
    return GLM(cfg).eval()


def _inputs(T=10, V=96):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, T), generator=g)
    pos = torch.arange(T).repeat(2, 1)
    blk = torch.zeros(2, T, dtype=torch.long)
    blk[:, 6:] = torch.arange(1, T - 5)
    sep = torch.tensor([6, 4])
    return ids, pos, blk, sep


def _ref_state(model: GLM) -> dict[str, torch.Tensor]:
    return {local_to_reference(k): v.clone() for k, v in model.state_dict().items()}


def test_export_then_import_gives_the_same_logits(tmp_path):
    model = _tiny()
    export_released(model, model.cfg, tmp_path / "out")
    cfg_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_json["max_sequence_length"] == 32 and cfg_json["block_position_encoding"] is True
    sd = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert sd["transformer.position_embeddings.weight"].shape == (33, 16)  # max_sequence_length + 1 rows
    assert sd["transformer.layers.1.attention.query_key_value.weight"].shape == (48, 16)  # fused [3h, h]
    assert "lm_head.weight" not in sd and len(sd) == len(model.state_dict())
    imported, cfg = import_released(tmp_path / "out")
    assert (cfg.n_layer, cfg.n_head, cfg.hidden_size, cfg.max_seq_len, cfg.vocab_size) == (2, 2, 16, 32, 96)
    args = _inputs()
    with torch.no_grad():
        assert torch.equal(model(*args), imported(*args))


def test_sharded_safetensors_and_prefixes_and_deepspeed(tmp_path):
    model = _tiny()
    ref = _ref_state(model)
    keys = sorted(ref)
    # two safetensors shards with an index, keys under HF's "glm." prefix
    d = tmp_path / "st"
    d.mkdir()
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, ks in halves.items():
        save_file({f"glm.{k}": ref[k].contiguous() for k in ks}, str(d / name))
        weight_map.update({f"glm.{k}": name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 2, "num_layers": 2, "hidden_size": 16}))
    imported, _ = import_released(d, dtype="bfloat16")
    assert imported.wte.weight.dtype == torch.bfloat16
    assert torch.equal(imported.wte.weight, model.wte.weight.to(torch.bfloat16))
    # DeepSpeed: weights under "module", an argparse.Namespace beside them, in a step folder named by `latest`
    import argparse

    ds = tmp_path / "ds"
    (ds / "250000").mkdir(parents=True)
    (ds / "latest_checkpointed_iteration.txt").write_text("250000")
    torch.save(
        {"module": ref, "args": argparse.Namespace(num_layers=2), "iteration": 250000},
        ds / "250000" / "mp_rank_00_model_states.pt",
    )
    imported, cfg = import_released(ds)
    assert cfg.n_head == 1  # no config.json: hidden_size / 64, at least 1
    # the head count changes nothing in the weights, only the attention; with config.json it is exact
    (ds / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    imported, cfg = import_released(ds)
    args = _inputs()
    with torch.no_grad():
        assert torch.equal(model(*args), imported(*args))


def test_unknown_keys_are_named_and_the_stray_head_is_allowed(tmp_path):
    model = _tiny()
    ref = _ref_state(model)
    ref["dense.weight"], ref["dense.bias"] = torch.zeros(16, 16), torch.zeros(16)  # glm-2b's stray head
    ref["out_proj.weight"] = torch.zeros(2, 16)
    torch.save(ref, tmp_path / "pytorch_model.bin")
    import_released(tmp_path)  # allowed: skipped by name
    ref["transformer.r_w_bias"] = torch.zeros(2, 8)
    torch.save(ref, tmp_path / "pytorch_model.bin")
    with pytest.raises(ReleasedCheckpointError, match="transformer.r_w_bias"):
        import_released(tmp_path)


def test_bad_inputs_get_one_clear_line(tmp_path):
    model = _tiny()
    ref = _ref_state(model)
    with pytest.raises(ReleasedCheckpointError, match="holds no GLM weights"):
        import_released(tmp_path)
    del ref["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    torch.save(ref, tmp_path / "pytorch_model.bin")
    with pytest.raises(ReleasedCheckpointError, match="lacks weights: blocks.1.mlp.proj.bias"):
        import_released(tmp_path)
    ref = _ref_state(model)
    torch.save(ref, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50048, "num_attention_heads": 2}))
    with pytest.raises(ReleasedCheckpointError, match="vocab_size=50048 but the weights say 96"):
        import_released(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    with pytest.raises(ReleasedCheckpointError, match=r"needs about .* GiB but 0.0 GiB is available"):
        import_released(tmp_path, available=1000)
    (tmp_path / "mp_rank_01_model_states.pt").write_bytes(b"")
    torch.save({"module": ref}, tmp_path / "mp_rank_00_model_states.pt")
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ReleasedCheckpointError, match="model-parallel"):
        import_released(tmp_path)


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path):
    import datetime

    torch.save({"module": {"x": datetime.date(2020, 1, 1)}}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ReleasedCheckpointError, match="weights-only"):
        import_released(tmp_path)


def test_released_config_reads_heads_and_checks_shapes(tmp_path):
    model = _tiny(max_seq_len=64)
    torch.save(_ref_state(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "max_sequence_length": 64, "num_layers": 2}))
    cfg = released_model_config(tmp_path)
    assert (cfg.n_head, cfg.max_seq_len, cfg.layernorm_eps, cfg.rotary_2d) == (4, 64, 1e-5, False)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    ref = _ref_state(_tiny())
    ref["transformer.layers.0.attention.query_key_value.weight"] = torch.zeros(40, 16)  # not [3h, h]
    torch.save(ref, tmp_path / "pytorch_model.bin")
    with pytest.raises(ReleasedCheckpointError, match=r"query_key_value.weight has shape \(40, 16\), expected \(48, 16\)"):
        import_released(tmp_path)
