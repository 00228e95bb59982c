"""The Optuna searcher as Tune drives it: whole trial configs out, PRUNED for trials the scheduler stopped."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from service.plan import load_plan
from service.search import EVALUATION, SweepSearch, build_scheduler, build_searcher
from trainables.config import RunConfig

from .conftest import SMALL

METRIC = "val/balanced_acc"


def result(step: int, value: float, **extra: float) -> dict:
    # what Tune hands the searcher: the trainable's metrics plus Tune's own counters
    return {"step": step, METRIC: value, EVALUATION: step // 20, "training_iteration": step // 20, **extra}


def test_suggestion_is_a_full_trial_config(small_plan):
    search = SweepSearch(small_plan)
    config = search.suggest("trial_a")
    meta = config.pop("service")
    run = RunConfig.model_validate(config)
    assert run.train.iterations == 60
    trial = search.study.trials[0]
    assert meta["optuna_trial"] == trial.number == 0
    assert trial.user_attrs["tune_trial_id"] == "trial_a"
    assert meta["params"]["method.preset"] == run.method.preset == trial.params["method.preset"]


def test_trial_stopped_before_its_last_evaluation_is_pruned_with_its_values(small_plan):
    search = SweepSearch(small_plan)
    search.suggest("a")  # 60 iterations, evaluations at 20, 40, 60
    search.on_trial_result("a", result(20, 0.30))
    # ASHA stops the trial on its step-40 result; Tune never passes that result to on_trial_result
    search.on_trial_complete("a", result=result(40, 0.35, done=True))
    trial = search.study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {20: 0.30, 40: 0.35}  # at training steps, not Tune's report count
    assert trial.value == pytest.approx(0.35)  # Optuna values a pruned trial at its last intermediate value


def test_trial_that_reached_its_last_evaluation_is_complete(small_plan):
    search = SweepSearch(small_plan)
    search.suggest("b")
    for step, value in ((20, 0.3), (40, 0.4)):
        search.on_trial_result("b", result(step, value))
    search.on_trial_result("b", result(60, 0.5))
    search.on_trial_complete("b", result=result(60, 0.5, done=True))
    trial = search.study.trials[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(0.5)
    assert trial.intermediate_values == {20: 0.3, 40: 0.4, 60: 0.5}


def test_failed_trial_is_failed(small_plan):
    search = SweepSearch(small_plan)
    search.suggest("c")
    search.on_trial_result("c", result(20, 0.3))
    search.on_trial_complete("c", error=True)
    assert search.study.trials[0].state == TrialState.FAIL


def test_retry_does_not_duplicate_intermediate_values(small_plan):
    search = SweepSearch(small_plan)
    search.suggest("d")
    search.on_trial_result("d", result(20, 0.30))
    search.on_trial_result("d", result(20, 0.31))  # a retry re-runs the evaluation after its checkpoint
    assert search.study.trials[0].intermediate_values == {20: 0.30}


def test_multi_objective_pruned_trial_keeps_its_history(write_space, tmp_path):
    text = SMALL.replace("  metric: val/balanced_acc\n  mode: max\n", "  metric: [val/balanced_acc, val/recall_tail]\n")
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    search = SweepSearch(plan)
    search.suggest("m")
    search.on_trial_result("m", result(20, 0.3, **{"val/recall_tail": 0.1}))
    search.on_trial_complete("m", result=result(40, 0.4, **{"val/recall_tail": 0.2}))
    trial = search.study.trials[0]
    assert trial.state == TrialState.PRUNED
    history = trial.user_attrs["intermediate_values"]
    assert history == {"20": {METRIC: 0.3, "val/recall_tail": 0.1}, "40": {METRIC: 0.4, "val/recall_tail": 0.2}}


def test_study_name_carries_the_space_hash(small_plan):
    search = SweepSearch(small_plan)
    assert search.study.study_name == small_plan.sweep_name
    assert small_plan.space_hash[:8] in search.study.study_name


def test_persistent_optuna_storage(write_space, tmp_path):
    text = SMALL + "storage: {optuna: sqlite:///optuna.db}\n"
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    search = SweepSearch(plan)
    search.suggest("p")
    search.on_trial_complete("p", result=result(60, 0.5))
    assert (tmp_path / "optuna.db").is_file()
    import optuna

    study = optuna.load_study(study_name=plan.sweep_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_concurrency_limit_and_asha_on_the_evaluation_cadence(write_space, tmp_path):
    text = SMALL.replace(
        "  num_trials: 6\n",
        "  num_trials: 6\n  max_concurrent: 2\n  scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\n",
    )
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    limiter, inner = build_searcher(plan)
    assert limiter.max_concurrent == 2 and isinstance(inner, SweepSearch)
    scheduler = build_scheduler(plan)
    assert scheduler._time_attr == EVALUATION
    assert scheduler._max_t == 3  # 60 iterations / one evaluation every 20
    assert (scheduler.metric, scheduler._mode) == (METRIC, "max")


def test_final_result_withheld_by_the_scheduler_still_completes_the_trial(small_plan):
    # ASHA answers STOP to the result at max_t (the last evaluation), so Tune passes it to on_trial_complete only
    search = SweepSearch(small_plan)
    search.suggest("e")
    search.on_trial_result("e", result(20, 0.3))
    search.on_trial_result("e", result(40, 0.4))
    search.on_trial_complete("e", result=result(60, 0.45, done=True))
    trial = search.study.trials[0]
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.45)
    assert trial.intermediate_values == {20: 0.3, 40: 0.4, 60: 0.45}


def test_a_database_study_is_pickled_as_its_name_and_reconnects(write_space, tmp_path):
    # Tune pickles the searcher into the sweep's storage: a database study goes as its name and trial ids (the
    # URL's password must not travel), and comes back connected, mid-trial
    import pickle

    plan = load_plan(write_space(SMALL + "storage: {optuna: sqlite:///optuna.db}\n"), launch_dir=tmp_path)
    search = SweepSearch(plan)
    search.suggest("q")
    search.on_trial_result("q", result(20, 0.3))
    state = search.__getstate__()
    assert state["_ot_study"] is None and state["_storage"] is None
    assert state["_ot_trials"] == {"q": search.study.trials[0]._trial_id}
    again = pickle.loads(pickle.dumps(search))
    again.on_trial_result("q", result(40, 0.4))
    again.on_trial_complete("q", result=result(60, 0.5))
    (trial,) = again.study.trials
    assert trial.state == TrialState.COMPLETE and trial.intermediate_values == {20: 0.3, 40: 0.4, 60: 0.5}
    saved = tmp_path / "searcher.pkl"
    search.save(str(saved))
    fresh = SweepSearch(plan)
    fresh.restore(str(saved))
    assert fresh.study.trials[0].state == TrialState.COMPLETE


def test_an_in_memory_study_is_pickled_whole(small_plan):
    import pickle

    search = SweepSearch(small_plan)
    search.suggest("m")
    again = pickle.loads(pickle.dumps(search))
    assert [t.user_attrs["tune_trial_id"] for t in again.study.trials] == ["m"]


def test_a_resumed_searcher_leaves_trials_the_database_already_finished(write_space, tmp_path):
    # the driver told Optuna a trial COMPLETE and died before Tune's next snapshot: the snapshot's searcher still
    # has the trial live; on --resume, Tune reports it again, and the database's record must stand (no crash)
    import pickle

    plan = load_plan(write_space(SMALL + "storage: {optuna: sqlite:///optuna.db}\n"), launch_dir=tmp_path)
    search = SweepSearch(plan)
    search.suggest("r")
    search.on_trial_result("r", result(20, 0.3))
    snapshot = pickle.dumps(search)
    search.on_trial_complete("r", result=result(60, 0.5))  # after the snapshot
    restored = pickle.loads(snapshot)
    restored.on_trial_result("r", result(40, 0.4))
    restored.on_trial_complete("r", result=result(60, 0.45))
    (trial,) = restored.study.trials
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.5)
    assert trial.intermediate_values == {20: 0.3, 60: 0.5}


def test_a_resumed_searcher_takes_over_trials_started_after_the_snapshot(write_space, tmp_path, capsys):
    # the driver died with trials the study handed out after Tune's last snapshot: one ended (COMPLETE in the
    # database), one cut short (RUNNING). The restored searcher hands the cut one to the next Tune trial (same
    # Optuna trial, same values), counts the ended one, and then says the study is complete: 6 planned, 6 in all
    import pickle

    from ray.tune.search import Searcher

    plan = load_plan(write_space(SMALL + "storage: {optuna: sqlite:///optuna.db}\n"), launch_dir=tmp_path)
    assert plan.num_trials == 6
    search = SweepSearch(plan)
    configs = {tid: search.suggest(tid) for tid in ("a", "b", "c", "d")}
    snapshot = pickle.dumps(search)  # Tune's last saved state knows a-d
    configs.update({tid: search.suggest(tid) for tid in ("e", "f")})
    search.on_trial_complete("e", result=result(60, 0.5))  # e ended after the snapshot; f was cut by the kill

    restored = pickle.loads(snapshot)
    assert "2 trial(s) started after Tune's last saved state: 1 cut short" in capsys.readouterr().out
    taken = restored.suggest("x")
    assert taken["service"] == configs["f"]["service"]  # Optuna number, values and run name of the cut trial
    assert {k: v for k, v in taken.items() if k != "service"} == {
        k: v for k, v in configs["f"].items() if k != "service"
    }
    assert restored.suggest("y") == Searcher.FINISHED
    restored.on_trial_result("x", result(20, 0.3))
    restored.on_trial_complete("x", result=result(60, 0.4))
    trials = restored.study.trials
    assert len(trials) == 6
    by_number = {t.number: t for t in trials}
    f = by_number[configs["f"]["service"]["optuna_trial"]]
    assert f.state == TrialState.COMPLETE and f.value == pytest.approx(0.4)
    assert f.user_attrs["tune_trial_id"] == "x"  # the Tune trial that ran it to its end
    e = by_number[configs["e"]["service"]["optuna_trial"]]
    assert e.state == TrialState.COMPLETE and e.value == pytest.approx(0.5)
