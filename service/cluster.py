"""What the driver checks and ships before a sweep's first trial starts on a Ray cluster.

- `stage_code`: the project's code as the workers get it (Ray `runtime_env` working directory): every file of the
  `trainables` and `service` packages with a code or configuration suffix, and nothing else (no data, results,
  databases, virtual environments or dotfiles), copied to a staging directory whose content alone Ray uploads.
- `alive_nodes` / `check_fit`: a trial must fit on one node; the cluster's total says nothing about that (two nodes
  of 4 CPUs cannot run a trial that asks for 8).
- `check_shared_storage`: with several nodes, a local `storage.path` must be one every node sees (a shared mount):
  the driver writes a token there and every node must read it back.
- `check_data`: every node that may run a trial loads (or downloads, under a file lock) the data set once, so a
  missing data set is one configuration error, not three failed attempts per trial.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.config import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainables", "service")
SHIPPED_SUFFIXES = (".py", ".yaml", ".yml")
HEAD_RESOURCE = "node:__internal_head__"
CHECK_TIMEOUT_S = 120.0


def code_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """Files the workers get, relative to `root`: the packages' code and configuration files."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            rel = path.relative_to(root)
            hidden = any(part.startswith(".") or part == "__pycache__" for part in rel.parts)
            if path.is_file() and not hidden and path.suffix in SHIPPED_SUFFIXES:
                out.append(rel)
    return out


def stage_code(dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """Copy `code_files(root)` under `dest` (emptied first); returns `dest`, the runtime_env working_dir."""
    if dest.exists():
        shutil.rmtree(dest)
    for rel in code_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return dest


@dataclass(frozen=True, eq=False)  # hashed by identity: one entry per node in result maps
class Node:
    node_id: str
    address: str
    hostname: str
    resources: dict[str, float]  # totals, Ray's names (CPU, GPU, memory in bytes, custom)

    @property
    def head(self) -> bool:
        return HEAD_RESOURCE in self.resources

    def describe(self) -> str:
        r = self.resources
        shown = [f"{r.get('CPU', 0):g} CPU", f"{r.get('GPU', 0):g} GPU", f"{r.get('memory', 0) / 2**30:.1f} GiB memory"]
        shown += [f"{k} {v:g}" for k, v in sorted(r.items()) if _custom(k)]
        role = "head, " if self.head else ""
        return f"{self.hostname} ({role}{self.address}, node {self.node_id[:8]}): {', '.join(shown)}"


def _custom(name: str) -> bool:
    return name not in ("CPU", "GPU", "memory", "object_store_memory") and not name.startswith("node:")


def alive_nodes(records: Iterable[dict[str, Any]]) -> list[Node]:
    """Nodes of `ray.nodes()` that are alive."""
    return [
        Node(
            node_id=r["NodeID"],
            address=r.get("NodeManagerAddress", "?"),
            hostname=r.get("NodeManagerHostname", "?"),
            resources=dict(r.get("Resources", {})),
        )
        for r in records
        if r.get("Alive")
    ]


def fits(request: dict[str, float], node: Node) -> bool:
    return all(node.resources.get(k, 0.0) >= v for k, v in request.items())


def check_fit(request: dict[str, float], nodes: list[Node], source: str) -> list[Node]:
    """The nodes that can hold one trial; ConfigError naming every node when none can."""
    able = [n for n in nodes if fits(request, n)]
    if able:
        return able
    wanted = ", ".join(f"{v / 2**30:.1f} GiB memory" if k == "memory" else f"{v:g} {k}" for k, v in request.items())
    listing = "\n".join(f"  {n.describe()}" for n in nodes) or "  (no node is alive)"
    raise ConfigError(
        f"{source}: no node of the Ray cluster can hold one trial, which asks for {wanted} (resources.cpu, gpu, "
        f"memory_gb, custom); a trial runs on a single node. The nodes:\n{listing}"
    )


def _on_each(nodes: list[Node], func: Callable, *args: Any) -> dict[Node, Any]:
    """Run `func(*args)` once on each node (a zero-CPU task pinned to it); node -> result or exception. A node that
    failed the task and that Ray no longer counts alive afterwards (it died during the check, or had died just
    before and Ray had not noticed yet) is left out: no trial will run there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(func)
    refs = {
        node: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(*args)
        for node in nodes
    }
    out: dict[Node, Any] = {}
    for node, ref in refs.items():
        try:
            out[node] = ray.get(ref, timeout=CHECK_TIMEOUT_S)
        except Exception as err:  # a node that cannot run the check fails it
            out[node] = err
    if any(isinstance(result, Exception) for result in out.values()):
        alive = {r["NodeID"] for r in ray.nodes() if r.get("Alive")}
        out = {n: r for n, r in out.items() if not isinstance(r, Exception) or n.node_id in alive}
    return out


def _read_token(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_shared_storage(directory: Path, nodes: list[Node], source: str) -> None:
    """With several nodes, every node must see the driver's local `directory`: ConfigError naming those that don't.

    The directory exists already (the sweep lock made it, and removes it again when the sweep does not start); the
    token file is removed.
    """
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    marker = directory / f".ltssl-shared-check-{token}"
    marker.write_text(token)
    try:
        seen = _on_each(nodes, _read_token, str(marker))
    finally:
        marker.unlink(missing_ok=True)
    blind = [n for n, result in seen.items() if result != token]
    if blind:
        listing = "\n".join(f"  {n.describe()}" for n in blind)
        raise ConfigError(
            f"{source}: storage.path {directory} is a local directory that {len(blind)} of the cluster's "
            f"{len(seen)} nodes cannot see, so their trials' checkpoints and results would be lost:\n{listing}\n"
            "Use a directory every node mounts at the same path (e.g. NFS), or an object store: "
            "storage.path: s3://bucket/prefix (with storage.endpoint_url for an S3-compatible store) or "
            "gs://bucket/prefix"
        )


def _prepare_data(data: dict[str, Any]) -> str | None:
    from trainables.config import DataConfig
    from trainables.data import DatasetNotFoundError, ensure_available

    try:
        ensure_available(DataConfig.model_validate(data))
    except (DatasetNotFoundError, ValueError) as err:
        return str(err)
    return None


def data_problems(datas: list[dict[str, Any]], nodes: list[Node] | None) -> list[str]:
    """Why trials could not load their data: on each node (None: in this process, the driver's machine)."""
    problems = []
    for data in datas:
        if data.get("dataset") == "synthetic":
            continue
        if nodes is None:
            problem = _prepare_data(data)
            problems += [f"data ({data['dataset']} at {data['root']}): {problem}"] if problem else []
            continue
        for node, result in _on_each(nodes, _prepare_data, data).items():
            if result is not None:
                problems.append(f"data ({data['dataset']} at {data['root']}) on {node.describe()}: {result}")
    return problems
