"""A fake `kubectl` on PATH that runs a rendered PyTorchJob here: apply starts every replica's container
command (Master, then Workers) as a local process with the variables the training operator sets
(MASTER_ADDR=127.0.0.1, MASTER_PORT, expanded in the command as Kubernetes expands $(VAR)); get -o json
reports the job Running, then Succeeded or Failed by the processes' exit codes; logs prints their
output; delete stops them. State lives in FAKE_KUBE_DIR. Only what glm/cluster.py calls is supported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

KUBECTL = """#!{python}
import json, os, re, signal, subprocess, sys, yaml
from pathlib import Path
state = Path(os.environ["FAKE_KUBE_DIR"])
state.mkdir(parents=True, exist_ok=True)
args = sys.argv[1:]
verb = args[0]
if verb == "apply":
    (doc,) = list(yaml.safe_load_all(Path(args[args.index("-f") + 1]).read_text()))
    assert doc["kind"] == "PyTorchJob", doc["kind"]
    name, port = doc["metadata"]["name"], os.environ["FAKE_KUBE_MASTER_PORT"]
    job = state / name
    job.mkdir(exist_ok=True)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    n = 0
    for role in ("Master", "Worker"):
        spec = doc["spec"]["pytorchReplicaSpecs"].get(role)
        for _ in range((spec or dict(replicas=0))["replicas"]):
            (container,) = spec["template"]["spec"]["containers"]
            cmd = [re.sub(r"\\$\\((\\w+)\\)", lambda m: env[m.group(1)], a) for a in container["command"]]
            runner = "import subprocess, sys; rc = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1] + '.log', 'w'), stderr=subprocess.STDOUT); open(sys.argv[1] + '.rc', 'w').write(str(rc))"
            p = subprocess.Popen([sys.executable, "-c", runner, str(job / f"pod-{{n}}"), *cmd], env=env, start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            (job / f"pod-{{n}}.pid").write_text(str(p.pid))
            n += 1
    (job / "pods").write_text(str(n))
    print(f"pytorchjob.kubeflow.org/{{name}} created")
elif verb == "get":
    job = state / args[2]
    n = int((job / "pods").read_text())
    codes = [int((job / f"pod-{{i}}.rc").read_text()) for i in range(n) if (job / f"pod-{{i}}.rc").exists()]
    cond = []
    if len(codes) == n:
        cond = [dict(type="Succeeded" if not any(codes) else "Failed", status="True")]
    print(json.dumps(dict(status=dict(conditions=cond))))
elif verb == "logs":
    name = args[args.index("-l") + 1].split("=", 1)[1]
    for log in sorted((state / name).glob("pod-*.log")):
        print(log.read_text(), end="")
elif verb == "delete":
    job = state / args[2]
    for pid in job.glob("pod-*.pid") if job.is_dir() else []:
        try:
            os.killpg(int(pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
else:
    sys.exit("fake kubectl: unsupported " + " ".join(args))
"""


def install(bin_dir: Path, state_dir: Path, master_port: int) -> dict[str, str]:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "kubectl"
    path.write_text(KUBECTL.format(python=sys.executable))
    path.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_KUBE_DIR": str(state_dir),
        "FAKE_KUBE_MASTER_PORT": str(master_port),
    }
