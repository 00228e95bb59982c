"""Load: a sweep of many cheap trials with ASHA, its records checked, and the service's overhead measured against the
same training function called directly in a loop (a benchmark, not a timed test; nothing else should run meanwhile).

    python -m tests.cluster.load [--trials 200] [--evaluations 100] [--mlflow-only]

1. `python -m service.tune` on a TPE + ASHA space of `--trials` trials (40 iterations, an evaluation every 10), one
   trial at a time on a new local Ray, MLflow in a sqlite file, the study in a sqlite database. Wall time from launch
   to exit.
2. Exact records: one child run per trial, finished or pruned, each evaluation once; one Optuna trial each, COMPLETE
   or PRUNED to match.
3. The same trials again, each trained as far as ASHA let it in the sweep, by `trainables.loop.train` in this process
   (one thread, as Ray gives a one-CPU trial), checkpoints and records written as in the sweep. Wall time.
   Overhead per trial = (sweep - direct) / trials; the ratio sweep / direct; that overhead as a share of a one-minute
   trial.
4. MLflow write throughput of one evaluation of a 100-class data set (the keys a real 10-class DRw evaluation
   reports, the per-class ones widened to 100 classes) through the sweep's own writer path
   (`MlflowTrialLogger._do_result`), into a sqlite store and into an MLflow server on PostgreSQL, with the
   per-class keys (every `tracking.per_class_every`-th evaluation) and without them (the evaluations in between).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SYNTHETIC = Path(__file__).resolve().parents[2] / "trainables" / "configs" / "repro_synthetic.yaml"
SPACE = """
experiment: load
base_file: {repo}/trainables/configs/repro_synthetic.yaml
base:
  train: {{iterations: 40, eval_every: 10}}
space:
  method.preset: {{type: categorical, values: [fixmatch, fixmatch_la, fixmatch_drw]}}
  optim.lr: {{type: loguniform, low: 0.01, high: 0.3}}
search:
  sampler: tpe
  num_trials: {trials}
  scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
  max_concurrent: 1
