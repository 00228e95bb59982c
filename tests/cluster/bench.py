"""Cluster start-up and tracking overhead, measured side by side in one run (a benchmark, not a timed test).

    python -m tests.cluster.bench [--repeats 2] [--trials 4]

Starts the same real components as the cluster suite (a Ray head and two worker nodes, PostgreSQL databases, moto's
S3 server, an MLflow server on PostgreSQL with artifacts in S3), then runs one small synthetic sweep four ways:

  local  + sqlite   a new local Ray, MLflow in ./mlflow.db (the quick start's setup)
  local  + server   a new local Ray, MLflow over HTTP to the PostgreSQL-backed server
  cluster + sqlite  --address of the running cluster (code staged and uploaded), MLflow in ./mlflow.db
  cluster + server  both

For each: seconds from launch to Ray connected (`ray.init`, with the code upload on a cluster), to the first trial
started, and to the end; and the MLflow writer thread's time in MLflow calls per trial (the sweep prints it; the
calls run off Tune's event loop). Ratios are against `local + sqlite` of the same repeat.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .peers import AWS, REPO, base_env, databases, mlflow_server, ray_cluster, s3_server

SPACE = """
experiment: bench
base_file: {repo}/trainables/configs/repro_synthetic.yaml
base:
  train: {{iterations: 40, eval_every: 10}}
space:
  method.preset: {{type: categorical, values: [fixmatch, fixmatch_la, fixmatch_drw, fixmatch_daso]}}
search: {{sampler: grid, metric: val/balanced_acc, max_concurrent: 2, num_trials: {trials}}}
resources: {{cpu: 1}}
"""
TRACKING = re.compile(r"\[sweep\] tracking: ([\d.]+) s of MLflow calls .* for (\d+) trial")


def run_sweep(cwd: Path, args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Launch the sweep; seconds from launch to each milestone, and tracking seconds per trial."""
    marks: dict[str, float] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.tune", "--space", "space.yaml", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            now = time.perf_counter() - started
            lines.append(line)
            if "[sweep] ray: connected" in line:
                marks.setdefault("connected", now)
            if "[sweep] start" in line:
                marks.setdefault("first_trial", now)
            if m := TRACKING.search(line):
                marks["tracking_per_trial"] = float(m[1]) / max(int(m[2]), 1)

    reader = threading.Thread(target=read)
    reader.start()
    proc.wait(timeout=1200)
    reader.join()
    marks["total"] = time.perf_counter() - started
    if proc.returncode != 0 or len(marks) < 4:
        raise RuntimeError(f"sweep {args} failed ({proc.returncode}):\n" + "".join(lines[-60:]))
    return marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--trials", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ltssl-bench-") as tmp:
        where = Path(tmp)
        with ray_cluster(where / "ray") as cluster, s3_server(where) as s3, databases() as create:
            with mlflow_server(where, create(), s3) as server:
                variants = {
                    "local + sqlite": ([], base_env()),
                    "local + server": (["--tracking-uri", server], {**base_env(), **AWS}),
                    "cluster + sqlite": (["--address", cluster.address], cluster.env),
                    "cluster + server": (["--address", cluster.address, "--tracking-uri", server], cluster.env),
                }
                results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
                for repeat in range(args.repeats):
                    for name, (flags, env) in variants.items():
                        cwd = where / f"{name.replace(' + ', '-')}-{repeat}"
                        cwd.mkdir()
                        (cwd / "space.yaml").write_text(SPACE.format(repo=REPO, trials=args.trials))
                        # each sweep its own MLflow experiment on the shared server
                        flags = [*flags, "--set", f"tracking.experiment=bench-{cwd.name}"]
                        results[name].append(run_sweep(cwd, flags, env))
                        print(f"  {name} (repeat {repeat + 1}): {results[name][-1]}", flush=True)
    report(results, args)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    base = results["local + sqlite"]

    def cell(values: list[float], scale: float = 1.0, unit: str = "s") -> str:
        mean = statistics.mean(values) * scale
        std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{mean:7.2f} +- {std:5.2f} {unit}"

    print(f"\n{args.trials} trials per sweep (40 iterations, 4 evaluations), {args.repeats} repeat(s), mean +- std")
    header = f"{'variant':18} {'ray connected':>18} {'first trial':>18} {'whole sweep':>18} {'MLflow per trial':>19}"
    print(header)
    for name, runs in results.items():
        row = [cell([r[k] for r in runs]) for k in ("connected", "first_trial", "total")]
        row.append(cell([r["tracking_per_trial"] for r in runs], 1000, "ms"))
        print(f"{name:18} " + " ".join(f"{c:>18}" for c in row))
    print("\nratios to local + sqlite (mean of per-repeat ratios)")
    for name, runs in results.items():
        ratios = [
            f"{k} {statistics.mean(r[k] / b[k] for r, b in zip(runs, base, strict=True)):.2f}x"
            for k in ("first_trial", "tracking_per_trial")
        ]
        print(f"  {name:18} " + ", ".join(ratios))


if __name__ == "__main__":
    main()
