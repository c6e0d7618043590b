"""The verbalizer-free linear head: labels and their order, scoring at the [MASK], training, the
checkpoint round trip, and the ONNX bundle classifying exactly as PyTorch (verification, infer)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from glm_pipeline.flows.cli import main as cli_main
from safetensors.torch import load_file

from glm import export, runtime
from glm.core.config import ClozeTaskConfig, ExportConfig, FinetuneConfig, OptimConfig
from glm.core.model import GLM
from glm.core.special_tokens import SPECIAL
from glm.core.tokenizer import Tokenizer
from glm.finetuning import finetune as ft
from glm.finetuning import heads
from glm.finetuning.heads import load_finetuned
from glm.training.checkpoint import CheckpointError, load_model, read_meta, save_checkpoint
from tests.glm.factories import sentiment_examples, tiny_model
from tests.glm.test_export import make_tokenizer

LINEAR = ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={}, head="linear")
TEXTS = ["the movie was good", "boring plot , really bad", "a", "very very quite an acting story film good"]


@dataclasses.dataclass(frozen=True)
class Built:
    tok: Tokenizer
    tok_path: Path
    result: dict
    model: heads.GLMClassifier  # as fine-tuning left it
    bundle: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """One linear-head fine-tuning run on separable data and its verified bundle (int8 included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("linear")
        tok_path = root / "tokenizer.model"
        tok_path.write_bytes(make_tokenizer())
        tok = Tokenizer.load(tok_path)
        model = tiny_model(448, max_seq_len=64)
        cfg = FinetuneConfig(
            task=LINEAR, epochs=4, batch_size=16, patience=3, optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0)
        )
        result = ft.finetune_cloze(model, tok, cfg, root / "run", examples=sentiment_examples(240))
        trained, _ = load_finetuned(result["checkpoint"])
        bundle = export.export_bundle(root / "run" / "checkpoints", tok_path, root / "bundle", ExportConfig())
    finally:
        torch.set_num_threads(threads)
    return Built(tok, tok_path, result, trained, bundle)


# --------------------------------------------------------------------------- labels


def test_labels_come_from_the_config_then_the_verbalizers_then_the_data_sorted():
    assert heads.data_labels(["10", "2", "2", "1"]) == ["1", "2", "10"]  # numeric, not "10" < "2"
    assert heads.data_labels(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]
    data = ["b", "a"]
    assert heads.with_data_labels(LINEAR, data).labels == ["a", "b"]
    explicit = LINEAR.model_copy(update={"labels": ["b", "a"]})
    assert heads.head_labels(heads.with_data_labels(explicit, data)) == ["b", "a"]
    worded = ClozeTaskConfig(head="linear", verbalizers={"1": "great", "0": "terrible"})
    assert heads.head_labels(heads.with_data_labels(worded, data)) == ["1", "0"]  # the verbalizers' order, as today
    assert heads.with_data_labels(ClozeTaskConfig(verbalizers={"0": "x", "1": "y"}), data).labels is None  # verbalizer head


def test_bad_label_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="task.labels is for task.head: linear"):
        ClozeTaskConfig(labels=["0", "1"])
    with pytest.raises(ValueError, match="must list each label once"):
        ClozeTaskConfig(head="linear", labels=["0", "0"])
    with pytest.raises(ValueError, match="label set is unknown: set task.labels"):
        heads.head_labels(LINEAR)


def test_a_data_label_outside_the_configured_labels_names_task_labels(tmp_path):
    (tmp_path / "t.model").write_bytes(make_tokenizer())
    task = ft.ClozeTask(Tokenizer.load(tmp_path / "t.model"), LINEAR.model_copy(update={"labels": ["0", "1"]}), 64)
    assert task.label_ids(["1", "0"]) == [1, 0]
    with pytest.raises(ValueError, match=r"label '2' is not in the linear head's labels \['0', '1'\] \(task.labels"):
        task.label_ids(["0", "2"])


# --------------------------------------------------------------------------- scoring


def test_head_scores_are_the_head_on_the_masks_hidden_state_whatever_the_batching(tmp_path):
    (tmp_path / "t.model").write_bytes(make_tokenizer())
    tok = Tokenizer.load(tmp_path / "t.model")
    model = heads.attach_head(tiny_model(448, max_seq_len=64), 2, seed=0)
    with torch.no_grad():
        model.head.proj.weight.normal_(0, 1.0)  # a head that tells rows apart
    task = ft.ClozeTask(tok, LINEAR.model_copy(update={"labels": ["0", "1"]}), 64)
    assert task.part_b_len == 0 and task.answers == []
    items = [task.encode(t) for t in TEXTS]
    batched = ft.score_encoded(model, task, items, batch_size=len(items))  # right-padded together
    for e, row in zip(items, batched):
        a = len(e.part_a)
        as_long = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
        with torch.no_grad():
            h, _ = model.glm.hidden_states(as_long(e.part_a), as_long(list(range(a))), as_long([0] * a), torch.tensor([a]))
            want = model.head(h[0, e.mask_pos]).numpy()  # (L,)
        assert e.part_a[e.mask_pos] == SPECIAL.mask
        np.testing.assert_allclose(row, want, atol=1e-5)


def test_the_head_starts_like_the_models_own_linear_layers_and_is_seeded():
    a, b = heads.ClassificationHead(256, 3, seed=7), heads.ClassificationHead(256, 3, seed=7)
    assert torch.equal(a.proj.weight, b.proj.weight) and not a.proj.bias.any()
    assert 0.015 < float(a.proj.weight.detach().std()) < 0.025


