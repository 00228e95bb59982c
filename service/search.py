"""The Tune side of the search: Optuna as the searcher, ASHA (or nothing) as the scheduler.

`SweepSearch` is Ray's `OptunaSearch` with the changes the sweep needs:
- suggestions are whole trial configurations (`TrialSampler.tune_config`), not bare parameter values;
- intermediate values are reported to Optuna at the training step (`step`), not at Tune's report count;
- a trial the scheduler stopped before its last evaluation is told to Optuna as PRUNED (with its intermediate
  values) rather than COMPLETE: OptunaSearch would otherwise file it as complete with a half-trained value, and
  TPE would learn from it as if it were final;
- with the study in a database, a restored searcher reconciles it with Tune's saved state (a driver killed after
  its last snapshot): trials the study handed out since then and that were cut short are taken over by the next
  Tune trials (same Optuna trial, same values), ended ones count toward the planned number, and a trial whose record
  ended meanwhile keeps that record;
- a Tune trial that a resume continues although its Optuna trial was closed as failed (cut by the time budget, or
  errored and retried with --retry-failed) continues as a new Optuna trial with the same values and the intermediate
  values so far, marked `continues_trial` = the closed trial's number: Optuna never reopens a finished trial, and its
  history keeps the closed one. The planned number counts each chain once.

`SweepGenerator` is Tune's generator of trials around the searcher, with the planned number of trials a resume may
raise (`planned`; Tune restores the number the sweep started with from its saved state).
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from typing import Any, ClassVar

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from service import secrets
from service.plan import Plan
from service.sampling import OPTUNA_NUMBER, SAMPLERS, TrialSampler
from trainables.ray_trainable import NO_METRICS, NOT_RETRIED

EVALUATION = "evaluation"  # result key: 1-based evaluation index, ASHA's time unit (added by the trainable)
STEP = "step"  # result key: training iteration of the evaluation (from the loop)
TRAINING_ITERATION = "training_iteration"  # Tune's own report counter, which OptunaSearch reports at
CONTINUES = "continues_trial"  # user attribute of an Optuna trial that continues a closed one: the closed one's number


class SweepSearch(OptunaSearch):
    def __init__(self, plan: Plan):
        metrics, modes = plan.spec.search.objectives_lists()
        storage = None
        # the redacted URL: Tune pickles the searcher into the experiment state, which must carry no password
        self._storage_url = secrets.remember(plan.optuna_storage)
        if plan.optuna_storage is not None:
            storage = study_storage(plan.optuna_storage)
        self._trial_sampler = TrialSampler(plan)
        self._final_steps: dict[str, int] = {}  # Tune trial id -> last training step of that trial
        self._reported: dict[str, int] = {}  # Tune trial id -> last step reported to Optuna
        self._unchecked: set[str] = set()  # trials of a restored database study not yet checked against it
        self._orphans: list[int] = []  # RUNNING Optuna trials (storage ids) of a restored study that no Tune trial owns
        self._num_trials = plan.num_trials
        super().__init__(
            space=self._trial_sampler,
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=SAMPLERS[plan.spec.search.sampler](plan),
            study_name=plan.sweep_name,
            storage=storage,
        )
        if storage is not None and self._ot_study.get_trials(deepcopy=False):
            # a new searcher on a study that has trials: a sweep rebuilt after its Tune state was lost
            self._adopt_unknown_trials()
        elif plan.spec.search.enqueue:
            # trials given one by one (search.enqueue): Optuna hands them out first, with exactly these values
            for trial in plan.spec.search.enqueue:
                self._ot_study.enqueue_trial(plan.spec.optuna_params(trial))

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if trial_id not in self._ot_trials and self._storage_url is not None:
            if self._orphans:
                # a trial the study handed out after Tune's last snapshot, cut by the driver's death: this Tune trial
                # takes it over (same Optuna number and values, so the same MLflow run) instead of asking for another
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, self._orphans.pop(0))
            elif planned_count(self._ot_study) >= self._num_trials:
                # trials that finished after Tune's last snapshot count: the study has every planned trial
                return Searcher.FINISHED
        drawn = super().suggest(trial_id)
        if drawn is None:
            return None
        # OptunaSearch returns Optuna's raw names too (e.g. "1 - method.drw.beta"); keep the configuration paths
        number = drawn.pop(OPTUNA_NUMBER)
        values = {k: v for k, v in drawn.items() if k in self._trial_sampler.space or k == "method.preset"}
        config = self._trial_sampler.tune_config(values, number)
        self._final_steps[trial_id] = config["train"]["iterations"]
        self._optuna_trial(trial_id).set_user_attr("tune_trial_id", trial_id)
        return config

    def _settle_restored(self, trial_id: str) -> bool:
        """Whether Optuna's record of a trial Tune continues after a resume is final and stands: the study holds it
        as complete or pruned although Tune's saved state does not (a driver that died after telling Optuna, before
        Tune's next snapshot). A trial the study holds as failed (closed by the time budget, or errored and retried
        with --retry-failed) continues as a new Optuna trial instead (`_continuation`). Each trial a restored
        searcher holds is looked up once, at its first report."""
        if trial_id not in self._unchecked:
            return False
        self._unchecked.discard(trial_id)
        number = self._ot_trials[trial_id].number
        closed = self._ot_study.get_trials(deepcopy=False)[number]
        if closed.state in (TrialState.COMPLETE, TrialState.PRUNED):
            self._completed_trials.add(trial_id)
            return True
        if closed.state == TrialState.FAIL:
            self._ot_trials[trial_id] = self._continuation(closed, trial_id)
            self._completed_trials.discard(trial_id)
        return False

    def _continuation(self, closed: optuna.trial.FrozenTrial, trial_id: str) -> optuna.Trial:
        """A new Optuna trial that continues `closed`: same values, its intermediate values so far, `CONTINUES`."""
        attrs = {k: v for k, v in closed.user_attrs.items() if k != "ltssl_outcome"}
        self._ot_study.enqueue_trial(closed.params, user_attrs={**attrs, CONTINUES: closed.number})
        trial = self._ot_study.ask(fixed_distributions=closed.distributions)
        for key in ("grid_id", "search_space"):  # the grid point it stands for (GridSampler reads them at the end)
            if key in closed.system_attrs:
                self._ot_study._storage.set_trial_system_attr(trial._trial_id, key, closed.system_attrs[key])
        for step, value in sorted(closed.intermediate_values.items()):
            trial.report(value, step)
        why = closed.user_attrs.get("ltssl_outcome", "failed")
        print(
            f"[sweep] resume: Tune trial {trial_id} continues Optuna trial {closed.number} (closed: {why}) as Optuna "
            f"trial {trial.number}",
            flush=True,
        )
        return trial

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if any(k in result for k in NO_METRICS) or self._settle_restored(trial_id):
            return  # no metric (on_trial_complete tells Optuna the trial failed), or Optuna's record is final
        step = int(result[STEP])
        if step <= self._reported.get(trial_id, -1):
            return  # a retry re-ran this evaluation after its checkpoint: Optuna keeps the first value
        self._reported[trial_id] = step
        super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: step})
        if isinstance(self.metric, list) and trial_id not in self._completed_trials:
            # Optuna has no intermediate values for several objectives: keep them as a user attribute
            trial = self._optuna_trial(trial_id)
            history = dict(trial.user_attrs.get("intermediate_values", {}))
            history[str(step)] = {m: result.get(m) for m in self.metric}
            trial.set_user_attr("intermediate_values", history)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._settle_restored(trial_id):
            return
        if result is not None and NOT_RETRIED in result:
            super().on_trial_complete(trial_id, result=None, error=True)  # Optuna: FAIL
            return
        if not error and result is not None and STEP in result and trial_id not in self._completed_trials:
            # the result on which a scheduler stops a trial (ASHA's rung, or max_t at the last evaluation) never
            # reaches on_trial_result
            self.on_trial_result(trial_id, result)
            if int(result[STEP]) < self._final_steps.get(trial_id, math.inf):
                result = None  # no final value: OptunaSearch tells Optuna PRUNED, valued at the last intermediate
        super().on_trial_complete(trial_id, result=result, error=error)

    # ---- pickling: Tune saves the searcher in the sweep's storage (tuner.pkl, searcher state) --------------------

    def _portable_state(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._storage_url is not None:
            # the study lives in its database: keep its name and trial ids, not connections (their URL holds the
            # password); an in-memory study is pickled whole, that is how it survives a --resume
            state["_storage"] = None
            state["_ot_study"] = None
            state["_ot_trials"] = {tid: trial._trial_id for tid, trial in self._ot_trials.items()}
        state["_unchecked"] = set()  # rebuilt on reconnecting
        state["_orphans"] = []
        return state

    def _reconnect(self, adopt: bool = True) -> None:
        if self._storage_url is None or self._ot_study is not None:
            return
        self._storage = study_storage(secrets.reveal(self._storage_url))
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler)
        self._ot_trials = {tid: optuna.Trial(self._ot_study, trial_id) for tid, trial_id in self._ot_trials.items()}
        self._unchecked = set(self._ot_trials)
        if adopt:
            self._adopt_unknown_trials()

    def _adopt_unknown_trials(self) -> None:
        owned = {trial._trial_id for trial in self._ot_trials.values()}
        unknown = [t for t in self._ot_study.get_trials(deepcopy=False) if t._trial_id not in owned]
        # a continuation started after Tune's last snapshot belongs to the Tune trial that holds the closed trial
        continuing = {t.user_attrs[CONTINUES]: t for t in unknown if CONTINUES in t.user_attrs}
        for tid, trial in list(self._ot_trials.items()):
            number = trial.number
            while number in continuing:
                successor = continuing.pop(number)
                self._ot_trials[tid] = optuna.Trial(self._ot_study, successor._trial_id)
                owned.add(successor._trial_id)
                number = successor.number
        unknown = [t for t in unknown if t._trial_id not in owned]
        self._orphans = sorted(t._trial_id for t in unknown if t.state == TrialState.RUNNING)
        if unknown:
            print(
                f"[sweep] resume: the study holds {len(unknown)} trial(s) started after Tune's last saved state: "
                f"{len(self._orphans)} cut short (taken over by the next trials, same values and MLflow runs), "
                f"{len(unknown) - len(self._orphans)} ended (kept as they are)",
                flush=True,
            )

    def __getstate__(self) -> dict[str, Any]:
        return self._portable_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # a searcher pickled before it handed out any trial is Tune's copy from the sweep's start (tuner.pkl), which
        # Tune then restores from its saved state (`restore`): that is where unknown trials are looked for
        self._reconnect(adopt=bool(self._ot_trials))
        self._num_trials = SweepGenerator.planned or self._num_trials

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self._portable_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self._reconnect()
        if self._storage_url is None:  # an in-memory study came back whole: its trials are checked as they report
            self._unchecked = set(self._ot_trials)
        self._num_trials = SweepGenerator.planned or self._num_trials

    def _optuna_trial(self, trial_id: str) -> optuna.Trial:
        return self._ot_trials[trial_id]  # OptunaSearch's live trials; it has no public accessor


def planned_count(study: optuna.Study) -> int:
    """The study's trials toward the planned number: a trial and the ones continuing it count once."""
    trials = study.get_trials(deepcopy=False)
    return len(trials) - sum(CONTINUES in t.user_attrs for t in trials)


