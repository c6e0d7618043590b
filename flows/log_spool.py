"""A flow run's log lines kept on disk until the Prefect API has them.

Prefect's API log handler queues records in memory and sends them in batches; a batch the API
still refuses after the client's retries (about a minute of backoff) is dropped, and a process
that ends or dies takes its queue with it. Measured on the self-hosted stack: Postgres down for
100 s under a training run, the run recovered and completed, and every one of its 240 training log
lines was gone from the API (tests/integration/test_stack.py).

`spooled(run_dir)` wraps a flow's body (flows.api_watch.watch does it). While it runs, every record
bound for the API is first appended to RUN_DIR/.log-spool/FLOW_RUN-PID.jsonl, then sent in order by
a thread that retries until the API accepts it; FLOW_RUN-PID.sent counts the lines it took. When
the process exits, it waits up to EXIT_SECONDS for the rest to go (normally well under a
second; the flow run's own last calls to the API come first, so the lines have that long too);
whatever is still unsent stays on disk, and the next flow run in the run directory (the
same run re-run after a crash, or tomorrow's) sends it with its original flow run, task run and
timestamp. A line is then shown late, or in the rare case where the API stored a batch but its
answer was lost, twice; never silently lost. The run directory's lock (glm.runlock) makes one
process at a time the spool's writer.
"""

import atexit
import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect.logging.handlers import APILogHandler

SPOOL_DIR = ".log-spool"
BATCH_LINES = 500  # per POST /logs/ (Prefect's own batches are up to 3 MB; lines here are short)
RETRY_SECONDS = 2.0  # between attempts once the client's own retries gave up
EXIT_SECONDS = 30.0  # the body has ended: how long unsent lines may hold the process


class Spool:
    """One spool file and the thread that sends it; `path` may hold lines of an earlier process."""

    def __init__(self, path: Path):
        self.path, self.sent_path = path, path.with_suffix(".sent")
        self.lock = threading.Condition()
        self.closing = False
        self.sent = _read_count(self.sent_path)
        self.pending: list[dict[str, Any]] = _read_lines(path)[self.sent :]
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (open for the spool's life)
        from prefect.context import get_settings_context

        # the thread sends with this context's Prefect settings (the API URL may be a contextvar, not the
        # environment) but with a client of its own: a flow run's client closes when the run ends
        self.settings = get_settings_context()
        self.thread = threading.Thread(target=self._send_loop, name=f"log-spool-{path.stem}", daemon=True)
        self.thread.start()

    def add(self, log: dict[str, Any]) -> None:
        log.pop("__payload_size__", None)  # Prefect's own batching key, not part of the API's schema
        with self.lock:
            self.file.write(json.dumps(log) + "\n")
            self.file.flush()  # on disk (the page cache) before the API has it: a killed process keeps it
            self.pending.append(log)
            self.lock.notify()

    def finish(self) -> None:
        """No more lines: the thread sends what is left (for as long as the process lives) and stops."""
        with self.lock:
            self.closing = True
            self.lock.notify()

    def close(self, timeout: float = EXIT_SECONDS) -> bool:
        """Wait up to `timeout` s for every line to be sent; True (and the files removed) if they were."""
        self.finish()
        self.thread.join(timeout)
        with self.lock:
            return not self.pending

    def _send_loop(self) -> None:
        from prefect import get_client
        from prefect.context import SettingsContext
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        warned = False
        # the loop below is the retry: the client's own backoff (up to 32 s a wait) would hold the lines
        # back long after the API is back
        with (
            SettingsContext(profile=self.settings.profile, settings=self.settings.settings),
            temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}),
            get_client(sync_client=True) as client,
        ):
            while True:
                with self.lock:
                    while not self.pending and not self.closing:
                        self.lock.wait()
                    if not self.pending:  # finished and all sent: the spool is no longer needed
                        self.file.close()
                        for p in (self.path, self.sent_path):
                            p.unlink(missing_ok=True)
                        return
                    batch = self.pending[:BATCH_LINES]
                try:
                    client.create_logs(batch)
                except Exception as e:  # the API is down or refusing: keep the lines, try again
                    if not warned:  # not through logging: this very handler would spool the warning
                        print(
                            f"glm-pipeline: log lines kept in {self.path} until the Prefect API takes them ({e})", file=sys.stderr
                        )
                        warned = True
                    threading.Event().wait(RETRY_SECONDS)
                    continue
                with self.lock:
                    del self.pending[: len(batch)]
                    self.sent += len(batch)
                    _write_count(self.sent_path, self.sent)


