"""Pretraining on CPU: seconds per step of `small` (bf16 autocast vs fp32) and the time to reach the demo's validation loss.

Two measurements:
  - seconds per optimizer step of the demo's shape (small preset, vocab 16,000, 32 rows of 128
    tokens, a realistic 15% span mask: benchmarks.train_step.infilling_batch), bf16 autocast
    against fp32, alternating in rounds in the same process; ratio = bf16 / fp32 seconds (lower
    is better). Tokens/s of both are reported too, and the CPU (model name, avx2/avx512/amx flags,
    PyTorch's kernel level). On a CPU without AVX512/AMX bf16 kernels
    (PyTorch then emulates bf16, ~40x slower) bf16 is timed for one step only.
  - time to reach the demo's validation loss: the demo's pretraining (configs/demo.yaml, its
    precision, on the blank-infilling shards `make demo` built in runs/demo) from scratch in a
    temporary directory, validating every 100 steps, stopped at the first validation loss at or
    below the demo's final one (read from runs/demo/pretrain/metrics.jsonl). Reported: training
    seconds (steps only), wall seconds (with the validations) and the step reached, against
    the demo's own run (ratio = this run's seconds / the demo's, lower is better).
    Needs runs/demo (`make demo`); without it that row says so instead.
  - validation loss after PARITY_STEPS equal steps of the demo's pretraining in bf16 autocast and in
    fp32 (same seed, same batches), both final models evaluated in fp32 on the same validation
    batches; ratio = bf16 / fp32 (the goal: within 1%). On a CPU without native bf16 the row says so.
quick=True: the tiny preset on synthetic batches (seconds per step), and a 10-step tiny run on
synthetic data against a loss target it reaches, to exercise the mechanics.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.train_step import infilling_batch
from glm.core.config import OptimConfig, load_config, model_config
from glm.core.model import GLM, configure_optimizer, infilling_loss
from glm.training.budget import cpu_kind
from glm.training.train import cpu_has_fast_bf16

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
VOCAB = 16000
# bf16 against fp32 at equal steps: 300 steps of the demo's pretraining each (2026-12-07, Xeon AMX, quiet:
# ~4 min fp32 + ~2.5 min bf16; measured under load: val loss 5.408 bf16 vs 5.443 fp32, ratio 0.994)
PARITY_STEPS = 300


def _seconds_per_step(preset: str, batch: int, seq_len: int, steps: int, rounds: int) -> Iterator[dict]:
    cfg = model_config(preset, vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0)
    data = infilling_batch(batch, seq_len, VOCAB)
    models = {}
    for precision in ("bf16", "fp32"):
        torch.manual_seed(0)
        net = GLM(cfg).train()
        models[precision] = (net, configure_optimizer(net, OptimConfig(), "cpu"))

    def step(precision: str) -> None:
        net, opt = models[precision]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            loss, _ = infilling_loss(net, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # without AVX512/AMX bf16 kernels PyTorch emulates bf16 (~40x slower): time it once, not per round
    emulated = not cpu_has_fast_bf16()
    times: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for precision in times:
        step(precision)  # warm-up: allocator, oneDNN kernels
    for r in range(rounds):  # alternate, so load from other processes hits both alike
        for precision in times:
            if emulated and precision == "bf16" and r > 0:
                continue
            n = 1 if emulated and precision == "bf16" else steps
            t0 = time.perf_counter()
            for _ in range(n):
                step(precision)
            times[precision].append((time.perf_counter() - t0) / n)
    bf16, fp32 = statistics.median(times["bf16"]), statistics.median(times["fp32"])
    common = {
        "name": f"pretrain/{preset}",
        "batch": batch,
        "seq_len": seq_len,
        "vocab": VOCAB,
        "params": models["fp32"][0].num_params(),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "bf16_kernels": "emulated (no AVX512/AMX)" if emulated else "oneDNN native",
        "cpu": cpu_kind(),  # model name, avx2/avx512/amx flags: what `precision: auto` decides from
    }
    yield {
        **common,
        "metric": "seconds_per_step_bf16",
        "value": round(bf16, 4),
        "unit": "s",
        "reference": round(fp32, 4),
        "ratio": round(bf16 / fp32, 4),
        "better": "lower",
        "note": "reference: the same steps in fp32",
    }
    tokens = batch * seq_len
    yield {
        **common,
        "metric": "train_tokens_per_s_bf16",
        "value": round(tokens / bf16, 1),
        "unit": "tokens/s",
        "reference": round(tokens / fp32, 1),
        "ratio": round(fp32 / bf16, 4),
        "better": "higher",
        "note": "reference: fp32",
    }


class _Reached(Exception):
    pass


def _time_to_loss(train: Callable[[Callable[[dict], None]], object], target: float) -> dict:
    """Run `train(on_metrics)` until a validation loss <= target: the step, its loss, wall seconds."""
    seen = {"step": None, "val_loss": None}
    t0 = time.perf_counter()

    def on_metrics(record: dict) -> None:
        if "val_loss" in record:
            seen["step"], seen["val_loss"] = record["step"], record["val_loss"]
            if record["val_loss"] is not None and record["val_loss"] <= target:
                raise _Reached

    reached = True
    try:
        train(on_metrics)
        reached = False
    except _Reached:
        pass
    return {**seen, "wall_seconds": time.perf_counter() - t0, "reached": reached}


def _step_seconds(metrics: list[dict], upto: int) -> float:
    """Seconds spent in optimizer steps 1..upto, from the per-step tokens and tokens/s."""
    steps = [r for r in metrics if "tokens_per_s" in r and r["step"] <= upto]
    previous, total = 0, 0.0
    for r in steps:
        total += (r["tokens"] - previous) / r["tokens_per_s"]
        previous = r["tokens"]
    return total


def _demo_time_to_loss() -> dict:
    from glm.core.metrics import read_metrics
    from glm.training.train import pretrain_on_shards

    cfg = load_config(DEMO_CONFIG)
    run = ROOT / cfg.run_dir
    if (run / "pretrain" / "run-config.yaml").is_file():  # the steps and precision the demo's budget resolved to
        cfg = load_config(run / "pretrain" / "run-config.yaml")
    common = {"name": "pretrain/demo", "metric": "seconds_to_demo_val_loss", "unit": "s", "better": "lower"}
    demo_metrics_path = run / "pretrain" / "metrics.jsonl"
    if not (run / "infill" / "manifest.json").is_file() or not demo_metrics_path.is_file():
        return {**common, "value": None, "note": f"no demo run in {run}: run `make demo` first, then this benchmark"}
    demo = read_metrics(demo_metrics_path)
    evals = [r for r in demo if r.get("val_loss") is not None]
    target, demo_step = evals[-1]["val_loss"], evals[-1]["step"]
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"eval_every": 100, "checkpoint_every": 10**9})})
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        out = _time_to_loss(lambda cb: pretrain_on_shards(cfg, run / "infill", tmp, on_metrics=cb), target)
        ours = read_metrics(Path(tmp) / "metrics.jsonl")
    seconds = _step_seconds(ours, out["step"] or 0)
    demo_seconds = _step_seconds(demo, demo_step)
    return {
        **common,
        "value": round(seconds, 1),
        "reference": round(demo_seconds, 1),
        "ratio": round(seconds / demo_seconds, 4),
        "reached": out["reached"],
        "step": out["step"],
        "target_val_loss": round(target, 4),
        "val_loss": out["val_loss"],
        "wall_seconds_with_validation": round(out["wall_seconds"], 1),
        "precision": cfg.pretrain.precision,
        "note": "training-step seconds until the first validation (every 100 steps) "
        "at or below the demo's final validation loss; reference: the demo's own step seconds to its last validation",
    }


def _quick_time_to_loss() -> dict:
    from glm.core.metrics import read_metrics
    from glm.training.train import SyntheticBatches, pretrain

    cfg = load_config(
        None,
        [
            "pretrain.steps=10",
            "pretrain.eval_every=5",
            "pretrain.eval_batches=1",
            "pretrain.batch_size=4",
            "pretrain.micro_batch_size=4",
            "pretrain.log_every=5",
        ],
    )
    mcfg = model_config("tiny", vocab_size=64)
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        out = _time_to_loss(
            lambda cb: pretrain(
                cfg.pretrain,
                mcfg,
                SyntheticBatches(64, 32, 4),
                tmp,
                valid_data=SyntheticBatches(64, 32, 4, seed=1, limit=1),
                on_metrics=cb,
            ),
            target=100.0,
        )
        seconds = _step_seconds(read_metrics(Path(tmp) / "metrics.jsonl"), out["step"] or 0)
    return {
        "name": "pretrain/tiny-synthetic",
        "metric": "seconds_to_val_loss",
        "value": round(seconds, 4),
        "unit": "s",
        "reached": out["reached"],
        "step": out["step"],
        "target_val_loss": 100.0,
        "note": "mechanics only: a target the first validation reaches",
    }


def _val_loss_fp32(checkpoint: Path, pipeline, data_dir: Path) -> float:
    """Validation loss of a checkpoint evaluated in fp32 (so bf16 training is judged without bf16 evaluation)."""
    from glm.data.loader import InfillingData, ValidLoader
    from glm.distributed import DistInfo
    from glm.training.checkpoint import load_model
    from glm.training.train import autocast_factory, evaluate, mix_weights

    model, _ = load_model(checkpoint)
    cfg = pipeline.pretrain
    shards = InfillingData(data_dir, seq_len=pipeline.infilling.seq_len, max_seq_len=pipeline.model.max_seq_len)
    valid = ValidLoader(shards, cfg.micro_batch_size, rank=0, world_size=1, max_batches=cfg.eval_batches)
    device = torch.device("cpu")
    out = evaluate(
        model, valid, cfg.eval_batches, device, autocast_factory("fp32", device), DistInfo(), mix_weights(shards.objective_mix)
    )
    return out["val_loss"]


def _precision_parity(steps: int) -> Iterator[dict]:
    """bf16 autocast against fp32 at equal steps: the demo's pretraining on its own shards, same seed and
    batches, `steps` optimizer steps each; both final models evaluated in fp32 on the same validation batches."""
    from glm.training.checkpoint import latest_checkpoint
    from glm.training.train import pretrain_on_shards

    cfg = load_config(DEMO_CONFIG)
    run = ROOT / cfg.run_dir
    common = {"name": f"pretrain/bf16-vs-fp32-{steps}-steps", "metric": "val_loss_fp32_eval", "unit": "nats", "better": "lower"}
    if not (run / "infill" / "manifest.json").is_file():
        yield {**common, "value": None, "note": f"no demo shards in {run}: run `glm-pipeline run demo --stage data` first"}
        return
    losses, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not cpu_has_fast_bf16():
                continue
            warmup = max(1, steps // 10)
            pre = cfg.pretrain.model_copy(
                update={
                    "precision": precision,
                    "steps": steps,
                    "eval_every": steps,
                    "checkpoint_every": steps,
                    "budget_minutes": None,
                    "optim": cfg.pretrain.optim.model_copy(update={"warmup_steps": warmup}),
                }
            )
            pipeline = cfg.model_copy(update={"pretrain": pre})
            out = Path(tmp) / precision
            t0 = time.perf_counter()
            pretrain_on_shards(pipeline, run / "infill", out)
            seconds[precision] = time.perf_counter() - t0
            losses[precision] = _val_loss_fp32(latest_checkpoint(out / "checkpoints"), pipeline, run / "infill")
    if "bf16" not in losses:
        yield {**common, "value": None, "note": "no native bf16 on this CPU: bf16 is emulated, not compared"}
        return
    yield {
        **common,
        "value": round(losses["bf16"], 4),
        "reference": round(losses["fp32"], 4),
        "ratio": round(losses["bf16"] / losses["fp32"], 4),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cpu": cpu_kind()["model"],
        "note": "validation loss (fp32 evaluation) after equal steps: value bf16-trained, reference fp32-trained",
    }


def run(quick: bool = False) -> Iterator[dict]:
    if quick:
        yield from _seconds_per_step("tiny", batch=8, seq_len=64, steps=2, rounds=1)
        yield _quick_time_to_loss()
        return
    yield from _seconds_per_step("small", batch=32, seq_len=128, steps=2, rounds=4)
    yield _demo_time_to_loss()
    yield from _precision_parity(PARITY_STEPS)
