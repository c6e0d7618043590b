"""A real `prefect server start` process on a free loopback port, for the integration tests.

Integration tests exercise what a user runs (a server, `glm-pipeline serve`, `prefect deploy`, a
worker, schedules) in real processes; nothing here is monkeypatched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200 and json.loads(r.read()) is True
    except (OSError, ValueError):
        return False


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT/api
    env: dict[str, str]  # the environment a client process of this server runs with
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def prefect_server(directory: Path, startup_seconds: float = 120.0, **settings: str) -> Iterator[Server]:
    """`prefect server start` on 127.0.0.1:<free port> with its own PREFECT_HOME; always stopped.

    `settings` are extra PREFECT_* environment variables of the server (and its clients), e.g. a
    short scheduler loop interval.
    """
    import time

    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(directory / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_URL": url,
        "DO_NOT_TRACK": "1",
        **settings,
    }
    log_path = directory / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(url, env, log_path)
        try:
            deadline = time.monotonic() + startup_seconds
            while not healthy(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"the Prefect server exited with code {proc.returncode}:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Prefect server did not become healthy:\n{server.log_tail()}")
                time.sleep(0.25)
            yield server
        finally:
            stop_group(proc)


@contextlib.contextmanager
def client_of(server: Server) -> Iterator[object]:
    """A synchronous Prefect client of `server` (this process's settings are left alone afterwards)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
        yield client
