"""The command line: exit codes, --schema, --dry-run, and bad input that fails before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.plan import load_plan
from service.sweep import RECORD_FILE, preflight, write_record
from service.tracking import SweepRecord
from tests.trainables.test_config import BOMB
from trainables.config import ConfigError

from .conftest import REPO, SMALL


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "service.tune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_schema_is_json_schema_for_editors(tmp_path):
    out = cli("--schema", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert {"experiment", "base", "space", "search", "resources", "tracking", "storage"} <= set(schema["properties"])
    assert "train" in schema["properties"]["base"]["properties"]  # base is described by RunConfig's schema
    param = schema["properties"]["space"]["additionalProperties"]
    assert set(param["discriminator"]["mapping"]) == {
        "uniform",
        "loguniform",
        "log_one_minus",
        "int",
        "categorical",
        "fixed",
    }
    refs = json.dumps(schema)
    for ref in {part.split('"')[0] for part in refs.split('"$ref": "#/$defs/')[1:]}:
        assert ref in schema["$defs"], f"dangling $ref {ref}"
    assert list(tmp_path.iterdir()) == []


def test_dry_run_without_flags_plans_the_quickstart_and_starts_nothing(tmp_path):
    out = cli("--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for fragment in (
        "Sweep quickstart-",
        "search_spaces/quickstart.yaml",
        "Base configuration (preset fixmatch",
        "method.drw.beta     log_one_minus[0.9, 0.9999]",
        "Optuna tpe sampler (seed 0), 8 trials",
        "ASHA on val/balanced_acc (max) at evaluation steps: grace period 2",
        "Resources per trial: 1 CPU, 0 GPU",
        f"Ray results: {tmp_path}/ray_results/quickstart-",
        f"MLflow: sqlite:///{tmp_path}/mlflow.db, experiment 'quickstart'",
        "Sampled configurations (3 of 8):",
        "  t000 ",
    ):
        assert fragment in text, f"{fragment!r} missing from the dry run:\n{text}"
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no ray_results


def test_dry_run_applies_flags(tmp_path):
    out = cli(
        "--dry-run",
        "--num-samples",
        "5",
        "--storage",
        "elsewhere",
        "--tracking-uri",
        "sqlite:///t.db",
        "--set",
        "search.seed=3",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "(seed 3), 5 trials" in out.stdout and f"{tmp_path}/elsewhere/quickstart-" in out.stdout
    assert f"sqlite:///{tmp_path}/t.db" in out.stdout


def test_bad_space_exits_2_with_the_message_and_writes_nothing(tmp_path):
    (tmp_path / "bad.yaml").write_text(SMALL.replace("metric: val/balanced_acc", "metric: test/balanced_acc"))
    out = cli("--space", "bad.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert "bad.yaml" in out.stderr and "search.metric" in out.stderr and "test split" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--num-samples", "many"], "invalid int value"),
        (["--address", "not an address"], "expected auto or HOST:PORT"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--num-samples", "0"], "search.num_trials"),
        (["--set", "search.sampler=annealing"], "search.sampler"),
        (["--tracking-uri", "mlruns"], "file store"),
        (["--space", "missing.yaml"], "missing.yaml: no such file"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(args, fragment, tmp_path):
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert fragment in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_sweep_exits_2(tmp_path):
    out = cli("--resume", cwd=tmp_path)
    assert out.returncode == 2
    assert "no sweep to resume" in out.stderr and "quickstart-" in out.stderr
    assert list(tmp_path.iterdir()) == []


def fake_sweep(plan) -> None:
    """A sweep folder as a run leaves it: the record and Tune's state (a stand-in file)."""
    Path(plan.sweep_location.uri).mkdir(parents=True)
    (Path(plan.sweep_location.uri) / "tuner.pkl").write_bytes(b"")
    write_record(plan, record_for(plan))


def record_for(plan) -> SweepRecord:
    return SweepRecord(plan.tracking_uri, "1", "parent", plan.sweep_name, plan.space_hash, "c0ffee", (("m", "max"),), 1)


def test_existing_sweep_needs_resume(write_space, tmp_path):
    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    fake_sweep(plan)
    with pytest.raises(ConfigError, match="already exists.*pass --resume"):
        preflight(plan, resume=False)
    assert preflight(plan, resume=True)["record"]["parent_run_id"] == "parent"


