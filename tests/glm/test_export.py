"""ONNX export: one verified bundle per kind (language model, cloze classifier), built once and
shared with test_runtime.py; parity with PyTorch at a grid of shapes, greedy generation parity,
int8, classifier agreement with score_cloze, verification failures and atomic replacement."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from glm import export, runtime
from glm.core.config import (
    ClozeTaskConfig,
    ExportConfig,
    FinetuneConfig,
    OptimConfig,
    model_config,
)
from glm.core.model import GLM
from glm.core.special_tokens import SPECIAL
from glm.core.tokenizer import Tokenizer
from glm.evaluation.generate import GenerationConfig, fill_blanks
from glm.finetuning import finetune as ft
from glm.training.checkpoint import load_model, save_checkpoint
from tests.glm.factories import (
    SENTIMENT_WORDS,
    bilingual_tokenizer,
    lively_model,
    sentiment_examples,
    tiny_model,
    train_tiny_sentencepiece,
)

ZH = list("我们喜欢这部电影很好看不故事演员音乐")
SINGLE = ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={"0": "bad", "1": "good"})
M, S, G = SPECIAL.mask, SPECIAL.smask, SPECIAL.gmask


# --------------------------------------------------------------------------- shared artefacts


def make_tokenizer() -> bytes:
    """A ~400-piece sentencepiece model (256 byte pieces + English and Chinese words) with the GLM ids."""
    rng = random.Random(0)
    sentences = []
    for _ in range(300):
        sentences.append(" ".join(rng.choice(SENTIMENT_WORDS) for _ in range(rng.randint(4, 12))) + ".")
        sentences.append("".join(rng.choice(ZH) for _ in range(rng.randint(4, 12))) + "。")
    return train_tiny_sentencepiece(sentences, vocab_size=400)


@dataclasses.dataclass(frozen=True)
class Built:
    root: Path
    tokenizer: Path  # tokenizer.model
    lm_checkpoint: Path  # a "pretrained" tiny model
    lm_bundle: Path  # its bundle, with int8
    clf_checkpoint: Path  # a cloze classifier fine-tuned with glm.finetune
    clf_bundle: Path
    clf_test: list  # the fine-tuning run's test examples


_BUILT: dict[str, Built] = {}


def build_bundles(tmp_path_factory) -> Built:
    """Export both bundles once per test session (the dynamo exporter takes seconds per export)."""
    if "built" in _BUILT:
        return _BUILT["built"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("bundles")
        tok_path = root / "tokenizer.model"
        tok_path.write_bytes(make_tokenizer())
        tok = Tokenizer.load(tok_path)
        vocab = 448  # the tokenizer's 400 pieces rounded up to a multiple of 64, as the pipeline does

        lm = lively_model(vocab)
        lm_ckpt = save_checkpoint(root / "lm", 100, lm.state_dict(), {}, model_config=lm.cfg)
        lm_bundle = export.export_bundle(lm_ckpt, tok_path, root / "lm-bundle", ExportConfig())

        clf = tiny_model(vocab, max_seq_len=64)
        cfg = FinetuneConfig(
            task=SINGLE, epochs=4, batch_size=16, patience=3, optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0)
        )
        examples = sentiment_examples(240)
        result = ft.finetune_cloze(clf, tok, cfg, root / "clf", examples=examples)
        test = [json.loads(line) for line in open(result["predictions_path"])]
        # verify_data defaults to the run's test_predictions.jsonl: the real fine-tune -> export path
        clf_bundle = export.export_bundle(root / "clf" / "checkpoints", tok_path, root / "clf-bundle", ExportConfig())
    finally:
        torch.set_num_threads(threads)
    _BUILT["built"] = Built(root, tok_path, lm_ckpt, lm_bundle, Path(result["checkpoint"]), clf_bundle, test)
    return _BUILT["built"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return build_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def lm(built) -> GLM:
    return load_model(built.lm_checkpoint)[0]


@pytest.fixture(scope="module")
def lm_bundle(built) -> runtime.Bundle:
    return runtime.Bundle.load(built.lm_bundle, providers=["CPUExecutionProvider"], threads=1)


# --------------------------------------------------------------------------- the bundle


def test_bundle_holds_the_listed_files_with_sha256sum_checksums(built):
    for bundle, graphs in ((built.lm_bundle, []), (built.clf_bundle, ["model.cls.int8.onnx", "model.cls.onnx"])):
        names = sorted(p.name for p in bundle.iterdir())
        assert names == [
            "SHA256SUMS",
            "config.json",
            *graphs,
            "model.int8.onnx",
            "model.onnx",
            "tokenizer.model",
            "verification.json",
        ]
        lines = (bundle / "SHA256SUMS").read_text().splitlines()
        assert [line.split("  ")[1] for line in lines] == [n for n in names if n != "SHA256SUMS"]
        for line in lines:
            digest, name = line.split("  ")
            assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    # nothing left behind by the temporary directory or the quantizer
    assert not [p for p in built.root.iterdir() if p.name.startswith(".")]


def test_config_records_version_dimensions_special_ids_and_io(built, lm):
    config = json.loads((built.lm_bundle / "config.json").read_text())
    assert config["format"] == runtime.FORMAT and config["format_version"] == export.FORMAT_VERSION == 2
    m = config["model"]
    assert (m["n_layer"], m["n_head"], m["head_dim"], m["vocab_size"], m["max_seq_len"]) == (2, 2, 16, 448, 128)
    assert config["special_tokens"] == SPECIAL.as_dict()
    inputs, outputs = export.io_names(2)
    assert [x["name"] for x in config["io"]["inputs"]] == inputs
    assert [x["name"] for x in config["io"]["outputs"]] == outputs
    assert inputs[:5] == ["input_ids", "position_ids", "block_position_ids", "sep", "key_start"]
    assert inputs[5:8] == ["past_length", "past_key_values.0.key", "past_key_values.0.value"] and outputs[1] == "present.0.key"
    assert config["classifier"] is None and config["files"]["model_int8"] == "model.int8.onnx"
    assert Path(config["source"]["checkpoint"]) == built.lm_checkpoint.resolve()


def test_graph_is_one_file_with_dynamic_batch_sequence_and_past_axes(built):
    model = onnx.load(str(built.lm_bundle / "model.onnx"))
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    graph_io = [*model.graph.input, *model.graph.output]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph_io}
    assert dims["input_ids"] == dims["block_position_ids"] == ["batch", "seq"]
    assert dims["sep"] == dims["key_start"] == dims["past_length"] == ["batch"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "capacity", 16]
    assert dims["logits"] == ["batch", "seq", 448]
    assert dims["present.1.key"] == ["batch", 2, "capacity", 16]  # the same buffer, written in place


@pytest.mark.parametrize("rotary", [False, True])
def test_the_in_place_cache_computes_what_the_concatenated_cache_does(rotary):
    """KVBuffer's eager form (the exported op's semantics) against the model's own (k, v) concatenation:
    a left-padded prompt, then two decoding steps, in buffers with spare capacity."""
    model = lively_model(448, rotary_2d=rotary)
    wrapper = export.CachedGLM(model)
    B, L, C = 2, 5, 8
    ids = torch.tensor([[0, 0, 20, 21, 4], [30, 31, 32, 4, 33]])
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    sep, key_start = torch.full((B,), L), torch.tensor([2, 0])
    shape = (B, model.cfg.n_head, C, model.cfg.head_dim)
    buffers = [torch.zeros(shape) for _ in range(2 * model.cfg.n_layer)]
    inputs = [(ids, pos, torch.zeros_like(pos))]
    inputs += [(torch.tensor([[t], [t]]), torch.tensor([[2], [3]]), torch.full((B, 1), n)) for n, t in ((1, 7), (2, 9))]
    past, length = None, 0
    with torch.no_grad():
        for x in inputs:
            ref, past = model(*x, sep, key_start=key_start, past_key_values=past, use_cache=True)
            got, *buffers = wrapper(*x, sep, key_start, torch.full((B,), length), *buffers)
            length += x[0].shape[1]
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    for buf, ref in zip(buffers, [t for kv in past for t in kv]):
        torch.testing.assert_close(buf[:, :, :length], ref, rtol=0, atol=1e-6)
        assert not buf[:, :, length:].any()  # written where past_length said, nowhere else


@pytest.mark.parametrize("graph", ["model.onnx", "model.int8.onnx"])
def test_each_layer_attends_with_one_fused_op_that_owns_its_cache(built, tmp_path, graph):
    """The generation graph's attention is onnxruntime's GroupQueryAttention (glm.export.KVBuffer), in
    the graph onnxruntime actually runs (optimized; int8 too): per layer one node reads the layer's
    cache buffers and writes its presents, and nothing else touches the cache: no Concat copying it
    every step (format 1), no transpose of the keys (SDPA's ONNX form); Shape (the capacity) reads no data."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(built.lm_bundle / graph), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    for i in range(2):
        for kv in ("key", "value"):
            readers = [n.op_type for n in nodes if f"past_key_values.{i}.{kv}" in n.input and n.op_type != "Shape"]
            writers = [n.op_type for n in nodes if f"present.{i}.{kv}" in n.output]
            assert readers == writers == ["GroupQueryAttention"], (i, kv, readers, writers)  # Shape reads no data
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2 and not [n for n in nodes if n.op_type in ("Concat", "Softmax", "FusedMatMul")]


def test_verification_report_covers_the_shape_grid_and_passed(built):
    report = json.loads((built.lm_bundle / "verification.json").read_text())
    assert report["passed"] is True and report["failures"] == []
    fp32 = report["fp32"]
    assert fp32["logits_max_abs_diff"] <= report["atol"] == 1e-4 and fp32["presents_max_abs_diff"] <= 1e-4
    shapes = [(r["batch"], r["seq"], r["past"]) for r in fp32["parity"]]
    assert {b for b, _, _ in shapes} == {1, 2, 3, 4}
    assert min(t for _, t, _ in shapes) == 1 and max(t for _, t, _ in shapes) == 128
    assert min(p for _, _, p in shapes) == 0 and max(p for _, _, p in shapes) == 128
    g = fp32["greedy"]
    assert g["passed"] and g["method"] == "teacher-forced" and g["generated_tokens"] > 50 and g["steps"] > 50
    assert g["divergent_count"] == 0 and g["near_tie_count"] == len(g["near_ties"])  # ties are allowed, never required
    assert g["logits_max_abs_diff"] <= 1e-4 and export.TIE_FLOOR <= g["tie_tolerance"] <= export.TIE_FACTOR * 1e-4
    int8 = report["int8"]
    assert int8["size_ratio"] < 0.5 and "logits_max_abs_diff" in int8 and 0.0 <= int8["greedy"]["token_agreement"] <= 1.0


# --------------------------------------------------------------------------- parity


def _random_case(cfg, B, T, P, seed):
    g = torch.Generator().manual_seed(seed)
    ri = lambda hi, shape: torch.randint(0, hi, shape, generator=g)  # noqa: E731
    return dict(
        ids=ri(cfg.vocab_size, (B, T)),
        pos=ri(cfg.max_seq_len + 1, (B, T)),
        blk=ri(cfg.max_seq_len + 1, (B, T)),
        sep=ri(P + T + 1, (B,)),
        key_start=ri(P + 1, (B,)),
        past=[torch.randn(B, cfg.n_head, P, cfg.head_dim, generator=g) for _ in range(2 * cfg.n_layer)],
    )


@pytest.mark.parametrize("B,T,P", [(1, 1, 0), (4, 128, 0), (1, 1, 128), (2, 7, 33), (3, 1, 2), (4, 128, 128)])
def test_logits_and_presents_match_pytorch_at_batch_seq_past(lm, lm_bundle, B, T, P):
    x = _random_case(lm.cfg, B, T, P, seed=B * 1000 + T * 10 + P)
    pairs = list(zip(x["past"][0::2], x["past"][1::2])) if P else None
    with torch.no_grad():
        ref_logits, ref_presents = lm(
            x["ids"], x["pos"], x["blk"], x["sep"], past_key_values=pairs, key_start=x["key_start"], use_cache=True
        )
    logits, presents = lm_bundle.run(
        *(x[k].numpy() for k in ("ids", "pos", "blk", "sep", "key_start")), past=[t.numpy() for t in x["past"]]
    )
    assert logits.shape == (B, T, 448) and len(presents) == 4 and presents[0].shape == (B, 2, P + T, 16)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=0)
    for got, ref in zip(presents, [t for kv in ref_presents for t in kv]):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0)


