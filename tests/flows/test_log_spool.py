"""flows.log_spool against a real Prefect server: the lines the API cannot take stay on disk, later sent once."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from glm_pipeline.flows import log_spool
from prefect import flow, get_client, get_run_logger
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from tests.flows.api import logs
from tests.integration.stack import wait_for

pytestmark = pytest.mark.usefixtures("prefect_api")


def _dead_api() -> str:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/api"


def _flow_run_id() -> str:
    @flow(name="log-spool-target")
    def target() -> None: ...

    with get_client(sync_client=True) as c:
        return str(c.create_flow_run(target).id)


def _spool_lines(spool: log_spool.Spool, run_id: str, n: int) -> None:
    """n records through the spooling handler, as a training loop's logger would send them."""
    logger = logging.getLogger("glm.log-spool-test")
    handler = log_spool.SpooledAPILogHandler(spool, APILogHandler())
    logger.addHandler(handler)
    try:
        for i in range(1, n + 1):
            logger.warning("step %d/%d loss 1.0", i, n, extra={"flow_run_id": run_id})
    finally:
        logger.removeHandler(handler)


def _messages(run_id: str) -> list[str]:
    return [r.message for r in logs(run_id) if r.name == "glm.log-spool-test"]


def test_lines_the_api_refuses_stay_on_disk_and_a_later_process_sends_each_once(tmp_path):
    run_id = _flow_run_id()
    path = tmp_path / log_spool.SPOOL_DIR / f"{run_id}-1.jsonl"
    path.parent.mkdir()
    with temporary_settings({PREFECT_API_URL: _dead_api(), PREFECT_CLIENT_MAX_RETRIES: 0}):
        down = log_spool.Spool(path)
        _spool_lines(down, run_id, 30)
        assert not down.close(timeout=1.0)  # the API is down: nothing sent, nothing dropped
    assert len(path.read_text().splitlines()) == 30
    # the process had sent 20 of them before it was killed mid-line
    path.with_suffix(".sent").write_text("20")
    with open(path, "a") as f:
        f.write('{"name": "glm.log-spool-te')

    assert log_spool.Spool(path).close(timeout=60)  # the next process in the run directory, API back
    assert _messages(run_id) == [f"step {i}/30 loss 1.0" for i in range(21, 31)]
    assert not path.exists() and not path.with_suffix(".sent").exists()


def test_a_flow_body_s_records_reach_the_api_through_the_spool_and_leave_nothing_behind(tmp_path):
    @flow(name="log-spool-body")
    def body(run_dir: str) -> str:
        from prefect.runtime import flow_run

        with log_spool.spooled(run_dir, flow_run.id):
            kinds = {type(h) for lg in (logging.getLogger("glm"), get_run_logger().logger) for h in lg.handlers}
            assert log_spool.SpooledAPILogHandler in kinds and APILogHandler not in kinds
            get_run_logger().info("from the flow's logger")
            logging.getLogger("glm.train").info("step 1/1 loss 2.0")
            spooled = [
                json.loads(x)["message"]
                for p in (tmp_path / log_spool.SPOOL_DIR).glob("*.jsonl")
                for x in p.read_text().splitlines()
            ]
        assert APILogHandler in {type(h) for h in logging.getLogger("glm").handlers}  # Prefect's handler is back
        assert spooled == ["from the flow's logger", "step 1/1 loss 2.0"]
        return flow_run.id

    run_id = body(str(tmp_path))
    wait_for("the spool to be sent and removed", lambda: not list((tmp_path / log_spool.SPOOL_DIR).iterdir()), 30)
    messages = [r.message for r in logs(run_id)]
    assert "from the flow's logger" in messages and "step 1/1 loss 2.0" in messages


def test_a_spool_that_is_a_link_is_not_used_and_a_linked_file_in_it_is_neither_read_nor_deleted(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "keep.jsonl"
    victim.write_text('{"name": "not a spool line"}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / log_spool.SPOOL_DIR).symlink_to(outside)
    with log_spool.spooled(str(run), "some-flow-run"):
        assert not [h for _, h in log_spool._api_handlers() if isinstance(h, log_spool.SpooledAPILogHandler)]
    assert "is not a directory of the run" in capsys.readouterr().err
    assert sorted(p.name for p in outside.iterdir()) == ["keep.jsonl"]  # nothing written there

    (run / log_spool.SPOOL_DIR).unlink()
    (run / log_spool.SPOOL_DIR).mkdir()
    (run / log_spool.SPOOL_DIR / "planted.jsonl").symlink_to(victim)
    run_id = _flow_run_id()
    with log_spool.spooled(str(run), run_id):
        pass
    assert victim.read_text() == '{"name": "not a spool line"}\n'  # not read as lines to send, not deleted
    assert (run / log_spool.SPOOL_DIR / "planted.jsonl").is_symlink()
