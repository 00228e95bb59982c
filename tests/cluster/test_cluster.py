"""The cluster path against real components: a three-node Ray cluster, an MLflow server on PostgreSQL with artifacts
in an S3-compatible store, the Optuna study in PostgreSQL and Ray Tune's state in S3. Every sweep is started from a
directory outside the checkout, as `python -m service.tune`, and checked through the public clients afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.trainables.data.fakes import write_cifar10

from .peers import AWS, REPO, RayCluster, base_env

pytestmark = pytest.mark.cluster

SPACE = f"""
experiment: {{name}}
base_file: {REPO}/trainables/configs/repro_synthetic.yaml
base:
  train: {{{{iterations: 40, eval_every: 20}}}}
space:
  method.preset: {{{{type: categorical, values: [fixmatch, fixmatch_la, fixmatch_drw]}}}}
search: {{{{sampler: grid, metric: val/balanced_acc, max_concurrent: {{concurrent}}}}}}
"""


def space(name: str, concurrent: int = 2, extra: str = "") -> str:
    return SPACE.format(name=name, concurrent=concurrent) + extra


def tune(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.tune", "--space", "space.yaml", *args],
        cwd=cwd,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ltssl.role") == "trial"]


def test_sweep_runs_on_two_worker_nodes_with_the_code_it_ships(ray_cluster: RayCluster, tmp_path):
    # trials need a trial_slot, which only the two worker nodes have (one each): two trials at a time, one per node
    resources = "resources: {cpu: 1, custom: {trial_slot: 1}}\nstorage: {path: results}\n"
    (tmp_path / "space.yaml").write_text(space("nodes", extra=resources))
    out = tune(tmp_path, "--address", ray_cluster.address, env=ray_cluster.env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = child_runs(client, "nodes")
    assert len(children) == 3
    assert all(c.data.tags["ltssl.outcome"] == "finished" for c in children)
    workers = {ray_cluster.node_ids["shared"], ray_cluster.node_ids["private"]}
    ran_on = {c.data.tags["ltssl.node_id"] for c in children}
    assert ran_on == workers  # both worker nodes, never the head
    for child in children:
        tags = child.data.tags
        assert tags["ltssl.nodes"] == tags["ltssl.node_id"]
        assert tags["ltssl.gpu"] == "none" and tags["ltssl.hostname"] and tags["ltssl.node_ip"]
        # the nodes' Python cannot import the project; the trial imported the copy Ray unpacked from the driver's
        # upload, not the checkout
        code = Path(tags["ltssl.code_path"])
        assert "runtime_resources" in code.parts and code.name == "trainables", code
        assert not code.is_relative_to(REPO)
        # the trial's run folder lives in the sweep's storage: its last checkpoint holds the final tables and records
        (trial_dir,) = (tmp_path / "results").glob(f"nodes-*/{tags['ltssl.tune_trial_id']}_*")
        (final,) = trial_dir.glob("checkpoint_*")  # an ended trial keeps its last checkpoint only
        assert {"state.pt", "metrics.jsonl", "counts.json", "config.json"} <= {p.name for p in final.iterdir()}
        assert (final / "artifacts" / "per_class_test.csv").is_file()
        assert [json.loads(line)["step"] for line in (final / "metrics.jsonl").read_text().splitlines()] == [20, 40]


def test_a_trial_no_node_can_hold_is_refused_naming_the_nodes(ray_cluster: RayCluster, tmp_path):
    # 2 CPUs: the cluster has 2 in all, but no node has 2
    (tmp_path / "space.yaml").write_text(space("too_big", extra="resources: {cpu: 2}\n"))
    out = tune(tmp_path, "--address", ray_cluster.address, env=ray_cluster.env, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no node of the Ray cluster can hold one trial, which asks for 2 CPU" in out.stderr
    for node_id in ray_cluster.node_ids.values():
        assert node_id[:8] in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_local_storage_a_node_cannot_see_is_refused(ray_cluster: RayCluster, tmp_path):
    results = ray_cluster.private / "results"
    (tmp_path / "space.yaml").write_text(space("unshared", extra=f"storage: {{path: {results}}}\n"))
    out = tune(tmp_path, "--address", ray_cluster.address, env=ray_cluster.env, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"storage.path {results} is a local directory that 1 of the cluster's 3 nodes cannot see" in out.stderr
    assert ray_cluster.node_ids["private"][:8] in out.stderr
    assert ray_cluster.node_ids["shared"][:8] not in out.stderr
    assert not results.exists()  # the check left nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_a_data_set_missing_on_a_node_is_one_configuration_error(ray_cluster: RayCluster, tmp_path):
    root = ray_cluster.private / "data"  # CIFAR-10 files the driver and one worker see, the other does not
    write_cifar10(root, train_per_class=30, test_per_class=2)
    base = f"  data: {{dataset: cifar10, root: {root}, download: false, n1: 10, m1: 10, gamma_l: 2, val_size: 50}}\n"
    text = space("no_data", extra="resources: {cpu: 1, custom: {trial_slot: 1}}\n").replace("base:\n", "base:\n" + base)
    (tmp_path / "space.yaml").write_text(text)
    out = tune(tmp_path, "--address", ray_cluster.address, env=ray_cluster.env, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trials could not load their data set" in out.stderr and "CIFAR-10 not found" in out.stderr
    assert ray_cluster.node_ids["private"][:8] in out.stderr
    assert ray_cluster.node_ids["shared"][:8] not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no MLflow store, no sweep directory


# ---- team mode ---------------------------------------------------------------------------------------------------

PASSWORD = "hunter2-never-written-7c41"  # PostgreSQL here trusts loopback, so any password connects


def test_team_mode_sweep_with_s3_storage_survives_an_interrupt(tmp_path, mlflow_server, databases, s3_server):
    optuna_url = databases().replace("postgres@", f"postgres:{PASSWORD}@")
    storage = f"s3://{s3_server.bucket}/sweeps"
    extra = (
        f"storage: {{path: '{storage}', endpoint_url: '{s3_server.endpoint}', optuna: '{optuna_url}'}}\n"
        "tracking: {experiment: team}\n"
    )
    (tmp_path / "space.yaml").write_text(space("team", concurrent=1, extra=extra))
    env = {**base_env(), **AWS}
    args = [sys.executable, "-m", "service.tune", "--space", "space.yaml", "--tracking-uri", mlflow_server]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # interrupt once the first trial has finished and the second has logged an evaluation (so it has a checkpoint)
    client = MlflowClient(mlflow_server)
    deadline = time.monotonic() + 400
    while True:
        exp = client.get_experiment_by_name("team")
        tags = [r.data.tags for r in child_runs(client, "team")] if exp else []
        finished = [t for t in tags if t.get("ltssl.outcome") == "finished"]
        started = [t for t in tags if t.get("ltssl.outcome") == "running" and int(t.get("ltssl.last_step", -1)) >= 20]
        if finished and started:
            break
        if first.poll() is not None or time.monotonic() > deadline:
            first.kill()
            pytest.fail("the sweep never reached a second trial with a checkpoint:\n" + first.communicate()[0][-3000:])
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    first_out, _ = first.communicate(timeout=180)
    assert first.returncode == 130, first_out[-3000:]

    second = subprocess.run([*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    # MLflow, read back through the server: one child per trial, every evaluation once, tables in the S3 store
    children = child_runs(client, "team")
    assert len(children) == 3 and len({c.data.tags["ltssl.tune_trial_id"] for c in children}) == 3
    (sweep_name,) = {c.data.tags["ltssl.sweep"] for c in children}
    study = optuna.load_study(study_name=sweep_name, storage=optuna_url)
    by_tune_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert len(study.trials) == 3
    for child in children:
        run_id = child.info.run_id
        assert (child.info.status, child.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
        history = client.get_metric_history(run_id, "val/balanced_acc")
        assert [m.step for m in history] == [20, 40]
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server to S3
        table = Path(client.download_artifacts(run_id, "per_class_test.csv", str(tmp_path / run_id))).read_text()
        assert len(table.strip().splitlines()) == 11
        # Optuna saw the same trials, with the same values
        trial = by_tune_id[child.data.tags["ltssl.tune_trial_id"]]
        assert trial.state == TrialState.COMPLETE
        assert trial.value == pytest.approx(history[-1].value)
        assert trial.intermediate_values == {m.step: pytest.approx(m.value) for m in history}

    # Ray Tune's state and the trials' checkpoints are in the S3 store, under the sweep
    objects = s3_objects(s3_server)
    keys = set(objects)
    prefix = f"sweeps/{sweep_name}/"
    assert {f"{prefix}tuner.pkl", f"{prefix}service_plan.json"} <= keys
    assert any(k.startswith(prefix) and k.endswith("/state.pt") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("per_class_test.csv") for k in keys)
    assert not (tmp_path / "ray_results").exists()

    # the password never left this process: not printed, not in the S3 store (Tune's pickles included), not in
    # either database (MLflow params, tags and artifacts; Optuna's tables)
    for text in (first_out, second.stdout, second.stderr):
        assert PASSWORD not in text
    leaked = [k for k, body in objects.items() if PASSWORD.encode() in body]
    assert leaked == []
    assert AWS["AWS_SECRET_ACCESS_KEY"].encode() not in b"".join(objects.values())
    assert not database_contains(optuna_url, PASSWORD)
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert PASSWORD not in json.dumps(parent.data.params) + json.dumps(parent.data.tags)
    plan = Path(client.download_artifacts(parent.info.run_id, "space", str(tmp_path / "parent"))).rglob("*")
    assert all(PASSWORD not in p.read_text() for p in plan if p.is_file())
    assert "postgres:***@" in json.loads(objects[f"{prefix}service_plan.json"])["frozen"]["storage"]["optuna"]


def s3_objects(s3) -> dict[str, bytes]:
    import boto3

    from .peers import boto_credentials

    client = boto3.client("s3", endpoint_url=s3.endpoint, **boto_credentials())
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
    return out


def database_contains(url: str, needle: str) -> bool:
    """Whether any text column of any table of the database holds `needle`."""
    import psycopg

    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={dbname}") as conn:
        columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND data_type IN ('text', 'character varying')"
        ).fetchall()
        for table, column in columns:
            hit = conn.execute(f'SELECT 1 FROM "{table}" WHERE "{column}" LIKE %s LIMIT 1', (f"%{needle}%",))
            if hit.fetchone():
                return True
    return False


def test_a_missing_bucket_or_an_unreachable_store_exits_2_before_anything_starts(tmp_path, s3_server):
    env = {**base_env(), **AWS}
    tmp_path = tmp_path / "launch"
    tmp_path.mkdir()
    for path, endpoint, fragment in [
        ("s3://no-such-bucket/sweeps", s3_server.endpoint, "bucket s3://no-such-bucket does not exist at"),
        (f"s3://{s3_server.bucket}/sweeps", "http://127.0.0.1:9", "cannot be read"),
    ]:
        extra = f"storage: {{path: '{path}', endpoint_url: '{endpoint}'}}\n"
        (tmp_path / "space.yaml").write_text(space("no_store", extra=extra))
        out = tune(tmp_path, env=env, timeout=300)
        assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
        assert fragment in out.stderr and "storage.path" in out.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
    assert s3_objects(s3_server) == {}


def test_one_driver_per_sweep_in_team_mode_through_a_postgres_lock(tmp_path, databases):
    from service.lock import SweepLock
    from service.plan import load_plan
    from trainables.config import ConfigError

    url = databases().replace("postgres@", f"postgres:{PASSWORD}@")
    extra = f"storage: {{path: 's3://any-bucket/sweeps', optuna: '{url}'}}\n"
    (tmp_path / "space.yaml").write_text(space("locked", extra=extra))
    plan = load_plan(tmp_path / "space.yaml", launch_dir=tmp_path)
    with SweepLock(plan):
        with pytest.raises(
            ConfigError, match="another driver is running sweep locked-.*PostgreSQL advisory lock"
        ) as info:
            SweepLock(plan).__enter__()
        assert PASSWORD not in str(info.value)
    with SweepLock(plan):  # released with its connection
        pass


def lock_holders(url: str) -> list[int]:
    """The backends holding an advisory lock."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        query = (
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return [row[0] for row in connection.execute(sqlalchemy.text(query))]


