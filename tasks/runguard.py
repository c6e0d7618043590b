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
import os
import re
from pathlib import Path
from typing import Iterator

from glm.runlock import RunDirBusy

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


@contextlib.contextmanager
def cluster_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's slot on the Prefect server for the block; RunDirBusy if another run holds it."""
    if _server_url() is None:
        yield
        return
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = limit_name(run_dir)
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:  # made by an earlier run of this directory (or a concurrent one)
            pass
    with contextlib.ExitStack() as stack:
        try:
            # a server that goes away mid-run must not stop the run (the flock still guards this machine)
            guard = concurrency(
                name,
                occupy=1,
                timeout_seconds=WAIT_SECONDS,
                lease_duration=LEASE_SECONDS,
                strict=True,
                raise_on_lease_renewal_failure=False,
            )
            stack.enter_context(guard)
        except TimeoutError:
            raise RunDirBusy(
                f"run directory {run_dir} is in use by another flow run (Prefect global concurrency limit {name!r} "
                f"has its one slot taken, maybe from another machine; a killed run's slot frees within "
                f"{LEASE_SECONDS:g} s); wait for it or stop it"
            ) from None
        yield
