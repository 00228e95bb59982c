"""`python -m service.tune`: check a search-space file, show its plan, and run it as a resumable Ray Tune sweep.

Exit status: 0 when the sweep ran to its end (or its time budget), 2 for bad input (nothing started, nothing
written), 130 when interrupted (resume with --resume), 75 when the trials ran but MLflow did not take every record
before the end (resume with --resume once it answers), 1 when every trial failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from service.leaderboard import runs_url
from service.plan import Plan, load_plan
from service.secrets import redact, redact_text
from service.space import Asha, Resources, describe, json_schema
from trainables.config import ConfigError

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
DRY_RUN_SAMPLES = 3
ADDRESS = re.compile(r"^(auto|[A-Za-z0-9_.-]+:\d+)$")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.tune",
        description="Hyperparameter search for long-tailed semi-supervised learning (Ray Tune + Optuna + MLflow).",
    )
    p.add_argument("--space", type=Path, metavar="FILE", help=f"search-space YAML (default: {DEFAULT_SPACE})")
    p.add_argument("--num-samples", type=int, metavar="N", help="number of trials (search.num_trials)")
    p.add_argument("--address", type=_address, help="Ray cluster: auto or HOST:PORT (default: a local Ray)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument(
        "--storage",
        metavar="PATH",
        help="storage.path: Ray Tune state and trial folders, a directory or s3://bucket/prefix, gs://bucket/prefix "
        "(default: ray_results)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep of this space (interrupted, stopped by its time budget, or extended with a larger "
        "search.num_trials or another search.time_budget_s)",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: continue the trials that failed with an error from their last checkpoints, with "
        "their retries back (trials stopped on purpose, e.g. a diverged loss, are not retried)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and sample trials; start nothing")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field of the space file, e.g. base.train.iterations=2000",
    )
    p.add_argument("--schema", action="store_true", help="print the space file's JSON Schema and exit")
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip the report and figures written at the sweep's end (python -m service.report makes them)",
    )
    return p


def _address(value: str) -> str:
    if not ADDRESS.match(value):
        raise argparse.ArgumentTypeError(f"{value!r}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    return value


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)  # bad flags: argparse prints usage and exits 2
    if args.retry_failed and not args.resume:
        cli.error("--retry-failed continues a sweep's failed trials: use it with --resume")
    if args.schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    overrides: dict[str, Any] = {}
    if args.num_samples is not None:
        overrides.setdefault("search", {})["num_trials"] = args.num_samples
    if args.tracking_uri is not None:
        overrides.setdefault("tracking", {})["uri"] = args.tracking_uri
    if args.storage is not None:
        overrides.setdefault("storage", {})["path"] = args.storage
    try:
        plan = load_plan(args.space or DEFAULT_SPACE, sets=args.set, overrides=overrides)
        if args.dry_run:
            print(render_plan(plan, samples=min(DRY_RUN_SAMPLES, plan.num_trials)))
            return 0
        from service import sweep  # Ray, MLflow and torch load only for a real run
        from service.lock import SweepLock

        sweep.check_reachable(plan, args.address)
        try:
            with SweepLock(plan):  # one driver per sweep, from the first check to the last record
                stored = sweep.preflight(plan, resume=args.resume)
                outcome = sweep.run(plan, stored, args.address, retry_failed=args.retry_failed)
        except sweep.RecordsPending as err:
            print(f"error: {redact_text(str(err))}", file=sys.stderr)
            return sweep.RECORDS_PENDING
    except ConfigError as err:  # bad input, or found once MLflow is open (e.g. the experiment was deleted in the UI)
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before Tune took over (or a second one after)
        command = resume_command(argv if argv is not None else sys.argv[1:])
        print(f"\nInterrupted. If the sweep had started, resume it with: {command}", file=sys.stderr)
        return 130
    if (outcome.complete or outcome.time_budget_hit) and not args.no_report:
        write_report(plan, outcome.record)
    print(render_outcome(plan, outcome, argv if argv is not None else sys.argv[1:]))
    if outcome.counts.get("failed", 0) == plan.num_trials:
        return 1
    return 0 if outcome.complete or outcome.time_budget_hit else sweep.INTERRUPTED


def write_report(plan: Plan, record: Any) -> None:
    """The sweep's report and figures (`service.report`), in `reports/<sweep>/` and on the parent run. A report that
    fails says so and leaves the sweep's outcome alone: `python -m service.report` makes it again."""
    from mlflow import MlflowClient

    from service import report

    try:
        client = MlflowClient(plan.tracking_uri)
        sweep = report.load_sweep(client, client.get_run(record.parent_run_id))
        out = plan.launch_dir / "reports" / sweep.name
        made = report.build(client, sweep, out, plan.tracking_uri)
        report.log_report(client, made, out)
        print(f"[sweep] report: {out / 'report.md'} and figures in {out / 'figures'} (also on the parent run)")
    except Exception as err:  # noqa: BLE001 - the sweep ran; the report is a reading of it, made again on demand
        print(f"[sweep] report: not written ({type(err).__name__}: {redact_text(str(err))})", file=sys.stderr)