class SweepGenerator(SearchGenerator):
    """Tune's generator of trials from the searcher, whose planned number of trials a resume may raise. Tune
    restores the generator's count, and whether the searcher had said it was done, from the sweep's saved state:
    a resume asks the searcher again (a sweep stopped by its time budget, or extended, has trials left)."""

    planned: ClassVar[int | None] = None  # this session's planned number (Tune holds an unpickled copy of this)

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if SweepGenerator.planned is not None:
            self._total_samples = max(self._total_samples, SweepGenerator.planned)
        self._finished = False


class RetryingStorage(optuna.storages.RDBStorage):
    """RDBStorage whose idempotent attribute writes are retried when the database drops the connection between
    the pool's pre-ping and the commit (seen in the PostgreSQL fault test: the grid sampler's `grid_id` write inside
    `study.ask()` failed and ended the sweep). Writing the same key and value again is harmless."""

    ATTEMPTS = 3

    def _retried(self, write, *args) -> None:
        for attempt in range(self.ATTEMPTS):
            try:
                return write(*args)
            except optuna.exceptions.StorageInternalError:
                if attempt == self.ATTEMPTS - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._retried(super().set_trial_system_attr, trial_id, key, value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._retried(super().set_trial_user_attr, trial_id, key, value)


def study_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's database storage, its pooled connections checked before each use: Optuna does that for MySQL only,
    and a PostgreSQL that restarted or dropped its backends would otherwise fail the searcher's next call."""
    return RetryingStorage(url, engine_kwargs={"pool_pre_ping": True})


class SweepLimiter(ConcurrencyLimiter):
    """Tune's concurrency limit, counting a trial that reports as live: an errored trial that --retry-failed
    continues left the limiter's live set when it failed, and the limiter drops the completion of a trial it does
    not hold (the searcher, and so Optuna, would never hear that the retried trial ended)."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._limit_concurrency and not self.batch and trial_id not in self.live_trials:
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
        else:  # a continued trial the scheduler stopped at its first report after the resume
            self.searcher.on_trial_complete(trial_id, result=result, error=error)


def build_searcher(plan: Plan) -> tuple[SweepGenerator, SweepSearch]:
    """(what Tune gets, the Optuna searcher inside it)."""
    search = SweepSearch(plan)
    limit = plan.spec.search.max_concurrent
    return SweepGenerator(SweepLimiter(search, max_concurrent=limit) if limit else search), search


SCHEDULERS: dict[str, Callable[[Plan], TrialScheduler]] = {
    "none": lambda plan: FIFOScheduler(),
    "asha": lambda plan: ASHAScheduler(
        time_attr=EVALUATION,
        metric=plan.spec.search.scheduler_objective[0],
        mode=plan.spec.search.scheduler_objective[1],
        max_t=max(plan.evaluations(plan.base_config(p)) for p in plan.presets),
        grace_period=plan.spec.search.scheduler.grace_period,
        reduction_factor=plan.spec.search.scheduler.reduction_factor,
        brackets=plan.spec.search.scheduler.brackets,
    ),
}


def build_scheduler(plan: Plan) -> TrialScheduler:
    return SCHEDULERS[plan.spec.search.scheduler.type](plan)
