"""`glm-pipeline deploy`: register the deployments of prefect.yaml on the Prefect server at PREFECT_API_URL.

`prefect deploy` refuses a work pool that does not exist and prefect.yaml cannot declare one, so
the pools the deployments name are created first as process pools (an existing pool is left as
it is); then `prefect --no-prompt deploy --all` runs in the project directory, the checkout or
/app in the image. A worker runs the deployments: `prefect worker start --pool glm-process`.

Then two automations, created when missing and updated when they differ (deploying twice changes
nothing):
- ZOMBIE: a flow run that stops sending heartbeats (its worker or machine died; nothing else would
  ever end it: it would stay Running forever) is marked Crashed once `zombie_after` seconds pass
  without a heartbeat, 3 beats of the flow runs' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (prefect.yaml).
  This is the automation of Prefect's guide "How to detect and respond to zombie flows".
- RERUN: a Crashed run of a glm deployment (tag `glm`, on one of these work pools: not a run of
  `glm-pipeline serve`, whose process stopping crashes its run) that has run once or twice is scheduled
  again (AwaitingRetry, the same parameters): a worker picks it up and the stages resume from their
  outputs and the last checkpoint. A third crash is left Crashed for a human.
"""

import subprocess
import sys
from pathlib import Path

import yaml

from glm.core.config import ConfigError


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


ZOMBIE = "glm-pipeline: crash flow runs whose heartbeats stopped"
RERUN = "glm-pipeline: re-run crashed flow runs"
RERUN_RUN_COUNTS = ["1", "2"]  # re-run after the first and the second crash, not the third


def heartbeat_frequency(prefect_yaml: Path) -> int:
    """The PREFECT_FLOWS_HEARTBEAT_FREQUENCY the deployments' flow runs get (prefect.yaml's work pool env)."""
    from prefect.settings import get_current_settings

    doc = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}
    for d in doc.get("deployments") or []:
        env = ((d.get("work_pool") or {}).get("job_variables") or {}).get("env") or {}
        if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in env:
            return int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    return get_current_settings().flows.heartbeat_frequency or 180


def automations(zombie_after: float, pools: list[str]) -> list:
    """The ZOMBIE and RERUN automations (see the module docstring); RERUN only for runs of `pools`."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    zombie = AutomationCore(
        name=ZOMBIE,
        description=f"No heartbeat for {zombie_after:.0f} s: the process running the flow run is gone; mark it Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=zombie_after),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {zombie_after:.0f} s: the worker or the flow run process died",
            )
        ],
    )
    rerun = AutomationCore(
        name=RERUN,
        description="A crashed run of a glm deployment is scheduled again (twice at most); it resumes from its checkpoints.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"], "prefect.run-count": RERUN_RUN_COUNTS},
            match_related=[  # both: a glm run of a worker's pool (not a `glm-pipeline serve` run stopped by Ctrl-C)
                {"prefect.resource.id": ["prefect.tag.glm"], "prefect.resource.role": "tag"},
                {"prefect.resource.role": "work-pool", "prefect.resource.name": pools},
            ],
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED, name="AwaitingRetry", message="re-run after a crash (glm-pipeline deploy's automation)"
            )
        ],
    )
    return [zombie, rerun]


def _comparable(automation) -> dict:
    """What an automation does (its trigger's generated id aside; sets stay sets, their JSON order varies)."""
    return automation.model_dump(include={"name", "description", "enabled", "trigger", "actions"}, exclude={"trigger": {"id"}})


def ensure_automations(zombie_after: float, pools: list[str]) -> list[str]:
    """Create the automations that are missing, update those that differ; what was done, one line each."""
    from prefect import get_client

    done = []
    with get_client(sync_client=True) as client:
        for wanted in automations(zombie_after, pools):
            existing = client.read_automations_by_name(wanted.name)
            if not existing:
                client.create_automation(wanted)
                done.append(f"created the automation {wanted.name!r}")
                continue
            first, *duplicates = existing
            for extra in duplicates:  # two deploys at once made it twice
                client.delete_automation(extra.id)
            if _comparable(first) != _comparable(wanted):
                client.update_automation(first.id, wanted)
                done.append(f"updated the automation {wanted.name!r}")
    return done


def deploy(project: Path, zombie_after: float | None = None) -> int:
    """Create the missing work pools, then `prefect --no-prompt deploy --all` in `project`, then the
    automations (`zombie_after`: seconds without a heartbeat; default 3 heartbeats); its exit code."""
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
    code = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=project).returncode
    if code != 0:
        return code
    for line in ensure_automations(zombie_after or 3 * heartbeat_frequency(prefect_yaml), work_pools(prefect_yaml)):
        print(line, flush=True)
    return 0
