"""The self-hosted stack of docker-compose.yml, started natively (no Docker engine).

    python -m glm_pipeline.flows.stack [--dir .stack]     # starts everything, Ctrl-C stops it

The same services as `docker compose up`, started in the same order and configured from the compose
file itself, so the two cannot drift apart: PostgreSQL and Redis as real servers (Debian's packages:
/usr/lib/postgresql/*/bin and redis-server, with the compose file's Redis arguments), the Prefect API
server (`prefect server start --no-services`), the background services (`prefect server services
start`), `glm-pipeline deploy`, and a process worker. Each Prefect process gets the `environment`
of its compose service, `${VAR:-default}` filled in from this process's environment (or .env), with
the compose host names (postgres, redis, prefect-server) and container ports replaced by
127.0.0.1 and free local ports. Only that: a process gets no variable its compose service does not
get, so the worker (and every flow run it starts) never sees the database password.

Everything lives under one state directory: the Postgres cluster (owned by the `postgres` user when
run as root; Postgres refuses to run as root), Redis's append-only file, PREFECT_HOME and a log per
service. Integration tests use `Stack` directly (tests/integration/stack.py) and kill or restart
single services to test faults.
"""

import contextlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

PROJECT = Path(__file__).resolve().parents[1]  # the checkout (flows/..)

# compose service name -> what replaces its host name and container port here
COMPOSE_HOSTS = {"postgres": "5432", "redis": "6379", "prefect-server": "4200"}

# the few variables a process needs to run at all; nothing else of this process's environment is passed on
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "OMP_NUM_THREADS")


class StackError(RuntimeError):
    """A service did not start; the message names it and its log file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an .env file (comments and blank lines skipped), as docker compose reads them."""
    values = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip().strip("'\"")
    return values


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ for a literal $."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = variables.get(name, "")
        if op == ":?" and not value:
            raise StackError(f"{name} is not set: {arg}")
        if op == ":-" and not value:
            return arg
        return value

    parts = text.split("$$")
    return "$".join(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, p) for p in parts)


def compose_file(project: Path = PROJECT) -> dict:
    return yaml.safe_load((project / "docker-compose.yml").read_text(encoding="utf-8"))


@dataclass
class Ports:
    postgres: int = field(default_factory=free_port)
    redis: int = field(default_factory=free_port)
    api: int = field(default_factory=free_port)
    worker: int = field(default_factory=free_port)

    def local(self, value: str) -> str:
        """A compose value with the services' host names and container ports made local."""
        mapping = {"postgres": self.postgres, "redis": self.redis, "prefect-server": self.api}
        for host, container_port in COMPOSE_HOSTS.items():
            value = value.replace(f"{host}:{container_port}", f"127.0.0.1:{mapping[host]}")
        return value


def service_env(compose: dict, service: str, variables: dict[str, str], ports: Ports) -> dict[str, str]:
    """The `environment` of a compose service as this stack runs it (hosts and ports local)."""
    raw = {k: interpolate(str(v), variables) for k, v in (compose["services"][service].get("environment") or {}).items()}
    port_of = {"postgres": ports.postgres, "redis": ports.redis, "prefect-server": ports.api, "0.0.0.0": ports.worker}
    env = {}
    for key, value in raw.items():
        if key.endswith("_HOST") and value in port_of:  # a service's name, or the worker's 0.0.0.0: loopback here
            env[key] = "127.0.0.1"
        elif key.endswith("_PORT") and raw.get(key[: -len("_PORT")] + "_HOST") in port_of:
            env[key] = str(port_of[raw[key[: -len("_PORT")] + "_HOST"]])
        else:
            env[key] = ports.local(value)
    return env


def compose_command(compose: dict, service: str) -> list[str]:
    command = compose["services"][service]["command"]
    return list(command) if isinstance(command, list) else shlex.split(command)


