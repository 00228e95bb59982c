"""What the driver ships and checks before a cluster sweep, on their own (the cluster suite runs them for real)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from service.cluster import Node, check_fit, code_files, stage_code
from service.plan import load_plan
from service.storage import Location
from trainables.config import ConfigError

from .conftest import REPO, SMALL


def tracked(prefixes: tuple[str, ...]) -> set[Path]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", *prefixes], capture_output=True, text=True, check=True)
    return {Path(line) for line in out.stdout.splitlines() if Path(line).suffix in (".py", ".yaml", ".yml")}


def test_every_module_of_both_packages_is_shipped_and_nothing_else():
    shipped = set(code_files(REPO))
    assert shipped == tracked(("trainables", "service"))
    assert Path("trainables/data/cifar.py") in shipped  # the folder named data is code here
    assert Path("trainables/configs/repro_synthetic.yaml") in shipped


def test_data_results_databases_and_secrets_inside_the_packages_stay_behind(tmp_path):
    for rel in ("trainables/__init__.py", "trainables/data/__init__.py", "service/tune.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("# code\n")
    junk = [
        "trainables/data/cifar-10-batches-py/data_batch_1",
        "trainables/__pycache__/loop.cpython-311.pyc",
        "service/mlflow.db",
        "service/.env",
        "service/.venv/lib/site.py",
        "trainables/runs/r1/checkpoint/state.pt",
        "data/cifar-10-batches-py/test_batch",
        "ray_results/sweep/tuner.pkl",
    ]
    for rel in junk:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    staged = stage_code(tmp_path / "stage", root=tmp_path)
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert files == ["service/tune.py", "trainables/__init__.py", "trainables/data/__init__.py"]


def node(name: str, **resources: float) -> Node:
    return Node(node_id=f"{name}-0123456789", address="10.0.0.1", hostname=name, resources=resources)


NODES = [node("head", CPU=4.0, memory=8 * 2**30), node("gpu1", CPU=8.0, GPU=1.0, memory=32 * 2**30, slot=1.0)]


def test_a_trial_that_fits_one_node_is_accepted():
    assert [n.hostname for n in check_fit({"CPU": 8.0, "GPU": 0.5}, NODES, "s.yaml")] == ["gpu1"]
    assert len(check_fit({"CPU": 2.0, "memory": 4 * 2**30}, NODES, "s.yaml")) == 2
    assert [n.hostname for n in check_fit({"CPU": 1.0, "slot": 1.0}, NODES, "s.yaml")] == ["gpu1"]


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        ({"CPU": 10.0}, "10 CPU"),  # 12 CPUs in the cluster, but no node has 10
        ({"CPU": 1.0, "GPU": 2.0}, "2 GPU"),
        ({"CPU": 1.0, "memory": 64 * 2**30}, "64.0 GiB memory"),
        ({"CPU": 1.0, "trial_slot": 1.0}, "1 trial_slot"),
    ],
)
def test_a_trial_no_node_can_hold_is_refused_naming_every_node(request_, named):
    with pytest.raises(ConfigError) as info:
        check_fit(request_, NODES, "s.yaml")
    message = str(info.value)
    assert "no node of the Ray cluster can hold one trial, which asks for" in message and named in message
    assert "head (10.0.0.1, node head-012): 4 CPU, 0 GPU, 8.0 GiB memory" in message
    assert "gpu1 (10.0.0.1, node gpu1-012): 8 CPU, 1 GPU, 32.0 GiB memory, slot 1" in message


def test_resources_as_ray_and_tune_spell_them(write_space, tmp_path):
    text = SMALL + "resources: {cpu: 2, memory_gb: 3, custom: {trial_slot: 1}}\n"
    resources = load_plan(write_space(text), launch_dir=tmp_path).spec.resources
    assert resources.ray_request() == {"CPU": 2.0, "memory": 3 * 2**30, "trial_slot": 1.0}  # no GPU: not asked
    assert resources.tune_request() == {"cpu": 2.0, "gpu": 0.0, "memory": 3 * 2**30, "trial_slot": 1.0}


@pytest.mark.parametrize(
    ("storage", "fragment"),
    [
        ("{path: 'hdfs://nn/x'}", "hdfs:// is not a store Ray Tune can share between nodes"),
        ("{path: 's3://'}", "names no bucket"),
        ("{path: 'gs://b/x', endpoint_url: 'http://127.0.0.1:9000'}", "endpoint_url applies to an s3:// path only"),
        ("{path: 's3://b/x', endpoint_url: 'ftp://h'}", "expected http(s)://host:port"),
        ("{optuna: 'redis://h:6379'}", "is not a database URL"),
        ("{optuna: 'mongodb://u:topsecret@h/db'}", "mongodb://u:***@h/db"),
    ],
)
def test_bad_storage_is_refused_naming_the_field(write_space, tmp_path, storage, fragment):
    with pytest.raises(ConfigError) as info:
        load_plan(write_space(SMALL + f"storage: {storage}\n"), launch_dir=tmp_path)
    assert "  storage" in str(info.value) and fragment in str(info.value)
    assert "topsecret" not in str(info.value)


@pytest.mark.parametrize(
    ("custom", "fragment"),
    [("{CPU: 1}", "'CPU' is a built-in resource"), ("{slot: 0}", "amount 0.0 must be above 0")],
)
def test_bad_custom_resources_are_refused(write_space, tmp_path, custom, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_plan(write_space(SMALL + f"resources: {{custom: {custom}}}\n"), launch_dir=tmp_path)


def test_object_store_location_is_taken_as_given(write_space, tmp_path):
    text = SMALL + "storage: {path: 's3://team-bucket/sweeps/', endpoint_url: 'http://127.0.0.1:9000'}\n"
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    assert plan.sweep_location.uri == f"s3://team-bucket/sweeps/{plan.sweep_name}"
    fs, path = plan.storage.filesystem()
    assert (fs.type_name, path) == ("s3", "team-bucket/sweeps")


def test_local_location_reads_and_writes_whole_files(tmp_path):
    where = Location(str(tmp_path / "store"))
    assert not where.exists() and where.subdirs() == []
    (where / "sweep-a" / "service_plan.json").write_text('{"a": 1}')
    assert where.subdirs() == ["sweep-a"] and (where / "sweep-a").exists()
    assert (where / "sweep-a" / "service_plan.json").read_text() == '{"a": 1}'
    assert [p.name for p in (tmp_path / "store" / "sweep-a").iterdir()] == ["service_plan.json"]  # no temp file
    pending = where / "sweep-a" / "unwritten_mlflow.pkl"
    pending.write_bytes(b"\x80\x05]\x94.")
    assert pending.is_file() and pending.read_bytes() == b"\x80\x05]\x94."
    pending.delete()
    pending.delete()  # nothing there: nothing to do
    assert not pending.is_file() and (where / "sweep-a" / "service_plan.json").is_file()
