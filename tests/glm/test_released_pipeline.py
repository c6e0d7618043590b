"""An imported released GLM on this pipeline's paths: its checkpoint, generation and cloze scoring
with the tokenizer's special ids, the ONNX bundle and its runtime, and the export back to the
released layout. Tiny random models from tests/fixtures/released (scripts/glm_reference_parity.py)."""

import json
from pathlib import Path

import pytest
import torch

from glm import runtime
from glm.core.config import ClozeTaskConfig, ExportConfig
from glm.core.released_tokenizer import ReleasedTokenizer
from glm.core.special_tokens import SPECIAL, special_of
from glm.core.tokenizer import load_tokenizer
from glm.evaluation.generate import GenerationConfig, fill_blanks
from glm.export import export_bundle
from glm.finetuning.finetune import ClozeTask, score_cloze
from glm.released import export_checkpoint, import_released, import_to_checkpoint
from glm.training.checkpoint import load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "released"


@pytest.fixture(scope="module", params=["glm-large", "glm-large-chinese"])
def imported(request, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(family)
    ckpt, tok_dir = import_to_checkpoint(
        FIXTURES / family / "model", out, n_head=4, tokenizer_dir=FIXTURES / family / "tokenizer"
    )
    return family, ckpt, tok_dir


def test_the_checkpoint_carries_the_tokenizer_ids(imported):
    family, ckpt, tok_dir = imported
    model, cfg = load_model(ckpt)
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, ReleasedTokenizer)
    assert special_of(model) == tok.special != SPECIAL
    rec = json.loads((FIXTURES / family / "tokens.json").read_text(encoding="utf-8"))
    assert cfg.special_tokens["eop"] == rec["commands"]["eop"] and cfg.special_tokens["gmask"] == rec["commands"]["gMASK"]
    # the same logits as importing directly (the pipeline checkpoint is lossless)
    ref = torch.load(FIXTURES / family / "logits.pt", weights_only=True)
    with torch.no_grad():
        got = model(ref["input_ids"], ref["position_ids"], ref["block_position_ids"], ref["sep"])
    assert (got - ref["logits"]).abs().max() < 1e-5


def test_generation_uses_the_models_sop_and_eop(imported):
    family, ckpt, tok_dir = imported
    model, _ = load_model(ckpt)
    tok = load_tokenizer(tok_dir)
    prompt = tok.encode("The film was [MASK] and the cast superb.")
    assert prompt.count(tok.mask_id) == 1
    res = fill_blanks(model, [prompt, tok.encode("Hello [gMASK]")], GenerationConfig(max_new_tokens=5))
    for r in res:
        assert len(r.spans) == 1 and len(r.spans[0]) <= 5
        assert tok.eop_id not in r.spans[0]  # <eop> (the tokenizer's id) ended or bounded the span
    # the cursor fed the tokenizer's <sop>: teacher forcing the spans reproduces the greedy choices
    from glm.evaluation.generate import infill_inputs

    x = infill_inputs(prompt, res[0].spans, tok.special)
    assert x["input_ids"][len(prompt)] == tok.sop_id


def test_cloze_scoring_puts_the_tokenizers_mask_in_part_a(imported):
    family, ckpt, tok_dir = imported
    model, _ = load_model(ckpt)
    tok = load_tokenizer(tok_dir)
    words = {"glm-large": ("great", "dull"), "glm-large-chinese": ("好", "天气")}[family]
    # multi-token: Part B runs <sop> + answer -> answer + <eop> with the tokenizer's ids
    task_cfg = ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={"pos": words[0], "neg": words[1]}, multi_token=True)
    task = ClozeTask(tok, task_cfg, 64)
    enc = task.encode("the cast was superb")
    assert enc.part_a[enc.mask_pos] == tok.mask_id
    scores = score_cloze(model, tok, ["the cast was superb", "dull"], task_cfg, max_seq_len=64)
    assert scores.shape == (2, 2) and torch.isfinite(torch.as_tensor(scores)).all()


