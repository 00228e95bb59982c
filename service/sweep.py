"""Running a validated plan: the parent MLflow run, Ray Tune's Tuner (new or restored), and the sweep's outcome.

A sweep lives in `<storage>/<experiment>-<space hash>`: Tune's experiment state plus `service_plan.json`, which
records the plan the sweep started with and its parent MLflow run. `--resume` restores that directory with
`Tuner.restore` (finished trials are not re-run) after checking that the space file still describes the same plan;
a changed space has another hash, so it never silently continues an old study.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import posixpath
import re
import signal
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import optuna
import ray
from mlflow import MlflowClient
from mlflow.entities import RunTag
from ray import tune

from service import cluster, packing, secrets
from service.console import TrialEvents
from service.leaderboard import SHARED_VIEW, view_state
from service.plan import Plan, anchor_paths
from service.search import SweepGenerator, build_scheduler, build_searcher, study_storage
from service.space import describe
from service.tracking import (
    COMMIT,
    ENDED_NOTE,
    EXPERIMENT_KIND,
    FLUSH_TIMEOUT_S,
    LOST,
    NOTE,
    OUTCOME,
    PARENT,
    ROLE,
    SPACE_HASH,
    SWEEP,
    UNWRITTEN,
    MlflowTrialLogger,
    SweepRecord,
    children,
    failure_kind,
    flatten,
    git_commit,
    log_params,
    terminal,
)
from trainables.config import ConfigError
from trainables.ray_trainable import SERVICE_KEY, STORAGE_REFUSED, run_trial, storage_refusal

RECORD_FILE = "service_plan.json"
#: the plan's fields a --resume may change: the budget (more trials, more time), not the question
# a resume may change these; resources.probe_memory only decides a check made before the trials start
EXTENSIBLE = ("search.num_trials", "search.time_budget_s", "resources.probe_memory")
TUNE_STATE = "tuner.pkl"  # what Tuner.restore reads first
PROJECT_ROOT = cluster.PROJECT_ROOT
INTERRUPTED = 130  # exit status of a sweep stopped by Ctrl-C (the shell's convention for SIGINT)
RECORDS_PENDING = 75  # the trials ran but MLflow did not answer at the end (sysexits' EX_TEMPFAIL: try again)


@dataclass(frozen=True)
class Outcome:
    counts: dict[str, int]  # outcome -> number of trials (finished, pruned, failed, interrupted, running)
    complete: bool  # every planned trial ended (finished, pruned or failed)
    time_budget_hit: bool
    record: SweepRecord


def preflight(plan: Plan, resume: bool) -> dict[str, Any] | None:
    """Checks that need no Ray or MLflow; returns the stored record when resuming. Raises ConfigError."""
    where = plan.sweep_location
    try:
        # a local storage path was created (or found unwritable) by the sweep lock, which runs first
        if plan.storage.remote and not plan.storage.bucket.exists():
            endpoint = plan.storage.endpoint
            raise ConfigError(
                f"{plan.source}: storage.path {plan.storage}: bucket {plan.storage.bucket} does not exist"
                + (f" at {endpoint}" if endpoint else "")
                + "; create it first (the service never creates buckets)"
            )
        exists = where.exists()
        record = where / RECORD_FILE
        has_record = (resume or exists) and record.is_file()
        if exists and not has_record and not resume:
            # what a start that died before writing the record left (Tune's tuner.pkl): no trial ever ran from it,
            # so a new start replaces it (its parent run, childless, is taken over by start_parent)
            where.remove_tree()
            exists = False
        has_tune_state = has_record and (where / TUNE_STATE).is_file()
        others = [] if has_record or not resume else plan.storage.subdirs()
    except OSError as err:  # an unreachable object store, missing credentials, a bucket that does not exist
        raise ConfigError(f"{plan.source}: storage.path {plan.storage} cannot be read: {err}") from err
    if not resume:
        if exists:
            raise ConfigError(
                f"{plan.source}: a sweep of this space already exists at {where}; pass --resume to continue it, "
                "or delete that directory to start over"
            )
        return None
    if not has_record:
        others = [name for name in others if name.startswith(f"{plan.spec.experiment}-")]
        raise ConfigError(
            f"{plan.source}: no sweep to resume at {where} (its name holds the space hash {plan.space_hash[:8]}, "
            "so a changed base or space starts a new sweep); "
            + (f"sweeps of this experiment: {', '.join(others)}" if others else "no sweep of this experiment exists")
        )
    if not has_tune_state:
        raise ConfigError(
            f"{plan.source}: --resume found the sweep's record but not Ray Tune's state ({TUNE_STATE}) in {where}: "
            "the folder was edited or only partly copied; a resume will not start the sweep over under the same "
            "parent run. Restore the folder, or delete it to start a new sweep"
        )
    stored = json.loads(record.read_text())
    diffs = _differences(stored["frozen"], plan.frozen_fields())
    fixed = [d for d in diffs if d[0] not in EXTENSIBLE]
    if fixed:
        raise ConfigError(
            f"{plan.source}: --resume continues the sweep as it was planned, but the plan changed:\n"
            + "\n".join(f"  {path}: {old!r} when the sweep started, {new!r} now" for path, old, new in fixed)
            + "\n(a resume may only raise search.num_trials and change search.time_budget_s and resources.probe_memory)"
        )
    planned = stored["frozen"]["search"]["num_trials"]
    if plan.num_trials < planned:
        raise ConfigError(
            f"{plan.source}: search.num_trials: {plan.num_trials} is fewer than the {planned} the sweep planned; "
            "a resume may extend a sweep, not shrink it"
        )
    stored["extended"] = [(path, old, new) for path, old, new in diffs]
    return stored


PROBE_TIMEOUT_S = 5.0


def check_reachable(plan: Plan, address: str | None) -> None:
    """The tracking store, the Optuna database and the Ray cluster answer, before anything starts; ConfigError
    naming the field and what failed otherwise (credentials never appear: the URLs are shown redacted)."""
    problems = []
    for field, url in (("tracking.uri", plan.tracking_uri), ("storage.optuna", plan.optuna_storage)):
        problem = url and _store_problem(url)
        if problem:
            problems.append(f"{field} {secrets.redact(url)}: {secrets.redact_text(problem)}")
    if address not in (None, "auto"):
        host, port = address.rsplit(":", 1)
        problem = _tcp_problem(host, int(port))
        if problem:
            problems.append(f"--address {address}: no Ray cluster answers there ({problem})")
    if problems:
        raise ConfigError(
            f"{plan.source}: cannot reach what the sweep needs:\n" + "\n".join(f"  {p}" for p in problems)
        )


def _tcp_problem(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return str(err) or type(err).__name__
    return None


def _store_problem(url: str) -> str | None:
    """Why an MLflow tracking URI or a database URL cannot be used from here (None when it can)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return _tcp_problem(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    if parts.scheme.startswith("sqlite"):
        folder = Path(url.split(":///", 1)[1]).parent if ":///" in url else None
        if folder is not None and not folder.is_dir():
            return f"the folder {folder} does not exist"
        return None
    if parts.scheme.startswith(("postgresql", "mysql", "mariadb", "mssql", "oracle")):
        import sqlalchemy

        connect_args = (
            {"connect_timeout": int(PROBE_TIMEOUT_S)} if parts.scheme.startswith(("postgresql", "mysql")) else {}
        )
        try:
            engine = sqlalchemy.create_engine(url, connect_args=connect_args)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as err:  # driver missing, refused, unknown database, bad credentials
            return str(err).splitlines()[0]
    return None


def start_parent(plan: Plan) -> SweepRecord:
    client = MlflowClient(plan.tracking_uri)
    safe_uri = secrets.redact(plan.tracking_uri)  # run() has remembered the real one for this process
    experiment = client.get_experiment_by_name(plan.mlflow_experiment)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"MLflow experiment {plan.mlflow_experiment!r} is deleted at {safe_uri}; restore it in the UI "
            "or set tracking.experiment to another name"
        )
    if experiment is None:
        experiment_id = client.create_experiment(plan.mlflow_experiment, tags=dict([EXPERIMENT_KIND]))
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older version, or by hand: say what it holds
            client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    commit = git_commit(PROJECT_ROOT)
    metrics, modes = plan.spec.search.objectives_lists()
    tags = {
        ROLE: "sweep",
        SWEEP: plan.sweep_name,
        SPACE_HASH: plan.space_hash,
        COMMIT: commit,
        OUTCOME: "running",
        "ltssl.objectives": ", ".join(f"{m} ({d})" for m, d in zip(metrics, modes, strict=True)),
        "mlflow.note.content": plan.spec.description or f"Sweep {plan.sweep_name} from {plan.source.name}",
        **plan.spec.tracking.tags,
    }
    run_id = _unrecorded_parent(client, experiment_id, plan)
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=plan.sweep_name, tags=tags).info.run_id
    else:  # a driver died between creating the parent run and writing the sweep's record: take that run over
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    # the printed link opens the runs table on this view of the sweep (service.leaderboard.view_state)
    state = view_state(plan.sweep_name, list(plan.spec.searched), list(zip(metrics, modes, strict=True)))
    client.set_experiment_tag(experiment_id, f"{SHARED_VIEW}{plan.sweep_name}", json.dumps(state))
    log_params(client, run_id, plan_params(plan))
    client.log_text(run_id, secrets.redact_text(plan.source.read_text()), f"space/{plan.source.name}")
    client.log_dict(run_id, plan.frozen_fields(), "space/resolved_plan.json")
    return SweepRecord(
        tracking_uri=safe_uri,
        experiment_id=experiment_id,
        parent_run_id=run_id,
        sweep_name=plan.sweep_name,
        space_hash=plan.space_hash,
        git_commit=commit,
        objectives=tuple(plan.spec.search.objectives),
        per_class_every=plan.spec.tracking.per_class_every,
        tags=tuple(sorted(plan.spec.tracking.tags.items())),
    )


