"""What a run does when its Prefect API goes away, and the flow run it then leaves behind.

The API can die mid-run (a server restarted, a laptop's `prefect server start` closed). The stages
need no API: they go on and finish. But every call Prefect makes afterwards (the flow run's final
state, artifacts, the log and event queues drained at exit) retries with backoff, so a finished run
lived on for minutes, and its flow run stayed `Running` in the API forever.

`watch(run_dir)` wraps a flow's body:
- a daemon thread asks the API's /health every PING_SECONDS; after MISSES failures in a row the API
  counts as gone (and as back when it answers again);
- when the body ends and the API is gone, `glm-pipeline run` (which sets EXIT_WHEN_GONE) prints one
  line and leaves at once (os._exit: the stages' outputs are already written atomically, and
  nothing Prefect still wants to send can arrive): exit 0 when every stage finished, 1 when one failed;
- its log records reach the API through a spool in the run directory (flows.log_spool): a line
  the API cannot take now is sent later, by this process or the next one in the run directory;
- the flow run's id is kept in RUN_DIR/FLOW_RUN_FILE, and the next flow run in the same run directory
  marks the previous one Crashed if the API still shows it Running or Pending: it holds the run
  directory's lock (glm.runlock), so no process of that earlier run can still be alive.
"""

import contextlib
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from glm_pipeline.flows import log_spool

log = logging.getLogger(__name__)

PING_SECONDS = 5.0
MISSES = 2  # failed pings in a row that make the API "gone"
FLOW_RUN_FILE = ".flow-run.json"
EXIT_WHEN_GONE = False  # set by `glm-pipeline run`: a served or deployed run is left to its runner


class _Watch:
    def __init__(self, url: str):
        self.url, self.misses, self.gone_since = url, 0, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="prefect-api-watch", daemon=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=PING_SECONDS) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def _loop(self) -> None:
        while not self.stop.wait(PING_SECONDS):
            if self.healthy():
                self.misses, self.gone_since = 0, None
                continue
            self.misses += 1
            if self.misses == MISSES:
                self.gone_since = time.strftime("%H:%M:%S")
                log.warning("the Prefect API at %s stopped answering; the stages go on without it", self.url)

    @property
    def gone(self) -> bool:
        return self.gone_since is not None

    def gone_now(self) -> bool:
        """Gone, asking once more now: the body may end before the thread's pings have seen it go."""
        if self.gone:
            return True
        if self.healthy() or (time.sleep(1.0) or self.healthy()):  # two misses, as the thread counts
            return False
        self.gone_since = time.strftime("%H:%M:%S")
        return True


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _leave(watch: _Watch, run_dir: str, error: BaseException | None) -> None:
    """One line, then exit now: nothing Prefect would still send (final state, artifacts, logs) can arrive."""
    where = f"the Prefect API at {watch.url} stopped answering at {watch.gone_since}"
    then = f"the next run in {run_dir} marks its flow run Crashed (the API shows it Running until then)"
    if error is None:
        print(f"glm-pipeline: every stage finished, but {where}; {then}", file=sys.stderr, flush=True)
    else:
        from glm.core.errors import cut_lines

        message = cut_lines(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        print(f"error: {type(error).__name__}: {message}; {where}; {then}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(0 if error is None else 1)


def _mark_earlier_run(run_dir: str, current: str | None) -> None:
    """Mark the flow run recorded in RUN_DIR Crashed if the API still has it Running or Pending."""
    path = Path(run_dir) / FLOW_RUN_FILE
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))["id"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = None
    if earlier and earlier != current:
        from prefect import get_client
        from prefect.states import Crashed

        try:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(earlier)
                if run.state is not None and run.state.type.value in ("RUNNING", "PENDING"):
                    client.set_flow_run_state(
                        earlier,
                        Crashed(message=f"its process ended without reporting (the Prefect API was unreachable); "
                                f"marked by flow run {current} in {run_dir}"),
                        force=True,
                    )  # fmt: skip
                    log.warning("flow run %s (%s) was still %s: marked Crashed", earlier, run.name, run.state.type.value)
        except Exception as e:  # another API, a deleted run: nothing to mark
            log.debug("could not check the earlier flow run %s: %s", earlier, e)
    if current:
        from glm.core.shards import atomic_write_json

        with contextlib.suppress(OSError):
            atomic_write_json(path, {"id": current})


@contextlib.contextmanager
def watch(run_dir: str) -> Iterator[None]:
    """The body of a flow (inside its run lock): the earlier ghost marked, the API watched (module docstring)."""
    from prefect.runtime import flow_run

    current = flow_run.id
    _mark_earlier_run(run_dir, current)
    url = _api_url()
    if url is None:
        yield
        return
    w = _Watch(url.rstrip("/"))
    w.thread.start()
    try:
        with log_spool.spooled(run_dir, current, api_gone=lambda: w.gone):
            yield
    except BaseException as e:
        if EXIT_WHEN_GONE and not isinstance(e, KeyboardInterrupt) and w.gone_now():
            _leave(w, run_dir, e)
        raise
    else:
        if EXIT_WHEN_GONE and w.gone_now():
            _leave(w, run_dir, None)
    finally:
        w.stop.set()
