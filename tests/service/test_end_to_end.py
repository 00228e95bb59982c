"""Real sweeps through the command line: a local Ray (this machine's CPUs), synthetic data, a local sqlite MLflow
store and a sqlite Optuna study, all in a temporary directory; checked through MlflowClient and Optuna.

Trials run one at a time (max_concurrent: 1) so that ASHA's decisions depend only on the trials' values, which the
seeds fix, not on which trial reaches a rung first.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from .conftest import REPO

CLASSES = [f"c{c:02d}" for c in range(10)]
OUTCOME_TO_OPTUNA = {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED}

SWEEP = f"""
experiment: e2e
base_file: {REPO}/trainables/configs/repro_synthetic.yaml
base:
  train: {{iterations: 60, eval_every: 20}}
  method:
    daso: {{warmup: 20, window: 20}}  # so that DASO's blending runs within 60 iterations
    drw: {{start: 20}}  # and DRw's dynamic weights
space:
  method.preset: {{type: categorical, values: [fixmatch, fixmatch_daso, fixmatch_drw]}}
  optim.lr: {{type: loguniform, low: 0.005, high: 0.2}}
  method.drw.beta: {{type: log_one_minus, low: 0.9, high: 0.9999}}
  method.daso.t_dist: {{type: loguniform, low: 0.3, high: 3.0}}
search:
  sampler: random
  num_trials: 6
  seed: 0
  metric: val/balanced_acc
  mode: max
  scheduler: {{type: asha, grace_period: 1, reduction_factor: 3}}
  max_concurrent: 1
resources: {{cpu: 1}}
storage: {{optuna: "sqlite:///optuna.db"}}
"""

RESUMABLE = f"""
experiment: resumable
base_file: {REPO}/trainables/configs/repro_synthetic.yaml
base:
  train: {{iterations: 60, eval_every: 20}}
space:
  method.preset: {{type: categorical, values: [fixmatch, fixmatch_la, fixmatch_drw]}}
search:
  sampler: grid
  metric: val/balanced_acc
  max_concurrent: 1
