"""Pretraining as a job of an existing cluster (pretrain.cluster): render it, submit it, watch it.

The scheduler starts one torchrun agent per node, as torchtitan's multinode_trainer.slurm does; the
orchestrator (the pretrain stage, under Prefect or not) only submits the job and watches it to
completion, failure or timeout. Its end is classified like a local training process's
(glm.launch): the run's pretrain/last-error.json or the job's exit code names a permanent failure
(config, data, diverged, disk: TrainingFailed, never retried); anything else (a crash, a node
failure, preemption, the scheduler's time limit) is TrainingCrashed, which a retry resubmits and
which resumes from the last checkpoint. orchestration.train_timeout_seconds cancels the job
(TrainingTimeout).

    SLURM       RUN/pretrain/cluster/pretrain.sbatch: #SBATCH --nodes N, one task per node,
                `srun torchrun --nnodes N --nproc_per_node P --rdzv_backend c10d
                --rdzv_endpoint $head:PORT --rdzv_id $SLURM_JOB_ID -m glm.train ...`;
                sbatch --parsable, squeue while it is queued or running, sacct for how it ended.
    Kubernetes  RUN/pretrain/cluster/pretrain.yaml: a Kubeflow PyTorchJob (Master + Worker replicas,
                nvidia.com/gpu limits; the operator sets MASTER_ADDR/MASTER_PORT) or an Indexed Job
                with a headless Service; kubectl apply, kubectl get -o json until it succeeded or failed.

The run directory must be on storage every node mounts at the same path: rank 0 writes it, every
rank reads the shards. Every file written here stays under RUN/pretrain/cluster.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from glm.core.config import ClusterConfig, PipelineConfig
from glm.core.shards import atomic_write_text
from glm.launch import Finished, TrainingCrashed, TrainingTimeout, _exit_error, torchrun_args

log = logging.getLogger("glm.cluster")

CLUSTER_DIR = "cluster"
# sacct states a retry can cure: the job was killed from outside (scheduler time limit, preemption, a node)
RETRIED_STATES = {"TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REQUEUED"}
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}


def job_name(cfg: PipelineConfig) -> str:
    """A DNS-1123 label (Kubernetes) and SLURM job name: glm-NAME-pretrain."""
    base = re.sub(r"[^a-z0-9]+", "-", cfg.name.lower()).strip("-")[:40] or "run"
    return f"glm-{base}-pretrain"


def _python(cluster: ClusterConfig) -> str:
    return cluster.python or sys.executable


def _torchrun(python: str) -> str:
    """The torchrun installed beside the nodes' Python (a venv's bin/), else torchrun on their PATH."""
    return str(Path(python).with_name("torchrun")) if "/" in python else "torchrun"


def _train_args(run_dir: Path) -> list[str]:
    pre = run_dir.resolve() / "pretrain"
    return ["--config", str(pre / "run-config.yaml"), "--data", str(run_dir.resolve() / "infill"), "--out", str(pre)]


# --------------------------------------------------------------------------- SLURM


def render_slurm(cfg: PipelineConfig, output: Path) -> str:
    """The sbatch script of this run's pretraining: one torchrun agent per node under srun."""
    pre, cluster = cfg.pretrain, cfg.pretrain.cluster
    assert cluster is not None
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name(cfg)}",
        f"#SBATCH --nodes={pre.nnodes}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun agent per node; it starts nproc workers
        f"#SBATCH --time={cluster.time_minutes}",
        f"#SBATCH --output={output}",
    ]
    if pre.device != "cpu":
        lines.append(f"#SBATCH --gpus-per-node={pre.nproc}")
    if cluster.partition:
        lines.append(f"#SBATCH --partition={cluster.partition}")
    if cluster.account:
        lines.append(f"#SBATCH --account={cluster.account}")
    lines += ["set -euo pipefail", *cluster.setup]
    lines += [
        "# the c10d rendezvous is hosted on the first node of the allocation",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
    ]
    # $head and $SLURM_JOB_ID are expanded by the shell on the node; every other word is quoted
    args = torchrun_args(pre, endpoint=f'"$head":{cluster.rdzv_port}', rdzv_id='"$SLURM_JOB_ID"')
    torchrun = " ".join([q(_torchrun(_python(cluster))), *(a if a.startswith('"$') else q(a) for a in args)])
    train = " ".join(q(a) for a in ["-m", "glm.train", *_train_args(Path(cfg.run_dir))])
    lines.append(f"srun --kill-on-bad-exit=1 {torchrun} {train}")
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], what: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise TrainingCrashed(f"{cmd[0]} was not found on PATH: {what} needs the cluster's client on this machine") from None
    if done.returncode != 0:
        raise TrainingCrashed(f"{' '.join(cmd)} failed (exit code {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def slurm_state(job_id: str) -> tuple[str, int | None]:
    """(state, exit code) of a job: squeue while the scheduler holds it, then sacct's record."""
    queued = _run(["squeue", "-h", "-j", job_id, "-o", "%T"], "watching the job").strip()
    if queued:
        return queued.split()[0], None
    record = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"], "watching the job").strip()
    if not record:
        return "UNKNOWN", None  # sacct may lag the end of the job by a moment
    state, _, code = record.splitlines()[0].partition("|")
    return state.split()[0], int(code.split(":")[0]) if code.split(":")[0].isdigit() else None


def _slurm_job(cfg: PipelineConfig, where: Path, say: Callable[[str], None]) -> tuple[str, Path, Callable[[], None]]:
    output = where / "slurm-%j.out"
    script = atomic_write_text(where / "pretrain.sbatch", render_slurm(cfg, output))
    job_id = _run(["sbatch", "--parsable", str(script)], "submitting the job").strip().split(";")[0]
    if not job_id.isdigit():
        raise TrainingCrashed(f"sbatch printed {job_id!r}, not a job id")
    say(f"submitted SLURM job {job_id}: {script}")
    return job_id, where / f"slurm-{job_id}.out", lambda: _run(["scancel", job_id], "cancelling the job") and None


# --------------------------------------------------------------------------- Kubernetes


def _container(cfg: PipelineConfig, name: str, endpoint: str, rdzv_id: str) -> dict[str, Any]:
    pre, cluster = cfg.pretrain, cfg.pretrain.cluster
    assert cluster is not None
    args = torchrun_args(pre, endpoint=endpoint, rdzv_id=rdzv_id)
    container: dict[str, Any] = {
        "name": name,
        "image": cluster.image,
        "command": [_torchrun(_python(cluster)), *args, "-m", "glm.train", *_train_args(Path(cfg.run_dir))],
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
    }
    if pre.device != "cpu":
        container["resources"] = {"limits": {"nvidia.com/gpu": pre.nproc}}
    if cluster.volume_claim:
        container["volumeMounts"] = [{"name": "run-dir", "mountPath": str(Path(cfg.run_dir).resolve())}]
    return container


def _pod_spec(cfg: PipelineConfig, container: dict[str, Any], **extra: Any) -> dict[str, Any]:
    cluster = cfg.pretrain.cluster
    assert cluster is not None
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], **extra}
    if cluster.volume_claim:
        spec["volumes"] = [{"name": "run-dir", "persistentVolumeClaim": {"claimName": cluster.volume_claim}}]
    return spec


