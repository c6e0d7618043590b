"""Flow run heartbeats that stop as soon as the flow run ends.

Prefect 3.8 emits a heartbeat event every flows.heartbeat_frequency seconds (180 by default) from
a thread that sleeps in one-second steps, and joins that thread when the flow run ends: every
flow run ends 0 to 1 s late (a whole second for a short run). `send_heartbeats` is the same
heartbeat, the same events at the same interval, from a thread that waits on the stop event, so
the join returns at once. Installed when this package is imported, and only if the flow engine
has the parts it relies on; otherwise Prefect's own is kept.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Iterator

import prefect.flow_engine as flow_engine

_ENGINE_PARTS = ("_build_heartbeat_event_template", "_emit_flow_run_heartbeat", "heartbeat_seconds")


@contextlib.contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Heartbeats for `engine`'s flow run while the block runs (Prefect's _send_heartbeats, promptly stopped)."""
    seconds = engine.heartbeat_seconds
    if seconds is None:  # heartbeats are off (flows.heartbeat_frequency unset)
        yield
        return
    seconds = max(seconds, flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            state = engine.flow_run.state if engine.flow_run else None
            if state is not None and state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(seconds)

    # the thread sees the caller's settings (the API URL), as Prefect's own heartbeat thread does
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), name="flow-run-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def install() -> bool:
    """Use send_heartbeats in Prefect's flow engine; False (nothing changed) if the engine differs."""
    engine = getattr(flow_engine, "BaseFlowRunEngine", None)
    if (
        not hasattr(flow_engine, "_send_heartbeats")
        or not hasattr(flow_engine, "MINIMUM_HEARTBEAT_INTERVAL")
        or engine is None
        or not all(hasattr(engine, part) for part in _ENGINE_PARTS)
    ):
        return False
    flow_engine._send_heartbeats = send_heartbeats
    return True