def test_greedy_generation_follows_glm_generate_step_by_step(built, lm, lm_bundle):
    tok = Tokenizer.load(built.tokenizer)
    prompts = [
        tok.encode("the movie was [MASK] and the acting [sMASK] 我们很[MASK]。"),
        [40, 41, M, 42],
        tok.encode("a story") + [G],
        list(range(100, 150)) + [S] + list(range(200, 230)),
    ]
    untied = 0
    for max_new in (1, 6, 20):
        check = export.check_greedy(lm, lm_bundle, prompts, max_new, cap=1e-4)
        assert check["passed"] and check["logits_max_abs_diff"] <= 1e-4, check
        ref = [r.spans for r in fill_blanks(lm, prompts, GenerationConfig(max_new_tokens=max_new))]
        got = lm_bundle.fill_ids(prompts, max_new_tokens=max_new)
        assert all(len(span) <= max_new for spans in got for span in spans)
        # where every teacher-forced step agreed, the bundle's own decoding is glm.generate's, token for token
        tied = {t["prompt"] for t in check["near_ties"]}
        for i in set(range(len(prompts))) - tied:
            assert got[i] == ref[i], (max_new, i)
            untied += 1
    assert untied >= 6  # near-ties are rare: most prompts are compared whole
    assert len({t for spans in got for s in spans for t in s}) > 5  # the model really varies its choices


