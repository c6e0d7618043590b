"""Prefect tasks: one thin task per pipeline stage (glm.stages), plus orchestration concerns only.

Importing this package routes the `glm` loggers into Prefect's run logs; it must happen before
Prefect configures logging, so the environment is set here, before the first Prefect import.
It also makes flow run heartbeats stop promptly when a flow run ends (tasks.heartbeats).
"""

from __future__ import annotations

import logging
import os


def _route_glm_logs() -> None:
    names = [n.strip() for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n.strip()]
    if "glm" not in names:
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*names, "glm"])
    # glm also runs outside flow runs (glm.stages.run_pipeline, tests): no warning about a missing run there
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # the embedded server's telemetry fails loudly (at ERROR) on machines without internet access;
    # opt out unless the user opted in explicitly
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


_route_glm_logs()

import prefect  # noqa: E402,F401  (configures logging with the variables above)


def _attach_glm_logger() -> None:
    """Also when Prefect was imported (and logging configured) before this package."""
    glm_logger = logging.getLogger("glm")
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in glm_logger.handlers:
            glm_logger.addHandler(handler)
    if glm_logger.level == logging.NOTSET:
        glm_logger.setLevel(logging.INFO)


_attach_glm_logger()

from glm_pipeline.tasks import heartbeats  # noqa: E402

heartbeats.install()