class SpooledAPILogHandler(APILogHandler):
    """Prefect's API log handler (same formatting, run ids, size limit) with a spool as its queue."""

    def __init__(self, spool: Spool, like: APILogHandler):
        super().__init__(level=like.level)
        self.setFormatter(like.formatter)
        self.filters = list(like.filters)
        self.spool = spool

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from prefect.context import get_settings_context

            if not get_settings_context().settings.logging.to_api.enabled or not getattr(record, "send_to_api", True):
                return
            self.spool.add(self.prepare(record))
        except Exception:
            self.handleError(record)  # Prefect's: a record outside any run is ignored as configured


def _read_count(path: Path) -> int:
    try:
        return int(path.read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return 0


def _write_count(path: Path, n: int) -> None:
    tmp = path.with_suffix(".sent.tmp")
    tmp.write_text(str(n), encoding="ascii")
    os.replace(tmp, path)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The spool's lines; a line cut short by a killed process (the last one) is skipped."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(text))
    return lines


def _api_handlers() -> list[tuple[logging.Logger, APILogHandler]]:
    """Every (logger, Prefect API handler) pair configured in this process (glm's logger shares prefect.extra's)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return [(lg, h) for lg in loggers for h in lg.handlers if type(h) is APILogHandler]  # exactly Prefect's, not ours


@contextlib.contextmanager
def spooled(run_dir: str, flow_run_id: str | None, api_gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """The body of a flow run: its API-bound log records spooled in RUN_DIR (module docstring).
    `api_gone()` at the end: the API is known to be down, so nothing is waited for (the lines stay on disk)."""
    if flow_run_id is None:
        yield
        return
    spool_dir = Path(run_dir) / SPOOL_DIR
    if spool_dir.is_symlink() or (spool_dir.exists() and not spool_dir.is_dir()):
        # the spool reads, writes and deletes files there: never through a link to somewhere else
        print(
            f"glm-pipeline: {spool_dir} is not a directory of the run (a link or a file); log lines are not spooled "
            "this run: remove it",
            file=sys.stderr,
        )
        yield
        return
    spool_dir.mkdir(parents=True, exist_ok=True)
    # lines an earlier process left unsent; a link planted in the spool is neither read nor deleted
    earlier = [Spool(p) for p in sorted(spool_dir.glob("*.jsonl")) if p.is_file() and not p.is_symlink()]
    spool = Spool(spool_dir / f"{flow_run_id}-{os.getpid()}.jsonl")
    swapped: dict[int, SpooledAPILogHandler] = {}
    pairs = _api_handlers()
    for lg, handler in pairs:
        mine = swapped.setdefault(id(handler), SpooledAPILogHandler(spool, handler))
        lg.handlers[lg.handlers.index(handler)] = mine
    try:
        yield
    finally:
        for lg, handler in pairs:
            mine = swapped[id(handler)]
            if mine in lg.handlers:
                lg.handlers[lg.handlers.index(mine)] = handler
        # the flow run is not over yet (its final state, artifacts): the threads keep sending meanwhile,
        # and at exit the process waits up to EXIT_SECONDS for them; lines still unsent stay on disk
        for s in [spool, *earlier]:
            s.finish()
            atexit.register(s.close, 0.0 if api_gone() else EXIT_SECONDS)
