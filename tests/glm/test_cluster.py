"""Pretraining as a cluster job (glm.cluster): the SLURM script and Kubernetes manifests for 2 nodes x 8
GPUs, checked by bash -n and a JSON schema of the Kubernetes fields used; submission and watching
against a fake SLURM on PATH (tests/fake_slurm.py) that runs the script here, two loopback "nodes"
under srun; each way a job ends mapped to the local training's classes."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from glm.config import PipelineConfig

from glm import cluster
from glm.launch import TrainingCrashed, TrainingFailed, TrainingTimeout
from glm.stages import parse_train_result
from tests import fake_slurm
from tests.glm.test_train import build_real_shards


def _cfg(tmp_path: Path, kind: str = "slurm", **cluster_kw) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "Big Run",
            "run_dir": str(tmp_path / "run"),
            "pretrain": {
                "nnodes": 2,
                "nproc": 8,
                "device": "cuda",
                "batch_size": 64,
                "micro_batch_size": 4,
                "distributed": "fsdp",
                "cluster": {"kind": kind, "partition": "gpu", "image": "registry.example/glm:1", **cluster_kw},
            },
        }
    )


def test_the_slurm_script_runs_one_torchrun_agent_per_node(tmp_path):
    script = cluster.render_slurm(_cfg(tmp_path, setup=["module load cuda/12.4"]), tmp_path / "run/pretrain/cluster/slurm-%j.out")
    path = tmp_path / "pretrain.sbatch"
    path.write_text(script)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu"):
        assert line in script.splitlines()
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d" in srun
    assert '--rdzv_endpoint "$head":29500 --rdzv_id "$SLURM_JOB_ID"' in srun
    assert srun.split()[2].endswith("/torchrun") and f"--out {(tmp_path / 'run/pretrain').resolve()}" in srun
    assert script.index("module load cuda/12.4") < script.index("srun ")


# the Kubernetes fields the manifests use, with their types (a subset of the API's schemas)
CONTAINER = {
    "type": "object",
    "required": ["name", "image", "command"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string", "minLength": 1},
        "command": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name", "value"]}},
        "resources": {
            "type": "object",
            "properties": {"limits": {"type": "object", "properties": {"nvidia.com/gpu": {"type": "integer", "minimum": 1}}}},
        },
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
    "additionalProperties": False,
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "restartPolicy": {"enum": ["Never", "OnFailure"]},
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "subdomain": {"type": "string"},
                "volumes": {"type": "array"},
            },
            "additionalProperties": False,
        },
    },
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}},
}
REPLICA = {
    "type": "object",
    "required": ["replicas", "template"],
    "properties": {"replicas": {"type": "integer", "minimum": 1}, "restartPolicy": {"type": "string"}, "template": POD_TEMPLATE},
}
SCHEMAS = {
    "PyTorchJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "kubeflow.org/v1"},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["pytorchReplicaSpecs"],
                "properties": {
                    "nprocPerNode": {"type": "string"},
                    "runPolicy": {"type": "object"},
                    "pytorchReplicaSpecs": {
                        "type": "object",
                        "required": ["Master"],
                        "properties": {"Master": REPLICA, "Worker": REPLICA},
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
    },
    "Job": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "batch/v1"},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["template"],
                "properties": {
                    "completionMode": {"enum": ["Indexed", "NonIndexed"]},
                    "completions": {"type": "integer"},
                    "parallelism": {"type": "integer"},
                    "backoffLimit": {"type": "integer"},
                    "template": POD_TEMPLATE,
                },
                "additionalProperties": False,
            },
        },
    },
    "Service": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "v1"}, "metadata": METADATA, "spec": {"type": "object", "required": ["ports"]}},
    },
}


@pytest.mark.parametrize("manifest", ["pytorchjob", "job"])
def test_the_kubernetes_manifests_fit_the_schema(tmp_path, manifest):
    docs = list(
        yaml.safe_load_all(
            yaml.safe_dump_all(cluster.render_kubernetes(_cfg(tmp_path, "kubernetes", manifest=manifest, volume_claim="runs")))
        )
    )
    for doc in docs:
        jsonschema.validate(doc, SCHEMAS[doc["kind"]])
    if manifest == "pytorchjob":
        (job,) = docs
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1  # 2 nodes
        pods = [replicas["Master"]["template"]["spec"], replicas["Worker"]["template"]["spec"]]
        endpoint = "$(MASTER_ADDR):$(MASTER_PORT)"
    else:
        service, job = docs
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2 and service["spec"]["clusterIP"] == "None"
        pods = [job["spec"]["template"]["spec"]]
        endpoint = "glm-big-run-pretrain-0.glm-big-run-pretrain:29500"
    for pod in pods:
        (c,) = pod["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        cmd = " ".join(c["command"])
        assert f"--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint {endpoint}" in cmd
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "runs"
    bad = {**docs[-1], "metadata": {"name": "Big_Run"}}
    with pytest.raises(jsonschema.ValidationError):  # the schema can fail
        jsonschema.validate(bad, SCHEMAS[bad["kind"]])


def test_a_kubernetes_cluster_needs_an_image():
    with pytest.raises(ValueError, match="needs pretrain.cluster.image"):
        PipelineConfig.model_validate({"pretrain": {"cluster": {"kind": "kubernetes"}}})


# --------------------------------------------------------------------------- submitting to a (fake) SLURM


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_real_shards(tmp_path_factory.mktemp("cluster-shards"))


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    for k, v in fake_slurm.install(tmp_path / "bin", tmp_path / "slurm-state").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path / "slurm-state"


def _loopback_run(tmp_path: Path, shards: Path, **pretrain) -> PipelineConfig:
    """RUN/infill and RUN/pretrain/run-config.yaml as the pretrain stage leaves them, for 2 CPU "nodes"."""
    run = tmp_path / "run"
    shutil.copytree(shards / "infill", run / "infill")
    config = yaml.safe_load((shards / "run.yaml").read_text())
    config["pretrain"].update(
        nnodes=2,
        distributed="ddp",
        device="cpu",
        cluster={"kind": "slurm", "poll_seconds": 0.2, "rdzv_port": _port()},
        **pretrain,
    )
    config["run_dir"] = str(run)
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "run-config.yaml").write_text(yaml.safe_dump(config))
    return PipelineConfig.model_validate(config)


def _port() -> int:
    from tests.glm.test_multinode import _free_port

    return _free_port()


def test_a_submitted_job_runs_on_two_nodes_and_reports_its_result(tmp_path, shards, slurm):
    cfg = _loopback_run(tmp_path, shards)
    lines: list[str] = []
    finished = cluster.run_job(cfg, Path(cfg.run_dir), log_line=lines.append, timeout=300)
    result = parse_train_result("\n".join(finished.lines))
    assert finished.returncode == 0 and result["step"] == 4
    assert lines[0].startswith("submitted SLURM job 1001: ")
    assert (Path(cfg.run_dir) / "pretrain/cluster/pretrain.sbatch").is_file()
    assert '"step": 4' in (Path(cfg.run_dir) / "pretrain/cluster/slurm-1001.out").read_text()  # the job's #SBATCH --output
    assert (Path(cfg.run_dir) / "pretrain/checkpoints/step-000004").is_dir()
    ranks = json.loads((Path(cfg.run_dir) / "pretrain/checkpoints/step-000004/meta.json").read_text())
    assert ranks["world_size"] == 2  # two agents, one rank each


def test_a_job_with_a_bad_config_fails_permanently(tmp_path, shards, slurm):
    cfg = _loopback_run(tmp_path, shards)
    run_config = Path(cfg.run_dir) / "pretrain/run-config.yaml"
    run_config.write_text(run_config.read_text().replace("pretrain:\n", "pretrain:\n  nosuch: 1\n"))
    with pytest.raises(TrainingFailed, match="(?s)training failed \\(config\\).*pretrain.nosuch") as failed:
        cluster.run_job(cfg, Path(cfg.run_dir), log_line=lambda line: None, timeout=300)
    assert failed.value.kind == "config"


@pytest.mark.parametrize("final_state", ["", "NODE_FAIL"])
def test_a_crashed_or_lost_job_is_retried(tmp_path, shards, slurm, monkeypatch, final_state):
    monkeypatch.setenv("FAKE_SLURM_FINAL_STATE", final_state)
    cfg = _loopback_run(tmp_path, shards)
    cfg.pretrain.cluster.setup = ["exit 1"]  # the job dies before training (a crash, as far as anyone can tell)
    match = "ended NODE_FAIL; a retry resubmits it" if final_state else "crashed \\(exit code 1"
    with pytest.raises(TrainingCrashed, match=match):
        cluster.run_job(cfg, Path(cfg.run_dir), log_line=lambda line: None, timeout=300)


def test_a_job_past_the_timeout_is_cancelled(tmp_path, shards, slurm):
    cfg = _loopback_run(tmp_path, shards)
    cfg.pretrain.cluster.setup = ["sleep 120"]
    with pytest.raises(TrainingTimeout, match="cancelled; raise the timeout"):
        cluster.run_job(cfg, Path(cfg.run_dir), log_line=lambda line: None, timeout=1.0)
    assert (slurm / "1001.cancelled").exists()
    pid = int((slurm / "1001.pid").read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


# --------------------------------------------------------------------------- submitting to a (fake) Kubernetes


def test_a_pytorchjob_is_applied_watched_and_its_logs_hold_the_result(tmp_path, shards, monkeypatch):
    from tests import fake_kubectl

    port = _port()
    for k, v in fake_kubectl.install(tmp_path / "bin", tmp_path / "kube-state", port).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = _loopback_run(tmp_path, shards)
    cfg.pretrain.cluster = cfg.pretrain.cluster.model_copy(
        update={"kind": "kubernetes", "image": "local/glm:test", "rdzv_port": port}
    )
    lines: list[str] = []
    finished = cluster.run_job(cfg, Path(cfg.run_dir), log_line=lines.append, timeout=300)
    assert parse_train_result("\n".join(finished.lines))["step"] == 4
    assert lines[0].startswith("submitted Kubernetes pytorchjob glm-default-pretrain: ")
    meta = json.loads((Path(cfg.run_dir) / "pretrain/checkpoints/step-000004/meta.json").read_text())
    assert meta["world_size"] == 2  # the Master and the Worker pod, one rank each
