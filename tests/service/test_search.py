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
    generator, inner = build_searcher(plan)
    assert generator.searcher.max_concurrent == 2 and isinstance(inner, SweepSearch)
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


def close(study, number: int, outcome: str) -> None:
    """What the sweep's end does to a trial its time budget cut (service.sweep.close_stale)."""
    import optuna

    trial = optuna.Trial(study, study.trials[number]._trial_id)
    trial.set_user_attr("ltssl_outcome", outcome)
    study.tell(trial, state=TrialState.FAIL)


def test_a_closed_trial_that_a_resume_continues_becomes_a_new_optuna_trial_with_its_history(
    write_space, tmp_path, capsys
):
    # cut by the time budget: Optuna FAIL; the resume continues the Tune trial from its checkpoint, and Optuna
    # never reopens a finished trial: a new one carries the values, the history so far and `continues_trial`
    import pickle

    from service.search import CONTINUES, planned_count

    plan = load_plan(write_space(SMALL + "storage: {optuna: sqlite:///optuna.db}\n"), launch_dir=tmp_path)
    search = SweepSearch(plan)
    config = search.suggest("a")
    search.on_trial_result("a", result(20, 0.3))
    snapshot = pickle.dumps(search)  # Tune's state at the graceful stop
    close(search.study, 0, "time budget")

    resumed = pickle.loads(snapshot)
    resumed.on_trial_result("a", result(40, 0.4))
    resumed.on_trial_complete("a", result=result(60, 0.5))
    closed, continued = resumed.study.trials
    assert (closed.state, closed.user_attrs["ltssl_outcome"]) == (TrialState.FAIL, "time budget")
    assert continued.state == TrialState.COMPLETE and continued.value == pytest.approx(0.5)
    assert continued.user_attrs[CONTINUES] == 0 and continued.user_attrs["tune_trial_id"] == "a"
    assert "ltssl_outcome" not in continued.user_attrs
    assert continued.params == closed.params == {k: v for k, v in config["service"]["params"].items()}
    assert continued.intermediate_values == {20: 0.3, 40: 0.4, 60: 0.5}
    assert planned_count(resumed.study) == 1  # a chain counts once toward the planned number
    assert "Tune trial a continues Optuna trial 0 (closed: time budget) as Optuna trial 1" in capsys.readouterr().out


def test_a_continuation_started_after_the_last_snapshot_stays_with_its_tune_trial(write_space, tmp_path):
    # the driver died after the continuation was created and before Tune's next snapshot: on the next resume the
    # continuation belongs to the same Tune trial (not an orphan a new Tune trial would take over, nor a second one)
    import pickle

    plan = load_plan(write_space(SMALL + "storage: {optuna: sqlite:///optuna.db}\n"), launch_dir=tmp_path)
    search = SweepSearch(plan)
    search.suggest("a")
    search.on_trial_result("a", result(20, 0.3))
    snapshot = pickle.dumps(search)
    close(search.study, 0, "time budget")
    pickle.loads(snapshot).on_trial_result("a", result(40, 0.4))  # a continuation is made; then kill -9

    again = pickle.loads(snapshot)
    assert again._orphans == []
    again.on_trial_result("a", result(60, 0.5))
    again.on_trial_complete("a", result=result(60, 0.5))
    closed, continued = again.study.trials
    assert (closed.state, continued.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert continued.intermediate_values == {20: 0.3, 40: 0.4, 60: 0.5}


def test_an_errored_trial_retried_in_an_in_memory_study_continues_too(small_plan):
    # --retry-failed: Tune requeues an ERROR trial, whose Optuna trial is FAIL in the study Tune's state holds
    search = SweepSearch(small_plan)
    search.suggest("e")
    search.on_trial_result("e", result(20, 0.3))
    search.on_trial_complete("e", error=True)
    path = small_plan.launch_dir / "searcher.pkl"
    search.save(str(path))
    resumed = SweepSearch(small_plan)
    resumed.restore(str(path))
    resumed.on_trial_result("e", result(40, 0.4))
    resumed.on_trial_complete("e", result=result(60, 0.5))
    failed, continued = resumed.study.trials
    assert (failed.state, continued.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert continued.intermediate_values == {20: 0.3, 40: 0.4, 60: 0.5}


def test_a_restored_generator_takes_the_raised_planned_number_and_asks_the_searcher_again(small_plan, monkeypatch):
    from service.search import SweepGenerator

    generator, _ = build_searcher(small_plan)
    state = {"counter": 6, "total_samples": 6, "finished": True, "experiment": None}
    monkeypatch.setattr(SweepGenerator, "planned", 9)
    generator.set_state(state)
    assert (generator.total_samples, generator.is_finished()) == (9, False)
    monkeypatch.setattr(SweepGenerator, "planned", 6)
    generator.set_state(state)  # a plain resume: the number stands, and the searcher says whether it is done
    assert (generator.total_samples, generator.is_finished()) == (6, True)


def test_the_concurrency_limit_passes_on_the_end_of_a_retried_trial(write_space, tmp_path):
    # the limiter forgets a trial when it fails; --retry-failed continues it, and its end must still reach Optuna
    text = SMALL.replace("  num_trials: 6\n", "  num_trials: 6\n  max_concurrent: 1\n")
    plan = load_plan(write_space(text + "storage: {optuna: sqlite:///optuna.db}\n"), launch_dir=tmp_path)
    generator, search = build_searcher(plan)
    limiter = generator.searcher
    limiter.suggest("a")
    limiter.on_trial_result("a", result(20, 0.3))
    limiter.on_trial_complete("a", error=True)
    assert limiter.live_trials == set()
    search.save(str(tmp_path / "searcher.pkl"))
    search.restore(str(tmp_path / "searcher.pkl"))  # --resume --retry-failed: Tune restores the searcher
    limiter.on_trial_result("a", result(40, 0.4))  # the retry, from its checkpoint at 20
    assert limiter.live_trials == {"a"} and limiter.suggest("b") is None  # it holds the one slot
    limiter.on_trial_complete("a", result=result(60, 0.5))
    failed, continued = search.study.trials
    assert (failed.state, continued.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert continued.intermediate_values == {20: 0.3, 40: 0.4, 60: 0.5}
    assert limiter.live_trials == set()
