"""One run per run directory across machines: a Prefect global concurrency limit of one slot.

glm.runlock's flock guards a run directory on one machine, and across machines only where the
shared filesystem honours flock (many NFS setups do not, some silently). Every flow therefore also
takes the one slot of the global concurrency limit `glm-run-<dir>-<hash of its real path>` on the
Prefect server the flows report to: a second flow run of the same run directory, from any machine,
fails at once with one line. The slot is a lease that the holder renews while it runs: a holder
that dies frees it when its lease expires (LEASE_SECONDS), never later.

Without a server (the ephemeral API of a plain `glm-pipeline run`) there is no other machine to
exclude: the flock alone guards the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from glm.runlock import RunDirBusy
from glm.shards import atomic_write_json

log = logging.getLogger("glm.runguard")
GUARD_FILE = ".run-guard.json"  # the slot's holder: lease id, host, pid

LEASE_SECONDS = 60.0  # a dead holder's slot is free again this long after its last renewal
WAIT_SECONDS = 2.0  # a second run waits this long for the slot, then fails


def limit_name(run_dir: str | Path) -> str:
    """The limit's name: readable, and unique per real path (Prefect names cannot hold '/')."""
    real = os.path.realpath(run_dir)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(real).name).strip("-")[:60] or "run"
    return f"glm-run-{base}-{hashlib.sha256(real.encode()).hexdigest()[:12]}"


def _server_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _alive_here(holder: dict) -> bool:
    """Whether a recorded holder may still run: on another host (unknown), or a live pid on this one."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _acquire(name: str) -> Any:
    """The lease id of the limit's slot, taken; TimeoutError if it stays taken for WAIT_SECONDS.

    One request per try (423 while the slot is taken), not prefect.concurrency's acquisition
    service: that one gives up after its timeout even while a slow server is still granting the
    slot, leaving a slot taken by nobody until its lease expires."""
    from uuid import UUID

    from prefect import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    deadline = time.monotonic() + WAIT_SECONDS
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS
                )
                return UUID(response.json()["lease_id"])
            except PrefectHTTPStatusError as e:
                if e.response.status_code != 423:
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the slot of {name} stayed taken for {WAIT_SECONDS:g} s") from None
            time.sleep(0.25)


@contextlib.contextmanager
def cluster_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's slot on the Prefect server for the block; RunDirBusy if another run holds it.

    The holder's lease, host and pid are kept in RUN_DIR/.run-guard.json: a run that finds the slot
    taken by a process of this host that no longer exists (a run whose server went away before it
    could release its slot) revokes that lease instead of waiting for it to expire.
    """
    if _server_url() is None:
        yield
        return
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import release_concurrency_slots_with_lease
    from prefect.exceptions import ObjectAlreadyExists

    name, record = limit_name(run_dir), Path(run_dir) / GUARD_FILE
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:  # made by an earlier run of this directory (or a concurrent one)
            pass
    try:
        acquired = _acquire(name)
    except TimeoutError:
        holder = _read(record)
        if holder is None or _alive_here(holder):
            where = f" by pid {holder.get('pid')} on host {holder.get('host')}" if holder else ""
            raise RunDirBusy(
                f"run directory {run_dir} is in use by another flow run{where} (Prefect global concurrency limit "
                f"{name!r} has its one slot taken; a killed run's slot frees within {LEASE_SECONDS:g} s); wait for it or stop it"
            ) from None
        log.warning("revoking the slot of %s: pid %s on this host is gone", name, holder.get("pid"))
        release_concurrency_slots_with_lease(UUID(holder["lease_id"]))
        try:
            acquired = _acquire(name)
        except TimeoutError:
            # the lease is unknown to the server (a restarted server keeps leases in memory): its slot
            # would never free, so give it back directly
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots(names=[name], slots=1, occupancy_seconds=1.0)
            acquired = _acquire(name)
    atomic_write_json(record, {"lease_id": str(acquired), "host": socket.gethostname(), "pid": os.getpid()})
    try:
        # a server that goes away mid-run must not stop the run (the flock still guards this machine)
        with maintain_concurrency_lease(acquired, LEASE_SECONDS, raise_on_lease_renewal_failure=False):
            yield
    finally:
        try:
            release_concurrency_slots_with_lease(acquired)
            record.unlink(missing_ok=True)
        except Exception as e:  # the server is gone: the lease expires, or the next run here revokes it
            log.warning("could not release the slot of %s (%s); it frees within %g s", name, e, LEASE_SECONDS)


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and "lease_id" in value else None
