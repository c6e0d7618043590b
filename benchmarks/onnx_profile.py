"""Where an ONNX decoding step spends its time: onnxruntime's per-op profiler on the fp32 and int8 graphs (shares, with the CPU's flags).

One random-init checkpoint (preset `small`, vocabulary 16000 as onnx_inference; quick: `tiny`) is
exported without verification (int8 included); each graph runs `steps` decoding steps (batch 1, one
token against a cache of `past` positions, the cache buffers bound and written in place as in Bundle.fill_ids) in a
session with SessionOptions.enable_profiling. Rows: each op type's share of the summed kernel time
(the top ones, then "other"), per graph; a row with the CPU model and its SIMD flags (avx512*, amx*,
vnni). Shares of time hold under background load, unlike absolute times; this benchmark reports no
timing. --variant adds a differently quantized int8 graph (glm.export.QUANT_VARIANTS) to compare.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from glm.checkpoint import save_checkpoint
from glm.config import ExportConfig, model_config
from glm.model import GLM
from glm.special_tokens import SPECIAL

from benchmarks.onnx_inference import VOCAB, _tokenizer
from glm import export

CASES = {"tiny": dict(past=32, steps=20, top=6), "small": dict(past=128, steps=200, top=10)}
SIMD = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu() -> dict[str, str]:
    """The CPU model and the SIMD flags onnxruntime's kernels care about (from /proc/cpuinfo)."""
    info = {"model": "unknown", "flags": ""}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] == "unknown":
            info["model"] = value.strip()
        if key.strip() == "flags":
            have = set(value.split())
            info["flags"] = " ".join(f for f in SIMD if f in have)
            break
    return info


def add_arguments(parser) -> None:
    parser.add_argument("--variant", action="append", default=[], choices=sorted(export.QUANT_VARIANTS))


def profile_step(model_path: Path, cfg, past: int, steps: int, threads: int, tmp: Path) -> dict[str, float]:
    """{op type: summed kernel microseconds} over `steps` decoding steps of the graph at model_path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / model_path.stem)
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": np.array([[SPECIAL.sop]]),
        "position_ids": np.array([[past - 1]]),
        "block_position_ids": np.ones((1, 1), np.int64),
        "sep": np.array([past]),
        "key_start": np.zeros(1, np.int64),
    }
    names = [i.name for i in session.get_inputs()]
    in_place = "past_length" in names  # format 2: cache buffers of capacity past + 1, past of them written
    if in_place:
        feeds["past_length"] = np.array([past])
    for n in names[len(feeds) :]:
        feeds[n] = rng.standard_normal((1, cfg.n_head, past + in_place, cfg.head_dim)).astype(np.float32)
    if in_place:  # as Bundle.fill_ids: each buffer bound as its layer's past and present, written in place
        binding = session.io_binding()
        binding.bind_output("logits", "cpu")
        for n, a in feeds.items():
            if n.startswith("past_key_values."):
                value = ort.OrtValue.ortvalue_from_numpy(a)
                binding.bind_ortvalue_input(n, value)
                binding.bind_ortvalue_output(n.replace("past_key_values.", "present."), value)
            else:
                binding.bind_cpu_input(n, a)
        for _ in range(steps):
            session.run_with_iobinding(binding)
    else:
        for _ in range(steps):
            session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    return dict(by_op)


def run(quick: bool = False, variant: list[str] | None = None) -> Iterator[dict]:
    preset = "tiny" if quick else "small"
    case = CASES[preset]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    machine = cpu()
    yield {"name": f"onnx_profile/{preset}", "metric": "cpu", "value": threads, "unit": "threads", **machine}
    with tempfile.TemporaryDirectory(prefix="onnx-profile-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        cfg = model_config(preset, vocab_size=VOCAB)
        model = GLM(cfg).eval()
        ckpt = save_checkpoint(tmp / "ckpt", 0, model.state_dict(), {}, model_config=cfg)
        bundle = export.export_bundle(ckpt, _tokenizer(tmp / "tokenizer.model"), tmp / "bundle", ExportConfig(verify=False))
        graphs = {"fp32": bundle / export.MODEL_FILE, "int8": bundle / export.INT8_FILE}
        for name in variant or []:
            graphs[f"int8-{name}"] = export.quantize_int8(bundle / export.MODEL_FILE, tmp / f"{name}.onnx", name)
        for kind, path in graphs.items():
            by_op = profile_step(path, cfg, case["past"], case["steps"], threads, tmp)
            total = sum(by_op.values()) or 1.0
            ranked = sorted(by_op.items(), key=lambda kv: -kv[1])
            top, rest = ranked[: case["top"]], ranked[case["top"] :]
            for op, us in [*top, ("other", sum(us for _, us in rest))]:
                yield {
                    "name": f"onnx_profile/{preset}",
                    "metric": f"decode_op_share_{kind}_{op}",
                    "value": round(100.0 * us / total, 2),
                    "unit": "%",
                    "graph": kind,
                    "op": op,
                    "past_tokens": case["past"],
                    "steps": case["steps"],
                    "threads": threads,
                    "cpu_model": machine["model"],
                }