storage: {{optuna: "sqlite:///optuna.db"}}
resources: {{cpu: 1}}
"""


def run_sweep(where: Path, trials: int) -> float:
    from .peers import REPO, base_env

    (where / "load.yaml").write_text(SPACE.format(repo=REPO, trials=trials))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "service.tune", "--space", "load.yaml"],
        cwd=where,
        env={**base_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"the sweep failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    tracking = re.search(r"\[sweep\] tracking: .*", out.stdout)
    print(tracking.group(0) if tracking else "(no tracking line)")
    return wall


def check_records(where: Path, trials: int) -> dict[str, int]:
    """Exact records, or SystemExit naming what is wrong; the trials' outcomes."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    client = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
    exp = client.get_experiment_by_name("load")
    runs = [
        r for r in client.search_runs([exp.experiment_id], max_results=5000) if r.data.tags["ltssl.role"] == "trial"
    ]
    problems = []
    if len(runs) != trials or len({r.data.tags["ltssl.optuna_trial"] for r in runs}) != trials:
        problems.append(f"{len(runs)} child runs for {trials} trials")
    (sweep,) = {r.data.tags["ltssl.sweep"] for r in runs}
    study = optuna.load_study(study_name=sweep, storage=f"sqlite:///{where / 'optuna.db'}")
    states = {t.number: t.state for t in study.trials}
    if len(states) != trials:
        problems.append(f"{len(states)} Optuna trials for {trials}")
    outcomes: dict[str, int] = {}
    expected = {"finished": ("FINISHED", TrialState.COMPLETE), "pruned": ("KILLED", TrialState.PRUNED)}
    for run in runs:
        outcome = run.data.tags["ltssl.outcome"]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        last = int(run.data.tags["ltssl.last_step"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/balanced_acc")]
        if steps != list(range(10, last + 1, 10)):
            problems.append(f"{run.info.run_name}: steps {steps}")
        state = (run.info.status, states.get(int(run.data.tags["ltssl.optuna_trial"])))
        if outcome not in expected or state != expected[outcome]:
            problems.append(f"{run.info.run_name}: {outcome}, {state}")
    if problems:
        raise SystemExit("records are not exact:\n  " + "\n  ".join(problems[:20]))
    return outcomes


def run_direct(where: Path) -> tuple[float, int]:
    """Each trial of the sweep again, as far as it trained there, through the training function itself."""
    import torch

    from trainables.config import RunConfig
    from trainables.loop import train
    from trainables.ray_trainable import SERVICE_KEY

    torch.set_num_threads(1)
    jobs = []
    for params in sorted(where.glob("ray_results/load-*/*/params.json")):
        config = {k: v for k, v in json.loads(params.read_text()).items() if k != SERVICE_KEY}
        last = json.loads((params.parent / "result.json").read_text().splitlines()[-1])["step"]
        config["train"]["iterations"] = int(last)
        jobs.append(RunConfig.model_validate(config))
    out = Path(tempfile.mkdtemp(prefix="direct-", dir=where))
    started = time.perf_counter()
    for i, cfg in enumerate(jobs):
        train(cfg, out / str(i), report=lambda metrics, checkpoint: None, progress=False)
    return time.perf_counter() - started, len(jobs)


def payload(classes: int, where: Path) -> dict[str, float]:
    """One evaluation's result with `classes` classes: what a real 10-class evaluation of the synthetic
    configuration (DRw on, so its per-class weights are in) reports, its per-class keys widened."""
    from trainables.config import load_config
    from trainables.loop import train
    from trainables.metrics import class_key

    cfg = load_config(SYNTHETIC, overrides=["train.iterations=10", "train.eval_every=10", "method.preset=fixmatch_drw"])
    reported: list[dict] = []
    train(cfg, where / "payload", report=lambda metrics, checkpoint: reported.append(metrics), progress=False)
    out = {}
    for key, value in reported[-1].items():
        if "/" not in key or not isinstance(value, int | float):
            continue
        match = re.fullmatch(r"(.*/)c\d+", key)
        if match is None:
            out[key] = value
        else:
            out.update({f"{match.group(1)}{class_key(c, classes)}": value for c in range(classes)})
    return out


def mlflow_throughput(uri: str, result: dict[str, float], evaluations: int, per_class: bool) -> tuple[float, float]:
    """(evaluations per second, seconds per evaluation) through the writer's own path, with the per-class keys at
    every evaluation (per_class_every 1) or only at the last (the summary keys in between)."""
    from mlflow import MlflowClient

    from service.tracking import MlflowTrialLogger, SweepRecord

    client = MlflowClient(uri)
    exp = client.create_experiment(f"throughput-{time.time_ns()}")
    parent = client.create_run(exp, run_name="parent").info.run_id
    every = 1 if per_class else 10**9
    record = SweepRecord(uri, exp, parent, "throughput", "0" * 16, "unknown", (("val/balanced_acc", "max"),), every)
    logger = MlflowTrialLogger(record)
    config = {"train": {"iterations": evaluations * 10}, "method": {"preset": "fixmatch"}}
    config["service"] = {"optuna_trial": 0, "run_name": "t000", "params": {}}
    trial = SimpleNamespace(trial_id="bench", config=config, checkpoint=None, last_result={}, error=None, results=None)
    logger._do_start(trial)
    started = time.perf_counter()
    for i in range(1, evaluations + 1):
        logger._do_result(trial, {**result, "step": i * 10, "evaluation": i}, int(time.time() * 1000))
    took = time.perf_counter() - started
    return evaluations / took, took / evaluations


def sweep_against_direct(where: Path, trials: int) -> None:
    sweep = run_sweep(where, trials)
    outcomes = check_records(where, trials)
    direct, n = run_direct(where)
    per_trial = (sweep - direct) / n
    print(f"trials: {n} ({', '.join(f'{v} {k}' for k, v in sorted(outcomes.items()))}); records exact")
    print(f"sweep (python -m service.tune, launch to exit): {sweep:.1f} s")
    print(f"direct (trainables.loop.train in a loop, same trials and iterations): {direct:.1f} s")
    print(f"ratio sweep / direct: {sweep / direct:.3f} (a trial: {direct / n:.2f} s direct)")
    print(f"service overhead per trial: {per_trial:.2f} s = {per_trial / 60 * 100:.1f} % of a one-minute trial")


def mlflow_writes(where: Path, evaluations: int) -> None:
    from .peers import databases, mlflow_server, s3_server

    result = payload(100, where)
    summary = sum(1 for k in result if not re.search(r"/c\d+$", k))
    print(f"MLflow payload: {len(result)} metrics per evaluation with the per-class keys, {summary} without")
    rates = {}
    with databases() as create, s3_server(where) as s3, mlflow_server(where, create(), s3) as url:
        for store, uri in [("sqlite", f"sqlite:///{where / 'throughput.db'}"), ("server on PostgreSQL", url)]:
            for per_class in (True, False):
                rates[store, per_class] = mlflow_throughput(uri, result, evaluations, per_class)
    for (store, per_class), (rate, seconds) in rates.items():
        size = len(result) if per_class else summary
        print(
            f"MLflow writes, {store}, {'every key' if per_class else 'summary keys'}: {rate:.1f} evaluations/s "
            f"({seconds * 1000:.0f} ms each, {rate * size:.0f} metrics/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--evaluations", type=int, default=100, help="evaluations written per MLflow store")
    parser.add_argument("--mlflow-only", action="store_true", help="only the MLflow write throughput (step 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ltssl-load-") as tmp:
        if not args.mlflow_only:
            sweep_against_direct(Path(tmp), args.trials)
        mlflow_writes(Path(tmp), args.evaluations)


if __name__ == "__main__":
    main()