resources: {{cpu: 1}}
"""


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO)}
    out.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never another user's cluster
    return out


def cli(cwd: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.tune", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def runs_of(client: MlflowClient, experiment: str) -> tuple:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("ltssl.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ltssl.role") == "trial"]
    return exp, parent, children


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def first_report(tmp_path: Path, experiment: str) -> dict | None:
    """The first result Tune recorded for any trial of the sweep (it carries the worker's pid)."""
    for path in (tmp_path / "ray_results").glob(f"{experiment}-*/*/result.json"):
        lines = path.read_text().splitlines()
        if lines:
            return json.loads(lines[0])
    return None


def start_sweep(cwd: Path) -> subprocess.Popen:
    """`python -m service.tune --space space.yaml` in cwd, output captured for the failure message."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.tune", "--space", "space.yaml"],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sweep_end_to_end(tmp_path):
    (tmp_path / "space.yaml").write_text(SWEEP)
    sweep = start_sweep(tmp_path)
    # a worker dies mid-trial (as under the OOM killer): Tune retries the trial from its last checkpoint
    deadline = time.monotonic() + 300
    while (report := first_report(tmp_path, "e2e")) is None:
        if sweep.poll() is not None or time.monotonic() > deadline:
            sweep.kill()
            pytest.fail("no trial reported an evaluation:\n" + sweep.communicate()[0][-3000:])
        time.sleep(0.3)
    os.kill(report["pid"], signal.SIGKILL)
    output, _ = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, output[-3000:]
    assert "Open the MLflow UI on the sweep's runs" in output

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp, parent, children = runs_of(client, "e2e")
    sweep_name = parent.info.run_name
    # a model-training experiment (MLflow 3's UI opens it on runs, not on GenAI traces), and the printed link opens
    # the runs table on the sweep's view, which the experiment holds
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={sweep_name}"
    assert link in output
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{sweep_name}"])
    assert view["searchFilter"] == f"tags.`ltssl.sweep` = '{sweep_name}' AND tags.`ltssl.role` = 'trial'"
    assert view["orderByKey"] == "metrics.`val/balanced_acc`" and view["orderByAsc"] is False
    assert "params.`sampled/method.drw.beta`" in view["selectedColumns"]
    assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
    assert sweep_name == f"e2e-{parent.data.tags['ltssl.space_hash'][:8]}"
    assert parent.data.tags["mlflow.source.git.commit"]

    # one child per trial, nested under the parent, each with its own Tune trial and Optuna trial
    assert len(children) == 6
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert len({c.data.tags["ltssl.tune_trial_id"] for c in children}) == 6
    assert sorted(int(c.data.tags["ltssl.optuna_trial"]) for c in children) == list(range(6))

    study = optuna.load_study(study_name=sweep_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_tune_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    presets = set()
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        preset = params["sampled/method.preset"]
        presets.add(preset)
        # params: the sampled values (conditional ones only where their method is on) and the resolved config
        assert ("sampled/method.drw.beta" in params) == (preset == "fixmatch_drw")
        assert ("sampled/method.daso.t_dist" in params) == (preset == "fixmatch_daso")
        assert params["optim.lr"] == params["sampled/optim.lr"] and params["train.iterations"] == "60"
        assert child.info.run_name.startswith(f"t{int(tags['ltssl.optuna_trial']):03d} {preset}")
        # per-class metrics of every class, at every evaluation the trial reached
        last = int(tags["ltssl.last_step"])
        for family in ("val/recall", "val/precision", "test/recall", "test/precision", "pl/count"):
            assert all(f"{family}/{c}" in metrics for c in CLASSES), family
        assert steps(client, child.info.run_id, "val/recall/c07") == list(range(20, last + 1, 20))
        if preset == "fixmatch_drw":
            assert all(f"drw/w_u/{c}" in metrics for c in CLASSES)
        if preset == "fixmatch_daso":
            assert all(f"daso/v/{c}" in metrics for c in CLASSES)
        # status: a trial that reached step 60 finished and has its final tables; one stopped earlier was pruned
        outcome = tags["ltssl.outcome"]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        if last == 60:
            assert (child.info.status, outcome) == ("FINISHED", "finished")
            assert {"per_class_test.csv", "confusion_test.csv"} <= artifacts
            table = Path(client.download_artifacts(child.info.run_id, "per_class_test.csv")).read_text()
            assert len(table.strip().splitlines()) == 1 + len(CLASSES)
        else:
            assert (child.info.status, outcome) == ("KILLED", "pruned")
            assert not artifacts
        # Optuna saw the same trial: the same state and the same curve
        trial = by_tune_id[tags["ltssl.tune_trial_id"]]
        assert trial.number == int(tags["ltssl.optuna_trial"])
        assert trial.state == OUTCOME_TO_OPTUNA[outcome]
        history = client.get_metric_history(child.info.run_id, "val/balanced_acc")
        assert trial.intermediate_values == {m.step: pytest.approx(m.value) for m in history}
        # an ended trial keeps one checkpoint in storage (its last), not the two Tune keeps while it runs
        (trial_dir,) = (tmp_path / "ray_results" / sweep_name).glob(f"{tags['ltssl.tune_trial_id']}_*")
        (kept,) = trial_dir.glob("checkpoint_*")
        assert (kept / "state.pt").is_file()
    assert presets == {"fixmatch", "fixmatch_daso", "fixmatch_drw"}
    outcomes = [c.data.tags["ltssl.outcome"] for c in children]
    # ASHA at reduction factor 3 keeps a trial past its first evaluation only when it is among the best third so
    # far; six sequential trials with distinct values all doing so has a chance of about 1 in 100
    assert outcomes.count("pruned") >= 1, "ASHA stopped no trial: see the module docstring"
    assert outcomes.count("finished") >= 1

    # the parent's leaderboard lists every trial, finished ones first
    board = Path(client.download_artifacts(parent.info.run_id, "leaderboard.csv")).read_text().splitlines()
    assert len(board) == 1 + 6
    ranked = [line.split(",")[2] for line in board[1:]]
    assert ranked == sorted(ranked, key=lambda o: o != "finished")
    assert parent.data.metrics["trials/finished"] + parent.data.metrics["trials/pruned"] == 6
    assert (tmp_path / "ray_results" / sweep_name / "service_plan.json").is_file()
    # the sweep's end wrote its report and figures, in the working directory and on the parent run
    assert (tmp_path / "reports" / sweep_name / "figures" / "per_class_recall.png").is_file()
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    # the killed trial was retried in its own run, whose curve has one point per evaluation
    (retried,) = [c for c in children if c.data.tags.get("ltssl.retries") == "1"]
    last = int(retried.data.tags["ltssl.last_step"])
    assert steps(client, retried.info.run_id, "val/balanced_acc") == list(range(20, last + 1, 20))


def child_tags(db: Path) -> dict[str, dict[str, str]]:
    """run id -> tags of the child runs, read with sqlite directly while the sweep writes the store."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT run_uuid, key, value FROM tags").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    tags: dict[str, dict[str, str]] = {}
    for run_id, key, value in rows:
        tags.setdefault(run_id, {})[key] = value
    return {r: t for r, t in tags.items() if t.get("ltssl.role") == "trial"}