def _unrecorded_parent(client: MlflowClient, experiment_id: str, plan: Plan) -> str | None:
    """The parent run of this sweep that no record points to: the sweep's folder has no record (preflight checked)
    and the run has no child run, i.e. no trial ever started. A parent with children belongs to a sweep whose folder
    was removed on purpose, and stays as it is."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE}` = 'sweep' AND tags.`{SWEEP}` = '{plan.sweep_name}'",
        max_results=50,
    )
    for run in found:
        if not client.search_runs([experiment_id], f"tags.`{PARENT}` = '{run.info.run_id}'", max_results=1):
            return run.info.run_id
    return None


def plan_params(plan: Plan) -> dict[str, str]:
    """The parent run's params: the space, the search settings and the base configuration."""
    params = {f"space.{name}": describe(p) for name, p in plan.spec.space.items()}
    params.update(flatten(plan.spec.search.model_dump(mode="json"), "search."))
    params.update(flatten(plan.spec.resources.model_dump(mode="json"), "resources."))
    params["search.num_trials"] = str(plan.num_trials)
    params.update(flatten(plan.base_config().model_dump(mode="json"), "base."))
    return params


def write_record(plan: Plan, record: SweepRecord) -> None:
    data = {
        "record": asdict(record),
        "frozen": plan.frozen_fields(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (plan.sweep_location / RECORD_FILE).write_text(json.dumps(data, indent=2, default=str))


def client_for(record: SweepRecord) -> MlflowClient:
    return MlflowClient(secrets.reveal(record.tracking_uri))


def run(plan: Plan, stored: dict[str, Any] | None, address: str | None, retry_failed: bool = False) -> Outcome:
    """Start (stored None) or resume a sweep and run it to its end, its time budget or an interruption;
    `retry_failed`: a resume also continues the trials that failed with an error, from their last checkpoints."""
    # Tune forces an experiment snapshot whenever a trial has replaced its kept checkpoints; on local disk that
    # costs milliseconds, so its "may become a bottleneck" warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # a diverged trial's last result carries the reason and no metric (the searcher, the scheduler and the logger
    # handle it); objective names were checked against the metrics contract before the sweep started
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    secrets.remember(plan.tracking_uri)
    secrets.remember(plan.optuna_storage)
    with tempfile.TemporaryDirectory(prefix="ltssl-code-") as staging:
        runtime_env = None
        if address is not None:  # a cluster's workers import the project from what the driver ships, nothing else
            runtime_env = {"working_dir": str(cluster.stage_code(Path(staging) / "code"))}
        connecting = time.perf_counter()
        ray.init(address=address or "local", include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
        # preemption (SIGTERM) stops the sweep as Ctrl-C does: state saved, runs closed, resumable
        signal.signal(signal.SIGTERM, _stop_gracefully)
        shipped = f", code shipped: {len(cluster.code_files())} files" if runtime_env else ""
        print(f"[sweep] ray: connected in {time.perf_counter() - connecting:.1f} s{shipped}", flush=True)
    started = time.monotonic()
    # what Tune's callbacks note for this sweep lives on their classes (Tune may hold unpickled copies of them)
    StorageWatch.refused, RESTORE_WATCH.failure, SAVE_WATCH.failed = None, None, False
    CheckpointPruner.ended, CheckpointPruner.started = [], False
    MlflowTrialLogger.unwritten = []
    SweepGenerator.planned = plan.num_trials
    Session.begin(plan.spec.search.time_budget_s, started, retry_failed)
    record = None
    previous = ("KILLED", "interrupted")  # a resumed sweep's parent run as it was (status, outcome)
    try:
        checking = time.perf_counter()
        prepare_cluster(plan, remote=address is not None)
        print(f"[sweep] checks: nodes, storage and data in {time.perf_counter() - checking:.1f} s", flush=True)
        if stored is None:
            record = start_parent(plan)
        else:
            saved = stored["record"]
            record = SweepRecord(
                **{
                    **saved,
                    "objectives": tuple(map(tuple, saved["objectives"])),
                    "tags": tuple(map(tuple, saved.get("tags", ()))),
                }
            )
            client = client_for(record)
            before = client.get_run(record.parent_run_id)
            previous = (before.info.status, before.data.tags.get(OUTCOME, "running"))
            client.update_run(record.parent_run_id, status="RUNNING")
            client.set_tag(record.parent_run_id, OUTCOME, "running")
            replay_unwritten(plan, record)
            if stored.get("extended"):
                extend(plan, record, stored["extended"])
        tuner = _tuner(plan, record, MlflowTrialLogger(record), restore=stored is not None, retry_failed=retry_failed)
        if stored is None:
            write_record(plan, record)
        try:
            tuner.fit()
        except RestoreFailed as err:
            if plan.optuna_storage is None:
                raise
            # a torn saved state (e.g. written to a storage that was full): the study in its database and the MLflow
            # runs hold what Tune's state would; a new Tune experiment on them takes the cut trials over, counts
            # the ended ones and reruns nothing
            torn = set_aside_tune_state(plan)
            print(
                f"[sweep] resume: Tune's saved state is unreadable ({err}); set aside as {', '.join(torn)}. "
                "Rebuilding the sweep from its study in the database and its MLflow runs",
                flush=True,
            )
            RESTORE_WATCH.failure = None
            CheckpointPruner.ended, CheckpointPruner.started = [], False
            Session.begin(plan.spec.search.time_budget_s, started, retry_failed)
            _tuner(plan, record, MlflowTrialLogger(record), restore=False).fit()
        if StorageWatch.refused is None and not SAVE_WATCH.failed:
            CheckpointPruner.prune_ended()  # Tune saved its final state: the trials that ended are ended there too
    except RestoreFailed as err:
        # nothing ran: the parent run goes back to how the sweep left it
        client_for(record).update_run(record.parent_run_id, status=previous[0])
        client_for(record).set_tag(record.parent_run_id, OUTCOME, previous[1])
        raise RestoreFailed(
            f"{plan.source}: --resume stopped: {err}. Nothing was run or changed; the sweep's folder is "
            f"{plan.sweep_location}"
        ) from None
    except KeyboardInterrupt:  # a second Ctrl-C: Tune's own handler took the first one
        if record is not None:
            terminal(client_for(record), record.parent_run_id, "KILLED", "interrupted")
        raise
    except Exception as err:
        refused = _refusal_in(err) if record is not None else None
        if refused is None:  # Tune's own saves to a full storage end up here too: that is a stop, not a failure
            if record is not None:
                terminal(client_for(record), record.parent_run_id, "FAILED", "failed")
            raise
        StorageWatch.refused = StorageWatch.refused or refused
    finally:
        try:
            pending, unsaved = save_unwritten(plan) if record is not None else (0, None)
        finally:
            ray.shutdown()
    if unsaved is not None:
        raise RecordsPending(
            f"MLflow at {secrets.redact(plan.tracking_uri)} did not take {pending} record(s) before the sweep's end, "
            f"and they could not be saved in {plan.sweep_location / UNWRITTEN} ({unsaved}): those records are lost. "
            "--resume closes the runs that stayed open"
        )
    if pending:
        raise RecordsPending(
            f"the sweep's trials ran, but MLflow at {secrets.redact(plan.tracking_uri)} did not take {pending} "
            f"record(s) before the end; they are saved in {plan.sweep_location / UNWRITTEN}. Run the same command "
            "with --resume once MLflow answers: it writes them first, then goes on as any resume (a sweep its time "
            "budget stopped continues its cut trials)"
        )
    if StorageWatch.refused is not None:
        terminal(client_for(record), record.parent_run_id, "KILLED", "interrupted")
        raise StorageRefused(
            f"{plan.source}: storage.path {plan.storage} refused a checkpoint ({StorageWatch.refused}). The sweep "
            "stopped; its trials keep their last checkpoints. Free space (or make the storage writable), then run "
            "the same command with --resume"
        )
    try:
        outcome = summarize(plan, record)
        if outcome.complete or outcome.time_budget_hit:
            close_stale(plan, record, "time budget" if not outcome.complete else LOST)
            outcome = summarize(plan, record)
        status = "FINISHED" if outcome.complete or outcome.time_budget_hit else "KILLED"
        summary = "finished" if outcome.complete else "time budget" if outcome.time_budget_hit else "interrupted"
        terminal(client_for(record), record.parent_run_id, status, summary)
    except Exception as err:
        if failure_kind(err) != "retry":
            raise
        raise RecordsPending(
            f"the sweep's trials ran, but MLflow at {secrets.redact(plan.tracking_uri)} stopped answering at the end "
            f"({type(err).__name__}). Run the same command with --resume once it answers: it closes the sweep (one "
            "its time budget stopped continues its cut trials)"
        ) from None
    return outcome


def extend(plan: Plan, record: SweepRecord, changes: list[tuple[str, Any, Any]]) -> None:
    """A resume that raised the planned number of trials or changed the time budget: the sweep's record, its parent
    run (a tag and the resolved plan: MLflow keeps a run's params as first logged) and its log say so. Tune's saved
    state and the searcher take the new numbers from `SweepGenerator.planned` and `SweepBudget.seconds`."""
    said = "; ".join(f"{path} {old} -> {new}" for path, old, new in changes)
    print(f"[sweep] resume: extended: {said}", flush=True)
    client = client_for(record)
    history = client.get_run(record.parent_run_id).data.tags.get("ltssl.extended")
    client.set_tag(record.parent_run_id, "ltssl.extended", f"{history}; {said}" if history else said)
    client.log_dict(record.parent_run_id, plan.frozen_fields(), "space/resolved_plan.json")
    write_record(plan, record)


def replay_unwritten(plan: Plan, record: SweepRecord) -> None:
    """Make the MLflow writes an earlier session of the sweep could not (MLflow was down at its end), before any
    trial reports; what still fails stays in the file."""
    where = plan.sweep_location / UNWRITTEN
    if not where.is_file():
        return
    writes = pickle.loads(where.read_bytes())
    print(f"[sweep] tracking: making {len(writes)} MLflow write(s) an earlier session left undone", flush=True)
    logger = MlflowTrialLogger(record)
    left = logger.replay(writes, FLUSH_TIMEOUT_S)
    if logger.bug is not None:  # a write that cannot be made as saved (traceback above): keep them all, stop here
        raise RuntimeError(f"making the MLflow writes saved in {where} failed; the file is kept") from logger.bug
    if left:  # the file keeps those only; this session's own are added to them at its end
        where.write_bytes(pickle.dumps(MlflowTrialLogger.unwritten))
        MlflowTrialLogger.unwritten = []
        print(f"[sweep] tracking: {len(left)} of them still failed; kept in {where}", flush=True)
    else:
        where.delete()


def save_unwritten(plan: Plan) -> tuple[int, str | None]:
    """Save the MLflow writes this session left undone (`MlflowTrialLogger.unwritten`) in the sweep's folder, after
    those an earlier session left and this one could not make either; `--resume` makes them. (How many are
    pending, why they could not be saved or None.)"""
    where = plan.sweep_location / UNWRITTEN
    mine = MlflowTrialLogger.unwritten
    try:
        earlier = pickle.loads(where.read_bytes()) if where.is_file() else []
        if mine:
            where.write_bytes(pickle.dumps(earlier + mine))
    except Exception as err:  # noqa: BLE001 - a sweep's end must not hide what went wrong before it
        return len(mine), f"{type(err).__name__}: {err}"
    MlflowTrialLogger.unwritten = []
    return len(earlier) + len(mine), None


class RecordsPending(Exception):
    """The sweep ran, but MLflow did not take all its records before the end: `--resume` writes them."""


def close_stale(plan: Plan, record: SweepRecord, outcome: str) -> None:
    """At a sweep's end (every trial ended, or the time budget is spent), nothing stays RUNNING: child runs still
    open and, with the study in a database, Optuna trials still RUNNING (which TPE's constant liar would keep
    treating as in flight) are closed, as `time budget` (cut by it) or `lost` (no trial of the sweep took them
    over). An in-memory study lives in Tune's saved state and ends with it."""
    client = client_for(record)
    why = "cut by the sweep's time budget" if outcome != LOST else "no trial of the resumed sweep took it over"
    for run in children(client, record):
        if run.data.tags.get(OUTCOME, "running") in ("running", "interrupted"):
            client.set_tag(run.info.run_id, NOTE, f"{ENDED_NOTE}{why}.")
            terminal(client, run.info.run_id, "KILLED", outcome)
    if plan.optuna_storage is None:
        return
    study = optuna.load_study(study_name=plan.sweep_name, storage=study_storage(plan.optuna_storage))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        live = optuna.Trial(study, trial._trial_id)  # a FrozenTrial's storage id: Optuna has no public accessor
        live.set_user_attr("ltssl_outcome", outcome)
        study.tell(live, state=optuna.trial.TrialState.FAIL)


class RestoreFailed(ConfigError):
    """Tune could not load the sweep's saved state on --resume (it would start the sweep over instead)."""


class _RestoreWatch(logging.Filter):
    """Tune logs a failed restore of its saved state (with a traceback) and then starts the whole experiment over,
    under the same parent run; this filter on Tune's logger takes that record instead, noting the failure so that
    `RestoreGuard` stops the sweep before any trial starts, with one clear error."""

    MESSAGE = "Failed to restore the run state"

    def __init__(self) -> None:
        super().__init__()
        self.failure: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.MESSAGE):
            return True
        if self.failure is None:
            error = record.exc_info[1] if record.exc_info else None
            self.failure = f"{type(error).__name__}: {error}" if error else record.getMessage()
        return False


RESTORE_WATCH = _RestoreWatch()
logging.getLogger("ray.tune.execution.tune_controller").addFilter(RESTORE_WATCH)


class _SaveWatch(logging.Filter):
    """Notes a failed save of Tune's experiment state, which Tune only logs (`fit()` returns as usual): the
    checkpoint pruner must not trust a final save that did not reach the storage."""

    MESSAGES = ("Experiment state snapshotting failed", "Saving experiment state to storage at ")

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith(self.MESSAGES):
            self.failed = True
        return True


SAVE_WATCH = _SaveWatch()
for _name in ("ray.tune.tune", "ray.tune.execution.experiment_state"):
    logging.getLogger(_name).addFilter(SAVE_WATCH)


def _save_errored_trials() -> None:
    """Ray Tune (2.60) stops a trial whose worker died (killed, the OOM killer, a lost node) on its last retry as
    ERROR, but leaves it out of its next saved state, which keeps it RUNNING with its failures uncounted: a plain
    --resume would run it again, and --retry-failed would not know it failed. Every stopped trial is marked for the
    next save here, as Tune marks the others (tests/service/test_end_to_end.py holds the behaviour)."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController._schedule_trial_stop
    if getattr(original, "saves_the_trial", False):
        return

    def schedule_trial_stop(self: Any, trial: Any, exception: Exception | None = None) -> None:
        original(self, trial, exception=exception)
        self._mark_trial_to_checkpoint(trial)

    schedule_trial_stop.saves_the_trial = True  # type: ignore[attr-defined]
    TuneController._schedule_trial_stop = schedule_trial_stop


_save_errored_trials()


def set_aside_tune_state(plan: Plan) -> list[str]:
    """Rename Tune's experiment state files of the sweep to `*.unreadable`; their new names."""
    import pyarrow.fs

    fs, folder = plan.sweep_location.filesystem()
    moved = []
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(folder)):
        if entry.base_name.startswith("experiment_state-") and entry.base_name.endswith(".json"):
            fs.move(entry.path, f"{entry.path}.unreadable")
            moved.append(f"{entry.base_name}.unreadable")
    return moved


class RestoreGuard(tune.Callback):
    """Stops a resumed sweep whose saved Tune state did not load (see `_RestoreWatch`), before any trial starts."""

    def setup(self, **info: Any) -> None:
        if RESTORE_WATCH.failure is not None:
            raise RestoreFailed(f"Ray Tune could not load the sweep's saved state: {RESTORE_WATCH.failure}")


class CheckpointPruner(tune.Callback):
    """Once a trial has ended (finished, stopped by ASHA, failed on purpose) and a saved Tune state on storage says so,
    only its last checkpoint stays in the sweep's storage: the last checkpoint holds the final tables and records.
    Tune keeps two per trial while it runs (`num_to_keep`), so a retry never restores from one being replaced.

    Not before the saved state says so: a state saved while the trial ran names the checkpoint it was at then, and a
    driver killed before the next save resumes the trial from that one (and re-runs its last evaluations, which the
    MLflow logger and the searcher already hold). So the trials restored as ended are pruned at the first step, and
    those that end in this session once `tuner.fit()` has returned (Tune saved its final state): `prune_ended()`."""

    ended: ClassVar[list[Any]] = []  # class level: a restored Tuner holds an unpickled copy of this callback
    started: ClassVar[bool] = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if CheckpointPruner.started:
            return
        CheckpointPruner.started = True
        for trial in trials:  # at the first step: the trials a --resume restored, ended as the saved state has them
            if trial.status in ("TERMINATED", "ERROR"):
                _prune(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        CheckpointPruner.ended.append(trial)

    @classmethod
    def prune_ended(cls) -> None:
        while cls.ended:
            _prune(cls.ended.pop())


def _prune(trial: Any) -> None:
    """Delete every checkpoint of `trial` in the sweep's storage but its last."""
    import pyarrow.fs

    if trial.checkpoint is None:
        return
    keep = posixpath.basename(trial.checkpoint.path.rstrip("/"))
    fs, folder = trial.storage.storage_filesystem, trial.storage.trial_fs_path
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True)):
        if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
            if entry.base_name != keep:
                fs.delete_dir(entry.path)


