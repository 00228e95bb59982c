"""`python -m service.report` on a real small sweep (synthetic data, local Ray, a local sqlite MLflow store): read while
the sweep runs, then after it ends with a seed confirmation of its top configurations; every number is checked
against MLflow."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from service.figures import TITLES

from .test_end_to_end import SWEEP, env, start_sweep

K, N = 2, 2
# a sweep, a report while it runs and a seed confirmation (about 2.5 minutes here): with the slow suites, so that the
# default suite stays under 15 minutes on a 2-core machine
pytestmark = pytest.mark.slow


def report_cli(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.report", "--experiment", "e2e", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_metrics_logged(db: Path) -> bool:
    """Whether a trial logged an evaluation, read with sqlite directly: an MlflowClient opened while the sweep's driver
    creates the store would race it on the schema's migrations."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            (n,) = conn.execute("SELECT COUNT(*) FROM metrics WHERE key = 'val/balanced_acc'").fetchone()
    except sqlite3.OperationalError:  # tables not created yet
        return False
    return n > 0


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    """The sweep, a report taken while it ran, and the report with a confirmation stage after it ended."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "space.yaml").write_text(SWEEP)
    sweep = start_sweep(tmp)
    deadline = time.monotonic() + 300
    while not child_metrics_logged(tmp / "mlflow.db"):
        if sweep.poll() is not None or time.monotonic() > deadline:
            sweep.kill()
            pytest.fail("no trial logged an evaluation:\n" + sweep.communicate()[0][-3000:])
        time.sleep(0.5)
    running = report_cli(tmp, "--out", "running", "--no-log")
    output, _ = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, output[-3000:]
    final = report_cli(tmp, "--out", "final", "--confirm-top-k", str(K), "--seeds", str(N))
    return {"dir": tmp, "running": running, "final": final, "client": MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_report_reads_a_sweep_that_is_still_running(swept):
    assert swept["running"].returncode == 0, swept["running"].stderr[-3000:]
    rows = read_csv(swept["dir"] / "running" / "leaderboard.csv")
    assert rows and any(r["outcome"] == "running" for r in rows)
    assert "# Sweep e2e-" in swept["running"].stdout


def test_every_number_in_the_leaderboard_is_the_one_mlflow_holds(swept):
    assert swept["final"].returncode == 0, swept["final"].stderr[-3000:]
    client = swept["client"]
    _, parent, children = runs_of_search(client)
    by_name = {c.info.run_name: c for c in children}
    rows = read_csv(swept["dir"] / "final" / "leaderboard.csv")
    assert sorted(r["run"] for r in rows) == sorted(by_name)  # the search's 6 trials, no confirmation run
    columns = {
        "val bACC": "val/balanced_acc",
        "test bACC Last": "test/balanced_acc_last",
        "test bACC Med20": "test/balanced_acc_med20",
        "test tail recall": "test/recall_tail",
        "test min recall": "test/recall_min",
    }
    for row in rows:
        run = by_name[row["run"]]
        assert row["outcome"] == run.data.tags["ltssl.outcome"]
        assert row["preset"] == run.data.params["method.preset"]
        for column, key in columns.items():
            assert row[column] == f"{run.data.metrics[key]:.4f}", (row["run"], column)
        for name in ("optim.lr", "method.drw.beta", "method.daso.t_dist"):
            sampled = run.data.params.get(f"sampled/{name}")
            assert row[name] == ("" if sampled is None else f"{json.loads(sampled):.6g}")
    # finished trials first, by the objective
    outcomes = [r["outcome"] for r in rows]
    finished = [float(r["val bACC"]) for r in rows if r["outcome"] == "finished"]
    assert outcomes == sorted(outcomes, key=lambda o: o != "finished") and finished == sorted(finished, reverse=True)

    # the per-preset summary: mean +- std over the finished trials of each preset
    for row in read_csv(swept["dir"] / "final" / "presets.csv"):
        values = [
            c.data.metrics["test/balanced_acc_last"]
            for c in children
            if c.data.params["method.preset"] == row["preset"] and c.data.tags["ltssl.outcome"] == "finished"
        ]
        assert int(row["n"]) == len(values)
        expected = f"{values[0]:.4f}" if len(values) == 1 else f"{np.mean(values):.4f} +- {np.std(values, ddof=1):.4f}"
        assert row["test/balanced_acc_last"] == expected

    # ASHA's rungs (grace period 1, factor 3: evaluation 1 = step 20): how many trials reached each
    rungs = read_csv(swept["dir"] / "final" / "rungs.csv")
    assert [r["rung (step)"] for r in rungs] == ["20"]
    reached = sum(1 for c in children if client.get_metric_history(c.info.run_id, "val/balanced_acc"))
    assert int(rungs[0]["trials reached"]) == reached == 6

    # the report is logged to the parent run
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/leaderboard.csv", "report/report.md", "report/figures"} <= artifacts


def runs_of_search(client: MlflowClient) -> tuple:
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("ltssl.role") == "sweep" and "ltssl.stage" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return exp, parent, children


def test_figures_are_images_with_their_titles(swept):
    folder = swept["dir"] / "final" / "figures"
    expected = {"per_class_recall", "pseudo_label_quality", "pseudo_label_counts", "optimization_history"}
    expected |= {"param_importances", "parallel_coordinate"}
    made = {p.stem for p in folder.glob("*.png")}
    assert expected <= made
    for stem in made:
        with Image.open(folder / f"{stem}.png") as image:
            assert image.text["Title"] == TITLES[stem]
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert min(pixels.shape) > 200 and pixels.std() > 5, stem  # drawn, not blank
    html = (folder / "parallel_coordinate.html").read_text()
    assert "plotly" in html and TITLES["parallel_coordinate"] in html


def test_confirmation_runs_k_times_n_trials_tagged_and_kept_off_the_search_leaderboard(swept):
    client = swept["client"]
    exp, search, children = runs_of_search(client)
    runs = client.search_runs([exp.experiment_id], "tags.`ltssl.stage` = 'confirmation'")
    (stage,) = [r for r in runs if r.data.tags["ltssl.role"] == "sweep"]
    trials = [r for r in runs if r.data.tags["ltssl.role"] == "trial"]
    assert stage.data.tags["ltssl.confirms"] == search.info.run_id
    ranked = read_csv(swept["dir"] / "final" / "leaderboard.csv")
    top = [r for r in ranked if r["outcome"] == "finished"][:K]
    baseline = 0 if any(r["preset"] == "fixmatch" for r in top) else N  # plain FixMatch is confirmed beside them
    has_fixmatch = any(r["preset"] == "fixmatch" and r["outcome"] in ("finished", "pruned") for r in ranked)
    assert len(trials) == len(top) * N + (baseline if has_fixmatch else 0)
    assert all(t.data.tags["mlflow.parentRunId"] == stage.info.run_id for t in trials)
    assert all(t.data.tags["ltssl.outcome"] == "finished" for t in trials)
    # fresh seeds (the search ran seed 0), the same configuration values as the search's trials
    assert {t.data.params["train.seed"] for t in trials} == {"1", "2"}
    by_name = {c.info.run_name: c for c in children}
    for row in top:
        search_run = by_name[row["run"]]
        same = [
            t
            for t in trials
            if all(t.data.params.get(k) == v for k, v in search_run.data.params.items() if k.startswith("sampled/"))
        ]
        assert len(same) == N, row["run"]
    # the search's own leaderboard (the parent's) still lists its 6 trials only
    board = Path(client.download_artifacts(search.info.run_id, "leaderboard.csv")).read_text().splitlines()
    assert len(board) == 1 + 6
    # the confirmation table: one row per configuration, N seeds each, and the paired comparisons
    table = read_csv(swept["dir"] / "final" / "confirmation.csv")
    assert len(table) == len(trials) // N and all(r["seeds"] == str(N) for r in table)
    text = (swept["dir"] / "final" / "report.md").read_text()
    assert "## Seed confirmation" in text and "paired seeds, 95 % interval" in text
