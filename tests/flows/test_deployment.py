"""prefect.yaml, docker-compose.yml, Dockerfile and .env.example hold together (no Docker engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


@pytest.mark.parametrize("deployment", [d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]])
def test_each_deployment_loads_its_flow_and_its_parameters_validate(deployment, monkeypatch):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from glm.core.config import PipelineConfig

    monkeypatch.chdir(ROOT)  # a run's working directory: where the deployment was made
    spec = next(d for d in PrefectYamlModel.model_validate(_prefect_yaml()).deployments if d.name == deployment)
    flow = load_flow_from_entrypoint(str(ROOT / spec.entrypoint), use_placeholder_flow=False)
    schema = parameter_schema(flow).model_dump_for_openapi()
    validate(spec.parameters, schema, raise_on_error=True, preprocess=True)  # as `prefect deploy` does
    params = flow.validate_parameters(spec.parameters)  # as each run does
    assert isinstance(params["config"], PipelineConfig)
    assert spec.work_pool.name == "glm-process"


def test_tiny_smoke_reads_configs_tiny_yaml_and_overrides_apply(monkeypatch):
    monkeypatch.chdir(ROOT)
    from glm_pipeline.flows.pipeline import glm_pipeline

    from glm.core.config import load_config

    smoke = next(d for d in _prefect_yaml()["deployments"] if d["name"] == "tiny-smoke")
    assert smoke["parameters"] == {"config": {"file": "configs/tiny.yaml"}}  # a reference, not a copy
    assert glm_pipeline.validate_parameters(smoke["parameters"])["config"] == load_config("configs/tiny.yaml")
    custom = {"config": {"file": "configs/tiny.yaml", "set": ["pretrain.steps=3", "run_dir=/tmp/x"]}}
    assert glm_pipeline.validate_parameters(custom)["config"] == load_config(
        "configs/tiny.yaml", ["pretrain.steps=3", "run_dir=/tmp/x"]
    )


def test_a_config_file_parameter_that_does_not_load_names_the_file():
    from glm_pipeline.flows.pipeline import glm_pipeline
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="config file 'configs/nope.yaml' not found"):
        glm_pipeline.validate_parameters({"config": {"file": "configs/nope.yaml"}})
    with pytest.raises(ParameterTypeError, match="pretrain.steps"):
        glm_pipeline.validate_parameters({"config": {"file": "configs/tiny.yaml", "set": ["pretrain.steps=many"]}})


def test_the_nightly_deployment_runs_the_whole_pipeline_on_a_cron_and_continues_pretraining():
    from prefect.client.schemas.schedules import CronSchedule

    doc = _prefect_yaml()
    nightly = next(d for d in doc["deployments"] if d["name"] == "nightly")
    assert nightly["entrypoint"] == "flows/pipeline.py:glm_pipeline"
    [schedule] = nightly["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 2 * * *"
    assert nightly["parameters"]["continue_steps"] > 0
    config = nightly["parameters"]["config"]
    assert config["data"]["sources"][0]["path"] == "data/incoming" and config["run_dir"] == "runs/nightly"


def test_runs_start_where_the_deployments_were_made_the_checkout_or_the_image_workdir():
    """The build step records `pwd` when deploying and the pull step moves there, so the relative
    paths of the deployments are the checkout's, or /app's where the compose `deploy` service runs."""
    doc = _prefect_yaml()
    [build] = doc["build"]
    step = build["prefect.deployments.steps.run_shell_script"]
    assert step["script"] == "pwd"
    [pull] = doc["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ %s.stdout }}" % step["id"]
    assert re.search(r"^WORKDIR /app$", (ROOT / "Dockerfile").read_text(), re.M)
    services = _compose()["services"]
    assert (
        services["deploy"]["command"] == ["glm-pipeline", "deploy"] and services["deploy"]["image"] == services["worker"]["image"]
    )
    mounts = {v.rsplit("}:", 1)[-1].split(":")[0] for v in services["worker"]["volumes"]}  # ${HOST:-default}:TARGET[:ro]
    assert mounts == {"/app/data", "/app/runs"}  # data/incoming and runs/ below the image's WORKDIR


def test_no_flow_module_postpones_its_annotations():
    """A served or deployed run unpickles the flows by value; a string annotation such as
    "PipelineConfig" then names nothing and every run fails its parameter validation."""
    offenders = [
        p.name for p in (ROOT / "flows").glob("*.py") if re.search(r"^from __future__ import annotations", p.read_text(), re.M)
    ]
    assert not offenders, f"flows/{offenders[0]}: remove `from __future__ import annotations` (see flows/pipeline.py)"


def _deploy(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run(
        [sys.executable, "-m", "glm_pipeline.flows.cli", "deploy"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, "PREFECT_HOME": str(cwd / "prefect-home"), **env},
    )


def test_deploy_outside_the_project_or_without_a_server_says_what_to_do(tmp_path):
    done = _deploy(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no prefect.yaml in {tmp_path}: run `glm-pipeline deploy` in the glm-pipeline checkout (or /app in the image)"
    ]
    shutil.copy(ROOT / "prefect.yaml", tmp_path / "prefect.yaml")
    done = _deploy(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: PREFECT_API_URL is not set: start a server (`prefect server start`) "
        "and export PREFECT_API_URL=http://127.0.0.1:4200/api, then deploy again"
    ]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def test_the_compose_file_is_valid(tmp_path):
    if _docker_compose_available():  # the real parser, with .env made from the example
        for name in ("docker-compose.yml", "Dockerfile", "prefect.yaml"):
            shutil.copy(ROOT / name, tmp_path / name)
        shutil.copy(ROOT / ".env.example", tmp_path / ".env")
        done = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", "prefect-server", "prefect-services", "deploy", "worker"}
    for name, svc in services.items():
        assert "restart" in svc, name
        if name != "deploy":  # the one-shot deploy step exits when done
            assert svc["healthcheck"]["test"], name
    assert "--no-services" in services["prefect-server"]["command"]
    assert services["prefect-services"]["command"] == "prefect server services start"
    assert services["prefect-services"]["environment"]["PREFECT_SERVER_EVENTS_MESSAGING_BROKER"] == "prefect_redis.messaging"
    assert services["prefect-services"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"


def test_only_the_ui_is_published_and_only_on_loopback():
    services = _compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"prefect-server"}
    for port in published["prefect-server"]:
        assert str(port).startswith("127.0.0.1:"), port


def test_the_worker_is_our_image_with_a_gpu_and_the_data_and_run_volumes():
    worker = _compose()["services"]["worker"]
    assert worker["build"] == "."
    assert "--pool glm-process" in worker["command"] and "--with-healthcheck" in worker["command"]
    [gpu] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"


def test_credentials_come_from_the_env_file_and_every_variable_is_in_the_example():
    text = COMPOSE.read_text()
    assert "POSTGRES_PASSWORD:?" in text  # compose refuses to start without a password
    for line in text.splitlines():  # no password written into the file itself
        if "PASSWORD" in line and not line.lstrip().startswith("#"):
            assert "${POSTGRES_PASSWORD" in line or "$${POSTGRES" in line, line
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    lines = (ROOT / ".env.example").read_text().splitlines()
    example = {line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("#")}
    assert used <= example, used - example


def test_the_dockerfile_installs_the_pinned_project_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.11", text, re.M)
    assert "-c constraints.txt" in text
    for package in ("glm", "tasks", "flows"):
        assert f"COPY {package}/ {package}/" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M)


def _setting_names(model) -> set[str]:
    """Every environment variable name a pydantic settings model reads (its prefix + field, its aliases)."""
    from pydantic_settings import BaseSettings

    names = set()
    prefix = (model.model_config.get("env_prefix") or "").upper()
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseSettings):
            names |= _setting_names(f.annotation)
            continue
        names.add(prefix + name.upper())
        for choice in getattr(f.validation_alias, "choices", [f.validation_alias]):
            if isinstance(choice, str):
                names.add(choice.upper())
    return names


def test_every_prefect_variable_of_the_stack_is_a_setting_of_prefect_3_8_8_or_prefect_redis():
    """A misspelt or invented PREFECT_* variable is silently ignored by Prefect (PREFECT_UI_PORT was one)."""
    from prefect.settings.models.root import Settings
    from prefect_redis.client import RedisMessagingSettings

    known = _setting_names(Settings) | _setting_names(RedisMessagingSettings)
    text = COMPOSE.read_text() + (ROOT / ".env.example").read_text() + (ROOT / "Dockerfile").read_text()
    used = set(re.findall(r"\b(PREFECT_[A-Z0-9_]+)", text))
    for d in _prefect_yaml()["deployments"]:
        used |= set(d["work_pool"]["job_variables"]["env"])
    unknown = sorted(v for v in used if v.startswith("PREFECT_") and v not in known)
    assert not unknown, f"not Prefect settings: {unknown}"
    assert "PREFECT_SERVER_EVENTS_MESSAGING_BROKER" in used and "PREFECT_REDIS_MESSAGING_HOST" in used  # the check sees them


def test_only_postgres_reads_the_env_file_and_no_password_reaches_the_worker():
    services = _compose()["services"]
    assert [name for name, svc in services.items() if "env_file" in svc] == ["postgres"]
    for name in ("worker", "deploy"):
        assert not [k for k in services[name].get("environment", {}) if "PASSWORD" in k or "DATABASE" in k], name
    assert "PREFECT_SERVER_DATABASE_PASSWORD" in services["prefect-server"]["environment"]


def test_the_server_image_is_built_with_the_project_pins_and_redis_keeps_an_append_only_file():
    services = _compose()["services"]
    for name in ("prefect-server", "prefect-services"):
        assert services[name]["build"] == {"context": ".", "target": "server"}, name
        assert "prefecthq/prefect" not in str(services[name].get("image")), name
    dockerfile = (ROOT / "Dockerfile").read_text()
    server_stage = dockerfile.split("FROM python:3.11-slim AS server", 1)[1].split("\nFROM ", 1)[0]
    assert "-c /tmp/constraints.txt" in server_stage and "prefect-redis" in server_stage
    pins = (ROOT / "constraints.txt").read_text()
    for pin in ("prefect==3.8.8", "fastapi<0.151", "sqlalchemy>=2.0,<2.1", "prefect-redis=="):
        assert pin in pins, pin
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_the_native_stack_gives_each_service_its_compose_environment_with_local_addresses():
    from glm_pipeline.flows.stack import Ports, service_env

    compose, ports = _compose(), Ports(postgres=15432, redis=16379, api=14200, worker=18080)
    variables = {"POSTGRES_PASSWORD": "pw", "GLM_UI_PORT": "14200"}
    for name in ("prefect-server", "prefect-services", "deploy", "worker"):
        env = service_env(compose, name, variables, ports)
        assert set(env) == set(compose["services"][name].get("environment") or {}), name
        assert not [v for v in env.values() if re.search(r"\b(postgres|redis|prefect-server):\d", v)], env
    server = service_env(compose, "prefect-server", variables, ports)
    assert server["PREFECT_SERVER_DATABASE_HOST"] == "127.0.0.1" and server["PREFECT_SERVER_DATABASE_PORT"] == "15432"
    assert (
        server["PREFECT_REDIS_MESSAGING_PORT"] == "16379" and server["PREFECT_SERVER_DOCKET_URL"] == "redis://127.0.0.1:16379/1"
    )
    assert server["PREFECT_SERVER_DATABASE_PASSWORD"] == "pw"
    assert service_env(compose, "worker", variables, ports)["PREFECT_API_URL"] == "http://127.0.0.1:14200/api"
    assert service_env(compose, "worker", variables, ports)["PREFECT_WORKER_WEBSERVER_PORT"] == "18080"


def test_deploy_refuses_a_zombie_window_within_one_heartbeat(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "glm_pipeline.flows.cli", "deploy", "--zombie-after", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --zombie-after 20: must be more than 30 s, Prefect's shortest heartbeat interval"
    ]


def test_the_automations_crash_a_silent_run_after_three_heartbeats_and_rerun_only_worker_runs():
    from glm_pipeline.flows.deploy import RERUN_RUN_COUNTS, automations, heartbeat_frequency, work_pools

    frequency = heartbeat_frequency(ROOT / "prefect.yaml")
    assert frequency == 30  # Prefect's minimum; 3.8.8's default is 180
    zombie, rerun = automations(3 * frequency, work_pools(ROOT / "prefect.yaml"))
    assert zombie.trigger.posture == "Proactive" and zombie.trigger.within.total_seconds() == 90
    assert zombie.trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.Completed" in zombie.trigger.expect
    assert zombie.trigger.for_each == {"prefect.resource.id"} and zombie.actions[0].state == "CRASHED"
    assert rerun.trigger.expect == {"prefect.flow-run.Crashed"} and rerun.actions[0].state == "SCHEDULED"
    assert RERUN_RUN_COUNTS == ["1", "2"]  # two re-runs, then a human looks
    [tag, pool] = rerun.trigger.match_related
    assert pool.model_dump()["prefect.resource.name"] == ["glm-process"] and tag.model_dump()["prefect.resource.role"] == "tag"
