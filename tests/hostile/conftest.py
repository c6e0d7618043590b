"""What a hostile or careless user does to the pipeline: each test runs the real command or stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m glm_pipeline.flows.cli ARGS` from the repository root, as a user runs it."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "glm_pipeline.flows.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real Prefect server on loopback (tests/integration/server.py), shared by this folder's modules."""
    from tests.integration.server import prefect_server

    with prefect_server(tmp_path_factory.mktemp("server")) as s:
        yield s
