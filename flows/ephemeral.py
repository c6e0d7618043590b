"""Prefect's ephemeral API server (no PREFECT_API_URL), started in a session of its own.

Prefect 3 starts it lazily as a `python -m uvicorn ...` child of the first process that needs an
API (prefect.server.api.server.SubprocessASGIServer) and stops it at exit (atexit). In the
caller's process group, it receives the terminal's Ctrl-C, or `timeout`'s SIGTERM to the group,
at the same moment as the run: it shuts down while the run still has to report its end, and the
run's log fills with "Error logging to API" retries for a minute. In its own session it hears
only this process, which reports the flow run Crashed and then stops it.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def detach_ephemeral_server() -> Any:
    """When this process would start Prefect's ephemeral server, make it start in a new session.

    Call before any Prefect client. SubprocessASGIServer() hands out one instance per port (None:
    the ephemeral one); registering ours first makes Prefect's own `SubprocessASGIServer()` calls
    return it. Returns it, or None with a PREFECT_API_URL (nothing to start; the server module,
    ~4 s of imports, stays unloaded).
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME, get_current_settings

    log_path = Path(PREFECT_HOME.value()) / "ephemeral-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server_log = open(log_path, "ab")  # the server's stdout for its lifetime

    class DetachedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect 3.8.8's command and environment (prefect/server/api/server.py), plus start_new_session
            return subprocess.Popen(
                args=[
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(prefect.__module_path__.parent),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env={
                    **os.environ,
                    "PREFECT_UI_ENABLED": "0",
                    "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1",
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                start_new_session=True,
                # its own log, not the terminal: at shutdown it reports events it could not flush with
                # long tracebacks, after the run's last line (successful runs included)
                stdout=server_log,
                stderr=subprocess.STDOUT,
            )

    return DetachedServer()
