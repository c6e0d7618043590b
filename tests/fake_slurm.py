"""A fake SLURM on PATH that runs batch scripts on this machine: sbatch, squeue, sacct, scancel, srun, scontrol.

sbatch starts the script in the background (its own session) with the variables SLURM sets
(SLURM_JOB_ID, SLURM_NNODES, SLURM_JOB_NODELIST) and its #SBATCH --output; srun starts its command
once per "node" (SLURM_NODEID, SLURM_PROCID), all on loopback, and with --kill-on-bad-exit stops the
others when one fails; scontrol show hostnames names 127.0.0.1. squeue reports RUNNING while the
script runs; sacct then reports COMPLETED|0:0, FAILED|CODE:0 or CANCELLED (scancel), unless
FAKE_SLURM_FINAL_STATE says otherwise (NODE_FAIL, PREEMPTED...). State lives in FAKE_SLURM_DIR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

COMMON = """#!{python}
import os, signal, subprocess, sys, time
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
state.mkdir(parents=True, exist_ok=True)
args = sys.argv[1:]
"""

SBATCH = """
script = Path(args[-1])
opts = dict(line[len("#SBATCH --"):].split("=", 1) for line in script.read_text().splitlines() if line.startswith("#SBATCH --"))
ids = sorted(int(p.stem) for p in state.glob("*.job"))
job = str((ids[-1] if ids else 1000) + 1)
(state / f"{job}.job").write_text(str(script))
output = opts.get("output", f"slurm-%j.out").replace("%j", job)
env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_NNODES": opts.get("nodes", "1"), "SLURM_JOB_NODELIST": "fake[1-9]"}
runner = f"import subprocess, sys; rc = subprocess.call(['bash', {str(script)!r}], stdout=open({output!r}, 'w'), stderr=subprocess.STDOUT); open({str(state / (job + '.rc'))!r}, 'w').write(str(rc))"
proc = subprocess.Popen([sys.executable, "-c", runner], env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
(state / f"{job}.pid").write_text(str(proc.pid))
print(job if "--parsable" in args else f"Submitted batch job {job}")
"""

SQUEUE = """
job = args[args.index("-j") + 1]
pid = int((state / f"{job}.pid").read_text())
try:
    os.kill(pid, 0)
    alive = not (state / f"{job}.rc").exists()
except ProcessLookupError:
    alive = False
if alive and not (state / f"{job}.cancelled").exists():
    print("RUNNING")
"""

SACCT = """
job = args[args.index("-j") + 1]
if (state / f"{job}.cancelled").exists():
    print("CANCELLED by 1000|0:15")
elif (state / f"{job}.rc").exists():
    rc = int((state / f"{job}.rc").read_text() or 1)
    final = os.environ.get("FAKE_SLURM_FINAL_STATE") or ("COMPLETED" if rc == 0 else "FAILED")
    print(f"{final}|{rc}:0")
"""

SCANCEL = """
job = args[0]
(state / f"{job}.cancelled").touch()
try:
    os.killpg(int((state / f"{job}.pid").read_text()), signal.SIGKILL)
except ProcessLookupError:
    pass
"""

SRUN = """
kill_on_bad_exit = False
while args and args[0].startswith("--"):
    kill_on_bad_exit = args.pop(0) == "--kill-on-bad-exit=1" or kill_on_bad_exit
nodes = int(os.environ.get("SLURM_NNODES", "1"))
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)}) for i in range(nodes)]
codes = {}
while len(codes) < nodes:
    for i, p in enumerate(procs):
        if i not in codes and p.poll() is not None:
            codes[i] = p.returncode
            if p.returncode != 0 and kill_on_bad_exit:
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
    time.sleep(0.05)
sys.exit(max(codes.values(), key=abs))
"""

SCONTROL = """
assert args[:2] == ["show", "hostnames"], args
print("127.0.0.1")
"""


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the commands to bin_dir; the environment that puts them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in dict(sbatch=SBATCH, squeue=SQUEUE, sacct=SACCT, scancel=SCANCEL, srun=SRUN, scontrol=SCONTROL).items():
        path = bin_dir / name
        path.write_text(COMMON.format(python=sys.executable) + body)
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir)}
