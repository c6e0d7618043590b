"""Test-wide settings: deterministic, quiet, no network, small thread counts."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    import torch

    # tiny models are 10-100x slower with several intra-op threads on a shared 2-core machine
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
    yield


# another process holding a run directory's lock (glm.runlock), for the lock's tests
HOLDER = """
import sys, time
from glm.core.runlock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock (killed at the end if still alive)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def swap_registry():
    """use(stages...): the pipeline's REGISTRY holds only these stages for the test (the one dict every
    module reads, filled in place and restored, in order, afterwards)."""
    from glm.pipeline.engine import REGISTRY

    saved = dict(REGISTRY)

    def use(*declared):
        REGISTRY.clear()
        REGISTRY.update({st.name: st for st in declared})

    yield use
    REGISTRY.clear()
    REGISTRY.update(saved)