def test_a_greedy_step_within_float_noise_of_a_tie_is_accepted_and_reported():
    V, eop = 10, SPECIAL.eop
    ref = np.zeros((3, V), np.float32)  # (S, V) three steps
    ref[0, 5], ref[0, 6] = 1.0, 1.0 - 1e-6  # a near-tie: 5 wins by 1e-6
    ref[1, 7], ref[1, 8] = 1.0, 0.5  # a clear choice
    ref[2, eop] = 1.0
    got = ref.copy()
    got[0, 6] += 2e-6  # float noise of 1e-6 flips the tie
    tol = export.tie_tolerance(float(np.abs(ref - got).max()))
    steps = export.compare_greedy_steps(ref, got, [5, 7, eop], [False] * 3, tol)
    assert steps == [
        {
            "step": 0,
            "reference_token": 5,
            "bundle_token": 6,
            "margin": pytest.approx(1e-6, rel=0.1),
            "bundle_margin": pytest.approx(1e-6, rel=0.1),
            "logit_diff": pytest.approx(2e-6, rel=0.1),
            "near_tie": True,
        }
    ]
    got[1, 8] = 1.1  # the same size of error cannot flip a clear choice: a real divergence
    steps = export.compare_greedy_steps(ref, got, [5, 7, eop], [False] * 3, export.tie_tolerance(0.6, cap=1e-4))
    assert [(d["step"], d["near_tie"]) for d in steps] == [(0, True), (1, False)]
    assert export.compare_greedy_steps(ref, got, [5, 7, eop], [False, True, False], tol)[1:] == []  # forced steps are skipped
    assert export.tie_tolerance(0.0) == export.TIE_FLOOR and export.tie_tolerance(1.0, cap=1e-4) == pytest.approx(4e-4)


