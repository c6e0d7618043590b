"""Flow run heartbeats: the same events as Prefect's, from a thread that stops when the run ends."""

from __future__ import annotations

import logging
import threading

import glm_pipeline.tasks  # noqa: F401  (installs the heartbeats)
import prefect.flow_engine as flow_engine
from glm_pipeline.tasks import heartbeats
from glm_pipeline.tasks.heartbeats import send_heartbeats


class FakeState:
    def __init__(self, final: bool):
        self.final = final

    def is_final(self) -> bool:
        return self.final


class FakeFlowRun:
    def __init__(self):
        self.state = FakeState(final=False)


class FakeEngine:
    """What send_heartbeats uses of Prefect's flow run engine."""

    def __init__(self, heartbeat_seconds: int | None):
        self.heartbeat_seconds, self.flow_run, self.beats = heartbeat_seconds, FakeFlowRun(), []
        self.beaten = threading.Event()
        self.logger = logging.getLogger("test-heartbeats")

    def _build_heartbeat_event_template(self):
        return {"prefect.resource.id": "prefect.flow-run.x"}, []

    def _emit_flow_run_heartbeat(self, resource, related):
        self.beats.append(resource["prefect.resource.id"])
        self.beaten.set()


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flow-run-heartbeat"]


def test_prefects_flow_engine_uses_the_prompt_heartbeats():
    assert flow_engine._send_heartbeats is send_heartbeats


def test_a_heartbeat_is_sent_at_once_and_its_thread_ends_with_the_block():
    engine = FakeEngine(heartbeat_seconds=3600)
    with send_heartbeats(engine):
        [thread] = _heartbeat_threads()
        assert engine.beaten.wait(timeout=10)  # the first beat is sent as the thread starts
    assert engine.beats == ["prefect.flow-run.x"]
    assert not thread.is_alive()


def test_no_heartbeats_when_they_are_switched_off():
    engine = FakeEngine(heartbeat_seconds=None)
    with send_heartbeats(engine):
        assert _heartbeat_threads() == []
    assert engine.beats == []


def test_a_finished_flow_run_sends_no_more_heartbeats(monkeypatch):
    started = []

    class Recorded(threading.Thread):
        def start(self):
            started.append(self)
            super().start()

    monkeypatch.setattr(heartbeats.threading, "Thread", Recorded)
    engine = FakeEngine(heartbeat_seconds=3600)
    engine.flow_run.state = FakeState(final=True)
    with send_heartbeats(engine):
        [thread] = started
        thread.join(timeout=10)  # the thread sees the final state and ends without a beat (not after an hour)
        assert not thread.is_alive()
    assert engine.beats == []


def test_a_long_synchronous_training_step_does_not_starve_the_heartbeat(monkeypatch):
    """Training runs in the flow run's process (orchestration.train_in_process): one torch call of
    seconds must not hold the GIL, or the zombie automation would crash a healthy run."""
    import time

    import torch

    monkeypatch.setattr(flow_engine, "MINIMUM_HEARTBEAT_INTERVAL", 0.1)  # Prefect's is 30 s: too slow for a test
    engine = FakeEngine(heartbeat_seconds=0.1)
    a = torch.randn(2048, 2048)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with send_heartbeats(engine):
            assert engine.beaten.wait(timeout=10)
            before, start = len(engine.beats), time.monotonic()
            while time.monotonic() - start < 2.0:  # single torch calls of ~0.1-1 s each on one core
                a = torch.tanh(a @ a / 2048)
            during = len(engine.beats) - before
    finally:
        torch.set_num_threads(threads)
    # one beat per 0.1 s would be ~20; a call holding the GIL (e.g. sum(range(10**8))) lets none through
    assert during >= 5, during