class Session(tune.Callback):
    """This driver session's controls on a sweep (Tune restores an unpickled copy: they live on the class).

    - The time budget (`search.time_budget_s`, per session, counted from connecting to Ray): once spent, the sweep
      stops as Ctrl-C stops it, so the cut trials keep their checkpoints and a later --resume continues them (the
      sweep's end closes their records as `time budget`; the searcher reopens them as continuations). Tune's own
      budget would end them for good, and a resume, even with more time, could never finish them.
    - --retry-failed: the errored trials a resume continues get their retries (`max_failures`) back."""

    budget_s: ClassVar[float | None] = None
    started: ClassVar[float] = 0.0
    spent: ClassVar[bool] = False
    retry_failed: ClassVar[bool] = False
    checked: ClassVar[bool] = False

    @classmethod
    def begin(cls, budget_s: float | None, started: float, retry_failed: bool) -> None:
        cls.budget_s, cls.started, cls.retry_failed = budget_s, started, retry_failed
        cls.spent = cls.checked = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if Session.checked:
            return
        Session.checked = True
        if not Session.retry_failed:
            return
        for trial in trials:  # the errored trials Tune requeued (resume_errored): their failures are used up
            if trial.status == "PENDING" and trial.run_metadata.num_failures > trial.max_failures >= 0:
                print(f"[sweep] retrying  {trial} from its last checkpoint (--retry-failed)", flush=True)
                trial.run_metadata.num_failures = 0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if Session.budget_s is None or Session.spent or time.monotonic() - Session.started < Session.budget_s:
            return
        Session.spent = True
        print(
            f"[sweep] the time budget of {Session.budget_s:g} s is spent; stopping (the cut trials keep their "
            "checkpoints: --resume continues them)",
            flush=True,
        )
        _stop_gracefully(signal.SIGINT, None)


