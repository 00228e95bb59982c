"""Running a validated plan: the parent MLflow run, Ray Tune's Tuner (new or restored), and the sweep's outcome.

A sweep lives in `<storage>/<experiment>-<space hash>`: Tune's experiment state plus `service_plan.json`, which
records the plan the sweep started with and its parent MLflow run. `--resume` restores that directory with
`Tuner.restore` (finished trials are not re-run) after checking that the space file still describes the same plan;
a changed space has another hash, so it never silently continues an old study.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow import MlflowClient
from ray import tune

from service.console import TrialEvents
from service.plan import Plan
from service.search import build_scheduler, build_searcher
from service.space import describe
from service.tracking import (
    COMMIT,
    OUTCOME,
    ROLE,
    SPACE_HASH,
    SWEEP,
    MlflowTrialLogger,
    SweepRecord,
    children,
    flatten,
    git_commit,
    log_params,
    terminal,
)
from trainables.config import ConfigError
from trainables.ray_trainable import SERVICE_KEY, run_trial

RECORD_FILE = "service_plan.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
INTERRUPTED = 130  # exit status of a sweep stopped by Ctrl-C (the shell's convention for SIGINT)


@dataclass(frozen=True)
class Outcome:
    counts: dict[str, int]  # outcome -> number of trials (finished, pruned, failed, interrupted, running)
    complete: bool  # every planned trial ended (finished, pruned or failed)
    time_budget_hit: bool
    record: SweepRecord


def preflight(plan: Plan, resume: bool) -> dict[str, Any] | None:
    """Checks that need no Ray or MLflow; returns the stored record when resuming. Raises ConfigError."""
    where = plan.experiment_dir
    if not resume:
        if where.exists():
            raise ConfigError(
                f"{plan.source}: a sweep of this space already exists at {where}; pass --resume to continue it, "
                "or delete that directory to start over"
            )
        return None
    record_path = where / RECORD_FILE
    if not record_path.is_file():
        others = sorted(p.name for p in plan.storage_dir.glob(f"{plan.spec.experiment}-*") if p.is_dir())
        raise ConfigError(
            f"{plan.source}: no sweep to resume at {where} (its name holds the space hash {plan.space_hash[:8]}, "
            "so a changed base or space starts a new sweep); "
            + (f"sweeps of this experiment: {', '.join(others)}" if others else "no sweep of this experiment exists")
        )
    stored = json.loads(record_path.read_text())
    diffs = _differences(stored["frozen"], plan.frozen_fields())
    if diffs:
        raise ConfigError(
            f"{plan.source}: --resume continues the sweep as it was planned, but the plan changed:\n"
            + "\n".join(f"  {path}: {old!r} when the sweep started, {new!r} now" for path, old, new in diffs)
        )
    return stored


def start_parent(plan: Plan) -> SweepRecord:
    client = MlflowClient(plan.tracking_uri)
    experiment = client.get_experiment_by_name(plan.mlflow_experiment)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"MLflow experiment {plan.mlflow_experiment!r} is deleted at {plan.tracking_uri}; restore it in the UI "
            "or set tracking.experiment to another name"
        )
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(plan.mlflow_experiment)
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
    }
    run = client.create_run(experiment_id, run_name=plan.sweep_name, tags=tags)
    run_id = run.info.run_id
    log_params(client, run_id, plan_params(plan))
    client.log_text(run_id, plan.source.read_text(), f"space/{plan.source.name}")
    client.log_dict(run_id, plan.frozen_fields(), "space/resolved_plan.json")
    return SweepRecord(
        tracking_uri=plan.tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=run_id,
        sweep_name=plan.sweep_name,
        space_hash=plan.space_hash,
        git_commit=commit,
        objectives=tuple(plan.spec.search.objectives),
        per_class_every=plan.spec.tracking.per_class_every,
    )


def plan_params(plan: Plan) -> dict[str, str]:
    """The parent run's params: the space, the search settings and the base configuration."""
    params = {f"space.{name}": describe(p) for name, p in plan.spec.space.items()}
    params.update(flatten(plan.spec.search.model_dump(mode="json"), "search."))
    params.update(flatten(plan.spec.resources.model_dump(mode="json"), "resources."))
    params["search.num_trials"] = str(plan.num_trials)
    params.update(flatten(plan.base_config().model_dump(mode="json"), "base."))
    return params