def test_resume_refuses_a_changed_plan(write_space, tmp_path):
    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    fake_sweep(plan)
    changed = load_plan(write_space(SMALL), sets=["search.sampler=random", "search.num_trials=9"], launch_dir=tmp_path)
    assert changed.sweep_location == plan.sweep_location  # same question, other budget and sampler
    with pytest.raises(ConfigError) as info:
        preflight(changed, resume=True)
    message = str(info.value)
    assert "search.sampler: 'tpe' when the sweep started, 'random' now" in message
    assert "search.num_trials" not in message.splitlines()[1:-1]  # a budget change is not what stops it
    assert "a resume may only raise search.num_trials and change search.time_budget_s" in message


def test_resume_may_extend_the_budget_but_not_shrink_it(write_space, tmp_path):
    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    fake_sweep(plan)
    more = load_plan(write_space(SMALL), sets=["search.num_trials=9", "search.time_budget_s=60"], launch_dir=tmp_path)
    stored = preflight(more, resume=True)
    assert stored["extended"] == [("search.num_trials", 6, 9), ("search.time_budget_s", None, 60.0)]
    assert preflight(plan, resume=True)["extended"] == []
    fewer = load_plan(write_space(SMALL), sets=["search.num_trials=4"], launch_dir=tmp_path)
    with pytest.raises(ConfigError, match="search.num_trials: 4 is fewer than the 6 the sweep planned"):
        preflight(fewer, resume=True)


