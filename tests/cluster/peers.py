"""Real components for the cluster tests and the cluster benchmark, each started as its own processes on loopback.

- `ray_cluster`: a Ray head and two worker nodes (`ray start`, distinct ports). The nodes run a Python that sees
  every installed package but not the project (the project's editable install is left out), so a trial can only
  import `trainables` from what the driver ships. Worker `private` runs in its own mount namespace with a tmpfs
  over `<tmp>/private`: a directory the driver and the other nodes see but it does not, as a node-local disk would
  be on a real cluster.
- `postgres_db`: a fresh database on this machine's PostgreSQL (127.0.0.1:5432, trust auth), dropped afterwards.
- `s3_server`: moto's S3-compatible server on a free loopback port, with a bucket.
- `mlflow_server`: `mlflow server` on a free loopback port, backend store in PostgreSQL, artifacts proxied to S3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
AWS = {
    "AWS_ACCESS_KEY_ID": "ltssl-test-key",
    "AWS_SECRET_ACCESS_KEY": "ltssl-test-secret-0d1e",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{url} did not answer within {timeout} s\n{tail}")


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


# ---- Ray -------------------------------------------------------------------------------------------------------


def project_free_python(where: Path) -> Path:
    """A Python with this environment's packages (torch, ray, ...) but without the project: a virtual environment
    whose site-packages points at ours through a .pth line, which does not run our .pth files (the editable install
    of the project is one)."""
    venv = where / "node-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "ours.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@dataclass
class RayCluster:
    address: str
    python: Path  # the nodes' project-free Python
    private: Path  # a directory every process sees except the `private` worker node
    node_ids: dict[str, str]  # head / shared / private -> Ray node id
    env: dict[str, str]


def _ray_start(python: Path, args: list[str], env: dict[str, str], wrap: list[str] | None = None) -> None:
    cmd = [*(wrap or []), str(python), "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd="/")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _node_ids(python: Path, address: str, env: dict[str, str]) -> dict[str, float]:
    script = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR');"
        "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
    )
    out = subprocess.run([str(python), "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextmanager
def ray_cluster(where: Path) -> Iterator[RayCluster]:
    python = project_free_python(where)
    check = subprocess.run([str(python), "-c", "import trainables"], capture_output=True, text=True, cwd="/")
    assert check.returncode != 0, "the nodes' Python must not see the project"
    private = where / "private"
    private.mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray 2.5x clusters started with `ray start` authenticate with a token: every node and the driver share it
    env = {**base_env(), **AWS, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
    common = ["--object-store-memory", str(200 * 2**20), "--node-ip-address", "127.0.0.1"]
    head = ["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard=false", *common]
    _ray_start(python, head, env)
    try:
        for name in ("shared", "private"):
            agent = str(free_port())
            resources = json.dumps({"trial_slot": 1, f"node_{name}": 1})
            args = ["--address", address, "--num-cpus", "1", "--resources", resources]
            args += ["--dashboard-agent-listen-port", agent, *common]
            # the private node's own mount namespace: a tmpfs hides <tmp>/private from it, and only from it
            wrap = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {private} && exec "$0" "$@"']
            _ray_start(python, args, env, wrap=wrap if name == "private" else None)
        deadline = time.monotonic() + 60
        while True:
            nodes = _node_ids(python, address, env)
            if len(nodes) == 3 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(nodes) == 3, nodes
        ids = {}
        for node_id, resources in nodes.items():
            role = next((r for r in ("shared", "private") if f"node_{r}" in resources), "head")
            ids[role] = node_id
        yield RayCluster(address=address, python=python, private=private, node_ids=ids, env=env)
    finally:
        subprocess.run([str(python), "-m", "ray.scripts.scripts", "stop", "--force"], env=env, capture_output=True)


class SpareNode:
    """A worker node in its own PID namespace (`ray start --block` as its first process): `kill()` takes the whole
    node down at once (raylet, agents, trial workers), as a lost machine; `processes(name)` finds its processes."""

    def __init__(self, cluster: RayCluster, name: str, resources: dict[str, float], log: Path):
        args = ["--address", cluster.address, "--num-cpus", "1", "--resources", json.dumps(resources), "--block"]
        args += ["--dashboard-agent-listen-port", str(free_port()), "--node-ip-address", "127.0.0.1"]
        args += ["--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]
        cmd = ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc"]
        cmd += [str(cluster.python), "-m", "ray.scripts.scripts", "start", *args]
        self.name = name
        self.node_id = ""  # Ray's id, once the node has joined
        self.proc = subprocess.Popen(cmd, env=cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd="/")

    def _namespace(self) -> str | None:
        for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            return os.readlink(f"/proc/{child}/ns/pid")
        return None

    def processes(self, name: str) -> list[int]:
        """Host PIDs of this node's processes whose command line contains `name`."""
        namespace, found = self._namespace(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") == namespace and name in (entry / "cmdline").read_text():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return found

    def kill(self) -> None:
        self.proc.kill()  # unshare's --kill-child takes the namespace's first process, and the kernel all the rest
        self.proc.wait(timeout=30)


@contextmanager
def spare_nodes(cluster: RayCluster, where: Path, resources: dict[str, dict[str, float]]) -> Iterator[dict]:
    """Worker nodes added to `cluster` for one test ({name: resources}), started one at a time (two raylets starting
    at once on 2 cores can miss Ray's start-up deadline), each waited for until Ray counts it alive."""
    nodes: dict[str, SpareNode] = {}
    try:
        for name, res in resources.items():
            node = nodes[name] = SpareNode(cluster, name, {**res, f"node_{name}": 1}, where / f"node-{name}.log")
            deadline = time.monotonic() + 120
            while not node.node_id:
                alive = _node_ids(cluster.python, cluster.address, cluster.env)
                node.node_id = next((i for i, r in alive.items() if r.get(f"node_{name}")), "")
                assert node.node_id or time.monotonic() < deadline, f"spare node {name} did not join: {alive}"
                if not node.node_id:
                    time.sleep(1)
        yield nodes
    finally:
        for node in nodes.values():
            if node.proc.poll() is None:
                node.kill()
        # the next test starts on a cluster Ray describes truly: a killed node is alive to Ray until its heartbeats
        # have been missed long enough, and a driver starting before that counts it as a node it must check
        gone = {n.node_id for n in nodes.values() if n.node_id}
        deadline = time.monotonic() + 120
        while gone & set(_node_ids(cluster.python, cluster.address, cluster.env)) and time.monotonic() < deadline:
            time.sleep(1)


# ---- PostgreSQL, S3, MLflow ------------------------------------------------------------------------------------


@contextmanager
def databases() -> Iterator[Callable[[], str]]:
    """databases() -> the SQLAlchemy URL (psycopg 3) of a new PostgreSQL database; all dropped afterwards."""
    import psycopg

    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    made: list[str] = []

    def create() -> str:
        name = f"ltssl_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{PG}/{name}"

    yield create
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class S3Server:
    endpoint: str
    bucket: str


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    import boto3

    port = free_port()
    log = tmp_path / "moto.log"
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**base_env(), **AWS},
        start_new_session=True,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/moto-api/", 60, proc, log)
        bucket = "ltssl-sweeps"
        boto3.client("s3", endpoint_url=endpoint, **boto_credentials()).create_bucket(Bucket=bucket)
        yield S3Server(endpoint=endpoint, bucket=bucket)
    finally:
        _stop(proc)


def boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


class MlflowServer:
    """`mlflow server` on a fixed loopback port, backend store in PostgreSQL, artifacts proxied to the S3 server;
    `stop()` and `start()` again on the same port and store (an outage, then a restart)."""

    def __init__(self, where: Path, backend: str, s3: S3Server):
        self.where, self.backend, self.s3 = where, backend, s3
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.where / f"mlflow-server-{self.starts}.log"
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
        env = {**base_env(), **AWS, "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint}
        args = ["server", "--backend-store-uri", self.backend, "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--artifacts-destination", f"s3://{self.s3.bucket}/mlflow", "--workers", "1"]
        self.proc = subprocess.Popen(
            [mlflow, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=self.where,
            start_new_session=True,
        )  # fmt: skip
        wait_http(f"{self.url}/health", 180, self.proc, log)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def kill(self) -> None:
        """Gone at once, as a crashed server or a lost machine (no graceful shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


@contextmanager
def mlflow_server(tmp_path: Path, backend: str, s3_server: S3Server) -> Iterator[str]:
    """A started `MlflowServer`; yields its URL."""
    with running_mlflow(tmp_path, backend, s3_server) as server:
        yield server.url


@contextmanager
def running_mlflow(tmp_path: Path, backend: str, s3_server: S3Server) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path, backend, s3_server)
    server.start()
    try:
        yield server
    finally:
        server.stop()