# the SIGTERM twin runs with the slow suites: the same code path as Ctrl-C, and the default suite is near 15 minutes
@pytest.mark.parametrize(
    "stop", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["ctrl-c", "sigterm"]
)
def test_interrupt_and_resume(tmp_path, stop):
    # SIGTERM is what a preempted machine or a scheduler sends: it must stop the sweep as gracefully as Ctrl-C
    (tmp_path / "space.yaml").write_text(RESUMABLE)
    first = start_sweep(tmp_path)
    # interrupt once the first trial has finished and the second has logged an evaluation (so it has a checkpoint)
    deadline = time.monotonic() + 300
    while True:
        tags = child_tags(tmp_path / "mlflow.db").values()
        if any(t.get("ltssl.outcome") == "finished" for t in tags) and any(
            t.get("ltssl.outcome") == "running" and int(t.get("ltssl.last_step", "-1")) >= 20 for t in tags
        ):
            break
        if first.poll() is not None or time.monotonic() > deadline:
            first.kill()
            pytest.fail("the sweep never reached a second trial with a checkpoint:\n" + first.communicate()[0][-3000:])
        time.sleep(0.3)
    first.send_signal(stop)
    output, _ = first.communicate(timeout=180)
    assert first.returncode == 130, output[-3000:]
    assert "Interrupted. Resume with: python -m service.tune --space space.yaml --resume" in output

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, parent, before = runs_of(client, "resumable")
    assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("KILLED", "interrupted")
    done = [r for r in before if r.data.tags["ltssl.outcome"] == "finished"]
    cut = [r for r in before if r.data.tags["ltssl.outcome"] == "interrupted"]
    assert len(done) >= 1 and len(done) + len(cut) == len(before) < 3
    assert all(r.info.status == "KILLED" for r in cut)
    done_end = {r.info.run_id: r.info.end_time for r in done}
    # how far each cut trial had reported to Tune when the stop took effect: on a loaded machine a trial can reach
    # its last evaluation between the signal and the actors' stop
    reported_before = {run.info.run_id: len(tune_reports(tmp_path, run)) for run in cut}

    second = cli(tmp_path, "--space", "space.yaml", "--resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    _, parent, after = runs_of(client, "resumable")
    assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
    # no duplicates: one run per trial, the interrupted run reopened, the finished ones untouched
    assert len(after) == 3
    assert len({r.data.tags["ltssl.tune_trial_id"] for r in after}) == 3
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in after}
    for run in after:
        assert (run.info.status, run.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
        assert steps(client, run.info.run_id, "val/balanced_acc") == [20, 40, 60]
        if run.info.run_id in done_end:
            assert run.info.end_time == done_end[run.info.run_id]  # not run again

    # the interrupted trial continued from its checkpoint: Tune's own log of it has every step once
    for run in cut:
        reported = tune_reports(tmp_path, run)
        assert [r["step"] for r in reported] == [20, 40, 60]
        # restored from the checkpoint of its last report before the stop: only the evaluations after it ran again
        before_stop = reported_before[run.info.run_id]
        assert [r["iterations_since_restore"] for r in reported[before_stop:]] == list(range(1, 4 - before_stop))


def tune_reports(sweep_dir: Path, run) -> list[dict]:
    """Tune's own log of a trial (result.json in the sweep's storage), one dict per report."""
    (trial_dir,) = (sweep_dir / "ray_results").glob(f"resumable-*/{run.data.tags['ltssl.tune_trial_id']}_*")
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


def test_a_second_driver_on_a_running_sweep_is_refused(tmp_path):
    (tmp_path / "space.yaml").write_text(RESUMABLE)
    first = start_sweep(tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not child_tags(tmp_path / "mlflow.db"):  # the first driver is past its start-up: a trial runs
            if first.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the first driver never started a trial:\n" + first.communicate()[0][-3000:])
            time.sleep(0.3)
        (lock,) = (tmp_path / "ray_results").glob(".resumable-*.lock")
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        for extra in ([], ["--resume"]):
            second = cli(tmp_path, "--space", "space.yaml", *extra, timeout=120)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert "another driver is running sweep resumable-" in second.stderr
            assert f"'pid': {first.pid}" in second.stderr or f'"pid": {first.pid}' in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=180)
    assert first.returncode in (0, 130), output[-3000:]
    # the lock went with the first driver: a resume may take it now
    again = cli(tmp_path, "--space", "space.yaml", "--resume", timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]


DIVERGING = f"""
experiment: diverging
base_file: {REPO}/trainables/configs/repro_synthetic.yaml
base:
  train: {{iterations: 40, eval_every: 20}}
space:
  optim.lr: {{type: categorical, values: [0.1, 1.0e+12]}}  # 1e12 sends the weights to inf within 20 steps
search: {{sampler: grid, metric: val/balanced_acc, max_concurrent: 1, max_failures: 2}}
storage: {{optuna: "sqlite:///optuna.db"}}
"""


def test_a_diverging_trial_fails_at_once_and_is_not_retried(tmp_path):
    (tmp_path / "space.yaml").write_text(DIVERGING)
    out = cli(tmp_path, "--space", "space.yaml")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "training diverged at step 20" in out.stdout and "(not retried)" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, parent, children = runs_of(client, "diverging")
    by_lr = {float(c.data.params["optim.lr"]): c for c in children}
    assert sorted(by_lr) == [0.1, 1e12]
    failed, good = by_lr[1e12], by_lr[0.1]
    assert (failed.info.status, failed.data.tags["ltssl.outcome"]) == ("FAILED", "failed")
    assert "ltssl.retries" not in failed.data.tags  # a retry from its checkpoint would diverge again
    assert "val/balanced_acc" not in failed.data.metrics  # nothing from the diverged evaluation
    error = Path(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path / "dl"))).read_text()
    assert error.startswith("training diverged at step 20: ")
    assert (good.info.status, good.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
    study = optuna.load_study(study_name=parent.info.run_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.user_attrs["tune_trial_id"]: t.state for t in study.trials}
    assert states[failed.data.tags["ltssl.tune_trial_id"]] == TrialState.FAIL
    assert states[good.data.tags["ltssl.tune_trial_id"]] == TrialState.COMPLETE
    assert parent.data.metrics["trials/failed"] == 1 and parent.data.metrics["trials/finished"] == 1


def test_a_resume_whose_saved_state_does_not_load_stops_and_changes_nothing(tmp_path):
    # Tune's own answer to a saved state it cannot load is to start the whole sweep over under the same parent run
    text = RESUMABLE.replace("[fixmatch, fixmatch_la, fixmatch_drw]", "[fixmatch]").replace(
        "iterations: 60", "iterations: 20"
    )
    (tmp_path / "space.yaml").write_text(text)
    first = cli(tmp_path, "--space", "space.yaml")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for state in (tmp_path / "ray_results").glob("resumable-*/experiment_state-*.json"):
        state.write_text('{"trial_data": [')  # cut mid-write, or damaged in a copy
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, parent, before = runs_of(client, "resumable")

    again = cli(tmp_path, "--space", "space.yaml", "--resume")
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert "--resume stopped: Ray Tune could not load the sweep's saved state" in again.stderr
    assert "Nothing was run or changed" in again.stderr and "Traceback" not in again.stderr
    assert "[sweep] start" not in again.stdout
    _, parent_after, after = runs_of(client, "resumable")
    assert [r.info.run_id for r in after] == [r.info.run_id for r in before]
    assert [(r.info.status, r.info.end_time) for r in after] == [(r.info.status, r.info.end_time) for r in before]
    assert (parent_after.info.status, parent_after.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")


def sweep_cut_by_its_budget(tmp_path: Path, iterations: int, budget_s: int, num_trials: int | None = None) -> tuple:
    """The resumable grid sweep with the study in sqlite, run until its time budget stops it: (client, parent, child
    runs), once the command exited 0 saying so and the parent run ended FINISHED `time budget`."""
    budget = f"  time_budget_s: {budget_s}\n" + (f"  num_trials: {num_trials}\n" if num_trials else "")
    text = RESUMABLE.replace("iterations: 60", f"iterations: {iterations}").replace(
        "max_concurrent: 1\n", "max_concurrent: 1\n" + budget
    )
    (tmp_path / "space.yaml").write_text(text + 'storage: {optuna: "sqlite:///optuna.db"}\n')
    out = cli(tmp_path, "--space", "space.yaml")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"The time budget of {budget_s} s ended the sweep. Give it more time" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, parent, children = runs_of(client, "resumable")
    assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("FINISHED", "time budget")
    return client, parent, children


def test_trials_cut_by_the_time_budget_are_closed_in_both_stores(tmp_path):
    # the budget ends the sweep mid-trial: nothing may stay RUNNING (TPE's constant liar would count it in flight)
    client, parent, children = sweep_cut_by_its_budget(tmp_path, iterations=2000, budget_s=25)
    assert children and all(
        (c.info.status, c.data.tags["ltssl.outcome"]) == ("KILLED", "time budget") for c in children
    )
    study = optuna.load_study(study_name=parent.info.run_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.trials and all(t.state == TrialState.FAIL for t in study.trials)
    assert all(t.user_attrs["ltssl_outcome"] == "time budget" for t in study.trials)


def optuna_chains(study) -> dict[int, list]:
    """Optuna trials by the number of the first trial of their chain (a trial and those continuing it)."""
    chains: dict[int, list] = {}
    for trial in sorted(study.trials, key=lambda t: t.number):
        first = trial.number
        while "continues_trial" in (t := study.trials[first]).user_attrs:
            first = t.user_attrs["continues_trial"]
        chains.setdefault(first, []).append(trial)
    return chains


def assert_chains_match_runs(client: MlflowClient, children: list, study, last_step: int) -> None:
    """Every run: one chain of Optuna trials, all closed as failed but the last, which is COMPLETE with the run's
    final value and every evaluation's intermediate value."""
    chains = optuna_chains(study)
    assert sorted(chains) == sorted(int(c.data.tags["ltssl.optuna_trial"]) for c in children)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val/balanced_acc")
        assert [m.step for m in history] == list(range(20, last_step + 1, 20))
        *closed, final = chains[int(child.data.tags["ltssl.optuna_trial"])]
        assert all(t.state == TrialState.FAIL for t in closed)
        assert final.state == TrialState.COMPLETE and final.value == pytest.approx(history[-1].value)
        assert final.intermediate_values == {m.step: pytest.approx(m.value) for m in history}


@pytest.mark.slow
def test_a_sweep_its_time_budget_cut_is_given_more_time_and_more_trials(tmp_path):
    # the budget stops the sweep mid-trial; --resume with a larger budget and one more trial continues the cut
    # trial from its checkpoint (a new Optuna trial continuing the closed one) and runs the new one
    client, parent, before = sweep_cut_by_its_budget(tmp_path, iterations=300, budget_s=15, num_trials=2)
    cut = {c.info.run_id for c in before if c.data.tags["ltssl.outcome"] == "time budget"}
    assert len(cut) == 1 and all(c.info.status == "KILLED" for c in before if c.info.run_id in cut)
    study_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name=parent.info.run_name, storage=study_url)
    assert sorted(t.user_attrs.get("ltssl_outcome", "") for t in study.trials if t.state == TrialState.FAIL) == [
        "time budget"
    ]

    more = cli(tmp_path, "--space", "space.yaml", "--resume", "--num-samples", "3", "--set", "search.time_budget_s=900")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "extended: search.num_trials 2 -> 3; search.time_budget_s 15.0 -> 900.0" in more.stdout
    _, parent, after = runs_of(client, "resumable")
    assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
    assert "search.num_trials 2 -> 3" in parent.data.tags["ltssl.extended"]
    assert len(after) == 3 and cut <= {c.info.run_id for c in after}  # the cut trial's run reopened, not a new one
    assert all((c.info.status, c.data.tags["ltssl.outcome"]) == ("FINISHED", "finished") for c in after)
    assert not any("mlflow.note.content" in c.data.tags for c in after)  # "Ended: cut by ..." went with the reopening
    study = optuna.load_study(study_name=parent.info.run_name, storage=study_url)
    assert_chains_match_runs(client, after, study, last_step=300)


@pytest.mark.slow
def test_a_trial_that_errored_is_retried_on_request_from_its_checkpoint(tmp_path):
    # no retries allowed: the worker killed mid-trial (as by the OOM killer) fails the trial for good, and the sweep
    # ends with it failed; --resume --retry-failed continues it from its last checkpoint to a finished trial
    text = RESUMABLE.replace("max_concurrent: 1\n", "max_concurrent: 1\n  max_failures: 0\n")
    (tmp_path / "space.yaml").write_text(text + 'storage: {optuna: "sqlite:///optuna.db"}\n')
    sweep = start_sweep(tmp_path)
    deadline = time.monotonic() + 300
    while (report := first_report(tmp_path, "resumable")) is None:
        if sweep.poll() is not None or time.monotonic() > deadline:
            sweep.kill()
            pytest.fail("no trial reported an evaluation:\n" + sweep.communicate()[0][-3000:])
        time.sleep(0.3)
    os.kill(report["pid"], signal.SIGKILL)
    output, _ = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, parent, before = runs_of(client, "resumable")
    (failed,) = [c for c in before if c.data.tags["ltssl.outcome"] == "failed"]
    assert failed.info.status == "FAILED" and failed.data.tags["ltssl.tune_trial_id"] == report["trial_id"]

    plain = cli(tmp_path, "--space", "space.yaml", "--resume")  # a failed trial stays failed without the flag
    assert plain.returncode == 0 and "[sweep] start" not in plain.stdout, plain.stdout[-3000:] + plain.stderr[-3000:]
    _, _, still = runs_of(client, "resumable")
    assert sorted(c.data.tags["ltssl.outcome"] for c in still) == ["failed", "finished", "finished"]

    again = cli(tmp_path, "--space", "space.yaml", "--resume", "--retry-failed")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"retrying  {report['trial_id']}" in again.stdout
    _, parent, after = runs_of(client, "resumable")
    assert (parent.info.status, parent.data.tags["ltssl.outcome"]) == ("FINISHED", "finished")
    assert sorted(c.info.run_id for c in after) == sorted(c.info.run_id for c in before)
    assert all((c.info.status, c.data.tags["ltssl.outcome"]) == ("FINISHED", "finished") for c in after)
    retried = tune_reports(tmp_path, failed)
    assert [r["step"] for r in retried] == [20, 40, 60]  # from its checkpoint at 20: nothing ran twice
    study = optuna.load_study(study_name=parent.info.run_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert_chains_match_runs(client, after, study, last_step=60)
    assert len(study.trials) == 4
