"""MLflow records written by the driver: parent/child runs, reopening on retry and resume, statuses, per-class
metrics, artifacts, the leaderboard. Uses a real sqlite MLflow store; the trial objects carry the four attributes
the logger reads from Tune's Trial (trial_id, config, checkpoint, get_error)."""

from __future__ import annotations

import dataclasses
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from ray import tune

from service.leaderboard import Row, pareto_ranks, rank
from service.plan import load_plan
from service.sampling import TrialSampler
from service.sweep import start_parent
from service.tracking import LAST_STEP, OUTCOME, PARENT, TRIAL_ID, MlflowTrialLogger

from .conftest import SMALL

C = 10


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store for the module (creating its tables takes seconds); each test has its own parent run."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def plan(write_space, store):
    text = SMALL + f"tracking: {{uri: 'sqlite:///{store}/mlflow.db', per_class_every: 2}}\n"
    return load_plan(write_space(text), sets=["base.train.iterations=80"], launch_dir=store)


@pytest.fixture
def record(plan, monkeypatch, store):
    monkeypatch.chdir(store)  # MLflow's local artifact root is relative to the working directory
    return start_parent(plan)


def make_trial(plan, trial_id: str, preset: str = "fixmatch_drw", number: int = 0, checkpoint=None):
    values = {"method.preset": preset, "optim.lr": 0.03}
    if preset == "fixmatch_drw":
        values["method.drw.beta"] = 0.995
    config = TrialSampler(plan).tune_config(values, number)
    return SimpleNamespace(trial_id=trial_id, config=config, checkpoint=checkpoint, get_error=lambda: "boom\n")


