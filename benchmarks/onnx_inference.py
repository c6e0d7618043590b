"""ONNX Runtime (fp32, int8) vs PyTorch eager: prompt pass, per-token decoding, greedy generation, cloze scoring.

One random-init checkpoint (preset `small`, vocabulary 16000; quick: `tiny`) is exported once into a
temporary bundle with glm.export.export_bundle (int8 included), then both sides run the same work
in the same process, alternating in rounds (median of rounds), with the same intra-op thread count
(torch.set_num_threads = onnxruntime intra_op_num_threads = the cores available; stated in each row):

- prompt pass: batch 1, the whole prompt, empty cache -> logits (1, T, V) and the cache;
- decoding step: batch 1, one token against a cache of P positions (ONNX: the cache buffers stay
  bound and are written in place, exactly as in Bundle.fill_ids; PyTorch: model(..., past_key_values=cache));
- greedy generation: a [gMASK] prompt, new tokens/s end to end (glm.generate.fill_blanks vs Bundle.fill_ids);
- cloze scoring: single-token classifier scores, batches of 32 texts (glm.finetune.score_cloze vs
  Bundle.label_scores, which runs the bundle's classification graph model.cls.onnx; tokenization
  included on both sides). Bundle.label_scores batches texts by length; the `_input_order` rows run
  the same graph on batches in input order, as PyTorch's scorer does, to show what the graph alone gives;
- batch command: `predict` (glm-runtime predict / glm-pipeline predict without the bundle load) on a
  JSON Lines file of the same texts, read, classified and written, vs the Python API
  (Bundle.classify_batch on the texts in memory), fp32, batches of 32.

reference = PyTorch eager; ratio = value / reference; "better" says which direction wins (latency:
lower, throughput: higher).
"""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from glm import runtime
from glm.core.config import ClozeTaskConfig, ExportConfig, model_config
from glm.core.model import GLM
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.core.tokenizer import Tokenizer
from glm.evaluation.generate import GenerationConfig, fill_blanks
from glm.export import export_bundle
from glm.finetuning.finetune import score_cloze
from glm.training.checkpoint import save_checkpoint

VOCAB = 16000
WORDS = (
    "the movie film was plot acting story really very quite an a good bad great terrible fun boring not "
    "music actor scene end long short funny sad"
).split()
TASK = ClozeTaskConfig(pattern="{text} It was [MASK].", verbalizers={"0": "bad", "1": "good"})
CASES = {  # preset: prompt length, cache length for one decoding step, new tokens, texts scored, rounds, iterations
    "tiny": dict(prompt=32, past=32, new_tokens=8, texts=32, rounds=2, iters=3),
    "small": dict(prompt=128, past=128, new_tokens=32, texts=128, rounds=5, iters=10),
}


def _tokenizer(path: Path) -> Path:
    """A small English sentencepiece model with the GLM special ids (the benchmark needs real text only for scoring)."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + "." for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=400,
        model_type="unigram",
        pad_id=0,
        pad_piece="[PAD]",
        unk_id=1,
        unk_piece="[UNK]",
        bos_id=2,
        bos_piece="[CLS]",
        eos_id=3,
        eos_piece="<eos>",
        user_defined_symbols=["[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>"],
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    path.write_bytes(buf.getvalue())
    return path


def _median_ms(fn: Callable[[], object], iters: int) -> float:
    fn()  # warm-up: allocators, lazy initialisation
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rounds(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median over rounds of each side's measurement, sides alternating so background load hits all alike."""
    seen: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            seen[name].append(measure())
    return {k: statistics.median(v) for k, v in seen.items()}


def _rows(metric: str, unit: str, better: str, results: dict[str, float], common: dict) -> Iterator[dict]:
    reference = _sig(results["pytorch"])
    for backend in [b for b in results if b != "pytorch"]:  # onnxruntime-fp32, -int8 (and variants: -input-order)
        value = _sig(results[backend])
        yield {
            "name": f"onnx_inference/{common['preset']}",
            "metric": f"{metric}_{backend.split('-', 1)[1].replace('-', '_')}",
            "value": value,
            "unit": unit,
            "reference": reference,
            "ratio": _sig(value / reference),
            "better": better,
            "backend": backend,
            "reference_backend": "pytorch-eager",
            **common,
        }


def _sig(x: float) -> float:
    return float(f"{x:.5g}")


