"""Two torchrun agents on loopback as two "nodes" (gloo, one process each), through `python -m glm.launch`,
the command every node of a multi-node run starts: the same losses as one process on the same global
batch, a node killed mid-run resumed exactly by re-running both, and a checkpoint of 2 ranks resumed by 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from glm.config import ConfigError, PipelineConfig, TrainConfig
from glm.metrics import read_metrics

from glm.launch import descendants, rendezvous, train_command
from tests.glm.test_train import build_real_shards

STEPS = 40  # node 1 is killed at step 4: the margin keeps a slow machine from finishing first
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = build_real_shards(tmp_path_factory.mktemp("multinode"))
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["model"].update(dropout=0.0, attention_dropout=0.0)  # one process and two ranks draw other dropout masks
    config["pretrain"].update(steps=STEPS, eval_every=20, checkpoint_every=4, keep_checkpoints=20, device="cpu")
    (root / "single.yaml").write_text(yaml.safe_dump(config))
    return root, config


def _two_node_config(root: Path, config: dict, name: str) -> Path:
    pre = {**config["pretrain"], "nnodes": 2, "distributed": "ddp", "rdzv_endpoint": f"127.0.0.1:{_free_port()}"}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "name": name, "pretrain": pre}))
    return path


def _node(config: Path, data: Path, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "glm.launch", "--config", str(config), "--data", str(data), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and the workers, which torchrun starts in sessions of their own."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _wait(procs: list[subprocess.Popen], timeout: float = 180) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_node(p)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference(shards):
    root, _ = shards
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm.launch",
            "--config",
            str(root / "single.yaml"),
            "--data",
            str(root / "infill"),
            "--out",
            str(root / "single"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    assert " -m glm.train " in single.stderr  # one process: no torchrun
    return _losses(root / "single")


def test_two_nodes_on_loopback_match_one_process(shards, reference):
    root, config = shards
    two = _two_node_config(root, config, "two-nodes")
    out = root / "two"
    codes = _wait([_node(two, root / "infill", out, root / f"two-{i}.log") for i in range(2)])
    logs = [(root / f"two-{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert all("--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in log for log in logs)
    losses = _losses(out)
    assert list(losses) == list(range(1, STEPS + 1))
    # the tolerance of tests/glm/test_distributed.py's DDP-vs-one-process test
    assert list(losses.values()) == pytest.approx(list(reference.values()), rel=1e-5)
    results = [json.loads(line) for log in logs for line in log.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["step"] == STEPS  # rank 0's node prints the result, once


def test_a_killed_node_resumes_exactly_and_on_another_world_size(shards, reference):
    root, config = shards
    two = _two_node_config(root, config, "killed")
    out = root / "killed"
    nodes = [_node(two, root / "infill", out, root / f"killed-{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000004").is_dir():
            assert time.monotonic() < deadline and nodes[1].poll() is None, "the two nodes never reached checkpoint 4"
            time.sleep(0.01)
        _kill_node(nodes[1])  # node 1 disappears: its agent and its worker
        survivor = nodes[0].wait(timeout=120)  # the other node's collective fails; its agent ends, not hangs
    finally:
        for p in nodes:  # kill what is left without raising: a failure above must show as itself
            if p.poll() is None:
                _kill_node(p)
    assert survivor != 0
    survivor_log = (root / "killed-0.log").read_text()
    assert max(_losses(out)) < STEPS, "the run finished before the kill; the test proved nothing"

    other_size = root / "one-after-two"  # the same checkpoints, resumed by one process
    shutil.copytree(out, other_size)

    codes = _wait([_node(two, root / "infill", out, root / f"rerun-{i}.log") for i in range(2)])
    logs = [(root / f"rerun-{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], (survivor_log, logs)
    result = next(json.loads(line) for log in logs for line in log.splitlines() if line.startswith("{"))
    assert result["resumed_from"] >= 4 and result["step"] == STEPS
    assert list(_losses(out).values()) == pytest.approx(list(reference.values()), rel=1e-5)

    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm.launch",
            "--config",
            str(root / "single.yaml"),
            "--data",
            str(root / "infill"),
            "--out",
            str(other_size),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert "was written by 2 ranks, this run has 1" in one.stderr  # one line naming both world sizes
    # no dropout and a global data position: even the reseeded run follows the uninterrupted trace
    assert list(_losses(other_size).values()) == pytest.approx(list(reference.values()), rel=1e-5)


def test_multi_node_settings_are_checked():
    pre = TrainConfig(nnodes=2, nproc=8, batch_size=64, micro_batch_size=4)
    assert pre.world_size == 16 and pre.grad_accum == 1
    with pytest.raises(ConfigError, match="pretrain.nnodes=2 needs the rendezvous address: set pretrain.rdzv_endpoint"):
        rendezvous(pre, "x", env={})
    # what a Kubernetes PyTorchJob and SLURM set
    assert rendezvous(pre, "my run", env={"MASTER_ADDR": "pod-0", "MASTER_PORT": "23456"}) == ("pod-0:23456", "my-run")
    assert rendezvous(pre, "x", env={"MASTER_ADDR": "h", "MASTER_PORT": "1", "SLURM_JOB_ID": "77"}) == ("h:1", "77")
    with pytest.raises(ValueError, match="micro_batch_size x nproc x nnodes = 4 x 8 x 2; make it a multiple of 64"):
        TrainConfig(nnodes=2, nproc=8, batch_size=32, micro_batch_size=4)
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        TrainConfig(rdzv_endpoint="node001")
    with pytest.raises(ValueError, match="cannot train on several nodes"):
        PipelineConfig.model_validate({"pretrain": {"nnodes": 2}, "orchestration": {"train_in_process": True}})
    cfg = PipelineConfig.model_validate({"pretrain": {"nnodes": 2, "rdzv_endpoint": "head:29500", "batch_size": 32}})
    assert not cfg.trains_in_process()
    cmd = train_command(cfg, Path("c.yaml"), Path("d"), Path("o"), python="py", env={})
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and cmd[-8:-6] == ["-m", "glm.train"]
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "head:29500" and cmd[cmd.index("--rdzv_id") + 1] == "default"


def test_a_node_passes_its_overrides_to_the_workers(shards, tmp_path):
    """`--set` reaches glm.train too: the workers train the config the agent was started for."""
    root, _ = shards
    cmd = [sys.executable, "-m", "glm.launch", "--config", str(root / "single.yaml"), "--data", str(root / "infill")]
    cmd += ["--out", str(tmp_path / "o"), "--set", "pretrain.steps=2", "--set", "pretrain.checkpoint_every=1"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2


def test_a_node_without_the_config_says_so(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "glm.launch", "--config", str(tmp_path / "nope.yaml"), "--data", "d", "--out", "o"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 3 and run.stderr.count("\n") == 1 and "nope.yaml" in run.stderr