def _as_postgres_user() -> list[str]:
    """Postgres refuses to run as root: as root, its commands run as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root needs a `postgres` user to run Postgres (apt-get install postgresql)") from None
    return ["runuser", "-u", "postgres", "--"]


def _reachable(path: Path) -> bool:
    """Whether another user (postgres) can reach `path`: every directory above it searchable by others."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def postgres_bin() -> Path:
    """The newest Postgres server binaries installed (Debian: /usr/lib/postgresql/N/bin), or the PATH's."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    if which:
        return Path(which).parent
    raise StackError("no PostgreSQL server found: apt-get install -y postgresql (or put pg_ctl on PATH)")


@dataclass
class Stack:
    """The compose stack's processes under `root`; start() brings them up in compose's order."""

    root: Path
    project: Path = PROJECT
    ports: Ports = field(default_factory=Ports)
    # extra PREFECT_* settings for the API server and the services (tests: a fast scheduler loop)
    server_settings: dict[str, str] = field(default_factory=dict)
    # extra variables for the worker (and so its flow runs)
    worker_settings: dict[str, str] = field(default_factory=dict)
    deploy_args: list[str] = field(default_factory=list)
    # compose's .env: its ${...} values, and the whole environment of a service with `env_file`
    dotenv: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.compose = compose_file(self.project)
        # what compose substitutes ${...} from: the shell environment over .env
        self.dotenv = Path(self.dotenv or self.project / ".env")
        self.variables = {**read_dotenv(self.dotenv), **os.environ}
        if not self.variables.get("POSTGRES_PASSWORD"):
            self.variables["POSTGRES_PASSWORD"] = secrets.token_urlsafe(24)  # a private cluster: a fresh random one
        self.variables["GLM_UI_PORT"] = str(self.ports.api)
        self.prefect_home = self.root / "prefect-home"
        # Postgres's own directory: the postgres user must reach it, and pytest's tmp dirs are 0700 root
        self.pg_dir, self._pg_dir_is_temporary = self.root / "postgres", False
        if os.geteuid() == 0 and not _reachable(self.root):
            self.pg_dir, self._pg_dir_is_temporary = Path(tempfile.mkdtemp(prefix="glm-stack-pg-")), True
        self.pg_dir.mkdir(exist_ok=True)

    # ------------------------------------------------------------------ environments

    def base_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        return {**env, "PREFECT_HOME": str(self.prefect_home), "PYTHONUNBUFFERED": "1"}

    def env_of(self, service: str) -> dict[str, str]:
        """The environment a Prefect process of `service` runs with: its compose `env_file` (the .env)
        if it has one, then its `environment`."""
        env = self.base_env()
        if self.compose["services"][service].get("env_file"):
            env.update(read_dotenv(self.dotenv))
        env.update(service_env(self.compose, service, self.variables, self.ports))
        if service in ("prefect-server", "prefect-services"):
            env.update(self.server_settings)
        if service == "worker":
            env.update(self.worker_settings)
        return env

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}/api"

    def client_env(self) -> dict[str, str]:
        """For a client of this stack (tests, `prefect` commands): the API URL and nothing secret."""
        return {**self.base_env(), "PREFECT_API_URL": self.api_url}

    def log(self, service: str) -> Path:
        return self.root / f"{service}.log"

    def log_tail(self, service: str, chars: int = 3000) -> str:
        path = self.log(service)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _spawn(self, service: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        with open(self.log(service), "a") as log:
            proc = subprocess.Popen(
                cmd, env=env, cwd=cwd or self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[service] = proc
        return proc

    def _wait(self, service: str, ready, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{service} exited with code {proc.returncode}; see {self.log(service)}:\n{self.log_tail(service)}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{service} did not become ready in {seconds:.0f} s; see {self.log(service)}:\n{self.log_tail(service)}"
                )
            time.sleep(0.25)

    # ------------------------------------------------------------------ postgres

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*_as_postgres_user(), str(postgres_bin() / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.pg_dir)
        if check and done.returncode != 0:
            raise StackError(f"postgres: {tool} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done

    def start_postgres(self) -> None:
        data = self.pg_dir / "data"
        user = self.variables.get("POSTGRES_USER") or "prefect"
        db = self.variables.get("POSTGRES_DB") or "prefect"
        if not data.exists():
            pwfile = self.pg_dir / "pwfile"
            pwfile.write_text(self.variables["POSTGRES_PASSWORD"] + "\n")
            if os.geteuid() == 0:
                shutil.chown(self.pg_dir, "postgres", "postgres")
                shutil.chown(pwfile, "postgres", "postgres")
            pwfile.chmod(0o600)
            self._pg("initdb", "-D", str(data), "-U", user, f"--pwfile={pwfile}", "-A", "scram-sha-256", "-E", "UTF8")
            pwfile.unlink()
        self.postgres_ctl("start")
        created = subprocess.run(
            [str(postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.ports.postgres), "-U", user, "-d", "postgres",
             "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{db}'"],
            capture_output=True, text=True, env={**self.base_env(), "PGPASSWORD": self.variables["POSTGRES_PASSWORD"]},
        )  # fmt: skip
        if created.stdout.strip() != "1":
            subprocess.run(
                [str(postgres_bin() / "createdb"), "-h", "127.0.0.1", "-p", str(self.ports.postgres), "-U", user, db],
                check=True, env={**self.base_env(), "PGPASSWORD": self.variables["POSTGRES_PASSWORD"]},
            )  # fmt: skip

    def postgres_ctl(self, action: str, mode: str = "fast") -> None:
        """pg_ctl start | stop (mode fast or immediate: a crash) | restart, on this stack's port."""
        data = str(self.pg_dir / "data")
        if action in ("stop", "restart"):
            self._pg("pg_ctl", "-D", data, "-m", mode, "-w", "stop", check=False)
        if action in ("start", "restart"):
            opts = f"-p {self.ports.postgres} -k {self.pg_dir} -c listen_addresses=127.0.0.1"
            self._pg("pg_ctl", "-D", data, "-l", str(self.pg_dir / "postgres.log"), "-o", opts, "-w", "-t", "60", "start")

    # ------------------------------------------------------------------ redis

    def redis_command(self) -> list[str]:
        """compose's redis command, listening on this stack's port and keeping its files in ROOT/redis."""
        (self.root / "redis").mkdir(exist_ok=True)
        cmd = compose_command(self.compose, "redis")
        server = shutil.which(cmd[0]) or shutil.which("redis-server")
        if server is None:
            raise StackError("redis-server not found: apt-get install -y redis-server")
        return [server, *cmd[1:], "--port", str(self.ports.redis), "--bind", "127.0.0.1", "--dir", str(self.root / "redis")]

    def redis_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports.redis), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start_redis(self) -> None:
        self._spawn("redis", self.redis_command(), self.base_env())
        self._wait("redis", self.redis_ping, 30)

    # ------------------------------------------------------------------ prefect

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start_server(self) -> None:
        cmd = compose_command(self.compose, "prefect-server")
        assert cmd[:3] == ["prefect", "server", "start"], cmd
        args = cmd[3:]
        for flag, value in (("--host", "127.0.0.1"), ("--port", str(self.ports.api))):
            if flag in args:
                args[args.index(flag) + 1] = value
        self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", *args], self.env_of("prefect-server"))
        self._wait("prefect-server", self.healthy, 180)

    def start_services(self) -> None:
        cmd = compose_command(self.compose, "prefect-services")
        assert cmd[0] == "prefect", cmd
        self._spawn("prefect-services", [sys.executable, "-m", *cmd], self.env_of("prefect-services"))
        # it has no health endpoint: it says it started, and is still running a moment later
        self._wait("prefect-services", lambda: "starting services" in self.log_tail("prefect-services", 100_000).lower(), 120)
        time.sleep(2)
        self._wait("prefect-services", lambda: True, 0)

    def deploy(self) -> None:
        cmd = compose_command(self.compose, "deploy")
        assert cmd[:2] == ["glm-pipeline", "deploy"], cmd
        with open(self.log("deploy"), "a") as log:
            done = subprocess.run(
                [sys.executable, "-m", "glm_pipeline.flows.cli", *cmd[1:], *self.deploy_args],
                cwd=self.project, env=self.env_of("deploy"), stdout=log, stderr=subprocess.STDOUT, timeout=300,
            )  # fmt: skip
        if done.returncode != 0:
            raise StackError(f"deploy exited with code {done.returncode}; see {self.log('deploy')}:\n{self.log_tail('deploy')}")

    def worker_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.worker}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start_worker(self) -> None:
        cmd = compose_command(self.compose, "worker")
        assert cmd[0] == "prefect", cmd
        self._spawn("worker", [sys.executable, "-m", *cmd], self.env_of("worker"), cwd=self.project)
        self._wait("worker", self.worker_ready, 120)

    # ------------------------------------------------------------------ the whole stack

    def start(self) -> "Stack":
        """Every service, in docker compose's dependency order, each healthy before the next."""
        self.start_postgres()
        self.start_redis()
        self.start_server()
        self.start_services()
        self.deploy()
        self.start_worker()
        return self

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the service's whole process group (the worker's flow runs have their own)."""
        proc = self.procs.pop(service)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=60)

    def stop(self) -> None:
        for service in ("worker", "prefect-services", "prefect-server", "redis"):
            proc = self.procs.pop(service, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if (self.pg_dir / "data").exists():
            self.postgres_ctl("stop", mode="fast")
        if self._pg_dir_is_temporary:  # outside ROOT only because postgres could not reach ROOT
            shutil.rmtree(self.pg_dir, ignore_errors=True)


@contextlib.contextmanager
def running(root: Path, **options) -> Iterator[Stack]:
    """A started stack, always stopped afterwards."""
    stack = Stack(root, **options)
    try:
        yield stack.start()
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m glm_pipeline.flows.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=".stack", help="state directory (logs, Redis data, PREFECT_HOME)")
    p.add_argument("--port", type=int, default=None, help="the API/UI port (default: GLM_UI_PORT or 4200)")
    args = p.parse_args(argv)
    ports = Ports(api=args.port or int(os.environ.get("GLM_UI_PORT", read_dotenv(PROJECT / ".env").get("GLM_UI_PORT", 4200))))
    stack = Stack(Path(args.dir), ports=ports)
    try:
        stack.start()
        print(
            f"the stack is up: {stack.api_url} (UI http://127.0.0.1:{ports.api}); logs in {stack.root}; Ctrl-C stops it",
            flush=True,
        )
        while all(p.poll() is None for p in stack.procs.values()):
            time.sleep(1)
        dead = [name for name, p in stack.procs.items() if p.poll() is not None]
        print(f"error: {', '.join(dead)} exited; see {stack.root}", file=sys.stderr)
        return 1
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