def render_kubernetes(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The manifest's documents: a PyTorchJob, or an Indexed Job and its headless Service."""
    pre, cluster = cfg.pretrain, cfg.pretrain.cluster
    assert cluster is not None
    name = job_name(cfg)
    meta = {"name": name, "namespace": cluster.namespace, "labels": {"app": "glm-pipeline", "glm-run": name}}
    port = cluster.rdzv_port
    if cluster.manifest == "pytorchjob":
        # the training operator sets MASTER_ADDR (the Master pod) and MASTER_PORT in every container;
        # Kubernetes expands $(VAR) in a container's command from its environment
        container = _container(cfg, "pytorch", "$(MASTER_ADDR):$(MASTER_PORT)", name)
        replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": {"spec": _pod_spec(cfg, container)}}}
        if pre.nnodes > 1:
            replicas["Worker"] = {
                "replicas": pre.nnodes - 1,
                "restartPolicy": "Never",
                "template": {"spec": _pod_spec(cfg, container)},
            }
        spec = {"runPolicy": {"backoffLimit": 0}, "nprocPerNode": str(pre.nproc), "pytorchReplicaSpecs": replicas}
        return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta, "spec": spec}]
    # an Indexed Job: pod i is NAME-i.NAME (the headless Service below), so pod 0 hosts the rendezvous
    container = _container(cfg, "train", f"{name}-0.{name}:{port}", name)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"clusterIP": "None", "selector": {"job-name": name}, "ports": [{"name": "rdzv", "port": port}]},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": pre.nnodes,
            "parallelism": pre.nnodes,
            "backoffLimit": 0,  # the orchestrator retries, resuming from the checkpoint
            "template": {"metadata": {"labels": meta["labels"]}, "spec": _pod_spec(cfg, container, subdomain=name)},
        },
    }
    return [service, job]