class StorageRefused(ConfigError):
    """The sweep's storage refused a trial's checkpoint (full, over quota, read-only): the sweep stopped, resumable."""


class StorageWatch(tune.Callback):
    """Stops the sweep as Ctrl-C does when a trial reports that the storage refused its checkpoint: every other trial
    would fail the same way, and a retry too; the trials keep their last checkpoints for --resume."""

    refused: str | None = None  # the first refusal of this process (class level: Tune may hold an unpickled copy)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if STORAGE_REFUSED in result and StorageWatch.refused is None:
            StorageWatch.refused = str(result[STORAGE_REFUSED])
            print(f"[sweep] storage refused a checkpoint of {trial}: {StorageWatch.refused}; stopping", flush=True)
            _stop_gracefully(signal.SIGINT, None)


def _refusal_in(err: BaseException) -> str | None:
    """The storage refusal behind an exception Tune raised (its own saves to a full storage), if any."""
    seen: BaseException | None = err
    while seen is not None:
        refused = storage_refusal(seen)
        if refused is not None:
            return refused
        seen = seen.__cause__ or seen.__context__
    return None


def _stop_gracefully(signum: int, frame: Any) -> None:
    tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's graceful stop, installed while tuner.fit() runs
    if callable(tune_stop):
        tune_stop(signum, frame)
    else:
        raise KeyboardInterrupt