def test_retry_failed_needs_resume(tmp_path):
    out = cli("--retry-failed", cwd=tmp_path)
    assert (
        out.returncode == 2 and "--retry-failed continues a sweep's failed trials: use it with --resume" in out.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_changed_space_is_another_sweep(write_space, tmp_path):
    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    Path(plan.sweep_location.uri).mkdir(parents=True)
    (plan.sweep_location / RECORD_FILE).write_text("{}")
    wider = load_plan(write_space(SMALL.replace("high: 0.1}", "high: 0.2}")), launch_dir=tmp_path)
    assert wider.sweep_location != plan.sweep_location
    with pytest.raises(ConfigError, match=f"no sweep to resume.*sweeps of this experiment: {plan.sweep_name}"):
        preflight(wider, resume=True)
    assert preflight(wider, resume=False) is None  # a fresh sweep with its own study


def test_resources_the_cluster_lacks_exit_2_before_any_run(tmp_path):
    (tmp_path / "space.yaml").write_text(SMALL + "resources: {cpu: 1024}\n")
    out = cli("--space", "space.yaml", cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no node of the Ray cluster can hold one trial, which asks for 1024 CPU" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["space.yaml"]  # no MLflow store, no sweep directory


def test_a_missing_data_set_exits_2_before_any_run(tmp_path):
    synthetic = "  data: {dataset: synthetic, n1: 100, m1: 200, synthetic: {num_classes: 10, pool_per_class: 400}}\n"
    cifar = "  data: {dataset: cifar10, root: nowhere, download: false, n1: 100, m1: 200}\n"
    assert synthetic in SMALL
    (tmp_path / "space.yaml").write_text(SMALL.replace(synthetic, cifar))
    out = cli("--space", "space.yaml", cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "trials could not load their data set" in out.stderr
    assert f"CIFAR-10 not found: {tmp_path / 'nowhere'}" in out.stderr and "data.download is false" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["space.yaml"]  # no MLflow store, no sweep directory


def test_a_password_in_a_rejected_url_is_not_printed(tmp_path):
    (tmp_path / "space.yaml").write_text(SMALL)
    out = cli("--space", "space.yaml", "--set", "storage.optuna=mongodb://ml:pw-in-flag@db/optuna", cwd=tmp_path)
    assert out.returncode == 2
    assert "storage.optuna" in out.stderr and "mongodb://ml:***@db/optuna" in out.stderr
    assert "pw-in-flag" not in out.stderr + out.stdout


def test_dry_run_shows_stores_without_their_passwords(tmp_path):
    (tmp_path / "space.yaml").write_text(SMALL)
    out = cli(
        "--space", "space.yaml", "--dry-run", "--tracking-uri", "http://alice:pw-track@mlflow.example:5000",
        "--set", "storage.optuna=postgresql+psycopg://ml:pw-optuna@db:5432/optuna",
        "--storage", "s3://team-bucket/sweeps", "--set", "storage.endpoint_url=http://127.0.0.1:9000",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pw-track" not in out.stdout and "pw-optuna" not in out.stdout
    assert "MLflow: http://alice:***@mlflow.example:5000" in out.stdout
    assert "postgresql+psycopg://ml:***@db:5432/optuna" in out.stdout
    assert "Ray results: s3://team-bucket/sweeps/small-" in out.stdout
    assert "(endpoint http://127.0.0.1:9000)" in out.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / "space.yaml"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x00\x01\xff binary", "not UTF-8 text"),
        (SMALL.encode() + b"search: {num_trials: 3}\n", "duplicate key 'search'"),
        (BOMB.encode(), "through its aliases"),  # 10^9 nodes once expanded: refused at once, no hang
    ],
)
def test_unreadable_space_files_exit_2(tmp_path, content, fragment):
    (tmp_path / "space.yaml").write_bytes(content)
    out = cli("--space", "space.yaml", "--dry-run", cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stderr
    assert fragment in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--tracking-uri", "http://127.0.0.1:9"], "tracking.uri http://127.0.0.1:9: "),
        (["--tracking-uri", "sqlite:////no/such/folder/mlflow.db"], "the folder /no/such/folder does not exist"),
        (["--set", "storage.optuna=postgresql+psycopg://postgres:pw-x@127.0.0.1:9/optuna"], "storage.optuna"),
        (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: no Ray cluster answers there"),
    ],
)
def test_unreachable_stores_and_clusters_exit_2_before_anything_starts(tmp_path, flags, fragment):
    (tmp_path / "space.yaml").write_text(SMALL)
    out = cli("--space", "space.yaml", *flags, cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "cannot reach what the sweep needs" in out.stderr and fragment in out.stderr
    assert "pw-x" not in out.stderr and "Traceback" not in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["space.yaml"]


def test_resume_without_tune_state_refuses_to_start_over(write_space, tmp_path):
    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    Path(plan.sweep_location.uri).mkdir(parents=True)
    write_record(plan, record_for(plan))  # the record, but Tune's state is gone
    with pytest.raises(ConfigError, match=r"not Ray Tune's state \(tuner.pkl\).*will not start the sweep over"):
        preflight(plan, resume=True)


def test_a_start_killed_before_its_record_is_replaced_by_the_next_start(write_space, tmp_path):
    # Tune wrote tuner.pkl, the driver died before service_plan.json: no trial ever ran from that folder
    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    where = Path(plan.sweep_location.uri)
    where.mkdir(parents=True)
    (where / "tuner.pkl").write_bytes(b"state of a start that died")
    with pytest.raises(ConfigError, match="no sweep to resume"):
        preflight(plan, resume=True)
    assert preflight(plan, resume=False) is None
    assert not where.exists()


def test_a_storage_path_that_cannot_be_written_exits_2(tmp_path):
    (tmp_path / "space.yaml").write_text(SMALL)
    out = cli("--space", "space.yaml", "--storage", "/proc/ltssl-results", cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "storage.path /proc/ltssl-results cannot be written" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["space.yaml"]


@pytest.mark.parametrize("space", sorted(p.name for p in (REPO / "search_spaces").glob("*.yaml")))
def test_every_shipped_space_passes_its_dry_run(tmp_path, space):
    out = cli("--space", str(REPO / "search_spaces" / space), "--dry-run", cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Dry run: nothing was started or written." in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_lock_on_a_file_system_that_locks_only_writable_files(write_space, tmp_path, monkeypatch):
    # NFS emulates flock with fcntl locks, which refuse a descriptor not open for writing (EBADF): the lock is then
    # taken through a writable one, and a second driver is still refused. Elsewhere the file is held read-only
    import errno
    import fcntl

    from service import lock

    held = []
    real = fcntl.flock

    def nfs_like(handle, operation):
        if handle.mode == "r":
            raise OSError(errno.EBADF, "Bad file descriptor")
        held.append(handle.mode)
        return real(handle, operation)

    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    with lock.SweepLock(plan) as first:
        assert first._file.mode == "r"  # a local disk: no writer kept open on the storage
    monkeypatch.setattr(lock.fcntl, "flock", nfs_like)
    with lock.SweepLock(plan):
        with pytest.raises(ConfigError, match="another driver is running sweep"):
            lock.SweepLock(plan).__enter__()
    assert held == ["r+", "r+"]  # the lock taken, then refused to the second driver, through writable descriptors