def result(step: int, acc: float) -> dict:
    out = {"step": step, "evaluation": step // 20, "val/balanced_acc": acc, "test/top1": acc - 0.01}
    out.update({f"val/recall/c{c:02d}": acc for c in range(C)})
    out.update({f"test/precision/c{c:02d}": acc for c in range(C)})
    # Tune's own fields travel in the same dict and must stay out of MLflow
    out.update({"training_iteration": step // 20, "done": False, "config": {"x": 1}, "trial_id": "t", "pid": 1})
    return out


def children(record):
    client = MlflowClient(record.tracking_uri)
    return client.search_runs([record.experiment_id], filter_string=f"tags.`{PARENT}` = '{record.parent_run_id}'")


def history(record, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(record.tracking_uri).get_metric_history(run_id, key)]


def test_child_run_is_nested_tagged_and_parametrised(plan, record):
    logger = MlflowTrialLogger(record)
    trial = make_trial(plan, "abc_00001", number=3)
    logger.on_trial_start(0, [], trial)
    where = {"ray_node_id": "node-a", "hostname": "gpu-7", "node_ip": "10.0.0.7", "gpu_model": "none"}
    logger.on_trial_result(0, [], trial, {**result(40, 0.3), **where})  # second evaluation: per-class included
    assert logger.flush(30) == []  # the hooks only queue; the writer thread talks to MLflow
    (run,) = children(record)
    tags, params = run.data.tags, run.data.params
    assert tags[TRIAL_ID] == "abc_00001" and tags["ltssl.optuna_trial"] == "3"
    assert tags["ltssl.space_hash"] == plan.space_hash and tags["mlflow.source.git.commit"] == record.git_commit
    assert run.info.run_name == "t003 fixmatch_drw lr=0.03 beta=0.995"
    assert params["sampled/method.drw.beta"] == "0.995" and params["method.drw.beta"] == "0.995"
    assert params["train.iterations"] == "80" and params["method.preset"] == "fixmatch_drw"
    assert "val/recall/c09" in run.data.metrics and "test/precision/c00" in run.data.metrics
    assert not {"training_iteration", "done", "pid", "step"} & set(run.data.metrics)
    assert (tags["ltssl.node_id"], tags["ltssl.hostname"], tags["ltssl.nodes"]) == ("node-a", "gpu-7", "node-a")


def test_retry_and_resume_reopen_the_same_run_without_duplicate_points(plan, record, tmp_path):
    logger = MlflowTrialLogger(record)
    trial = make_trial(plan, "abc_00002")
    logger.on_trial_start(0, [], trial)
    for step in (20, 40):
        logger.on_trial_result(0, [], trial, result(step, step / 100))
    logger.on_experiment_end([trial])  # the sweep was interrupted (the end flushes the writer)
    (run,) = children(record)
    assert (run.info.status, run.data.tags[OUTCOME]) == ("KILLED", "interrupted")

    resumed = pickle.loads(pickle.dumps(logger))  # how Tuner.restore brings the callback back
    art = tmp_path / "ckpt" / "artifacts"
    art.mkdir(parents=True)
    (art / "per_class_test.csv").write_text("class,recall\n0,0.5\n")
    (art / "confusion_test.csv").write_text("1,0\n0,1\n")
    trial.checkpoint = tune.Checkpoint.from_directory(str(tmp_path / "ckpt"))
    resumed.on_trial_start(0, [], trial)
    resumed.flush(30)
    assert MlflowClient(record.tracking_uri).get_run(run.info.run_id).info.status == "RUNNING"
    for step in (40, 60, 80):  # the restored trial re-runs the evaluation after its checkpoint (40)
        resumed.on_trial_result(0, [], trial, result(step, step / 100 + 0.001))
    resumed.on_trial_complete(0, [], trial)
    resumed.flush(30)

    (run,) = children(record)  # still one run
    assert (run.info.status, run.data.tags[OUTCOME], run.data.tags[LAST_STEP]) == ("FINISHED", "finished", "80")
    assert history(record, run.info.run_id, "val/balanced_acc") == [
        (20, 0.2),
        (40, 0.4),
        (60, pytest.approx(0.601)),
        (80, pytest.approx(0.801)),
    ]
    files = {f.path for f in MlflowClient(record.tracking_uri).list_artifacts(run.info.run_id)}
    assert {"per_class_test.csv", "confusion_test.csv"} <= files


def tune_log(tmp_path: Path, trial_id: str, steps: list[int]) -> SimpleNamespace:
    """A trial folder in storage whose result.json (Tune's log of the trial) holds these evaluations; what the
    logger reads through a Trial's `storage`."""
    import json

    import pyarrow.fs

    folder = tmp_path / "storage" / trial_id
    folder.mkdir(parents=True)
    earlier = int(time.time()) - 600  # Tune stamps each result when it happens, before the kill
    lines = [json.dumps({**result(step, step / 100), "timestamp": earlier + step}) for step in steps]
    (folder / "result.json").write_text("\n".join(lines) + '\n{"step": 1')  # and a last line cut by the kill
    return SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(folder))


def test_evaluations_a_killed_driver_never_wrote_are_backfilled_from_tunes_log(plan, record, tmp_path):
    logger = MlflowTrialLogger(record)
    trial = make_trial(plan, "abc_00005")
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, result(20, 0.2))
    logger.flush(30)  # then kill -9: the write of step 40 was still queued, but Tune had saved it (and its checkpoint)
    trial.storage = tune_log(tmp_path, "abc_00005", [20, 40])

    resumed = pickle.loads(pickle.dumps(logger))
    resumed.on_trial_start(0, [], trial)  # the trial continues from its checkpoint at 40
    resumed.on_trial_result(0, [], trial, result(60, 0.6))
    resumed.flush(30)
    (run,) = children(record)
    # each evaluation once (the backfilled ones carry Tune's own, earlier, timestamps)
    assert sorted(s for s, _ in history(record, run.info.run_id, "val/balanced_acc")) == [20, 40, 60]
    assert [s for s, _ in history(record, run.info.run_id, "val/recall/c03")] == [40]  # per_class_every: 2
    assert run.data.tags[LAST_STEP] == "60"


def test_a_trial_that_ended_before_the_kill_is_closed_on_resume(plan, record, tmp_path):
    logger = MlflowTrialLogger(record)
    trial = make_trial(plan, "abc_00006")
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, result(20, 0.2))
    logger.flush(30)  # kill -9 with the last evaluations and the completion queued; Tune saved the trial as ended
    trial.storage = tune_log(tmp_path, "abc_00006", [20, 40, 60, 80])
    trial.status, trial.last_result = "TERMINATED", result(80, 0.8)

    resumed = pickle.loads(pickle.dumps(logger))
    resumed.on_step_begin(0, [trial])  # Tune does not start an ended trial again: the first step reconciles it
    resumed.on_step_begin(1, [trial])
    resumed.flush(30)
    (run,) = children(record)
    assert (run.info.status, run.data.tags[OUTCOME]) == ("FINISHED", "finished")
    assert sorted(s for s, _ in history(record, run.info.run_id, "val/balanced_acc")) == [20, 40, 60, 80]
    ended = run.info.end_time
    again = pickle.loads(pickle.dumps(resumed))  # a later resume leaves a closed run alone
    again.on_step_begin(0, [trial])
    again.flush(30)
    assert MlflowClient(record.tracking_uri).get_run(run.info.run_id).info.end_time == ended