def run(quick: bool = False) -> Iterator[dict]:
    preset = "tiny" if quick else "small"
    case = CASES[preset]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
            yield from _bench(Path(tmp), preset, case, threads, quick)
    finally:
        torch.set_num_threads(before)


def _bench(tmp: Path, preset: str, case: dict, threads: int, quick: bool) -> Iterator[dict]:
    torch.manual_seed(0)
    cfg = model_config(preset, vocab_size=VOCAB)
    model = GLM(cfg).eval()
    tok_path = _tokenizer(tmp / "tokenizer.model")
    tok = Tokenizer.load(tok_path)
    ckpt = save_checkpoint(tmp / "ckpt", 0, model.state_dict(), {}, model_config=cfg)
    spec = {"kind": "cloze", "pattern": TASK.pattern, "verbalizers": TASK.verbalizers, "labels": list(TASK.verbalizers)}
    t0 = time.perf_counter()
    bundle_dir = export_bundle(ckpt, tok_path, tmp / "bundle", ExportConfig(verify=not quick), classifier=spec)
    export_seconds = time.perf_counter() - t0
    report = json.loads((bundle_dir / "verification.json").read_text())
    fp32 = runtime.Bundle.load(bundle_dir, providers=["CPUExecutionProvider"], threads=threads)
    int8 = runtime.Bundle.load(bundle_dir, providers=["CPUExecutionProvider"], threads=threads, int8=True)
    bundles = {"onnxruntime-fp32": fp32, "onnxruntime-int8": int8}
    common = {
        "preset": preset,
        "threads": threads,
        "vocab": VOCAB,
        "params": model.num_params(),
        "dims": f"{cfg.n_layer} layers x {cfg.hidden_size} wide x {cfg.n_head} heads",
        "device": "cpu",
    }
    rounds, iters = case["rounds"], case["iters"]
    rng = np.random.default_rng(0)

    # ---- prompt pass: (1, T) with an empty cache
    T = case["prompt"]
    ids = rng.integers(NUM_SPECIAL, VOCAB, (1, T))  # (1, T)
    ids[0, -1] = SPECIAL.gmask
    pos, blk = np.arange(T)[None], np.zeros((1, T), np.int64)  # (1, T)
    sep, ks = np.array([T]), np.zeros(1, np.int64)  # (1,)
    t_args = [torch.from_numpy(a) for a in (ids, pos, blk, sep, ks)]

    def torch_prompt() -> float:
        with torch.inference_mode():
            return _median_ms(lambda: model(*t_args[:4], key_start=t_args[4], use_cache=True), iters)

    def onnx_prompt(b: runtime.Bundle) -> Callable[[], float]:  # as Bundle.fill_ids: logits and the cache to host
        return lambda: _median_ms(lambda: b.run(ids, pos, blk, sep, ks), iters)

    sides = {"pytorch": torch_prompt, **{k: onnx_prompt(b) for k, b in bundles.items()}}
    yield from _rows("prompt_latency", "ms", "lower", _rounds(sides, rounds), {**common, "batch": 1, "prompt_tokens": T})

    # ---- one decoding step: (1, 1) against a cache of P positions
    P = case["past"]
    step = (np.array([[SPECIAL.sop]]), np.array([[P - 1]]), np.ones((1, 1), np.int64), np.array([P]), ks)
    past = [rng.standard_normal((1, cfg.n_head, P, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)]
    t_step = [torch.from_numpy(a) for a in step]
    t_past = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(past[0::2], past[1::2])]

    def torch_step() -> float:
        with torch.inference_mode():
            return _median_ms(lambda: model(*t_step[:4], past_key_values=t_past, key_start=t_step[4], use_cache=True), iters * 3)

    def onnx_step(b: runtime.Bundle) -> Callable[[], float]:
        cache = b.new_cache(P + 1, past)  # as Bundle.fill_ids: buffers bound once, written in place

        def one_step() -> object:
            cache.length = P  # the same step again: it rewrites slot P
            return b._run_bound(step, cache)

        return lambda: _median_ms(one_step, iters * 3)

    sides = {"pytorch": torch_step, **{k: onnx_step(b) for k, b in bundles.items()}}
    decode = _rounds(sides, rounds)
    yield from _rows("decode_step_latency", "ms", "lower", decode, {**common, "batch": 1, "past_tokens": P})

    # ---- greedy generation end to end: new tokens per second
    n_new = case["new_tokens"]
    prompt = ids[0].tolist()
    gen = GenerationConfig(max_new_tokens=n_new)

    def per_s(generate: Callable[[], list[int]]) -> float:
        generate()
        t0 = time.perf_counter()
        n = len(generate())
        return n / (time.perf_counter() - t0)

    sides = {"pytorch": lambda: per_s(lambda: fill_blanks(model, [prompt], gen)[0].spans[0])}
    sides.update({k: (lambda b=b: per_s(lambda: b.fill_ids([prompt], n_new)[0][0])) for k, b in bundles.items()})
    yield from _rows(
        "generate_tokens_per_s",
        "tokens/s",
        "higher",
        _rounds(sides, rounds),
        {**common, "batch": 1, "prompt_tokens": T, "max_new_tokens": n_new, "decoding": "greedy, prompt pass included"},
    )

    # ---- cloze scoring throughput: texts per second, batches of 32
    wrng = random.Random(1)
    texts = [" ".join(wrng.choice(WORDS) for _ in range(wrng.randint(20, 60))) for _ in range(case["texts"])]

    def rate(score: Callable[[], object]) -> float:
        score()
        t0 = time.perf_counter()
        score()
        return len(texts) / (time.perf_counter() - t0)

    def torch_scores() -> float:
        with torch.inference_mode():
            return rate(lambda: score_cloze(model, tok, texts, TASK, batch_size=32))

    sides = {"pytorch": torch_scores}
    sides.update({k: (lambda b=b: rate(lambda: b.label_scores(texts, batch_size=32))) for k, b in bundles.items()})
    # what batching by length contributes: the same graph on batches in input order, as PyTorch's scorer batches
    sides.update(
        {
            f"{k}-input-order": (lambda b=b: rate(lambda: b.label_scores(texts, batch_size=32, sort_by_length=False)))
            for k, b in bundles.items()
        }
    )
    yield from _rows(
        "cloze_scoring_throughput",
        "texts/s",
        "higher",
        _rounds(sides, rounds),
        {**common, "batch": 32, "texts": len(texts), "text_words": "20-60"},
    )

    # ---- the batch command (file in, file out) vs the Python API on the same texts, fp32
    src = tmp / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")

    def command() -> float:
        t0 = time.perf_counter()
        runtime.predict(fp32, src, tmp / "out.jsonl", "classify", batch_size=32, quiet=True)
        return len(texts) / (time.perf_counter() - t0)

    def api() -> float:
        return rate(lambda: fp32.classify_batch(texts, batch_size=32))

    command()  # warm-up
    got = _rounds({"api": api, "command": command}, rounds)
    value, reference = _sig(got["command"]), _sig(got["api"])
    yield {
        "name": f"onnx_inference/{preset}",
        "metric": "batch_predict_throughput",
        "value": value,
        "unit": "texts/s",
        "reference": reference,
        "ratio": _sig(value / reference),
        "better": "higher",
        "backend": "glm-runtime predict (JSONL in/out, fp32)",
        "reference_backend": "Bundle.classify_batch (fp32)",
        **common,
        "batch": 32,
        "texts": len(texts),
    }

    # ---- size and what the int8 model costs in agreement
    sizes = {k: b.model_path.stat().st_size / 1e6 for k, b in bundles.items()}
    value, reference = _sig(sizes["onnxruntime-int8"]), _sig(sizes["onnxruntime-fp32"])
    yield {
        "name": f"onnx_inference/{preset}",
        "metric": "model_size_int8",
        "value": value,
        "unit": "MB",
        "reference": reference,
        "ratio": _sig(value / reference),
        "better": "lower",
        "reference_backend": "onnxruntime-fp32",
        **common,
        "int8_logits_max_abs_diff": report.get("int8", {}).get("logits_max_abs_diff"),
        "int8_greedy_token_agreement": report.get("int8", {}).get("greedy", {}).get("token_agreement"),
    }
    yield {
        "name": f"onnx_inference/{preset}",
        "metric": "export_seconds",
        "value": round(export_seconds, 2),
        "unit": "s",
        "verified": report.get("passed"),
        "fp32_logits_max_abs_diff": report.get("fp32", {}).get("logits_max_abs_diff"),
        **common,
    }