def _edit_onnx(bundle: Path, name: str, edit) -> None:
    """Change one weight of a bundle's model.onnx in place (and its checksum): a bundle that is genuinely different."""
    from onnx import numpy_helper

    graph = onnx.load(str(bundle / "model.onnx"))
    (init,) = [t for t in graph.graph.initializer if t.name == name]
    init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), name))
    onnx.save(graph, str(bundle / "model.onnx"))
    export.write_sha256sums(bundle)


def _most_chosen_token(model, tok) -> int:
    """The token glm.generate chooses most often on the verification prompts."""
    prompts = export._generation_prompts(model, tok)
    chosen = [t for r in fill_blanks(model, prompts, GenerationConfig(max_new_tokens=16)) for s in r.spans for t in s]
    return max(set(chosen), key=chosen.count)


def test_near_ties_in_a_real_bundle_pass_verification_and_are_listed(built, lm, tmp_path):
    """Token b made a twin of token a: the reference puts b just below a, the bundle just above, so
    wherever a is the greedy choice the two runs flip by a margin far below the tie tolerance."""
    a, b, delta = _most_chosen_token(lm, Tokenizer.load(built.tokenizer)), 447, 1e-5  # b: a row past the tokenizer
    reference = copy.deepcopy(lm)
    with torch.no_grad():
        reference.wte.weight[b] = reference.wte.weight[a] * (1 - delta)
    bundle = tmp_path / "bundle"
    shutil.copytree(built.lm_bundle, bundle)

    def twin(w):
        w[b] = w[a] * (1 + delta)
        return w

    _edit_onnx(bundle, "model.wte.weight", twin)
    report = export.verify_bundle(bundle, model=reference)  # does not raise
    g = report["fp32"]["greedy"]
    assert report["passed"] and g["passed"] and not g["identical"] and g["divergent_count"] == 0
    assert g["near_tie_count"] >= 1 and len(g["near_ties"]) == min(g["near_tie_count"], export.MAX_LISTED_STEPS)
    for t in g["near_ties"]:
        assert (t["reference_token"], t["bundle_token"]) == (a, b) and 0 < t["margin"] <= g["tie_tolerance"]
    assert g["tie_tolerance"] == export.tie_tolerance(max(report["fp32"]["logits_max_abs_diff"], g["logits_max_abs_diff"]), 1e-4)


