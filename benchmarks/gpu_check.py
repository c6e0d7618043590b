"""GPU readiness in one command: FlexAttention, bf16 + compile training, MFU, fused AdamW, DDP/FSDP, ONNX on CUDA.

    python -m benchmarks gpu_check               # on a CUDA machine: every check on the `base` model
    python -m benchmarks gpu_check --quick       # the same checks on `small`, fewer steps
    python -m benchmarks gpu_check --device cpu  # the CPU subset on `tiny` (what the tests run)

Each check prints one JSON line: name, metric, value (the measured error, or the measurement),
unit, tolerance, status (pass | fail | skip | measured) and passed (true, false, or null when
nothing was judged), plus what was compared. The exit code is 1 if any check failed, else 0; on a
machine without CUDA the default mode prints one `skip` line saying it needs CUDA and exits 0.

Every check goes through the project's own code: the model's attention selection and prefix-LM
masks (glm.model), the trainer (glm.train.pretrain: autocast, torch.compile, fused AdamW and
DDP/FSDP applied from outside the model), and the ONNX bundle (glm.export, glm.runtime).

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token from GLM.flops_per_token:
6 N (N = non-embedding parameters: forward 2N + backward 4N) + 6 V C f (the tied vocabulary
projection, applied to the fraction f of positions that carry a loss) + 12 L C T (attention
scores and weighted sums over the whole row: the prefix-LM mask is dense, no causal halving).
Peaks are the dense (no sparsity) tensor-core figures in glm.train.PEAK_FLOPS; an unknown GPU gets MFU null.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from glm.core import model as glm_model
from glm.core.config import ExportConfig, ModelConfig, OptimConfig, TrainConfig, model_config
from glm.core.model import GLM, configure_optimizer, infilling_loss, prefix_lm_mask
from glm.training.train import peak_flops_of as peak_flops  # the one table: glm.train.PEAK_FLOPS

VOCAB = 16000
REPO = Path(__file__).resolve().parents[1]

Check = Callable[..., Iterator[dict[str, Any]]]


def _line(check: str, metric: str, value: Any, unit: str, *, tolerance: float | None = None, **extra: Any) -> dict[str, Any]:
    """One result: passed iff value <= tolerance when a tolerance is given; otherwise a measurement."""
    row: dict[str, Any] = {"name": f"gpu_check/{check}", "metric": metric, "value": value, "unit": unit}
    if tolerance is not None:
        passed = value is not None and math.isfinite(value) and value <= tolerance
        row.update(tolerance=tolerance, passed=passed, status="pass" if passed else "fail")
    else:
        row.update(passed=None, status="measured")
    row.update(extra)
    return row


def _skip(check: str, metric: str, unit: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": f"gpu_check/{check}",
        "metric": metric,
        "value": None,
        "unit": unit,
        "status": "skip",
        "passed": None,
        "reason": reason,
        **extra,
    }


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: one number per tensor whatever its scale (gradients are ~1e-3)."""
    return _max_err(got, ref) / max(float(ref.double().abs().max()), 1e-30)


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf become null (strict JSON has neither), named in `non_finite`; _line already failed them."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    return {**row, **dict.fromkeys(bad), "non_finite": bad} if bad else row


