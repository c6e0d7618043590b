"""The data stages on an existing Dask cluster (orchestration.dask_address): a real `dask scheduler` and two
`dask worker` processes on loopback, started here. Outputs identical to the threads runner's (byte for byte
but for what differs between any two runs: timestamps, durations, mtimes and the hashes over them), and a
worker killed in the middle of a shard (tests/flows/dask_kill_once.py) survived: the shard is redone on
a worker, nothing under a final name is half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from glm_pipeline.flows.pipeline import data_flow

from tests.flows.api import task_runs
from tests.glm.test_multinode import _free_port

HERE = Path(__file__).resolve().parent
DATA_DIRS = ("docs", "tokenizer", "tokens", "infill")
# more, smaller shards than the flow tests' config: both workers get some
SHARDS = ["infilling.samples_per_shard=64", "infilling.epochs=2", "data.shard_docs=40"]


@pytest.fixture
def dask_cluster(prefect_api, tmp_path):
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    bin_dir = Path(sys.executable).parent
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    marker = tmp_path / "worker-killed"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs = [
        subprocess.Popen(
            [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
            env=env,
            stdout=open(logs / "scheduler.log", "w"),
            stderr=subprocess.STDOUT,
        )
    ]
    for i, extra in enumerate([[], ["--preload", str(HERE / "dask_kill_once.py")]]):
        procs.append(
            subprocess.Popen(
                [str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--name", f"w{i}", "--no-dashboard", *extra],
                env={**env, "GLM_TEST_KILL_MARKER": str(marker)} if extra else env,
                stdout=open(logs / f"worker-{i}.log", "w"),
                stderr=subprocess.STDOUT,
            )
        )
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address, marker, logs
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


# what differs between any two runs of the data stages, whatever the runner: when and how long, file
# mtimes, and the hashes of manifests that hold them (an infill shard's build key hashes the token manifest)
VOLATILE = {"created", "mtime_ns", "seconds", "seconds_last_run", "train_seconds", "build_key", "sha256"}


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _outputs(run_dir: str) -> dict[str, str]:
    """Each data-stage file's content: its sha256; an infill shard's table and metadata but its build key; a
    JSON manifest or report without its VOLATILE fields."""
    import pyarrow as pa

    root, out = Path(run_dir), {}
    for p in (p for d in DATA_DIRS for p in sorted((root / d).rglob("*")) if p.is_file()):
        data = p.read_bytes()
        if p.suffix == ".json":
            data = json.dumps(_stable(json.loads(data)), sort_keys=True).encode()
        elif p.suffix == ".arrow" and p.parts[-3] == "infill":
            table = pa.ipc.open_file(p).read_all()
            meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"glm.build_key"}
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as writer:
                writer.write_table(table.replace_schema_metadata(meta))
            data = sink.getvalue().to_pybytes()
        out[p.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def test_data_stages_on_an_existing_dask_cluster_equal_threads_and_survive_a_killed_worker(dask_cluster, make_config, tmp_path):
    address, marker, logs = dask_cluster
    run_dir = str(tmp_path / "run")  # both runs in one place: shard keys (stored in the shards) hash their paths
    threads = make_config(*SHARDS, "data.workers=2", run_dir=run_dir)  # data.workers is in the data stage key
    assert data_flow(threads, return_state=True).is_completed()
    expected = _outputs(run_dir)
    shutil.rmtree(run_dir)

    dask = make_config(
        *SHARDS, "data.workers=2", "orchestration.task_runner=dask", f"orchestration.dask_address={address}", run_dir=run_dir
    )
    state = data_flow(dask, return_state=True)
    assert state.is_completed(), state.message
    assert marker.is_file(), "the preloaded worker never built an infill shard: nothing was killed"

    got = _outputs(run_dir)
    hidden = {p for p in got if Path(p).name.startswith(".")}  # the killed writer's temporary, never renamed
    assert all(p.endswith(".tmp") for p in hidden)
    assert {p: h for p, h in got.items() if p not in hidden} == expected
    killed_shard = marker.read_text().split(" -> ")[1].strip()
    assert Path(killed_shard).is_file()  # redone by a worker, whole (its bytes are compared above)

    shard_runs = [r for r in task_runs(state.state_details.flow_run_id) if r.name.startswith("infill-")]
    assert shard_runs and all(r.state.is_completed() for r in shard_runs)
    assert "was killed by signal 9" in (logs / "worker-1.log").read_text()  # by its nanny's account