def test_writes_mlflow_refuses_to_take_at_the_end_are_kept_and_made_by_a_later_session(plan, record, monkeypatch):
    # the tracking server is down from the start of the trial to past the sweep's end (nothing listens on port 9)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(MlflowTrialLogger, "unwritten", [])
    down = MlflowTrialLogger(dataclasses.replace(record, tracking_uri="http://127.0.0.1:9"))
    trial = make_trial(plan, "abc_00020", number=7)
    down.on_trial_start(0, [], trial)
    for step in (20, 40, 60, 80):
        down.on_trial_result(0, [], trial, result(step, step / 100))
    down.on_trial_complete(0, [], trial)
    left = down.flush(2)
    assert left == ["start", "result", "result", "result", "result", "complete"]
    assert children(record) == []
    writes = pickle.loads(pickle.dumps(MlflowTrialLogger.unwritten))  # what the sweep saves in its folder
    assert [name for name, _ in writes] == [f"_do_{name}" for name in left]

    MlflowTrialLogger.unwritten = []
    assert MlflowTrialLogger(record).replay(writes, 30) == []  # --resume, MLflow back
    assert MlflowTrialLogger(record).replay(writes, 30) == []  # made twice (a resume killed mid-replay): once
    (run,) = children(record)
    assert (run.info.status, run.data.tags[OUTCOME], run.data.tags["ltssl.optuna_trial"]) == (
        "FINISHED",
        "finished",
        "7",
    )
    assert history(record, run.info.run_id, "val/balanced_acc") == [(20, 0.2), (40, 0.4), (60, 0.6), (80, 0.8)]
    assert MlflowTrialLogger.unwritten == []


def test_per_class_metrics_every_kth_evaluation_and_the_last(plan, record):
    logger = MlflowTrialLogger(record)
    trial = make_trial(plan, "abc_00003")
    logger.on_trial_start(0, [], trial)
    for step in (20, 40, 60, 80):
        logger.on_trial_result(0, [], trial, result(step, 0.5))
    logger.flush(30)
    (run,) = children(record)
    assert sorted(s for s, _ in history(record, run.info.run_id, "val/balanced_acc")) == [20, 40, 60, 80]
    assert [s for s, _ in history(record, run.info.run_id, "val/recall/c03")] == [40, 80]  # per_class_every: 2


def test_statuses_and_leaderboard(plan, record):
    logger = MlflowTrialLogger(record)
    best, pruned, failed = (make_trial(plan, f"abc_0001{i}", "fixmatch", number=i) for i in range(3))
    for trial in (best, pruned, failed):
        logger.on_trial_start(0, [], trial)
    for step in (20, 40, 60, 80):
        logger.on_trial_result(0, [], best, result(step, 0.7))
    logger.on_trial_complete(0, [], best)
    logger.on_trial_result(0, [], pruned, result(20, 0.2))
    logger.on_trial_complete(0, [], pruned)  # ended at step 20 of 80: stopped by ASHA
    logger.on_trial_result(0, [], failed, result(20, 0.9))
    logger.on_trial_error(0, [], failed)
    logger.flush(30)

    status = {r.data.tags[TRIAL_ID]: (r.info.status, r.data.tags[OUTCOME]) for r in children(record)}
    assert status == {
        "abc_00010": ("FINISHED", "finished"),
        "abc_00011": ("KILLED", "pruned"),
        "abc_00012": ("FAILED", "failed"),
    }
    client = MlflowClient(record.tracking_uri)
    failed_run = next(r for r in children(record) if r.data.tags[TRIAL_ID] == "abc_00012")
    assert "boom" in Path(client.download_artifacts(failed_run.info.run_id, "error.txt")).read_text()
    parent = client.get_run(record.parent_run_id)
    assert parent.data.metrics["trials/finished"] == 1 and parent.data.metrics["trials/failed"] == 1
    assert parent.data.metrics["best/val/balanced_acc"] == pytest.approx(0.7)  # not the failed trial's 0.9
    board = Path(client.download_artifacts(record.parent_run_id, "leaderboard.csv")).read_text().splitlines()
    assert board[0].startswith("rank,run_name,outcome")
    assert [line.split(",")[2] for line in board[1:]] == ["finished", "failed", "pruned"]


def test_pareto_ranks_on_hand_picked_points():
    """(bACC, tail recall), both maximised: (0.8, 0.2) and (0.6, 0.5) trade off (front); (0.5, 0.2) is beaten by
    both (rank 2 would be wrong for it only if something on the front did not dominate it); (0.7, 0.1) is beaten
    by (0.8, 0.2) only, so it is on the second front with (0.5, 0.2)."""
    points = [(0.8, 0.2), (0.6, 0.5), (0.5, 0.2), (0.7, 0.1)]
    assert pareto_ranks(points, ["max", "max"]) == [1, 1, 2, 2]
    assert pareto_ranks([(1.0,), (2.0,)], ["min"]) == [1, 2]


