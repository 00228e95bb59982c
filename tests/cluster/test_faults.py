"""Fault injection against the real components: a multi-node Ray cluster (`ray start`), an MLflow server on
PostgreSQL with artifacts in moto's S3 server, and the Optuna study in PostgreSQL. Each test breaks something mid-sweep,
lets the sweep (or its `--resume`) finish, and then checks through the public clients that every planned trial has
exactly one MLflow child run and one Optuna trial, both in the right final state, and that every evaluation is
recorded exactly once (`assert_exact`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from .peers import REPO, RayCluster, spare_nodes

pytestmark = pytest.mark.faults

ITERATIONS, EVERY = 60, 20
STEPS = list(range(EVERY, ITERATIONS + 1, EVERY))

# 6 trials (3 presets x 2 learning rates), two at a time, one on each worker node (each has one trial_slot)
SPACE = f"""
experiment: {{name}}
base_file: {REPO}/trainables/configs/repro_synthetic.yaml
base:
  train: {{{{iterations: {ITERATIONS}, eval_every: {EVERY}}}}}
space:
  method.preset: {{{{type: categorical, values: [fixmatch, fixmatch_la, fixmatch_drw]}}}}
  optim.lr: {{{{type: categorical, values: [0.03, 0.01]}}}}
search: {{{{sampler: grid, metric: val/balanced_acc, max_concurrent: 2, max_failures: 3}}}}
resources: {{{{cpu: 1, custom: {{{{trial_slot: 1}}}}}}}}
storage: {{{{path: results, optuna: '{{optuna}}'}}}}
tracking: {{{{experiment: {{name}}}}}}
"""
PLANNED = 6


def start(cwd: Path, tracking: str, env: dict[str, str], *extra: str) -> subprocess.Popen:
    """The driver, its output in a file of its own (`output(proc)`): a pipe nobody reads would block it."""
    args = [sys.executable, "-m", "service.tune", "--space", "space.yaml", "--tracking-uri", tracking, *extra]
    log = cwd / f"driver-{len(list(cwd.glob('driver-*.log')))}.log"
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()  # type: ignore[attr-defined]


def child_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("ltssl.role") == "trial"]


def wait_for(what: str, done: Callable[[], bool], proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            pytest.fail(f"never reached: {what}\n" + output(proc)[-4000:])
        time.sleep(0.5)


def evaluations(client: MlflowClient, experiment: str) -> int:
    return sum(int(r.data.tags.get("ltssl.last_step", "0")) // EVERY for r in child_runs(client, experiment))


def assert_exact(
    client: MlflowClient, experiment: str, optuna_url: str, planned: int = PLANNED, diverging_lr: float | None = None
) -> None:
    """Every planned trial: one child run FINISHED (outcome finished) with each evaluation once, and one Optuna
    trial COMPLETE with the same value and intermediate values; nothing else in either store. A trial with the
    learning rate `diverging_lr` instead failed at its first evaluation, at once: FAILED (not retried, the reason in
    error.txt, no metric) and Optuna FAIL."""
    children = child_runs(client, experiment)
    assert len(children) == planned, sorted((c.data.tags.get("ltssl.optuna_trial"), c.info.status) for c in children)
    numbers = sorted(int(c.data.tags["ltssl.optuna_trial"]) for c in children)
    assert numbers == list(range(planned))
    (sweep_name,) = {c.data.tags["ltssl.sweep"] for c in children}
    study = optuna.load_study(study_name=sweep_name, storage=optuna_url)
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == numbers
    for child in children:
        run_id = child.info.run_id
        trial = trials[int(child.data.tags["ltssl.optuna_trial"])]
        if diverging_lr is not None and float(child.data.params["optim.lr"]) == diverging_lr:
            assert (child.info.status, child.data.tags["ltssl.outcome"]) == ("FAILED", "failed"), child.data.tags
            assert "ltssl.retries" not in child.data.tags and "val/balanced_acc" not in child.data.metrics
            assert child.data.tags["mlflow.note.content"].startswith("training diverged at step 20")
            assert trial.state == TrialState.FAIL, (trial.number, trial.state)
            continue
        assert (child.info.status, child.data.tags["ltssl.outcome"]) == ("FINISHED", "finished"), child.data.tags
        for key in ("val/balanced_acc", "val/recall/c03"):
            history = client.get_metric_history(run_id, key)
            assert [m.step for m in history] == STEPS, (child.info.run_name, key, [m.step for m in history])
        history = client.get_metric_history(run_id, "val/balanced_acc")
        assert trial.state == TrialState.COMPLETE, (trial.number, trial.state)
        assert trial.value == pytest.approx(history[-1].value)
        assert trial.intermediate_values == {m.step: pytest.approx(m.value) for m in history}
        assert trial.user_attrs["tune_trial_id"] == child.data.tags["ltssl.tune_trial_id"]
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")


def test_driver_killed_twice_then_terminated_then_resumed(ray_cluster: RayCluster, tmp_path, mlflow_server, databases):
    """kill -9 of the driver mid-sweep, twice, each time after trials have started since the last kill, then SIGTERM
    (a preempted machine) of the next resumed driver; `--resume` after each. Trials started after Tune's last saved
    state are taken over, not run as new trials."""
    optuna_url = databases()
    (tmp_path / "space.yaml").write_text(SPACE.format(name="driver_kill", optuna=optuna_url))
    client = MlflowClient(mlflow_server)
    # Tune saves its state only when it must (start, end, a trial's checkpoints rotated): the kills land after trials
    # that Tune's saved state does not know were started, and some finished
    env = {**ray_cluster.env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    args = ("--address", ray_cluster.address)
    resumed = []

    driver = start(tmp_path, mlflow_server, env, *args)
    # first kill: a trial has finished and another is mid-training
    wait_for(
        "a finished trial and two running ones with an evaluation",
        lambda: (
            sum(c.data.tags.get("ltssl.outcome") == "finished" for c in child_runs(client, "driver_kill")) >= 1
            and sum(
                c.data.tags.get("ltssl.outcome") == "running" and int(c.data.tags.get("ltssl.last_step", -1)) >= EVERY
                for c in child_runs(client, "driver_kill")
            )
            >= 1
        ),
        driver,
    )
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)

    # second kill -9, then SIGTERM, each once the resumed sweep has recorded two more evaluations
    for stop in (signal.SIGKILL, signal.SIGTERM, None):
        before = evaluations(client, "driver_kill")
        driver = start(tmp_path, mlflow_server, env, *args, "--resume")
        resumed.append(driver)
        if stop is None:
            break
        wait_for("two more evaluations", lambda n=before: evaluations(client, "driver_kill") >= n + 2, driver)
        driver.send_signal(stop)
        driver.wait(timeout=180)
        if stop == signal.SIGTERM:  # stopped gracefully: records flushed, runs closed as interrupted, resumable
            assert driver.returncode == 130, output(driver)[-4000:]
            assert "Interrupted. Resume with: python -m service.tune" in output(driver)
            parent = client.get_run(child_runs(client, "driver_kill")[0].data.tags["mlflow.parentRunId"])
            assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("KILLED", "interrupted")
            assert not any(c.info.status == "RUNNING" for c in child_runs(client, "driver_kill"))
    driver.wait(timeout=900)
    assert driver.returncode == 0, output(driver)[-4000:]
    assert_exact(client, "driver_kill", optuna_url)
    # the kills did land in that window: a resume found trials Tune's state did not hold, and took them over
    assert "started after Tune's last saved state" in output(resumed[0]) + output(resumed[1])


def running_on(client: MlflowClient, experiment: str, node_id: str) -> list:
    """Child runs mid-training on a node, with at least one evaluation recorded."""
    return [
        c
        for c in child_runs(client, experiment)
        if c.data.tags.get("ltssl.outcome") == "running"
        and c.data.tags.get("ltssl.node_id") == node_id
        and int(c.data.tags.get("ltssl.last_step", -1)) >= EVERY
    ]


def test_worker_process_then_whole_node_killed(ray_cluster: RayCluster, tmp_path, mlflow_server, databases):
    """kill -9 of a trial's worker process (as by the OOM killer), then of a whole worker node (raylet, agents and
    workers at once, as a lost machine). Tune retries each cut trial from its last checkpoint on a node still up."""
    optuna_url = databases()
    text = SPACE.format(name="node_kill", optuna=optuna_url).replace("trial_slot", "spare_slot")
    (tmp_path / "space.yaml").write_text(text)
    client = MlflowClient(mlflow_server)
    with spare_nodes(ray_cluster, tmp_path, {"a": {"spare_slot": 1}, "b": {"spare_slot": 1}}) as nodes:
        a, b = nodes["a"], nodes["b"]
        driver = start(tmp_path, mlflow_server, ray_cluster.env, "--address", ray_cluster.address)
        wait_for("a trial mid-training on node a", lambda: running_on(client, "node_kill", a.node_id), driver)
        workers = a.processes("ray::ImplicitFunc")
        assert workers, "no trial worker process found on node a"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for("a trial mid-training on node b", lambda: running_on(client, "node_kill", b.node_id), driver)
        b.kill()
        driver.wait(timeout=900)
    assert driver.returncode == 0, output(driver)[-4000:]
    assert_exact(client, "node_kill", optuna_url)
    # which trial each kill cut is Tune's business (workers are reused across trials, and MLflow's view lags the
    # trials by the writer's queue): at least one was cut and retried, and its run stayed one run with each
    # evaluation once (assert_exact)
    retried = [c for c in child_runs(client, "node_kill") if int(c.data.tags.get("ltssl.retries", "0")) >= 1]
    assert retried, output(driver)[-4000:]
    assert "retrying" in output(driver)


def drop_connections() -> int:
    """Terminate every PostgreSQL backend of the tests' databases (MLflow's and Optuna's), as a database failover or
    a restart does; the number terminated."""
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname LIKE 'ltssl\\_%' AND pid <> pg_backend_pid()"
        ).fetchall()
    return sum(1 for (done,) in rows if done)


def test_postgres_connections_dropped_mid_sweep(ray_cluster: RayCluster, tmp_path, mlflow_server, databases):
    """Every connection of the MLflow server and of the driver (Optuna, the sweep lock) to PostgreSQL terminated,
    three times while trials train and report; the pools reconnect and nothing is lost. Half the trials diverge
    (a learning rate of 1e12: a non-finite loss at the first evaluation) and fail at once while the others finish."""
    optuna_url = databases()
    text = SPACE.format(name="pg_drop", optuna=optuna_url).replace("values: [0.03, 0.01]", "values: [0.03, 1.0e12]")
    (tmp_path / "space.yaml").write_text(text)
    client = MlflowClient(mlflow_server)
    driver = start(tmp_path, mlflow_server, ray_cluster.env, "--address", ray_cluster.address)
    dropped = []
    for _ in range(3):
        seen = evaluations(client, "pg_drop")
        wait_for("one more evaluation", lambda n=seen: evaluations(client, "pg_drop") > n, driver)
        dropped.append(drop_connections())
    driver.wait(timeout=900)
    assert driver.returncode == 0, output(driver)[-4000:]
    assert all(n >= 2 for n in dropped), dropped  # the server's and the driver's connections were open and cut
    assert_exact(client, "pg_drop", optuna_url, diverging_lr=1.0e12)


@pytest.mark.parametrize("refusal", ["full", "read-only"])
def test_a_storage_that_refuses_writes_stops_the_sweep_and_resume_finishes_it(tmp_path, refusal):
    """The sweep's storage (a 64 MB tmpfs) fills up, or is remounted read-only, mid-sweep: the sweep stops at the
    first refused checkpoint with exit 2 and the reason, no trial is failed or retried for it, and once space is
    freed (the storage writable again) `--resume` finishes every trial exactly once. Local Ray, MLflow and the study
    in sqlite files outside the storage."""
    from .peers import base_env

    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(store)], check=True)
    try:
        name = refusal.replace("-", "_") + "_storage"
        text = SPACE.format(name=name, optuna="sqlite:///optuna.db")
        text = text.replace("storage: {path: results,", f"storage: {{path: '{store}',")
        text = text.replace("resources: {cpu: 1, custom: {trial_slot: 1}}", "resources: {cpu: 1}")
        text = text.replace("values: [0.03, 0.01]", "values: [0.03]").replace("max_concurrent: 2", "max_concurrent: 1")
        (tmp_path / "space.yaml").write_text(text)
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        client = MlflowClient(tracking)
        driver = start(tmp_path, tracking, base_env())
        wait_for(
            "a trial with an evaluation",
            lambda: any(int(c.data.tags.get("ltssl.last_step", -1)) >= EVERY for c in child_runs(client, name)),
            driver,
        )
        filler = store / "filler"
        if refusal == "full":
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)  # until ENOSPC
        else:  # the kernel refuses while a file there is open for writing (a checkpoint being copied): try again
            deadline = time.monotonic() + 60
            while subprocess.run(["mount", "-o", "remount,ro", str(store)], capture_output=True).returncode != 0:
                assert time.monotonic() < deadline, "the storage never became free of writers"
                time.sleep(0.05)
        driver.wait(timeout=300)
        out = output(driver)
        assert driver.returncode == 2, out[-4000:]
        reason = {"full": "No space left on device", "read-only": "Read-only file system"}[refusal]
        assert f"storage.path {store} refused a checkpoint ({refusal}: " in out and reason in out, out[-4000:]
        assert "with --resume" in out and "Traceback" not in out.split("[sweep]")[-1]
        children = child_runs(client, name)
        assert children and all(c.data.tags["ltssl.outcome"] in ("finished", "interrupted") for c in children)
        assert not any("ltssl.retries" in c.data.tags for c in children)  # not retried against the storage
        parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
        assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("KILLED", "interrupted")

        if refusal == "full":
            filler.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(store)], check=True)
        resumed = start(tmp_path, tracking, base_env(), "--resume")
        resumed.wait(timeout=600)
        assert resumed.returncode == 0, output(resumed)[-4000:]
        assert_exact(client, name, f"sqlite:///{tmp_path / 'optuna.db'}", planned=3)
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)
