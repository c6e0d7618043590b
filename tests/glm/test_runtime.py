"""The bundle runtime: vendorable alone (numpy + onnxruntime + sentencepiece), clear errors for bad
bundles and inputs, provider choice from the real session, io-bound decoding, sampling, classify, CLI."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from glm_pipeline.flows.cli import main as cli_main

from glm import export, runtime
from glm.core.tokenizer import Tokenizer
from glm.export import write_sha256sums
from glm.finetuning import finetune as ft
from glm.training.checkpoint import load_model
from tests.glm.test_export import SINGLE, build_bundles

RUNTIME_PY = Path(runtime.__file__)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def lm(built) -> runtime.Bundle:
    return runtime.Bundle.load(built.lm_bundle, threads=1)


@pytest.fixture(scope="module")
def clf(built) -> runtime.Bundle:
    return runtime.Bundle.load(built.clf_bundle, threads=1)


# --------------------------------------------------------------------------- vendorable alone


def test_runtime_imports_only_numpy_onnxruntime_sentencepiece_and_the_standard_library():
    tree = ast.parse(RUNTIME_PY.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports tie runtime.py to its package"
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    # optional, imported where needed: `tokenizers` for bundles of released WordPiece/BPE GLMs, `pyarrow`
    # for Parquet files and `tqdm` for the progress bar of the batch command
    optional = {"tokenizers", "pyarrow", "tqdm"}
    assert third_party - optional == {"numpy", "onnxruntime", "sentencepiece"}
    top_level = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_level |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not top_level & optional


def test_a_copy_of_runtime_py_alone_runs_a_bundle_without_torch_or_glm(built, tmp_path):
    shutil.copy(RUNTIME_PY, tmp_path / "glm_runtime.py")
    script = (
        "import sys, glm_runtime as r\n"
        f"b = r.Bundle.load({str(built.clf_bundle)!r})\n"
        "print(b.classify('the movie was good').label, b.fill_blanks('the plot [MASK].', max_new_tokens=3, allow_classifier=True).text != '')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'glm')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["1 True", "[]"]


# --------------------------------------------------------------------------- loading


def _copy(built, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(built.lm_bundle, dst)
    return dst


def _edit_config(bundle: Path, **changes) -> None:
    config = json.loads((bundle / "config.json").read_text())
    for key, value in changes.items():
        node = config
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    (bundle / "config.json").write_text(json.dumps(config))
    write_sha256sums(bundle)  # only the intended problem remains


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda b: _edit_config(b, format_version=runtime.FORMAT_VERSION + 1),
            f"format version {runtime.FORMAT_VERSION + 1}, newer than this runtime understands \\({runtime.FORMAT_VERSION}, "
            "glm-runtime .*pip install -U glm-runtime",
        ),
        (lambda b: (b / "tokenizer.model").unlink(), "missing tokenizer.model"),
        (lambda b: (b / "model.onnx").open("ab").write(b"\0"), "model.onnx does not match its checksum"),
        (lambda b: (b / "SHA256SUMS").unlink(), "has no SHA256SUMS"),
        (lambda b: (b / "config.json").unlink(), "missing config.json"),
        (lambda b: _edit_config(b, format="something-else"), "not a GLM bundle config"),
        (lambda b: (b / "SHA256SUMS").write_text("not a checksum line\n"), "line 1 is not 'SHA256  NAME'"),
    ],
    ids=["newer-version", "missing-file", "checksum-mismatch", "no-checksums", "no-config", "not-a-bundle", "bad-sums"],
)
def test_bad_bundles_are_clear_errors(built, tmp_path, damage, message):
    bundle = _copy(built, tmp_path)
    damage(bundle)
    with pytest.raises(runtime.BundleError, match=message):
        runtime.Bundle.load(bundle)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classifier__head": "softmax"}, "'classifier.head' is 'softmax', not one of \\['verbalizer', 'linear'\\]"),
        ({"classifier__head": "linear"}, "a linear-head classifier needs string 'classifier.labels'"),
        ({"classifier__head": "linear", "classifier__answer_ids": []}, "missing \\['label_logits'\\]"),
    ],
    ids=["unknown-head", "linear-with-verbalizers", "linear-without-its-output"],
)
def test_a_classifier_heads_config_must_match_its_graph(built, tmp_path, changes, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(built.clf_bundle, bundle)
    _edit_config(bundle, **changes)
    with pytest.raises(runtime.BundleError, match=message):
        runtime.Bundle.load(bundle)


def _list_in_sums(bundle: Path, name: str) -> None:
    """Add `name` (relative to the bundle, wherever it points) to SHA256SUMS with its true checksum."""
    digest = runtime.sha256_file(bundle / name)
    (bundle / "SHA256SUMS").write_text((bundle / "SHA256SUMS").read_text() + f"{digest}  {name}\n")


def _outside_model(b: Path) -> None:
    (b.parent / "outside").mkdir()
    shutil.copy(b / "model.onnx", b.parent / "outside" / "evil.onnx")
    _edit_config(b, files__model="../outside/evil.onnx")
    _list_in_sums(b, "../outside/evil.onnx")  # checksums cannot vouch for a file outside the bundle


def _absolute_tokenizer(b: Path) -> None:
    shutil.copy(b / "tokenizer.model", b.parent / "evil.model")
    _edit_config(b, files__tokenizer=str(b.parent / "evil.model"))
    _list_in_sums(b, str(b.parent / "evil.model"))


def _symlinked_model(b: Path) -> None:
    shutil.move(b / "model.onnx", b.parent / "elsewhere.onnx")
    (b / "model.onnx").symlink_to(b.parent / "elsewhere.onnx")  # same bytes: the checksum still matches


def _without(*keys: str):
    def damage(b: Path) -> None:
        config = json.loads((b / "config.json").read_text())
        node = config
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
        (b / "config.json").write_text(json.dumps(config))
        write_sha256sums(b)

    return damage


def _json_list(b: Path) -> None:
    (b / "config.json").write_text("[]")
    write_sha256sums(b)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_outside_model, r"field 'files.model' is '../outside/evil.onnx', outside the bundle"),
        (_absolute_tokenizer, r"field 'files.tokenizer' is '/.*evil.model', outside the bundle"),
        (_symlinked_model, r"field 'files.model' is 'model.onnx', which resolves to .*elsewhere.onnx, outside the bundle"),
        (
            lambda b: (b / "SHA256SUMS").open("a").write("0" * 64 + "  /etc/passwd\n"),
            r"SHA256SUMS entry 6 is '/etc/passwd', outside the bundle",
        ),
        (lambda b: (b / "SHA256SUMS").open("a").write("0" * 64 + "  sub/../../x\n"), r"entry 6 is 'sub/../../x', outside"),
        (_without("files"), r"config.json lacks field 'files'; the bundle config is incomplete: re-export"),
        (_without("model", "head_dim"), r"config.json lacks field 'model.head_dim'"),
        (_json_list, r"config.json holds a JSON list, not a GLM bundle config"),
        (lambda b: _edit_config(b, model__n_layer="two"), r"field 'model.n_layer' must be a positive integer, got 'two'"),
        (lambda b: _edit_config(b, special_tokens__eop=10_000), r"'special_tokens.eop' is 10000, outside the vocabulary"),
        (lambda b: _edit_config(b, files="model.onnx"), r"field 'files' must be a JSON object, got str"),
        (
            lambda b: _edit_config(b, model__n_layer=3),
            r"model.onnx: the graph's inputs do not match config.json "
            r"\(model.n_layer=3\); missing \['past_key_values.2.key'",
        ),
        (lambda b: _edit_config(b, model__n_layer=1), r"unexpected \['past_key_values.1.key'.*the graph has 2 cache layers"),
        (
            lambda b: _edit_config(b, model__n_head=4),
            r"graph input 'past_key_values.0.key' is tensor\(float\) "
            r"\['batch', 2, 'capacity', 16\], but config.json implies .* \['\*', 4, '\*', 16\]",
        ),
        (lambda b: _edit_config(b, model__vocab_size=500), r"graph output 'logits' .* sizes \['\*', '\*', 500\]"),
    ],
    ids=[
        "dotdot-model",
        "absolute-tokenizer",
        "symlink-out",
        "sums-absolute",
        "sums-dotdot",
        "no-files",
        "no-head-dim",
        "json-list",
        "n-layer-type",
        "special-range",
        "files-type",
        "n-layer-more",
        "n-layer-fewer",
        "n-head",
        "vocab",
    ],
)
def test_tampered_bundles_are_refused_at_load_with_the_file_and_field(built, tmp_path, damage, message):
    bundle = _copy(built, tmp_path)
    damage(bundle)
    with pytest.raises(runtime.BundleError, match=message) as info:
        runtime.Bundle.load(bundle)
    assert "\n" not in str(info.value)


def test_classifier_fields_are_checked_at_load(built, tmp_path):
    bundle = tmp_path / "clf"
    shutil.copytree(built.clf_bundle, bundle)
    _without("classifier", "answer_ids")(bundle)
    with pytest.raises(runtime.BundleError, match=r"config.json lacks field 'classifier.answer_ids'"):
        runtime.Bundle.load(bundle)
    shutil.rmtree(bundle)
    shutil.copytree(built.clf_bundle, bundle)
    _edit_config(bundle, classifier__labels=["0"])
    with pytest.raises(runtime.BundleError, match=r"'classifier.labels' \(\['0'\]\) needs one string per"):
        runtime.Bundle.load(bundle)


def test_classifier_rows_must_hold_the_answers(built, tmp_path):
    bundle = tmp_path / "clf"
    shutil.copytree(built.clf_bundle, bundle)
    _edit_config(bundle, classifier__rows=[5])
    with pytest.raises(runtime.BundleError, match=r"'classifier.rows' must list distinct token ids holding every answer id"):
        runtime.Bundle.load(bundle)


def test_a_classifier_bundle_without_the_classification_graph_classifies_with_the_generation_graph(built, clf, tmp_path):
    """Bundles exported before the classification graph keep working, with the same scores."""
    bundle = tmp_path / "clf"
    shutil.copytree(built.clf_bundle, bundle)
    for name in ("model.cls.onnx", "model.cls.int8.onnx"):
        (bundle / name).unlink()
    _without("files", "classifier")(bundle)
    _without("files", "classifier_int8")(bundle)
    old = runtime.Bundle.load(bundle, threads=1)
    assert old.select_session is None and clf.select_session is not None
    texts = ["the movie was good", "a bad film", "good " * 80]
    np.testing.assert_allclose(old.label_scores(texts), clf.label_scores(texts), atol=1e-4)
    assert runtime.Bundle.load(built.clf_bundle, int8=True, threads=1).select_session is not None


def test_good_bundles_still_load_also_through_a_symlinked_directory(built, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(built.clf_bundle, target_is_directory=True)  # the whole bundle elsewhere: every file stays inside it
    bundle = runtime.Bundle.load(link, threads=1)
    assert bundle.labels == ["0", "1"] and bundle.classify("a good film").label == "1"
    assert runtime.Bundle.load(built.lm_bundle, int8=True, threads=1).fill_ids([[20, 4]], 2)


def test_a_missing_directory_and_a_missing_int8_model_are_clear_errors(built, tmp_path):
    with pytest.raises(runtime.BundleError, match="does not exist"):
        runtime.Bundle.load(tmp_path / "nowhere")
    bundle = _copy(built, tmp_path)
    _edit_config(bundle, files__model_int8=None)
    with pytest.raises(runtime.BundleError, match="no int8 model; re-export with export.quantize_int8=true"):
        runtime.Bundle.load(bundle, int8=True)


class _FakeSession:
    def __init__(self, providers):
        self._providers = providers

    def get_providers(self):
        return self._providers


def test_the_device_follows_the_providers_the_session_really_loaded(lm):
    # CUDA requested but not loadable (no GPU): onnxruntime falls back, and so must the cache placement
    fallback = runtime.Bundle(lm.path, lm.config, _FakeSession(["CPUExecutionProvider"]), lm.tokenizer)
    cuda = runtime.Bundle(lm.path, lm.config, _FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"]), lm.tokenizer)
    assert fallback.device == "cpu" and cuda.device == "cuda"
    assert lm.device == ("cuda" if "CUDAExecutionProvider" in lm.session.get_providers() else "cpu")
    assert runtime.Bundle.load(lm.path, providers=["CPUExecutionProvider"]).session.get_providers() == ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- decoding


def test_in_place_cache_steps_equal_plain_host_runs(lm):
    # format 2: one buffer per layer bound as both past and present, written in place at each step
    assert lm.in_place
    B, L = 2, 6
    ids = np.array([[0, 0, 20, 21, 4, 22], [30, 31, 32, 4, 33, 34]])
    pos = np.array([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    sep, key_start = np.full(B, L), np.array([2, 0])
    steps = [(np.array([[t], [t]]), np.array([[2], [3]]), np.full((B, 1), n), sep, key_start) for n, t in ((1, 7), (2, 9))]
    _, past_host = lm.run(ids, pos, np.zeros_like(pos), sep, key_start)
    cache = lm.new_cache(L + 3, past_host)
    buffers = [b.numpy() for b in cache.buffers]  # views of the bound memory (CPU)
    for step in steps:
        ref, past_host = lm.run(*step[:4], step[4], past_host)
        got, cache = lm._run_bound(step, cache)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert cache.length == L + 2
    for buf, host in zip(buffers, past_host):
        np.testing.assert_allclose(buf[:, :, : L + 2], host, rtol=0, atol=1e-5)  # written where the cache said
        assert not buf[:, :, L + 2 :].any()  # and nowhere else
    with pytest.raises(ValueError, match="holds 9 positions; 8 written, 2 more asked"):
        lm._run_bound((ids[:, :2], pos[:, :2], pos[:, :2], sep, key_start), cache)


def test_a_format_2_bundle_names_the_onnxruntime_it_needs(lm):
    # onnxruntime 1.29 refuses GroupQueryAttention's causal attribute ("Unrecognized attribute"), 1.30 runs
    # the bundle (both measured in fresh venvs); an app that vendored runtime.py gets the fix, not the error
    why = runtime.onnxruntime_too_old(lm.config, "1.29.0")
    assert why.startswith("bundle format 2 needs onnxruntime >= 1.30") and "pip install -U 'onnxruntime>=1.30'" in why
    assert runtime.onnxruntime_too_old(lm.config, "1.30.0") is None
    assert runtime.onnxruntime_too_old(lm.config, "1.31.1+cu12") is None
    assert runtime.onnxruntime_too_old({**lm.config, "format_version": 1}, "1.18.0") is None


def test_a_format_1_bundle_still_decodes_with_this_runtime(built, lm, tmp_path):
    # bundles exported before the in-place cache (format 1: pasts concatenated onto) stay loadable, e.g.
    # an older version promoted back by a rollback; same model, same logits at every decoding step
    old = _copy(built, tmp_path)
    model = load_model(built.lm_checkpoint)[0]
    export.export_onnx(model, old / "model.onnx", in_place=False)
    (old / "model.int8.onnx").unlink()
    _edit_config(old, format_version=1, files__model_int8=None)
    v1 = runtime.Bundle.load(old, threads=1)
    assert not v1.in_place and [i.name for i in v1.session.get_inputs()][5] == "past_key_values.0.key"
    prompts = [lm.encode("the movie was [MASK] and the acting [sMASK]."), [40, 41, 4, 42]]
    eop = lm.special["eop"]
    tokens = [[t for span in row for t in [*span, eop]] for row in lm.fill_ids(prompts, max_new_tokens=4)]
    for new, got in zip(lm.teacher_forced_logits(prompts, tokens, 4), v1.teacher_forced_logits(prompts, tokens, 4)):
        np.testing.assert_allclose(got, new, rtol=0, atol=1e-4)
    with pytest.raises(runtime.BundleError, match="format version 1 .*re-export it for in-place decoding"):
        v1.new_cache(8, v1.run(*(np.zeros((1, 2), np.int64),) * 3, np.array([2]))[1])


def test_teacher_forcing_the_bundles_own_choices_replays_its_greedy_decoding(lm):
    prompts = [lm.encode("the movie was [MASK] and the acting [sMASK]."), [40, 41, 4, 42]]
    spans = lm.fill_ids(prompts, max_new_tokens=3)
    eop = lm.special["eop"]
    tokens = [[t for span in row for t in [*span, eop]] for row in spans]
    logits = lm.teacher_forced_logits(prompts, tokens, max_new_tokens=3)
    for row, steps in zip(tokens, logits):
        assert steps.shape == (len(row), 448)
        n = 0
        for tok, step in zip(row, steps):
            assert tok == (eop if n >= 3 else int(step.argmax()))  # a full blank's <eop> is forced, not chosen
            n = 0 if tok == eop else n + 1
    with pytest.raises(ValueError, match=r"tokens\[1\] is not a complete decoding of prompt 1"):
        lm.teacher_forced_logits(prompts, [tokens[0], tokens[1][:-1]], max_new_tokens=3)  # the last <eop> missing
    with pytest.raises(ValueError, match="at most max_new_tokens=2"):
        lm.teacher_forced_logits(prompts[1:], [[20, 21, 22, eop]], max_new_tokens=2)


def test_min_new_tokens_and_no_repeat_ngrams_constrain_each_greedy_choice(lm):
    prompts = [lm.encode("the movie was [MASK] and the acting [sMASK]."), [40, 41, 4, 42], lm.encode("the plot") + [6]]
    eop = lm.special["eop"]
    spans = lm.fill_ids(prompts, max_new_tokens=8, min_new_tokens=2, no_repeat_ngram_size=2)
    tokens = [[t for span in row for t in [*span, eop]] for row in spans]
    for row, steps in zip(tokens, lm.teacher_forced_logits(prompts, tokens, max_new_tokens=8)):
        span: list[int] = []
        for tok, step in zip(row, steps):
            allowed = step.astype(np.float64)  # (V,) the rules applied by hand to the step's raw logits
            allowed[[t for i, t in enumerate(span[1:]) if span[i] == (span[-1] if span else None)]] = -np.inf
            if len(span) < 2:
                allowed[eop] = -np.inf
            assert tok == (eop if len(span) >= 8 else int(allowed.argmax())), (row, span)
            span = [] if tok == eop else [*span, tok]
    for row in spans:
        for span in row:
            assert 2 <= len(span) <= 8 and len(set(zip(span, span[1:]))) == len(span) - 1
    with pytest.raises(ValueError, match="min_new_tokens"):
        lm.fill_ids(prompts, max_new_tokens=2, min_new_tokens=3)


def test_fill_blanks_returns_the_text_with_every_blank_filled(lm):
    result = lm.fill_blanks("the movie was [MASK] and the acting [sMASK].", max_new_tokens=5)
    assert len(result.spans) == len(result.span_ids) == 2 and all(len(s) <= 5 for s in result.span_ids)
    prompt = lm.encode("the movie was [MASK] and the acting [sMASK].")
    spliced = prompt[: prompt.index(4)] + result.span_ids[0] + prompt[prompt.index(4) + 1 : prompt.index(5)]
    spliced += result.span_ids[1] + prompt[prompt.index(5) + 1 :]
    assert result.text == lm.decode(spliced) and str(result) == result.text


def test_generate_continues_the_prompt_within_max_new_tokens(lm):
    text = lm.generate("the plot was", max_new_tokens=6)
    assert isinstance(text, str)
    span = lm.fill_ids([lm.encode_text("the plot was") + [6]], max_new_tokens=6)[0][0]
    assert 1 <= len(span) <= 6 and lm.decode(lm.encode_text("the plot was") + span).endswith(text)


def test_unseen_characters_fall_back_to_bytes(lm, clf):
    text = "naïve 🎉 𠀋 café [MASK]"
    ids = lm.encode(text)
    assert 1 not in ids and any(lm.tokenizer.is_byte(i) for i in ids)  # no [UNK]: byte pieces
    assert "🎉" in lm.fill_blanks(text, max_new_tokens=3).text
    assert clf.classify("good 🎉 𠀋").label in ("0", "1")


def test_too_long_prompts_and_bad_decoding_settings_are_clear_errors(lm):
    with pytest.raises(ValueError, match=r"is \d+ tokens, more than the model's max_seq_len=128; shorten it"):
        lm.fill_blanks("the movie " * 100 + "[MASK]")
    with pytest.raises(ValueError, match="more than the model's max_seq_len"):
        lm.generate("a story " * 200)
    with pytest.raises(ValueError, match="has no blank"):
        lm.fill_blanks("no blank here")
    with pytest.raises(ValueError, match=r"max_new_tokens=500 must be in \[1, 127\]"):
        lm.fill_blanks("a [MASK]", max_new_tokens=500)
    with pytest.raises(ValueError, match="top_p"):
        lm.fill_blanks("a [MASK]", temperature=1.0, top_p=0.0)


def test_sampling_is_seeded_and_top_k_1_is_greedy(lm):
    prompt = "the movie was [MASK]."
    greedy = lm.fill_blanks(prompt, max_new_tokens=8).span_ids
    assert lm.fill_blanks(prompt, max_new_tokens=8, temperature=0.7, top_k=1, seed=3).span_ids == greedy
    assert lm.fill_blanks(prompt, max_new_tokens=8, temperature=1e-3, top_p=1e-6, seed=3).span_ids == greedy
    draws = [lm.fill_blanks(prompt, max_new_tokens=8, temperature=1.0, seed=s).span_ids for s in range(4)]
    assert draws[0] == lm.fill_blanks(prompt, max_new_tokens=8, temperature=1.0, seed=0).span_ids
    assert len({json.dumps(d) for d in draws}) > 1


def test_top_k_and_top_p_filters_keep_only_allowed_tokens():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 400))  # (400, 4)
    assert set(runtime._sample(logits, 2, 1.0, rng).tolist()) == {0, 1}
    assert set(runtime._sample(logits, 0, 0.7, rng).tolist()) == {0, 1}  # mass before token 2 is 0.8 >= 0.7
    assert set(runtime._sample(logits, 0, 1.0, rng).tolist()) == {0, 1, 2, 3}


# --------------------------------------------------------------------------- classification


def test_classify_agrees_with_pytorch_score_cloze(built, clf):
    model, _ = load_model(built.clf_checkpoint)
    tok = Tokenizer.load(built.tokenizer)
    texts = [e["text"] for e in built.clf_test[:10]] + ["good", "a bad film", "the film [MASK] bad"]
    with torch.no_grad():
        ref = ft.score_cloze(model, tok, texts, SINGLE)
    for text, row in zip(texts, ref):
        result = clf.classify(text)
        assert result.label == ["0", "1"][int(row.argmax())]
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        np.testing.assert_allclose([result.probabilities["0"], result.probabilities["1"]], probs, atol=1e-4)


def test_classify_needs_a_classifier_bundle(lm):
    with pytest.raises(runtime.BundleError, match="not a classifier"):
        lm.classify("the movie was good")


# --------------------------------------------------------------------------- command line


def test_infer_command_fills_generates_and_classifies(built, capsys):
    assert cli_main(["infer", str(built.lm_bundle), "--fill", "the movie was [MASK].", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    fill = ["infer", str(built.lm_bundle), "--fill", "a [MASK]", "--max-new-tokens", "6", "--min-new-tokens", "6"]
    assert cli_main([*fill, "--no-repeat-ngram-size", "1"]) == 0  # six tokens, none twice
    filled = capsys.readouterr().out.strip()
    span = runtime.Bundle.load(built.lm_bundle, threads=1).fill_blanks(
        "a [MASK]", max_new_tokens=6, min_new_tokens=6, no_repeat_ngram_size=1
    )
    assert filled == span.text and len(span.span_ids[0]) == 6 == len(set(span.span_ids[0]))
    assert (
        cli_main(
            [
                "infer",
                str(built.lm_bundle),
                "--generate",
                "the plot",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0.8",
                "--top-p",
                "0.9",
                "--seed",
                "1",
                "--int8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("the plot")
    assert cli_main(["infer", str(built.clf_bundle), "--classify", "a good film"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "label: 1" and {line.split(":")[0].strip() for line in out[1:]} == {"0", "1"}


def test_infer_command_reports_errors_with_exit_code_2(built, tmp_path, capsys):
    assert cli_main(["infer", str(tmp_path / "nowhere"), "--fill", "a [MASK]"]) == 2
    assert "error: bundle directory" in capsys.readouterr().err
    assert cli_main(["infer", str(built.lm_bundle), "--classify", "good"]) == 2
    assert "not a classifier" in capsys.readouterr().err


def test_a_classifier_bundle_refuses_to_fill_or_generate_and_names_the_generation_bundle(built, tmp_path, capsys):
    # a run's layout: the classifier at export/bundle, the pretrained model at generation/bundle
    run = tmp_path / "run"
    shutil.copytree(built.clf_bundle, run / "export" / "bundle")
    assert cli_main(["infer", str(run / "export" / "bundle"), "--fill", "a [MASK] film"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a fine-tuned classifier (labels 0, 1)" in err and "RUN_DIR/generation/bundle" in err
    shutil.copytree(built.lm_bundle, run / "generation" / "bundle")
    assert cli_main(["infer", str(run / "export" / "bundle"), "--generate", "the plot"]) == 2
    assert f"use the generation bundle {(run / 'generation' / 'bundle').resolve()}" in capsys.readouterr().err
    clf = runtime.Bundle.load(run / "export" / "bundle", threads=1)
    with pytest.raises(runtime.BundleError, match="allow_classifier=True"):
        clf.fill_blanks("a [MASK] film")
    assert isinstance(clf.fill_blanks("a [MASK] film", max_new_tokens=2, allow_classifier=True).text, str)
    assert cli_main(["infer", str(run / "generation" / "bundle"), "--fill", "a [MASK] film", "--max-new-tokens", "2"]) == 0


def test_the_runtimes_no_repeat_rule_is_glm_generates():
    """runtime.py is copied into applications on its own (it imports nothing from glm), so it keeps its
    own copy of the no-repeat n-gram rule: it must ban exactly what glm.generate bans."""
    from glm.evaluation.generate import banned_ngram_tokens

    rng = np.random.default_rng(0)
    for _ in range(500):
        span = rng.integers(0, 4, size=int(rng.integers(0, 12))).tolist()  # a small alphabet: many repeats
        n = int(rng.integers(0, 5))
        assert runtime._banned_ngram_tokens(span, n) == banned_ngram_tokens(span, n), (span, n)
