"""One real Prefect server per integration module (tests/integration/server.py)."""

from __future__ import annotations

import pytest

from tests.integration.server import prefect_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("server")) as s:
        yield s