def prepare_cluster(plan: Plan, remote: bool) -> None:
    """Before anything is written: a node must hold a trial, trials packed on one GPU must fit its memory (a short
    probe), a local storage path must be shared by every node, and every node that may run a trial must have the
    data set. Raises ConfigError naming the nodes."""
    nodes = cluster.alive_nodes(ray.nodes())
    able = cluster.check_fit(plan.spec.resources.ray_request(), nodes, str(plan.source))
    probed = packing.check_packing(plan)
    if probed:
        print(f"[sweep] {packing.describe(probed, plan.spec.resources.gpu)}", flush=True)
    if not plan.storage.remote:
        cluster.check_shared_storage(Path(plan.storage.uri), nodes, str(plan.source))
    runs = [anchor_paths(plan.base_config(p).model_dump(mode="json"), plan.launch_dir) for p in plan.presets]
    datas = {json.dumps(r["data"], sort_keys=True): r["data"] for r in runs}
    problems = cluster.data_problems(list(datas.values()), able if remote else None)
    if problems:
        raise ConfigError(
            f"{plan.source}: trials could not load their data set:\n" + "\n".join(f"  {p}" for p in problems)
        )


def _tuner(
    plan: Plan, record: SweepRecord, logger: MlflowTrialLogger, restore: bool, retry_failed: bool = False
) -> tune.Tuner:
    trainable = tune.with_resources(run_trial, plan.spec.resources.tune_request())
    filesystem, path = plan.storage.filesystem()
    filesystem = filesystem if plan.storage.remote else None
    if restore:
        # Tune reloads the searcher, the scheduler and the callbacks it pickled at the start; finished trials stay
        # as they are, unfinished ones continue from their last checkpoint, and so do errored ones on request
        where = f"{path}/{plan.sweep_name}"
        return tune.Tuner.restore(
            where,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=retry_failed,
            storage_filesystem=filesystem,
        )
    searcher, _ = build_searcher(plan)
    search = plan.spec.search
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=build_scheduler(plan),
            num_samples=plan.num_trials,
            # no time_budget_s: Tune's ends the trials for good; `Session` stops the sweep as Ctrl-C does instead
            # one worker process serves trial after trial: saves starting Python and importing torch for each
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=plan.sweep_name,
            storage_path=path,
            storage_filesystem=filesystem,
            callbacks=[RestoreGuard(), Session(), StorageWatch(), logger, TrialEvents(), CheckpointPruner()],
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            # two, so the one a retry restores from is never the one being replaced
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,  # Tune's table would list every config field and metric; TrialEvents prints one line each
        ),
    )


def trial_name(trial: Any) -> str:
    return f"{trial.trial_id} {trial.config[SERVICE_KEY]['run_name']}"


def trial_dirname(trial: Any) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", trial.config[SERVICE_KEY]["run_name"])[:80]
    return f"{trial.trial_id}_{slug}"


def summarize(plan: Plan, record: SweepRecord) -> Outcome:
    counts: dict[str, int] = {}
    for r in children(client_for(record), record):
        outcome = r.data.tags.get(OUTCOME, "running")
        counts[outcome] = counts.get(outcome, 0) + 1
    ended = sum(counts.get(o, 0) for o in ("finished", "pruned", "failed"))
    return Outcome(counts=counts, complete=ended >= plan.num_trials, time_budget_hit=Session.spent, record=record)


def _differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [(path, old, new)]