def terminate(url: str, pids: list[int]) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        for pid in pids:
            connection.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


def test_a_postgres_lock_whose_connection_drops_is_taken_again_or_its_sweep_stopped(tmp_path, databases, monkeypatch):
    # a terminated backend (a PostgreSQL restart, a failover) releases the advisory lock without a word: the
    # holder's watchdog takes it again; if another driver got it first, the holder stops its own sweep
    from service import lock
    from service.plan import load_plan
    from trainables.config import ConfigError

    monkeypatch.setattr(lock, "LOCK_CHECK_S", 0.2)
    url = databases()
    (tmp_path / "space.yaml").write_text(space("relocked", extra=f"storage: {{path: 's3://b/s', optuna: '{url}'}}\n"))
    plan = load_plan(tmp_path / "space.yaml", launch_dir=tmp_path)
    lost = []
    with lock.SweepLock(plan, on_lost=lambda: lost.append(True)):
        (first,) = lock_holders(url)
        terminate(url, [first])
        deadline = time.monotonic() + 30
        while lock_holders(url) in ([], [first]):
            assert time.monotonic() < deadline, "the lock was never taken again"
            time.sleep(0.1)
        with pytest.raises(ConfigError, match="another driver is running sweep relocked-"):
            lock.SweepLock(plan).__enter__()  # the lock holds again
        assert lost == []

        (second,) = lock_holders(url)
        monkeypatch.setattr(lock, "LOCK_CHECK_S", 2.0)  # room for another driver to step in first
        time.sleep(0.3)  # the watchdog is in its 2 s wait
        terminate(url, [second])
        time.sleep(0.5)
        with lock.SweepLock(plan, on_lost=lambda: None):  # the other driver
            deadline = time.monotonic() + 30
            while not lost:
                assert time.monotonic() < deadline, "the holder never noticed it had lost the lock"
                time.sleep(0.1)


