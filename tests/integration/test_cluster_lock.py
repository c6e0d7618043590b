"""One run per run directory across machines (tasks/runguard.py): two data flows of one run directory from
two processes against one real Prefect server, with glm.runlock's flock made a no-op in both, as on a
network filesystem that does not honour it. The second fails at once with one line while the first
holds the Prefect global concurrency limit's slot, and runs once the first has finished."""

from __future__ import annotations

import subprocess
import sys
import time

from glm_pipeline.tasks.runguard import limit_name

from tests.integration.server import ROOT, client_of, stop_group

FLOW = """
import contextlib, pathlib, sys, time
import glm.runlock
glm.runlock.run_lock = lambda run_dir, owner=None: contextlib.nullcontext()  # a filesystem without flock: only Prefect guards
import glm.corpus
if len(sys.argv) > 3:  # hold the run until the test says so (ingest waits for a file)
    real, gate = glm.corpus.ingest, pathlib.Path(sys.argv[3])
    def ingest(*args, **kwargs):
        while not gate.exists():
            time.sleep(0.1)
        return real(*args, **kwargs)
    glm.corpus.ingest = ingest
from glm_pipeline.flows.pipeline import data_flow
from glm.config import load_config
from tests.flows.conftest import SMALL
data_flow(load_config("configs/tiny.yaml", [*SMALL, "name=" + sys.argv[2], "run_dir=" + sys.argv[1]]))
"""


def _slots(server, name: str) -> int | None:
    from prefect.exceptions import ObjectNotFound

    with client_of(server) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).active_slots
        except ObjectNotFound:
            return None


def test_a_second_flow_of_a_run_directory_from_another_process_is_refused(server, tmp_path):
    run, gate = tmp_path / "run", tmp_path / "go"
    env = {**server.env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-c", FLOW, str(run), "first", str(gate)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        name = limit_name(run)
        deadline = time.monotonic() + 120
        while _slots(server, name) != 1:
            assert first.poll() is None and time.monotonic() < deadline, (
                first.stdout.read() if first.poll() is not None else "no slot"
            )
            time.sleep(0.2)

        second = subprocess.run(
            [sys.executable, "-c", FLOW, str(run), "second"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert second.returncode != 0
        line = f"run directory {run} is in use by another flow run by pid {first.pid} on host "
        assert line in second.stderr and f"(Prefect global concurrency limit {name!r} has its one slot taken" in second.stderr
        assert not (run / "docs").exists()  # the first is still waiting at ingest; the second wrote nothing

        gate.touch()
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            stop_group(first)
    assert _slots(server, name) == 0  # released when the flow ended

    again = subprocess.run(
        [sys.executable, "-c", FLOW, str(run), "again"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