def test_onnx_bundle_and_runtime_with_the_released_tokenizer(imported, tmp_path):
    family, ckpt, tok_dir = imported
    tok = load_tokenizer(tok_dir)
    bundle_dir = export_bundle(ckpt, tok_dir, tmp_path / "bundle", ExportConfig(quantize_int8=False))
    report = json.loads((bundle_dir / "verification.json").read_text())
    assert report["passed"] is True and report["fp32"]["logits_max_abs_diff"] < 1e-4
    b = runtime.Bundle.load(bundle_dir)
    assert isinstance(b.tokenizer, runtime.CommandTokenizer)
    assert b.special == tok.special.as_dict()
    for text in ("It was [MASK].", "a  [MASK]  b [sMASK] c", "今天天气很好[MASK]我们去公园。"):
        assert b.encode(text) == tok.encode(text)
        assert b.encode_text(text) == tok.encode(text, specials=False)
    spans = b.fill_ids([tok.encode("The film was [MASK] and the cast superb.")], max_new_tokens=4)
    assert len(spans[0]) == 1 and len(spans[0][0]) <= 4
    assert isinstance(b.decode(spans[0][0]), str)


def test_export_back_to_the_released_layout_round_trips(imported, tmp_path):
    family, ckpt, tok_dir = imported
    out = export_checkpoint(ckpt, tmp_path / "released", tokenizer=tok_dir)
    assert (out / "config.json").is_file() and (out / "pytorch_model.bin").is_file()
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert "transformer.block_position_embeddings.weight" in sd and "word_embeddings.weight" in sd
    again, cfg = import_released(out)
    model, _ = load_model(ckpt)
    ref = torch.load(FIXTURES / family / "logits.pt", weights_only=True)
    args = (ref["input_ids"], ref["position_ids"], ref["block_position_ids"], ref["sep"])
    with torch.no_grad():
        assert torch.equal(again(*args), model(*args))
    # the tokenizer files came along: the exported directory imports as a whole again
    assert ReleasedTokenizer(out).encode("It was [MASK].") == load_tokenizer(tok_dir).encode("It was [MASK].")


def test_export_released_command(imported, tmp_path):
    import subprocess
    import sys

    family, ckpt, tok_dir = imported
    cmd = [sys.executable, "-m", "glm_pipeline.flows.cli", "export-released", str(ckpt), str(tmp_path / "out")]
    done = subprocess.run([*cmd, "--tokenizer", str(tok_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "pytorch_model.bin").is_file() and (tmp_path / "out" / "config.json").is_file()
    bad = subprocess.run(
        [*cmd[:-2], str(tmp_path / "missing"), str(tmp_path / "o2")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "missing" in bad.stderr and "Traceback" not in bad.stderr


def test_bpe_verbalizers_and_pattern_words_keep_their_space():
    tok = ReleasedTokenizer(FIXTURES / "glm-2b" / "tokenizer")
    task = ClozeTask(
        tok, ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={"a": "great", "b": "the"}, multi_token=True), 64
    )
    assert task.answers[1] == tok.encode(" the", specials=False)  # "Ġthe", as after "was " in running text
    part_a = task.encode("The movie").part_a
    assert part_a == tok.encode("The movie It was", specials=False) + [tok.mask_id] + tok.encode(".", specials=False)


def test_seq2seq_rows_use_the_models_gmask_sop_eop(imported):
    from glm.finetuning.finetune import encode_seq2seq, seq2seq_batch, seq2seq_loss

    family, ckpt, tok_dir = imported
    model, _ = load_model(ckpt)
    tok = load_tokenizer(tok_dir)
    items = [encode_seq2seq(tok, "the film was long", "too long", 64), encode_seq2seq(tok, "a short one", "fine", 64)]
    batch = seq2seq_batch(items, "cpu", special_of(model))
    a = len(items[0].source)
    assert batch["input_ids"][0, a] == tok.gmask_id and batch["input_ids"][0, a + 1] == tok.sop_id
    assert batch["targets"][0, a + 1 + len(items[0].target)] == tok.eop_id
    metrics = seq2seq_loss(model, items)
    assert metrics["loss"] > 0 and metrics["tokens"] == sum(len(e.target) + 1 for e in items)
