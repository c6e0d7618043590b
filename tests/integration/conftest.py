"""One real Prefect server for every integration test (tests/integration/server.py).

Its scheduler loops every second and looks two minutes ahead, so a deployment's cron schedule
has its next run created at once (Prefect's defaults: every 60 s, an hour ahead).
"""

from __future__ import annotations

import pytest

from tests.integration.server import prefect_server

SCHEDULER = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME": "PT2M",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("server"), **SCHEDULER) as s:
        yield s
