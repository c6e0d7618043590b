"""`glm-pipeline deploy`: register the deployments of prefect.yaml on the Prefect server at PREFECT_API_URL.

`prefect deploy` refuses a work pool that does not exist and prefect.yaml cannot declare one, so
the pools the deployments name are created first as process pools (an existing pool is left as
it is); then `prefect --no-prompt deploy --all` runs in the project directory, the checkout or
/app in the image. A worker runs the deployments: `prefect worker start --pool glm-process`.
"""

import subprocess
import sys
from pathlib import Path

import yaml

from glm.config import ConfigError


def work_pools(prefect_yaml: Path) -> list[str]:
    """The work pools the deployments of a prefect.yaml name."""
    doc = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}
    return sorted({d["work_pool"]["name"] for d in doc.get("deployments") or [] if (d.get("work_pool") or {}).get("name")})


def ensure_process_pool(name: str) -> bool:
    """Create the process work pool `name` unless it exists; True if it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:  # the template `prefect work-pool create --type process` would give it
            client.create_work_pool(
                WorkPoolCreate(
                    name=name, type=ProcessWorker.type, base_job_template=ProcessWorker.get_default_base_job_template()
                )
            )
        except ObjectAlreadyExists:  # another deploy made it meanwhile
            return False
    return True


def deploy(project: Path) -> int:
    """Create the missing work pools, then `prefect --no-prompt deploy --all` in `project`; its exit code."""
    from prefect.settings import PREFECT_API_URL

    prefect_yaml = project / "prefect.yaml"
    if not prefect_yaml.is_file():
        raise ConfigError(
            f"no prefect.yaml in {project}: run `glm-pipeline deploy` in the glm-pipeline checkout (or /app in the image)"
        )
    if not PREFECT_API_URL.value():
        raise ConfigError(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api, then deploy again"
        )
    for pool in work_pools(prefect_yaml):
        if ensure_process_pool(pool):
            print(f"created the process work pool {pool!r}", flush=True)
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=project).returncode