def _sig(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the presets


def _setup(device: torch.device, quick: bool) -> dict[str, Any]:
    """Model and batch sizes: `base` at its 512 length on CUDA (`small` with --quick), `tiny` on CPU."""
    if device.type == "cpu":
        preset, seq_len, micro, steps, vocab = "tiny", 64, 4, 3, 512
    elif quick:
        preset, seq_len, micro, steps, vocab = "small", 256, 8, 4, VOCAB
    else:
        preset, seq_len, micro, steps, vocab = "base", 512, 8, 8, VOCAB
    return {"preset": preset, "seq_len": seq_len, "micro": micro, "steps": steps, "vocab": vocab}


def _model_cfg(setup: dict[str, Any], **overrides: Any) -> ModelConfig:
    return model_config(setup["preset"], vocab_size=setup["vocab"], **overrides)


# --------------------------------------------------------------------------- 1. attention


def _flex_call(device: torch.device) -> Callable[..., torch.Tensor]:
    if device.type == "cuda":
        return glm_model._flex  # the compiled kernel the model runs
    # on CPU: eager flex (unfused, forward only); compiling it here costs ~20 s for a tiny case

    def eager(q, k, v, block_mask):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": intended here
            return glm_model.flex_attention(q, k, v, block_mask=block_mask)

    return eager


def check_attention(device: torch.device, quick: bool = False) -> Iterator[dict[str, Any]]:
    """FlexAttention (glm.model._flex_block_mask) vs SDPA (glm.model.prefix_lm_mask) on the prefix-LM rule.

    Both are compared with a float64 SDPA reference; FlexAttention passes when its error is within
    2x SDPA's own error at that dtype plus a floor (fp32 1e-5; bf16 7.8e-3, one ulp at 1): a masking
    mistake moves outputs by 0.1-1, far above either. Gradients of q, k, v likewise, on CUDA only
    (FlexAttention has no CPU backward). Rows cover training (no padding) and a left-padded prompt
    pass (key_start), which also takes the flex path.
    """
    if glm_model.flex_attention is None:
        yield _skip("attention", "max_abs_error", "abs", f"torch {torch.__version__} has no FlexAttention")
        return
    B, H, T, D = (2, 2, 64, 16) if device.type == "cpu" else (4, 12, 512, 64)
    g = torch.Generator().manual_seed(0)
    sep = torch.randint(T // 4, T - 1, (B,), generator=g).to(device)
    key_start = torch.tensor([0] + [int(x) for x in torch.randint(1, T // 4, (B - 1,), generator=g)]).to(device)
    flex = _flex_call(device)
    backward = device.type == "cuda"
    # bf16 where the hardware has it (sm80+): the dtype training runs flex in; Triton has no bf16 dot below
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16 else [])
    if not native_bf16:
        why = "checked on CUDA only" if device.type == "cpu" else "this GPU has no native bf16 (compute capability < 8.0)"
        yield _skip("attention/bf16", "max_abs_error", "abs", f"bf16 attention: {why}; fp32 only")
    floors = {torch.float32: 1e-5, torch.bfloat16: 7.8e-3}
    for case, ks in (("train", None), ("left_padded", key_start)):
        dense = prefix_lm_mask(sep, T, 0, ks)  # (B, 1, T, T)
        block = glm_model._flex_block_mask(sep, T, ks)
        base = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
        grad_out = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(device)

        def run(fn, dtype, base=base, grad_out=grad_out):
            qkv = [x.to(dtype, copy=True).requires_grad_(backward) for x in base]  # fresh leaves
            out = fn(*qkv)
            grads = None
            if backward:
                out.backward(grad_out.to(dtype))
                grads = [x.grad for x in qkv]
            return out.detach(), grads

        ref_out, ref_grads = run(lambda q, k, v, m=dense: F.scaled_dot_product_attention(q, k, v, attn_mask=m), torch.float64)
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            s_out, s_grads = run(lambda q, k, v, m=dense: F.scaled_dot_product_attention(q, k, v, attn_mask=m), dtype)
            f_out, f_grads = run(lambda q, k, v, m=block: flex(q, k, v, m), dtype)
            _sync(device)
            sdpa_err, flex_err = _max_err(s_out, ref_out), _max_err(f_out, ref_out)
            common = {"device": device.type, "dtype": name, "case": case, "shape": [B, H, T, D], "reference": "sdpa float64"}
            yield _line(
                f"attention/forward/{case}/{name}",
                "max_abs_error",
                _sig(flex_err),
                "abs",
                tolerance=_sig(2 * sdpa_err + floors[dtype]),
                sdpa_error=_sig(sdpa_err),
                **common,
            )
            if backward:
                errs = [(_rel_err(f, r), _rel_err(s, r)) for f, s, r in zip(f_grads, s_grads, ref_grads)]
                flex_g, sdpa_g = max(e[0] for e in errs), max(e[1] for e in errs)
                yield _line(
                    f"attention/backward/{case}/{name}",
                    "max_rel_error_dq_dk_dv",
                    _sig(flex_g),
                    "rel",
                    tolerance=_sig(2 * sdpa_g + floors[dtype]),
                    sdpa_error=_sig(sdpa_g),
                    **common,
                )
    if not backward:
        yield _skip("attention/backward", "max_rel_error_dq_dk_dv", "rel", "FlexAttention has no backward on CPU (torch 2.13)")
    yield from _check_model_attention(device, quick)


def _check_model_attention(device: torch.device, quick: bool) -> Iterator[dict[str, Any]]:
    """The whole model, training mode, fp32, fwd + bwd with the flex path on, then forced off (USE_FLEX_ATTENTION)."""
    if device.type != "cuda":
        yield _skip("attention/model", "loss_rel_error", "rel", "the model selects FlexAttention on CUDA only")
        return
    from benchmarks.train_step import infilling_batch

    setup = _setup(device, quick)
    cfg = _model_cfg(setup, dropout=0.0, attention_dropout=0.0)  # no dropout: the model selects flex
    torch.manual_seed(0)
    net = GLM(cfg).to(device).train()
    batch = {k: v.to(device) for k, v in infilling_batch(4, setup["seq_len"], setup["vocab"]).items()}
    before, results, flex_used = glm_model.USE_FLEX_ATTENTION, {}, False
    try:
        for use_flex in (True, False):
            glm_model.USE_FLEX_ATTENTION = use_flex
            if use_flex:
                glm_model._compiled_flex = None  # set again only if the model really calls the flex kernel
            net.zero_grad(set_to_none=True)
            loss, _ = infilling_loss(net, batch)
            loss.backward()
            results[use_flex] = (loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()]))
            flex_used = flex_used or (use_flex and glm_model._compiled_flex is not None)
    finally:
        glm_model.USE_FLEX_ATTENTION = before
    common = {
        "device": device.type,
        "preset": setup["preset"],
        "batch": [4, setup["seq_len"]],
        "dtype": "float32",
        "flex_used": flex_used,
        "reference": "the same model with USE_FLEX_ATTENTION=False (SDPA)",
    }
    if not flex_used:
        yield {
            **_line("attention/model", "loss_rel_error", None, "rel", tolerance=1e-4, **common),
            "error": "the model did not take the FlexAttention path on CUDA",
        }
        return
    loss_err, grad_err = _rel_err(results[True][0], results[False][0]), _rel_err(results[True][1], results[False][1])
    yield _line("attention/model", "loss_rel_error", _sig(loss_err), "rel", tolerance=1e-4, **common)
    yield _line("attention/model", "grad_rel_error", _sig(grad_err), "rel", tolerance=1e-3, **common)


# --------------------------------------------------------------------------- 2. training: bf16 + compile vs fp32


def _train(device: torch.device, setup: dict[str, Any], out: Path, **train: Any) -> list[dict[str, Any]]:
    """glm.train.pretrain on synthetic batches; the per-step metric records."""
    from glm.training.train import SyntheticBatches, pretrain

    steps, micro = setup["steps"], setup["micro"]
    cfg = TrainConfig(
        steps=steps,
        batch_size=micro,
        micro_batch_size=micro,
        device=device.type,
        eval_every=10_000,
        checkpoint_every=10_000,
        keep_checkpoints=1,
        log_every=10_000,
        optim=OptimConfig(lr=3e-4, warmup_steps=2),
        **train,
    )
    data = SyntheticBatches(setup["vocab"], setup["seq_len"], micro, seed=0, limit=steps)
    records: list[dict[str, Any]] = []
    model_cfg = _model_cfg(setup, dropout=0.0, attention_dropout=0.0, max_seq_len=max(setup["seq_len"], 64))
    pretrain(cfg, model_cfg, data, out, on_metrics=records.append)
    return [r for r in records if "loss" in r]


def check_training(device: torch.device, quick: bool = False) -> Iterator[dict[str, Any]]:
    """bf16 autocast + torch.compile training steps against fp32 eager from the same weights and batches.

    Dropout is 0 on both sides, so the two runs differ only by precision and compilation (and the
    attention kernel: flex when compiled on CUDA). Passes when every step's loss is within 2e-2
    (relative) of the fp32 run's: bf16 keeps 8 bits of mantissa (3.9e-3 per rounding), and a
    few AdamW steps from the same start stay close. Then tokens/s (median of the steps after the
    first, which includes compilation) and MFU.
    """
    setup = _setup(device, quick)
    compile_ = device.type == "cuda"  # a CPU compile costs ~40 s even for `tiny`
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
        ref = _train(device, setup, Path(tmp) / "fp32", precision="fp32", compile=False)
        t0 = time.perf_counter()
        got = _train(device, setup, Path(tmp) / "bf16", precision="bf16", compile=compile_)
        wall = time.perf_counter() - t0
    # a NaN loss arrives as None (glm.train records non-finite values so); it must fail, not crash
    errors = [
        abs(g["loss"] - r["loss"]) / abs(r["loss"]) if None not in (g["loss"], r["loss"]) else math.nan for g, r in zip(got, ref)
    ]
    common = {"device": device.type, "preset": setup["preset"], "seq_len": setup["seq_len"], "micro_batch": setup["micro"]}
    yield _line(
        "train/bf16_vs_fp32",
        "loss_max_rel_error",
        _sig(max(errors)) if errors and all(map(math.isfinite, errors)) else math.nan,
        "rel",
        tolerance=2e-2,
        steps=len(errors),
        compiled=compile_,
        losses_bf16=[_sig(g["loss"]) for g in got],
        losses_fp32=[_sig(r["loss"]) for r in ref],
        **common,
    )
    timed = got[1:] or got
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    yield _line(
        "train/throughput",
        "tokens_per_s",
        round(tps, 1),
        "tokens/s",
        precision="bf16",
        compiled=compile_,
        steps_timed=len(timed),
        wall_seconds_with_compile=round(wall, 1),
        **common,
    )
    yield _mfu(device, setup, tps, got, common)


def _mfu(device: torch.device, setup: dict[str, Any], tps: float, records: list[dict[str, Any]], common: dict) -> dict[str, Any]:
    net = GLM(_model_cfg(setup, max_seq_len=max(setup["seq_len"], 64)))
    loss_fraction = statistics.mean(r["loss_tokens"] for r in records) / (setup["micro"] * setup["seq_len"])
    flops = net.flops_per_token(setup["seq_len"], loss_fraction)
    extra = {
        "flops_per_token": _sig(flops),
        "loss_fraction": round(loss_fraction, 3),
        "formula": "6*N_nonembedding + 6*V*C*loss_fraction + 12*L*C*seq_len",
    }
    if device.type != "cuda":
        return {
            **_skip("train/mfu", "mfu", "fraction", "MFU is defined against a GPU's tensor-core peak; this is a CPU"),
            **extra,
            **common,
        }
    name = torch.cuda.get_device_name(device)
    found = peak_flops(name)
    if found is None:
        return {
            **_skip("train/mfu", "mfu", "fraction", f"{name!r} is not in the peak table (glm/training/train.py PEAK_FLOPS)"),
            "gpu": name,
            **extra,
            **common,
        }
    peak, dtype, entry = found
    return _line(
        "train/mfu",
        "mfu",
        round(tps * flops / peak, 4),
        "fraction",
        gpu=name,
        peak_flops=peak,
        peak_dtype=dtype,
        peak_entry=entry,
        achieved_tflops=round(tps * flops / 1e12, 2),
        **extra,
        **common,
    )


# --------------------------------------------------------------------------- 3. fused AdamW


def check_fused_adamw(device: torch.device, quick: bool = False) -> Iterator[dict[str, Any]]:
    """The optimizer configure_optimizer builds (fused on CUDA) against the plain for-loop AdamW.

    Same weights, same random gradients, 3 steps; passes when every parameter agrees within 1e-6
    (absolute: updates are ~lr = 1e-3, so that is 1e-3 of an update). On CPU configure_optimizer
    does not fuse, so the fused CPU kernel is checked in its place.
    """
    setup = _setup(device, quick)
    cfg = _model_cfg(setup)
    optim = OptimConfig(lr=1e-3)
    torch.manual_seed(0)
    a = GLM(cfg).to(device)
    b = GLM(cfg).to(device)
    b.load_state_dict(a.state_dict())
    fused = configure_optimizer(a, optim, device.type)
    from_config = bool(fused.defaults.get("fused"))
    hyper = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if not from_config:
        fused = torch.optim.AdamW(_groups(fused), **hyper, fused=True)
    plain = torch.optim.AdamW(_groups(configure_optimizer(b, optim, "cpu")), **hyper, foreach=False, fused=False)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            grad = torch.randn(pa.shape, generator=g, device=device) * 1e-2
            pa.grad, pb.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    err = max(_max_err(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    yield _line(
        "fused_adamw",
        "max_abs_param_diff",
        _sig(err),
        "abs",
        tolerance=1e-6,
        device=device.type,
        fused_by_configure_optimizer=from_config,
        steps=3,
        preset=setup["preset"],
    )


def _groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The same parameters and weight-decay split, for an optimizer built with other kernel options."""
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]


# --------------------------------------------------------------------------- 4. DDP / FSDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(args: argparse.Namespace) -> int:
    """One torchrun rank: pretrain with train.distributed=STRATEGY; rank 0 writes the loss trace."""
    from glm.training.train import SyntheticBatches, pretrain

    setup = json.loads(args.setup)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = TrainConfig(
        steps=setup["steps"],
        batch_size=2 * setup["micro"],
        micro_batch_size=setup["micro"],
        device=args.device,
        precision="fp32",
        distributed=args.strategy,
        nproc=world,
        eval_every=10_000,
        checkpoint_every=10_000,
        keep_checkpoints=1,
        log_every=10_000,
        optim=OptimConfig(lr=3e-4, warmup_steps=2),
    )
    data = SyntheticBatches(setup["vocab"], setup["seq_len"], setup["micro"], seed=0, rank=rank, world_size=world)
    records: list[dict[str, Any]] = []
    model_cfg = _model_cfg(setup, dropout=0.0, attention_dropout=0.0, max_seq_len=max(setup["seq_len"], 64))
    pretrain(cfg, model_cfg, data, Path(args.out) / "run", on_metrics=records.append)
    if rank == 0:
        losses = [r["loss"] for r in records if "loss" in r]
        Path(args.out, "losses.json").write_text(json.dumps(losses))
    return 0


def check_distributed(
    device: torch.device, quick: bool = False, strategies: tuple[str, ...] = ("ddp", "fsdp"), force: bool = False
) -> Iterator[dict[str, Any]]:
    """2 processes (torchrun, NCCL on CUDA) against one process on the same global batch, fp32.

    The trainer scales gradients so that any split of a global batch over ranks and micro-batches
    gives the same update; the 2-rank loss trace must match the 1-rank one (with 2 accumulation
    micro-batches) within 1e-4 relative, float reduction order aside.
    """
    if not force:
        if device.type != "cuda":
            yield _skip(
                "distributed",
                "loss_max_rel_error",
                "rel",
                "CUDA only here; gloo DDP/FSDP with 2 processes is covered by tests/glm/test_distributed.py",
            )
            return
        if torch.cuda.device_count() < 2:
            yield _skip("distributed", "loss_max_rel_error", "rel", f"needs 2+ GPUs, {torch.cuda.device_count()} visible")
            return
    setup = {**_setup(device, quick), "steps": 4}  # 3 runs of `base`: keep the whole command under 5 minutes
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the ranks share GPU 0 with this process
    with tempfile.TemporaryDirectory(prefix="gpu-check-dist-") as tmp:
        from glm.training.train import SyntheticBatches, pretrain

        cfg = TrainConfig(
            steps=setup["steps"],
            batch_size=2 * setup["micro"],
            micro_batch_size=setup["micro"],
            device=device.type,
            precision="fp32",
            eval_every=10_000,
            checkpoint_every=10_000,
            keep_checkpoints=1,
            log_every=10_000,
            optim=OptimConfig(lr=3e-4, warmup_steps=2),
        )
        records: list[dict[str, Any]] = []
        data = SyntheticBatches(setup["vocab"], setup["seq_len"], setup["micro"], seed=0)
        model_cfg = _model_cfg(setup, dropout=0.0, attention_dropout=0.0, max_seq_len=max(setup["seq_len"], 64))
        pretrain(cfg, model_cfg, data, Path(tmp) / "single", on_metrics=records.append)
        ref = [r["loss"] for r in records if "loss" in r]
        for strategy in strategies:
            out = Path(tmp) / strategy
            out.mkdir()
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "1",
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(_free_port()),
                "-m",
                "benchmarks.gpu_check",
                "--dist-worker",
                "--strategy",
                strategy,
                "--device",
                device.type,
                "--out",
                str(out),
                "--setup",
                json.dumps(setup),
            ]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            common = {
                "device": device.type,
                "backend": "nccl" if device.type == "cuda" else "gloo",
                "strategy": strategy,
                "world_size": 2,
                "preset": setup["preset"],
                "steps": setup["steps"],
            }
            losses_file = out / "losses.json"
            if proc.returncode != 0 or not losses_file.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                yield {
                    **_line(f"distributed/{strategy}", "loss_max_rel_error", None, "rel", tolerance=1e-4, **common),
                    "error": f"torchrun exited {proc.returncode}: " + " | ".join(tail),
                }
                continue
            got = json.loads(losses_file.read_text())
            err = max(abs(g - r) / abs(r) for g, r in zip(got, ref)) if len(got) == len(ref) else None
            yield _line(
                f"distributed/{strategy}",
                "loss_max_rel_error",
                None if err is None else _sig(err),
                "rel",
                tolerance=1e-4,
                losses=[_sig(x) for x in got],
                losses_single=[_sig(x) for x in ref],
                **common,
            )


# --------------------------------------------------------------------------- 5. ONNX bundle


def check_onnx(device: torch.device, quick: bool = False) -> Iterator[dict[str, Any]]:
    """The exported bundle on the device's execution provider against PyTorch fp32 on CPU.

    Strict parity (glm.export.check_parity over the export's own shape grid, cached and uncached)
    runs with TF32 off and must meet ExportConfig.atol, the bar every bundle is verified to on CPU.
    Then the session an app gets by default (Bundle.load(path): CUDA if it really loads, TF32 on)
    must decode greedily like glm.generate, near-ties within its measured logit error aside
    (glm.export.check_greedy), which exercises the cache kept on the GPU through io binding.
    """
    from benchmarks.onnx_inference import _tokenizer
    from glm import export, runtime
    from glm.training.checkpoint import save_checkpoint

    setup = _setup(device, quick)
    cfg = _model_cfg(setup)
    torch.manual_seed(0)
    model = GLM(cfg).eval()
    atol = ExportConfig().atol
    with tempfile.TemporaryDirectory(prefix="gpu-check-onnx-") as tmp_:
        tmp = Path(tmp_)
        tok_path = _tokenizer(tmp / "tokenizer.model")
        ckpt = save_checkpoint(tmp / "ckpt", 0, model.state_dict(), {}, model_config=cfg)
        t0 = time.perf_counter()
        bundle_dir = export.export_bundle(ckpt, tok_path, tmp / "bundle", ExportConfig(verify=False, quantize_int8=False))
        export_seconds = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            # onnxruntime >= 1.21 loads CUDA/cuDNN from the nvidia wheels torch brought; whatever it does, the
            # session's provider below is what is judged
            with contextlib.suppress(Exception):
                runtime.ort.preload_dlls()
            strict_providers: list[Any] = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        else:
            strict_providers = ["CPUExecutionProvider"]
        strict = runtime.Bundle.load(bundle_dir, providers=strict_providers)
        common = {
            "device": device.type,
            "preset": setup["preset"],
            "export_seconds": export_seconds,
            "onnxruntime": runtime.ort.__version__,
            "providers_available": runtime.ort.get_available_providers(),
        }
        if strict.device != device.type:
            yield {
                **_line("onnx/parity", "logits_max_abs_diff", None, "abs", tolerance=atol, **common),
                "error": f"the session runs on {strict.session.get_providers()}, not on {device.type}: the CUDA "
                f"provider did not load (onnxruntime-gpu {runtime.ort.__version__} is built for CUDA {_ort_cuda()} "
                "and cuDNN 9; pip install 'onnxruntime-gpu[cuda,cudnn]' brings those libraries)",
            }
            return
        rows = export.check_parity(model, strict, export._grid(cfg.max_seq_len))
        logits_err = max(r["logits_max_abs_diff"] for r in rows)
        presents_err = max(r["presents_max_abs_diff"] for r in rows)
        ep = strict.session.get_providers()[0]
        yield _line(
            "onnx/parity",
            "logits_max_abs_diff",
            _sig(logits_err),
            "abs",
            tolerance=atol,
            provider=ep,
            tf32=False,
            shapes=len(rows),
            **common,
        )
        yield _line(
            "onnx/parity",
            "presents_max_abs_diff",
            _sig(presents_err),
            "abs",
            tolerance=atol,
            provider=ep,
            tf32=False,
            shapes=len(rows),
            **common,
        )
        default = runtime.Bundle.load(bundle_dir) if device.type == "cuda" else strict
        tokenizer = __import__("glm.tokenizer", fromlist=["Tokenizer"]).Tokenizer.load(tok_path)
        prompts = export._generation_prompts(model, tokenizer)
        greedy = export.check_greedy(model, default, prompts, min(16, cfg.max_seq_len - 1), logits_err)
        yield _line(
            "onnx/greedy",
            "divergent_steps",
            greedy["divergent_count"],
            "steps",
            tolerance=0,
            provider=default.session.get_providers()[0],
            tf32=device.type == "cuda",
            token_agreement=round(greedy["token_agreement"], 4),
            near_ties=greedy["near_tie_count"],
            logits_max_abs_diff=_sig(greedy["logits_max_abs_diff"]),
            tie_tolerance=_sig(greedy["tie_tolerance"]),
            steps=greedy["steps"],
            **common,
        )


# --------------------------------------------------------------------------- the command


CHECKS: dict[str, Check] = {
    "attention": check_attention,
    "train": check_training,
    "fused_adamw": check_fused_adamw,
    "distributed": check_distributed,
    "onnx": check_onnx,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default; without CUDA: one skip line, exit 0) or cpu: the CPU subset on `tiny`",
    )
    parser.add_argument("--only", action="append", choices=sorted(CHECKS), help="run only this check (repeatable)")


def _ort_cuda() -> str | None:
    """The CUDA version this onnxruntime-gpu build links against (None for a CPU-only build)."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:
        return None
    return getattr(build_and_package_info, "cuda_version", None)


def _environment(device: torch.device) -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "onnxruntime_cuda": _ort_cuda(),
        "providers": ort.get_available_providers(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        )
    return info


def run(quick: bool = False, device: str = "cuda", only: list[str] | None = None) -> Iterator[dict[str, Any]]:
    if device == "cuda" and not torch.cuda.is_available():
        reason = (
            f"needs CUDA: no CUDA device is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "run it on a GPU machine (README, GPU section), or pass --device cpu for the CPU subset"
        )
        print(f"gpu_check: {reason}", file=sys.stderr)
        yield {
            "name": "gpu_check",
            "metric": "cuda_devices",
            "value": 0,
            "unit": "devices",
            "status": "skip",
            "passed": None,
            "reason": reason,
        }
        return
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    count = torch.cuda.device_count() if dev.type == "cuda" else 0
    yield {
        "name": "gpu_check",
        "metric": "cuda_devices",
        "value": count,
        "unit": "devices",
        "status": "measured",
        "passed": None,
        "quick": quick,
        **_environment(dev),
    }
    start = time.perf_counter()
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            for row in check(dev, quick=quick):
                yield {**_json_safe(row), "check_seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # one broken check must not hide the others' results
            yield {
                "name": f"gpu_check/{name}",
                "metric": "error",
                "value": None,
                "unit": "",
                "status": "fail",
                "passed": False,
                "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                "traceback": traceback.format_exc()[-2000:],
            }
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # the 5-minute aim is reported, never judged: a slow disk or a first compile must not fail the check
    yield _line("total", "wall_seconds", round(time.perf_counter() - start, 1), "s", aim_seconds=300, device=dev.type)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.gpu_check --dist-worker ...` is one rank of the distributed check."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dist-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dist_worker:
        return _dist_worker(args)
    failed = False
    for row in run(quick=args.quick, device=args.device, only=args.only):
        failed |= row.get("status") == "fail"
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