def resume_command(argv: list[str]) -> str:
    """The command that resumes the sweep `argv` started, passwords masked."""
    again = [a for a in argv if a != "--resume"] + ["--resume"]
    return "python -m service.tune " + redact_text(shlex.join(again))


def render_plan(plan: Plan, samples: int) -> str:
    from service.sampling import sample_configs

    spec, search = plan.spec, plan.spec.search
    endpoint = plan.storage.endpoint
    lines = [f"Sweep {plan.sweep_name}  ({plan.source}, space hash {plan.space_hash[:12]})"]
    if spec.description:
        lines.append(f"  {spec.description}")
    presets = ", ".join(plan.presets)
    lines += [f"\nBase configuration (preset {plan.presets[0]}; sweep presets: {presets}):"]
    base = yaml.safe_dump(plan.base_config().model_dump(mode="json"), sort_keys=False).rstrip()
    lines += ["  " + line for line in base.splitlines()]
    lines.append(f"\nSpace ({len(spec.space)} parameter(s)):")
    width = max((len(n) for n in spec.space), default=0)
    lines += [f"  {name:{width}}  {describe(p)}" for name, p in spec.space.items()]
    objectives = ", ".join(f"{m} ({d})" for m, d in search.objectives)
    budget = f"{search.time_budget_s:g} s" if search.time_budget_s else "none"
    lines += [
        f"\nSearch: Optuna {search.sampler} sampler (seed {search.seed}), {plan.num_trials} trials, "
        f"objective(s): {objectives}",
        f"Scheduler: {_scheduler_text(plan)}",
        f"Concurrency: {search.max_concurrent or 'as resources allow'}; time budget: {budget}; "
        f"retries per trial: {search.max_failures}",
        f"Resources per trial: {_resources_text(spec.resources)} (on one node)",
        f"Ray results: {plan.sweep_location}" + (f" (endpoint {endpoint})" if endpoint else ""),
        f"Optuna study: {plan.sweep_name} ({redact(plan.optuna_storage) or 'in memory, saved with the Ray state'})",
        f"MLflow: {redact(plan.tracking_uri)}, experiment {plan.mlflow_experiment!r} (one parent run, one child per "
        "trial)",
        f"\nSampled configurations ({samples} of {plan.num_trials}):",
    ]
    for config in sample_configs(plan, samples):
        meta = config["service"]
        lines.append(f"  {meta['run_name']}")
        lines += [f"      {k} = {v!r}" for k, v in meta["params"].items()]
    lines.append("\nDry run: nothing was started or written.")
    return "\n".join(lines)


def _resources_text(resources: Resources) -> str:
    parts = [f"{resources.cpu:g} CPU", f"{resources.gpu:g} GPU"]
    if resources.memory_gb is not None:
        parts.append(f"{resources.memory_gb:g} GiB memory")
    parts += [f"{v:g} {k}" for k, v in resources.custom.items()]
    return ", ".join(parts)


def _scheduler_text(plan: Plan) -> str:
    scheduler = plan.spec.search.scheduler
    if not isinstance(scheduler, Asha):
        return "none (every trial runs to its last evaluation)"
    metric, mode = plan.spec.search.scheduler_objective
    evaluations = max(plan.evaluations(plan.base_config(p)) for p in plan.presets)
    return (
        f"ASHA on {metric} ({mode}) at evaluation steps: grace period {scheduler.grace_period}, reduction factor "
        f"{scheduler.reduction_factor:g}, {scheduler.brackets} bracket(s), up to {evaluations} evaluations per trial"
    )


def render_outcome(plan: Plan, outcome: Any, argv: list[str]) -> str:
    record = outcome.record
    counts = ", ".join(f"{n} {o}" for o, n in sorted(outcome.counts.items())) or "no trials"
    lines = [f"\nSweep {plan.sweep_name}: {counts} (of {plan.num_trials} planned)."]
    if outcome.time_budget_hit and not outcome.complete:
        lines.append(
            f"The time budget of {plan.spec.search.time_budget_s:g} s ended the sweep. Give it more time (the cut "
            f"trials continue from their checkpoints) with: {resume_command(argv)}"
        )
    elif not outcome.complete:
        lines.append(f"Interrupted. Resume with: {resume_command(argv)}")
    lines.append(f"Leaderboard: artifact leaderboard.md of the parent run {record.parent_run_id}")
    lines.append("Open the MLflow UI on the sweep's runs:")
    uri = record.tracking_uri
    if uri.startswith(("http://", "https://")):
        lines.append(f"  {runs_url(uri, record.experiment_id, view=record.sweep_name)}")
    else:
        lines.append(f"  mlflow ui --backend-store-uri {uri}")
        lines.append(f"  then open {runs_url('http://127.0.0.1:5000', record.experiment_id, view=record.sweep_name)}")
    experiment = plan.mlflow_experiment
    where = "" if plan.spec.tracking.uri is None else f" --tracking-uri {shlex.quote(uri)}"
    lines.append(f"Report, figures and seed confirmation: python -m service.report --experiment {experiment}{where}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