def write_record(plan: Plan, record: SweepRecord) -> None:
    path = plan.experiment_dir / RECORD_FILE
    data = {
        "record": asdict(record),
        "frozen": plan.frozen_fields(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path.write_text(json.dumps(data, indent=2, default=str))


def run(plan: Plan, stored: dict[str, Any] | None, address: str | None) -> Outcome:
    """Start (stored None) or resume a sweep and run it to its end or an interruption."""
    # Tune forces an experiment snapshot whenever a trial has replaced its kept checkpoints; on local disk that
    # costs milliseconds, so its "may become a bottleneck" warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    runtime_env = None
    if address is not None:  # a cluster's workers need this checkout's code; data and results stay out
        excludes = [".git", ".venv", "data", "ray_results", "mlruns", "mlflow.db", "*.db"]
        runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": excludes}
    ray.init(address=address or "local", include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    started = time.monotonic()
    record = None
    try:
        check_cluster(plan, ray.cluster_resources())
        if stored is None:
            record = start_parent(plan)
        else:
            record = SweepRecord(
                **{**stored["record"], "objectives": tuple(map(tuple, stored["record"]["objectives"]))}
            )
            client = MlflowClient(record.tracking_uri)
            client.update_run(record.parent_run_id, status="RUNNING")
            client.set_tag(record.parent_run_id, OUTCOME, "running")
        tuner = _tuner(plan, record, MlflowTrialLogger(record), restore=stored is not None)
        if stored is None:
            write_record(plan, record)
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: Tune's own handler took the first one
        if record is not None:
            terminal(MlflowClient(record.tracking_uri), record.parent_run_id, "KILLED", "interrupted")
        raise
    except Exception:
        if record is not None:
            terminal(MlflowClient(record.tracking_uri), record.parent_run_id, "FAILED", "failed")
        raise
    finally:
        ray.shutdown()
    outcome = summarize(plan, record, time.monotonic() - started)
    status = "FINISHED" if outcome.complete or outcome.time_budget_hit else "KILLED"
    summary = "finished" if outcome.complete else "time budget" if outcome.time_budget_hit else "interrupted"
    terminal(MlflowClient(record.tracking_uri), record.parent_run_id, status, summary)
    return outcome


def check_cluster(plan: Plan, available: dict[str, float]) -> None:
    """A trial that asks for more than the whole cluster has would wait forever: refuse before anything runs."""
    wanted = {"CPU": plan.spec.resources.cpu, "GPU": plan.spec.resources.gpu}
    short = {k: v for k, v in wanted.items() if v > available.get(k, 0.0)}
    if short:
        have = ", ".join(f"{available.get(k, 0.0):g} {k}" for k in short)
        need = ", ".join(f"resources.{k.lower()}: {v:g}" for k, v in short.items())
        raise ConfigError(f"{plan.source}: {need} per trial, but the Ray cluster has {have} in all")


def _tuner(plan: Plan, record: SweepRecord, logger: MlflowTrialLogger, restore: bool) -> tune.Tuner:
    trainable = tune.with_resources(run_trial, {"cpu": plan.spec.resources.cpu, "gpu": plan.spec.resources.gpu})
    if restore:
        # Tune reloads the searcher, the scheduler and the callbacks it pickled at the start; finished and errored
        # trials stay as they are, unfinished ones continue from their last checkpoint
        return tune.Tuner.restore(str(plan.experiment_dir), trainable=trainable, resume_unfinished=True)
    searcher, _ = build_searcher(plan)
    search = plan.spec.search
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=build_scheduler(plan),
            num_samples=plan.num_trials,
            time_budget_s=search.time_budget_s,
            # one worker process serves trial after trial: saves starting Python and importing torch for each
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=plan.sweep_name,
            storage_path=str(plan.storage_dir),
            callbacks=[logger, TrialEvents()],
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


def summarize(plan: Plan, record: SweepRecord, elapsed_s: float) -> Outcome:
    counts: dict[str, int] = {}
    for r in children(MlflowClient(record.tracking_uri), record):
        outcome = r.data.tags.get(OUTCOME, "running")
        counts[outcome] = counts.get(outcome, 0) + 1
    ended = sum(counts.get(o, 0) for o in ("finished", "pruned", "failed"))
    budget = plan.spec.search.time_budget_s
    return Outcome(
        counts=counts,
        complete=ended >= plan.num_trials,
        time_budget_hit=budget is not None and elapsed_s >= budget,
        record=record,
    )


def _differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [(path, old, new)]
