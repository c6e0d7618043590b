"""`python -m benchmarks gpu_check`: the CPU subset runs the real checks and passes; without CUDA the
default mode says so and exits 0. No timing is asserted: throughput lines are only checked for shape."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.__main__ import REQUIRED

REPO = Path(__file__).resolve().parents[2]
STATUSES = {"pass", "fail", "skip", "measured"}


def _command(*args: str) -> tuple[int, list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "gpu_check", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    lines = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in proc.stdout.splitlines()
    ]
    return proc.returncode, lines, proc.stderr


def _well_formed(row: dict) -> None:
    assert all(k in row for k in REQUIRED), row
    assert row["status"] in STATUSES, row
    assert row["passed"] is {"pass": True, "fail": False}.get(row["status"]), row
    if row["status"] == "skip":
        assert row["reason"] and (row["value"] is None or row["metric"] == "cuda_devices"), row  # nothing measured
    if row["status"] in ("pass", "fail"):
        assert isinstance(row["tolerance"], (int, float)), row
    if row["value"] is not None:
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), row


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the default mode runs the GPU checks")
def test_without_cuda_the_default_mode_says_it_needs_cuda_and_exits_0():
    code, lines, stderr = _command()
    assert code == 0
    assert len(lines) == 1
    _well_formed(lines[0])
    assert lines[0]["status"] == "skip" and "needs CUDA" in lines[0]["reason"] and "--device cpu" in lines[0]["reason"]
    assert "needs CUDA" in stderr


@pytest.mark.slow
def test_cpu_mode_runs_every_check_and_each_line_passes():
    code, lines, stderr = _command("--device", "cpu")
    assert code == 0, stderr[-3000:]
    for row in lines:
        _well_formed(row)
    assert not [r for r in lines if r["status"] == "fail"]
    passed = {(r["name"], r["metric"]) for r in lines if r["status"] == "pass"}
    assert passed == {
        ("gpu_check/attention/forward/train/float32", "max_abs_error"),
        ("gpu_check/attention/forward/left_padded/float32", "max_abs_error"),
        ("gpu_check/train/bf16_vs_fp32", "loss_max_rel_error"),
        ("gpu_check/fused_adamw", "max_abs_param_diff"),
        ("gpu_check/onnx/parity", "logits_max_abs_diff"),
        ("gpu_check/onnx/parity", "presents_max_abs_diff"),
        ("gpu_check/onnx/greedy", "divergent_steps"),
    }
    by_name = {r["name"]: r for r in lines}
    # the CPU-only gaps are said, not silently dropped
    assert {
        "gpu_check/attention/bf16",
        "gpu_check/attention/backward",
        "gpu_check/attention/model",
        "gpu_check/train/mfu",
        "gpu_check/distributed",
    } <= {r["name"] for r in lines if r["status"] == "skip"}
    assert by_name["gpu_check/train/throughput"]["status"] == by_name["gpu_check/total"]["status"] == "measured"
    assert by_name["gpu_check/train/mfu"]["formula"].startswith("6*N_nonembedding")
    train = by_name["gpu_check/train/bf16_vs_fp32"]
    assert len(train["losses_bf16"]) == len(train["losses_fp32"]) == train["steps"] > 1


def test_only_and_unknown_options_are_handled_by_the_benchmark_command():
    code, lines, _ = _command("--device", "cpu", "--only", "fused_adamw")
    assert code == 0
    assert [r["name"] for r in lines] == ["gpu_check", "gpu_check/fused_adamw", "gpu_check/total"]
    assert (
        lines[1]["status"] == "pass" and lines[1]["fused_by_configure_optimizer"] is False
    )  # CPU: the fused kernel is checked directly
    code, _, stderr = _command("--device", "tpu")
    assert code == 2 and "--device" in stderr


@pytest.mark.slow
def test_distributed_check_compares_two_ranks_with_one_on_gloo():
    """The same launcher the GPU check uses (torchrun, 2 processes), on gloo; DDP here, FSDP on the GPU run."""
    rows = list(gpu_check.check_distributed(torch.device("cpu"), strategies=("ddp",), force=True))
    assert [r["name"] for r in rows] == ["gpu_check/distributed/ddp"]
    row = rows[0]
    assert row["status"] == "pass", row
    assert row["backend"] == "gloo" and row["world_size"] == 2 and len(row["losses"]) == row["steps"]


def test_a_result_is_judged_against_its_tolerance():
    assert gpu_check._line("x", "err", 1e-6, "abs", tolerance=1e-5)["status"] == "pass"
    for bad in (1e-4, math.nan, math.inf, None):
        row = gpu_check._line("x", "err", bad, "abs", tolerance=1e-5)
        assert row["status"] == "fail" and row["passed"] is False
    assert gpu_check._line("x", "tokens_per_s", 10.0, "tokens/s")["status"] == "measured"
    safe = gpu_check._json_safe({"value": math.nan, "other": 1.0})
    assert safe["value"] is None and safe["non_finite"] == ["value"]
    json.dumps(safe, allow_nan=False)


@pytest.mark.parametrize(
    "name, peak, dtype",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12, "bf16"),
        ("NVIDIA A10G", 70e12, "bf16"),
        ("NVIDIA A10", 125e12, "bf16"),
        ("NVIDIA H100 80GB HBM3", 989e12, "bf16"),
        ("NVIDIA H100 PCIe", 756e12, "bf16"),
        ("NVIDIA L4", 121e12, "bf16"),
        ("NVIDIA L40S", 362e12, "bf16"),
        ("NVIDIA GeForce RTX 4090", 165e12, "bf16"),
        ("Tesla T4", 65e12, "fp16"),
    ],
)
def test_peak_table_matches_the_most_specific_name(name, peak, dtype):
    assert gpu_check.peak_flops(name)[:2] == (peak, dtype)


def test_an_unknown_gpu_has_no_peak():
    assert gpu_check.peak_flops("NVIDIA GeForce GTX 1080") is None