def test_rank_puts_finished_trials_first():
    rows = [
        Row("r1", "a", "t1", "0", "pruned", metrics={"val/top1": 0.99}),
        Row("r2", "b", "t2", "1", "finished", metrics={"val/top1": 0.5}),
        Row("r3", "c", "t3", "2", "finished", metrics={"val/top1": 0.7}),
    ]
    assert [r.name for r in rank(rows, [("val/top1", "max")])] == ["c", "b", "a"]
    assert [r.name for r in rank(rows, [("val/top1", "min")])] == ["b", "c", "a"]


def test_a_duplicate_child_run_is_folded_into_the_one_with_the_records(plan, record):
    # a create_run retried after its response was lost leaves a second run with the same trial tags: the logger
    # keeps the one with the evaluations and soft-deletes the other, instead of refusing every later resume
    trial = make_trial(plan, "abc_00042")
    logger = MlflowTrialLogger(record)
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, result(20, 0.3))
    logger.flush(30)
    kept = logger._runs[trial.trial_id]
    client = MlflowClient(record.tracking_uri)
    tags = {k: v for k, v in client.get_run(kept).data.tags.items() if k.startswith(("ltssl.", "mlflow.parent"))}
    tags.pop("ltssl.last_step")
    duplicate = client.create_run(record.experiment_id, tags=tags).info.run_id
    fresh = MlflowTrialLogger(record)  # a resumed driver
    fresh.on_trial_result(0, [], trial, result(40, 0.4))
    fresh.flush(30)
    assert fresh._runs[trial.trial_id] == kept
    assert [r.info.run_id for r in children(record)] == [kept]
    gone = client.get_run(duplicate)
    assert gone.info.lifecycle_stage == "deleted" and gone.data.tags["ltssl.duplicate_of"] == kept
    assert history(record, kept, "val/balanced_acc") == [(20, 0.3), (40, 0.4)]


def test_a_trial_taken_over_after_a_kill_keeps_its_run(plan, record):
    logger = MlflowTrialLogger(record)
    cut = make_trial(plan, "abc_00007", number=4)
    logger.on_trial_start(0, [], cut)
    logger.on_trial_result(0, [], cut, result(20, 0.2))
    logger.flush(30)  # kill -9: Tune's saved state never knew abc_00007; the study (a database) did
    resumed = pickle.loads(pickle.dumps(logger))
    heir = make_trial(plan, "xyz_00001", number=4)  # a new Tune trial got the same Optuna trial and values
    resumed.on_trial_start(0, [], heir)
    for step in (20, 40):  # trained again from the start: step 20 is not logged twice
        resumed.on_trial_result(0, [], heir, result(step, step / 100 + 0.001))
    resumed.flush(30)
    (run,) = children(record)
    assert run.data.tags[TRIAL_ID] == "xyz_00001" and run.data.tags["ltssl.optuna_trial"] == "4"
    assert history(record, run.info.run_id, "val/balanced_acc") == [(20, 0.2), (40, pytest.approx(0.401))]


def test_an_optuna_number_handed_out_again_with_other_values_loses_the_old_run(plan, record):
    # a study kept only in Tune's state: after a kill, the resumed study hands number 5 out again, to other values
    logger = MlflowTrialLogger(record)
    first = make_trial(plan, "abc_00008", preset="fixmatch_drw", number=5)
    logger.on_trial_start(0, [], first)
    logger.on_trial_result(0, [], first, result(20, 0.2))
    logger.flush(30)
    resumed = pickle.loads(pickle.dumps(logger))
    other = make_trial(plan, "xyz_00002", preset="fixmatch", number=5)
    resumed.on_trial_start(0, [], other)
    resumed.flush(30)
    runs = {r.data.tags[TRIAL_ID]: r for r in children(record)}
    assert sorted(runs) == ["abc_00008", "xyz_00002"]
    lost, new = runs["abc_00008"], runs["xyz_00002"]
    assert (lost.info.status, lost.data.tags[OUTCOME]) == ("KILLED", "lost")
    assert "gave its Optuna number to another trial" in lost.data.tags["mlflow.note.content"]
    assert (new.info.status, new.data.tags[OUTCOME]) == ("RUNNING", "running")


def test_a_parent_run_without_a_record_or_children_is_taken_over(plan, record):
    # the driver died after creating the parent run, before writing the sweep's record: the next start reuses it
    again = start_parent(plan)
    assert again.parent_run_id == record.parent_run_id
    logger = MlflowTrialLogger(again)
    logger.on_trial_start(0, [], make_trial(plan, "abc_00009"))
    logger.flush(30)
    # a parent with child runs belongs to a sweep whose folder was removed on purpose: a new start gets a new parent
    assert start_parent(plan).parent_run_id != record.parent_run_id