def test_a_bundle_with_a_broken_layer_fails_greedy_verification(built, lm, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(built.lm_bundle, bundle)
    rng = np.random.default_rng(0)
    _edit_onnx(bundle, "model.blocks.0.mlp.fc.bias", lambda w: w + rng.normal(0, 0.5, w.shape).astype(w.dtype))
    with pytest.raises(
        export.ExportVerificationError, match="greedy generations differ from glm.generate on prompts .* beyond near-ties"
    ) as info:
        export.verify_bundle(bundle, model=lm)
    g = info.value.report["fp32"]["greedy"]
    assert not g["passed"] and g["divergent_count"] >= 1 and g["mismatched_prompts"]
    assert all(d["margin"] > g["tie_tolerance"] for d in g["divergent_steps"])


def test_int8_bundle_loads_decodes_and_reports_its_size_and_accuracy_change(built):
    int8 = runtime.Bundle.load(built.lm_bundle, int8=True, threads=1)
    assert int8.model_path.name == "model.int8.onnx"
    assert (built.lm_bundle / "model.int8.onnx").stat().st_size < 0.5 * (built.lm_bundle / "model.onnx").stat().st_size
    result = int8.fill_blanks("the plot was [MASK].", max_new_tokens=4)
    assert len(result.spans) == 1 and len(result.span_ids[0]) <= 4
    c = json.loads((built.clf_bundle / "verification.json").read_text())["int8"]["classifier"]
    assert abs(c["accuracy_change"]) <= 0.01 and c["examples"] == len(built.clf_test)


# --------------------------------------------------------------------------- classifier


def test_classifier_bundle_carries_the_cloze_spec_and_its_accuracy_equals_pytorch(built):
    config = json.loads((built.clf_bundle / "config.json").read_text())
    c = config["classifier"]
    assert c["pattern"] == "{text} It was [MASK]." and c["verbalizers"] == {"0": "bad", "1": "good"} and c["labels"] == ["0", "1"]
    report = json.loads((built.clf_bundle / "verification.json").read_text())["fp32"]["classifier"]
    assert report["examples"] == len(built.clf_test) > 10
    assert report["accuracy"] == report["accuracy_pytorch"] > 0.9


def test_classifier_scores_equal_score_cloze_including_odd_and_long_texts(built):
    model, _ = load_model(built.clf_checkpoint)
    tok = Tokenizer.load(built.tokenizer)
    bundle = runtime.Bundle.load(built.clf_bundle, threads=1)
    texts = [e["text"] for e in built.clf_test[:6]] + [
        "good 🎉 naïve 𠀋 café",  # characters the tokenizer never saw: byte fallback
        "the plot [MASK] was <sop> bad",  # literal special-token text stays text
        " ".join(["very good"] * 80),  # longer than the model: cut from its end, like fine-tuning
    ]
    ref = ft.score_cloze(model, tok, texts, SINGLE)
    assert bundle.select_session is not None  # scored by the classification graph
    got = bundle.label_scores(texts)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # batches of 2, built shortest first (the texts are not in length order): rows come back in input order
    assert [len(t) for t in texts] != sorted(len(t) for t in texts)
    np.testing.assert_allclose(bundle.label_scores(texts, batch_size=2), ref, atol=1e-4)
    assert [bundle.classify(t).label for t in texts] == [["0", "1"][i] for i in ref.argmax(1)]


def test_classifier_bundle_scores_with_a_graph_that_projects_only_the_selected_positions_and_rows(built):
    config = json.loads((built.clf_bundle / "config.json").read_text())
    c, files = config["classifier"], config["files"]
    assert files["classifier"] == "model.cls.onnx" and files["classifier_int8"] == "model.cls.int8.onnx"
    assert c["rows"] == sorted(a[0] for a in c["answer_ids"])  # single-token: only the verbalizers' rows
    graph = onnx.load(built.clf_bundle / files["classifier"], load_external_data=False).graph
    assert [i.name for i in graph.input][:6] == [*runtime.INPUTS, "select_positions"]
    out = graph.output[0]
    assert out.name == "select_scores" and out.type.tensor_type.shape.dim[2].dim_value == len(c["rows"])
    report = json.loads((built.clf_bundle / "verification.json").read_text())
    assert all("select_scores_max_abs_diff" in r for r in report["fp32"]["parity"])  # the whole grid of shapes
    assert report["fp32"]["select_scores_max_abs_diff"] <= report["atol"]
    assert "select_scores_max_abs_diff" in report["int8"]
    bundle = runtime.Bundle.load(built.clf_bundle, threads=1)
    ids = np.array([[20, 21, 22, 23]])  # (1, 4)
    zeros = np.zeros_like(ids)
    scores, presents = bundle.run_select(ids, np.arange(4)[None], zeros, np.array([4]), np.array([[3, 0, 1]]))
    assert scores.shape == (1, 3, len(c["rows"])) and presents[0].shape[2] == 4
    logits, _ = bundle.run(ids, np.arange(4)[None], zeros, np.array([4]))  # (1, 4, V) the generation graph
    logp = logits[0, [3, 0, 1]] - np.log(np.exp(logits[0, [3, 0, 1]].astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(scores[0], logp[:, c["rows"]], atol=1e-4)


def _with_classification_graph(built, tmp_path, model, tok, task_cfg) -> runtime.Bundle:
    """The clf bundle's generation graph with `task_cfg`'s spec and its own exported classification graph."""
    import onnxruntime as ort

    spec = {"kind": "cloze", **ft.ClozeTask(tok, task_cfg, 64).spec()}
    base = runtime.Bundle.load(built.clf_bundle, threads=1)
    config = {**base.config, "classifier": export._classifier_config(spec, tok, 64)}
    path = export.export_classifier_onnx(model, tmp_path / "cls.onnx", config["classifier"]["rows"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runtime.check_graph(session, config, path, select=True)
    return runtime.Bundle(base.path, config, base.session, base.tokenizer, select_session=session)


@pytest.mark.parametrize("score_eop", [False, True])
def test_multi_token_scoring_through_the_classification_graph_matches_pytorch(built, tmp_path, score_eop):
    model, _ = load_model(built.clf_checkpoint)
    tok = Tokenizer.load(built.tokenizer)
    multi = ClozeTaskConfig(
        pattern="{text} It was [MASK].",
        verbalizers={"0": "not good at all", "1": "good", "2": "very bad"},
        multi_token=True,
        length_normalise=True,
        score_eop=score_eop,
    )
    bundle = _with_classification_graph(built, tmp_path, model, tok, multi)
    rows = bundle.classifier["rows"]
    assert (SPECIAL.eop in rows) == score_eop and set(rows) == {t for a in bundle.classifier["answer_ids"] for t in a} | (
        {SPECIAL.eop} if score_eop else set()
    )
    texts = ["the movie was good", "bad", "a very very long story film plot really quite an acting " * 3]
    np.testing.assert_allclose(bundle.label_scores(texts), ft.score_cloze(model, tok, texts, multi), atol=1e-4)


@pytest.mark.parametrize("score_eop", [False, True])
def test_multi_token_cloze_scoring_matches_pytorch(built, score_eop):
    """The runtime's shared-prefix multi-token scoring (left padding, key_start, cache reuse) on the same graph."""
    model, _ = load_model(built.clf_checkpoint)
    tok = Tokenizer.load(built.tokenizer)
    multi = ClozeTaskConfig(
        pattern="{text} It was [MASK].",
        verbalizers={"0": "not good at all", "1": "good", "2": "very bad"},
        multi_token=True,
        length_normalise=True,
        score_eop=score_eop,
    )
    spec = {"kind": "cloze", **ft.ClozeTask(tok, multi, 64).spec()}
    base = runtime.Bundle.load(built.clf_bundle, threads=1)
    config = {**base.config, "classifier": export._classifier_config(spec, tok, 64)}
    bundle = runtime.Bundle(base.path, config, base.session, base.tokenizer)
    texts = ["the movie was good", "bad", "a very very long story film plot really quite an acting " * 3]
    np.testing.assert_allclose(bundle.label_scores(texts), ft.score_cloze(model, tok, texts, multi), atol=1e-4)


def test_specs_from_before_score_eop_keep_scoring_eop():
    """Checkpoints and bundles made when multi-token scores always included <eop> must not change meaning."""
    old = {
        "pattern": "{text} It was [MASK].",
        "verbalizers": {"0": "bad", "1": "very good"},
        "labels": ["0", "1"],
        "multi_token": True,
    }
    assert export._cloze_task_config(old).score_eop is True
    assert export._cloze_task_config({**old, "score_eop": False}).score_eop is False


def test_cjk_verbalizer_ids_agree_between_pytorch_and_the_bundle(built):
    """A glued Chinese verbalizer is one token in fine-tuning; the bundle stores and scores the same id."""
    import sentencepiece as spm

    model, _ = load_model(built.clf_checkpoint)
    zh = bilingual_tokenizer()
    assert zh.vocab_size <= model.cfg.vocab_size  # the bilingual ids index the same (random-for-them) rows
    task_cfg = ClozeTaskConfig(pattern="{text}这部电影很[MASK]。", verbalizers={"0": "差", "1": "好"})
    spec = {"kind": "cloze", **ft.ClozeTask(zh, task_cfg, 64).spec()}
    classifier = export._classifier_config(spec, zh, 64)
    assert classifier["answer_ids"] == spec["answer_ids"] == [[zh.piece_to_id("差")], [zh.piece_to_id("好")]]
    base = runtime.Bundle.load(built.clf_bundle, threads=1)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(zh.model_proto)
    literal = {str(i): ids for i, ids in zh.literal_ids().items()}
    config = {**base.config, "classifier": classifier, "tokenizer": {**base.config["tokenizer"], "literal_ids": literal}}
    bundle = runtime.Bundle(base.path, config, base.session, sp)
    texts = ["故事很好", "情节很差，音乐也差。", "the movie was good"]
    np.testing.assert_allclose(bundle.label_scores(texts), ft.score_cloze(model, zh, texts, task_cfg), atol=1e-4)


def test_text_pair_patterns_and_their_truncation_match_pytorch(built):
    model, _ = load_model(built.clf_checkpoint)
    tok = Tokenizer.load(built.tokenizer)
    pair = ClozeTaskConfig(
        pattern="{text} ? [MASK] , {text_pair}", verbalizers={"0": "bad", "1": "good"}, text_pair_field="premise"
    )
    spec = {"kind": "cloze", **ft.ClozeTask(tok, pair, 64).spec()}
    base = runtime.Bundle.load(built.clf_bundle, threads=1)
    bundle = runtime.Bundle(
        base.path, {**base.config, "classifier": export._classifier_config(spec, tok, 64)}, base.session, base.tokenizer
    )
    texts, pairs = ["the movie was good", "a " * 50 + "film"], ["bad acting", "story " * 70]  # the second pair must be cut
    np.testing.assert_allclose(
        bundle.label_scores(texts, pairs), ft.score_cloze(model, tok, texts, pair, text_pairs=pairs), atol=1e-4
    )


def test_labels_keep_the_configs_order_from_fine_tuning_to_the_runtime(built, tmp_path, monkeypatch):
    """Verbalizer keys in reverse alphabetical order survive config -> meta.json -> config.json -> Bundle (issue 12.9)."""
    tok = Tokenizer.load(built.tokenizer)
    task = ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={"positive": "good", "negative": "bad"})
    examples = [ft.LabelledExample(e.text, "positive" if e.label == "1" else "negative") for e in sentiment_examples(240)]
    cfg = FinetuneConfig(
        task=task,
        epochs=4,
        batch_size=16,
        patience=3,
        from_scratch_baseline=False,
        optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0),
    )
    result = ft.finetune_cloze(tiny_model(448, max_seq_len=64), tok, cfg, tmp_path / "ft", examples=examples)
    meta = json.loads((Path(result["checkpoint"]) / "meta.json").read_text())
    assert meta["finetune"]["labels"] == list(meta["finetune"]["verbalizers"]) == ["positive", "negative"]

    out = export.export_bundle(
        tmp_path / "ft" / "checkpoints", built.tokenizer, tmp_path / "bundle", ExportConfig(quantize_int8=False)
    )
    classifier = json.loads((out / "config.json").read_text())["classifier"]
    assert classifier["labels"] == list(classifier["verbalizers"]) == ["positive", "negative"]
    report = json.loads((out / "verification.json").read_text())["fp32"]["classifier"]
    assert report["accuracy"] == report["accuracy_pytorch"] > 0.9

    bundle = runtime.Bundle.load(out, threads=1)
    assert bundle.labels == ["positive", "negative"]
    model, _ = load_model(result["checkpoint"])
    texts = ["the movie was good", "a bad film", "the acting was really very good", "bad plot"]
    ref = ft.score_cloze(model, tok, texts, task)  # (N, L) columns in the config's label order
    got = bundle.classify_batch(texts)
    assert [c.label for c in got] == [list(task.verbalizers)[i] for i in ref.argmax(1)]
    assert [c.label for c in got] == ["positive", "negative", "positive", "negative"]
    assert list(got[0].probabilities) == ["positive", "negative"] and got[0].probabilities["positive"] > 0.5

    # files written before the fix sorted their keys: the labels list still fixes the order
    step = Path(result["checkpoint"])
    (step / "meta.json").write_text(json.dumps(meta, sort_keys=True))
    assert list(json.loads((step / "meta.json").read_text())["finetune"]["verbalizers"]) == ["negative", "positive"]
    monkeypatch.setattr(export, "export_onnx", _reuse_graph(out / "model.onnx"))
    again = export.export_bundle(step, built.tokenizer, tmp_path / "again", ExportConfig(quantize_int8=False))
    assert runtime.Bundle.load(again).classify("the movie was good").label == "positive"
    old = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(old, sort_keys=True))
    export.write_sha256sums(out)
    assert export.verify_bundle(out, step)["fp32"]["classifier"]["accuracy"] > 0.9


# --------------------------------------------------------------------------- failures


def test_verification_failure_raises_with_the_numbers(built):
    other = lively_model(448, seed=1)
    with pytest.raises(export.ExportVerificationError, match=r"differ from PyTorch by up to [0-9.e+-]+ \(logits\)") as info:
        export.verify_bundle(built.lm_bundle, model=other)
    assert info.value.report["passed"] is False and info.value.report["fp32"]["logits_max_abs_diff"] > 1e-4


def _reuse_graph(source: Path):
    """An export_onnx stand-in that copies an existing graph: tests export_bundle's plumbing in milliseconds."""

    def fake_export(model, path, opset=18):
        shutil.copy(source, path)
        return Path(path)

    return fake_export


def test_failed_export_leaves_the_existing_bundle_and_no_temporary_files(built, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "export_onnx", _reuse_graph(built.lm_bundle / "model.onnx"))
    other = lively_model(448, seed=2)
    ckpt = save_checkpoint(tmp_path / "other", 1, other.state_dict(), {}, model_config=other.cfg)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("previous bundle")
    with pytest.raises(export.ExportVerificationError):
        export.export_bundle(ckpt, built.tokenizer, out, ExportConfig(quantize_int8=False))
    assert (out / "keep.txt").read_text() == "previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "other"]


def test_export_replaces_an_existing_bundle(built, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "export_onnx", _reuse_graph(built.lm_bundle / "model.onnx"))
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export.export_bundle(built.lm_checkpoint, built.tokenizer, out, ExportConfig(quantize_int8=False))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["SHA256SUMS", "config.json", "model.onnx", "tokenizer.model", "verification.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert json.loads((out / "config.json").read_text())["files"]["model_int8"] is None
    with pytest.raises(runtime.BundleError, match="no int8 model"):
        runtime.Bundle.load(out, int8=True)


def test_bad_export_inputs_are_clear_errors(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.export_bundle(tmp_path / "nowhere", built.tokenizer, tmp_path / "b")
    small = GLM(model_config("tiny", vocab_size=64))
    ckpt = save_checkpoint(tmp_path / "small", 1, small.state_dict(), {}, model_config=small.cfg)
    with pytest.raises(ValueError, match="400 pieces but the model's vocabulary is 64"):
        export.export_bundle(ckpt, built.tokenizer, tmp_path / "b")
    with pytest.raises(ValueError, match=r"classifier spec lacks \['labels'"):
        export.export_bundle(
            built.lm_checkpoint,
            built.tokenizer,
            tmp_path / "b",
            classifier={"pattern": "{text} It was [MASK].", "verbalizers": {"0": "bad"}},
        )
    with pytest.raises(ValueError, match="labels"):
        export.verify_bundle(built.clf_bundle, verify_data=[("good film", "positive")])
    assert not (tmp_path / "b").exists()


def test_rotary_model_exports_and_verifies(built, tmp_path):
    model = lively_model(448, rotary_2d=True)
    ckpt = save_checkpoint(tmp_path / "rot", 1, model.state_dict(), {}, model_config=model.cfg)
    out = export.export_bundle(ckpt, built.tokenizer, tmp_path / "bundle", ExportConfig(quantize_int8=False))
    report = json.loads((out / "verification.json").read_text())
    # this random model's greedy decode holds an exact top-2 tie (issue 12.1): which side wins depends on the CPU
    assert report["passed"] and report["fp32"]["logits_max_abs_diff"] <= 1e-4 and report["fp32"]["greedy"]["passed"]


def test_verify_bundle_alone_finds_the_checkpoint_and_the_test_split(built):
    report = export.verify_bundle(built.clf_bundle)  # checkpoint from config.json, data from test_predictions.jsonl
    assert report["passed"] and report["fp32"]["classifier"]["examples"] == len(built.clf_test)
    data = [(e["text"], e["label"]) for e in built.clf_test[:5]]
    assert export.verify_bundle(built.clf_bundle, verify_data=data)["fp32"]["classifier"]["examples"] == 5


def test_models_past_the_protobuf_limit_get_external_data_files(built, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 1000)  # pretend the tiny model is over 2 GB
    out = export.export_bundle(built.lm_checkpoint, built.tokenizer, tmp_path / "bundle", ExportConfig())
    names = sorted(p.name for p in out.iterdir())
    assert {"model.onnx.data", "model.int8.onnx.data"} <= set(names)
    assert {line.split("  ")[1] for line in (out / "SHA256SUMS").read_text().splitlines()} == set(names) - {"SHA256SUMS"}
    assert json.loads((out / "verification.json").read_text())["passed"]
    assert runtime.Bundle.load(out, int8=True).fill_ids([[20, M]], max_new_tokens=2)


def test_default_verify_data_reads_texts_with_unicode_line_separators(tmp_path):
    # json.dumps(ensure_ascii=False) keeps U+2028 / U+0085 raw; str.splitlines() would cut records there
    from glm.export import _default_verify_data

    run = tmp_path / "pretrained"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    rows = [{"text": "odd\u2028line\x85break", "text_pair": None, "label": "1"}, {"text": "plain", "label": 0}]
    (run / "test_predictions.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    assert _default_verify_data(run / "checkpoints" / "step-000001") == [
        ("odd\u2028line\x85break", None, "1"),
        ("plain", None, "0"),
    ]