# --------------------------------------------------------------------------- training and checkpoint


def test_linear_head_learns_and_its_checkpoint_restores_it(built):
    r = built.result
    assert r["head"] == "linear" and r["labels"] == ["0", "1"] and r["test"]["accuracy"] > 0.9 and r["best_val_accuracy"] > 0.9
    spec = read_meta(r["checkpoint"])["finetune"]
    assert spec["head"] == "linear" and spec["labels"] == ["0", "1"] and spec["answer_ids"] == []
    weights = load_file(str(Path(r["checkpoint"]) / "model.safetensors"))
    assert weights["head.weight"].shape == (2, built.model.cfg.hidden_size) and weights["head.bias"].shape == (2,)
    assert isinstance(built.model, heads.GLMClassifier)
    plain, _ = load_model(r["checkpoint"])  # the GLM alone, e.g. to start another fine-tuning
    assert isinstance(plain, GLM)
    predictions = [json.loads(line) for line in open(r["predictions_path"])]
    task = LINEAR.model_copy(update={"labels": ["0", "1"]})
    scores = ft.score_cloze(built.model, built.tok, [p["text"] for p in predictions], task)
    probs = torch.from_numpy(scores).softmax(-1).numpy()
    np.testing.assert_allclose(probs, [p["label_probs"] for p in predictions], atol=1e-5)


def test_head_weights_without_a_linear_spec_are_refused_by_load_finetuned(tmp_path):
    model = heads.attach_head(tiny_model(64, max_seq_len=32), 3, seed=0)
    path = save_checkpoint(tmp_path, 1, model.checkpoint_state(), {}, model_config=model.cfg)  # no "finetune" spec
    with pytest.raises(CheckpointError, match="holds head weights but meta.json names no linear head"):
        load_finetuned(path)
    assert isinstance(load_model(path)[0], GLM)
    spec = {"finetune": {"head": "linear"}}
    path = save_checkpoint(tmp_path, 2, model.checkpoint_state(), {}, model_config=model.cfg, extra_meta=spec)
    loaded, _ = load_finetuned(path)
    assert torch.equal(loaded.head.proj.weight, model.head.proj.weight)
    path = save_checkpoint(tmp_path, 3, model.glm.state_dict(), {}, model_config=model.cfg, extra_meta=spec)
    with pytest.raises(ValueError, match="the linear head's weights are \\[\\], not head.weight and head.bias"):
        load_finetuned(path)


def test_scoring_a_linear_task_without_a_head_is_a_clear_error(built):
    task = LINEAR.model_copy(update={"labels": ["0", "1"]})
    with pytest.raises(TypeError, match="without a head; load a fine-tuned checkpoint"):
        ft.score_cloze(built.model.glm, built.tok, ["good"], task)


# --------------------------------------------------------------------------- the bundle


def test_bundle_config_names_the_head_and_the_graph_outputs_label_logits(built):
    config = json.loads((built.bundle / "config.json").read_text())
    assert config["classifier"]["head"] == "linear" and config["classifier"]["labels"] == ["0", "1"]
    assert [o["name"] for o in config["io"]["outputs"]][-1] == runtime.LABEL_LOGITS
    b = runtime.Bundle.load(built.bundle, providers=["CPUExecutionProvider"], threads=1)
    assert b.has_head and [o.name for o in b.session.get_outputs()][-1] == runtime.LABEL_LOGITS


def test_bundle_classifies_as_pytorch_and_verification_checks_it(built):
    report = json.loads((built.bundle / "verification.json").read_text())
    assert report["passed"]
    fp32 = report["fp32"]
    assert fp32["label_logits_max_abs_diff"] <= report["atol"]
    assert fp32["classifier"]["accuracy"] == fp32["classifier"]["accuracy_pytorch"] > 0.9
    assert fp32["classifier"]["examples"] == built.result["sizes"]["test"]
    assert abs(report["int8"]["classifier"]["accuracy_change"]) <= export.INT8_ACCURACY_TOLERANCE + 1e-9

    b = runtime.Bundle.load(built.bundle, providers=["CPUExecutionProvider"], threads=1)
    texts = [*TEXTS, "good " * 200]  # a text the pattern must cut
    task = LINEAR.model_copy(update={"labels": ["0", "1"]})
    ref = ft.score_cloze(built.model, built.tok, texts, task)
    got = b.label_scores(texts)
    # the bound is the parity the verification measured on the same graph, not a guess
    np.testing.assert_allclose(got, ref, atol=max(10 * fp32["label_logits_max_abs_diff"], 1e-6))
    assert b.classify("the plot was good").label == "1" and b.classify("the plot was bad").label == "0"


def test_a_bundle_whose_head_disagrees_with_pytorch_fails_verification(built):
    model, _ = load_finetuned(built.result["checkpoint"])
    with torch.no_grad():
        model.head.proj.bias += torch.tensor([5.0, -5.0])  # a different classifier than the one exported
    with pytest.raises(export.ExportVerificationError, match="label logits"):
        export.verify_bundle(built.bundle, model=model)


def test_infer_classifies_with_a_linear_head_bundle(built, capsys):
    assert cli_main(["infer", str(built.bundle), "--classify", "a good film"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "label: 1" and {line.split(":")[0].strip() for line in out[1:]} == {"0", "1"}