def kubernetes_state(cfg: PipelineConfig) -> str:
    """Succeeded, Failed or Running, from the job's status conditions."""
    cluster = cfg.pretrain.cluster
    assert cluster is not None
    kind = "pytorchjob" if cluster.manifest == "pytorchjob" else "job"
    status = json.loads(_run(["kubectl", "get", kind, job_name(cfg), "-n", cluster.namespace, "-o", "json"], "watching the job"))
    for cond in status.get("status", {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Succeeded", "Complete"):
            return "Succeeded"
        if cond.get("status") == "True" and cond.get("type") == "Failed":
            return "Failed"
    return "Running"


# --------------------------------------------------------------------------- submit and watch


def run_job(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    log_line: Callable[[str], None],
    timeout: float | None = None,
    on_poll: Callable[[], None] | None = None,
) -> Finished:
    """Submit this run's pretraining job and wait for its end; raise as a local training process would
    (TrainingFailed permanent, TrainingCrashed retried, TrainingTimeout past `timeout`). Returns its
    output's last lines, which hold glm.train's result line."""
    cluster = cfg.pretrain.cluster
    assert cluster is not None
    where = run_dir / "pretrain" / CLUSTER_DIR
    where.mkdir(parents=True, exist_ok=True)
    if cluster.kind == "slurm":
        job_id, output, cancel = _slurm_job(cfg, where, log_line)
    else:
        manifest = atomic_write_text(where / "pretrain.yaml", yaml.safe_dump_all(render_kubernetes(cfg), sort_keys=False))
        kind = "pytorchjob" if cluster.manifest == "pytorchjob" else "job"
        _run(["kubectl", "delete", kind, job_name(cfg), "-n", cluster.namespace, "--ignore-not-found"], "replacing the job")
        _run(["kubectl", "apply", "-f", str(manifest)], "submitting the job")
        job_id, output = job_name(cfg), where / "kubernetes.log"
        log_line(f"submitted Kubernetes {kind} {job_id}: {manifest}")

        def cancel() -> None:
            _run(["kubectl", "delete", kind, job_id, "-n", cluster.namespace, "--ignore-not-found"], "cancelling the job")

    deadline = None if timeout is None else time.monotonic() + timeout
    state, code = "PENDING", None
    try:
        while True:
            if cluster.kind == "slurm":
                state, code = slurm_state(job_id)
                done = state not in ACTIVE_STATES and state != "UNKNOWN"
            else:
                state = kubernetes_state(cfg)
                done = state != "Running"
            if done:
                break
            if on_poll is not None:
                on_poll()
            if deadline is not None and time.monotonic() >= deadline:
                cancel()
                raise TrainingTimeout(
                    f"the cluster job {job_id} ran longer than orchestration.train_timeout_seconds={timeout:g} and was "
                    "cancelled; raise the timeout, or re-run: training resumes from its last checkpoint"
                )
            time.sleep(cluster.poll_seconds)
    except KeyboardInterrupt:
        cancel()  # the flow run was cancelled or timed out: never leave the job running
        raise
    if cluster.kind == "kubernetes":
        logs = _run(
            ["kubectl", "logs", "-n", cluster.namespace, "-l", f"glm-run={job_id}", "--tail=-1", "--all-containers"],
            "reading the job's output",
        )
        atomic_write_text(output, logs)
    lines = output.read_text(encoding="utf-8", errors="replace").splitlines()[-200:] if output.is_file() else []
    for line in lines[-20:]:
        log_line(line)
    if state in ("COMPLETED", "Succeeded"):
        return Finished(0, lines)
    if state in RETRIED_STATES:
        raise TrainingCrashed(f"cluster job {job_id} ended {state}; a retry resubmits it and resumes from the last checkpoint")
    finished = Finished(code if code else 1, lines)
    raise _exit_error(finished, [f"job {job_id} ({state})"], run_dir / "pretrain")