def test_an_mlflow_outage_delays_records_but_loses_none(tmp_path, databases, s3_server):
    # the tracking server goes down for longer than a trial's evaluation interval and comes back mid-sweep:
    # training goes on (the writes wait in the driver's queue), and every evaluation ends up in MLflow exactly once
    from .peers import running_mlflow

    launch = tmp_path / "launch"
    launch.mkdir()
    extra = f"storage: {{optuna: '{databases()}'}}\ntracking: {{experiment: outage}}\n"
    (launch / "space.yaml").write_text(
        space("outage", concurrent=1, extra=extra).replace("40, eval_every: 20", "200, eval_every: 20")
    )
    with running_mlflow(tmp_path, databases(), s3_server) as server:
        client = MlflowClient(server.url)
        args = [sys.executable, "-m", "service.tune", "--space", "space.yaml", "--tracking-uri", server.url]
        sweep = subprocess.Popen(
            args, cwd=launch, env={**base_env(), **AWS}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 300
        while not (client.get_experiment_by_name("outage") and child_runs(client, "outage")):
            if sweep.poll() is not None or time.monotonic() > deadline:
                pytest.fail("no trial started:\n" + sweep.communicate()[0][-3000:])
            time.sleep(0.5)
        server.kill()
        killed = time.time()
        time.sleep(25)  # several evaluation intervals of these trials (a second or two each)
        restarted = time.time()
        server.start()
        output, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, output[-3000:]
        # training went on while the server was down: Tune recorded evaluations in that window
        reported = [
            json.loads(line)["timestamp"]
            for path in (launch / "ray_results").glob("outage-*/*/result.json")
            for line in path.read_text().splitlines()
        ]
        assert sum(killed < t < restarted for t in reported) >= 3, (killed, restarted, reported)

        children = child_runs(client, "outage")
        assert len(children) == 3 and len({c.data.tags["ltssl.tune_trial_id"] for c in children}) == 3
        for child in children:
            assert (child.info.status, child.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
            for key in ("val/balanced_acc", "val/recall/c03"):
                steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
                assert steps == list(range(20, 201, 20)), (key, steps)


def test_records_mlflow_did_not_take_before_the_end_are_written_by_resume(tmp_path, databases, s3_server):
    # the tracking server goes down mid-sweep and stays down past the sweep's end: the trials finish, the writes left
    # undone are saved in the sweep's folder (exit 75, no traceback), and --resume, once MLflow is back, makes them
    from .peers import running_mlflow

    launch = tmp_path / "launch"
    launch.mkdir()
    extra = f"storage: {{optuna: '{databases()}'}}\ntracking: {{experiment: after_end}}\n"
    (launch / "space.yaml").write_text(space("after_end", concurrent=2, extra=extra))
    # MLflow's client retries a refused connection for minutes by default; the sweep's end waits 2 s for the queue
    env = {**base_env(), **AWS, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "LTSSL_MLFLOW_FLUSH_TIMEOUT_S": "2"}
    with running_mlflow(tmp_path, databases(), s3_server) as server:
        client = MlflowClient(server.url)
        args = [sys.executable, "-m", "service.tune", "--space", "space.yaml", "--tracking-uri", server.url]
        sweep = subprocess.Popen(args, cwd=launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not (client.get_experiment_by_name("after_end") and child_runs(client, "after_end")):
            if sweep.poll() is not None or time.monotonic() > deadline:
                pytest.fail("no trial started:\n" + sweep.communicate()[0][-3000:])
            time.sleep(0.5)
        server.kill()
        output, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 75, output[-3000:]
        assert 'service/sweep.py", line' not in output, output[-3000:]  # no traceback of the driver's own
        assert "with --resume once MLflow answers" in output, output[-3000:]
        (saved,) = (launch / "ray_results").glob("after_end-*/unwritten_mlflow.pkl")

        server.start()
        patient = {**env, "LTSSL_MLFLOW_FLUSH_TIMEOUT_S": "60"}  # a write may take seconds on a loaded machine
        resumed = tune(launch, "--tracking-uri", server.url, "--resume", env=patient)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "MLflow write(s) an earlier session left undone" in resumed.stdout
        assert not saved.exists()
        children = child_runs(client, "after_end")
        assert len(children) == 3 and len({c.data.tags["ltssl.optuna_trial"] for c in children}) == 3
        for child in children:
            assert (child.info.status, child.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
            for key in ("val/balanced_acc", "val/recall/c03"):
                assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [20, 40], key
        parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
        assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
