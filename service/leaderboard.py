"""The sweep's leaderboard: trials ranked by the objective(s), written to the parent MLflow run.

Finished trials first, ranked by the single objective, or for several objectives by Pareto rank (1 = on the front:
no other finished trial is at least as good on every objective and better on one), then by the first objective.
Pruned, failed and interrupted trials follow with their last values; they are never ranked above a finished one.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: recorded next to the objectives when present (test metrics are shown, never searched)
SUMMARY_METRICS = (
    "val/balanced_acc",
    "val/top1",
    "val/recall_head",
    "val/recall_tail",
    "val/recall_min",
    "test/balanced_acc",
    "test/top1",
    "test/recall_tail",
)


@dataclass
class Row:
    run_id: str
    name: str
    trial_id: str
    optuna_trial: str
    outcome: str  # running | finished | pruned | failed | interrupted
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    pareto_rank: int | None = None


SHARED_VIEW = "mlflow.sharedViewState."  # experiment tag the MLflow UI reads a view from (`viewStateShareKey`)
#: test metrics the sweep's view of the runs table shows next to the objective(s)
VIEW_METRICS = (
    "val/balanced_acc",
    "test/balanced_acc",
    "test/balanced_acc_med20",
    "test/recall_tail",
    "test/recall_min",
)


def runs_url(server: str, experiment_id: str, view: str | None = None) -> str:
    """The MLflow UI's runs table of an experiment in its model-training view (MLflow 3's UI otherwise opens an
    experiment on its GenAI overview: traces and token usage); with `view`, the sweep's view of it (`view_state`)."""
    url = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


def view_state(sweep_name: str, searched: list[str], objectives: list[tuple[str, str]]) -> dict[str, object]:
    """The runs table as a sweep's leaderboard, for the UI's shared views: the sweep's trial runs only, ranked by the
    first objective, with the outcome, the preset, the searched values and the summary metrics as columns; the chart
    view narrowed to the first objective's charts. (Sorting by a metric shows the runs flat; the experiment's plain view
    nests them under their sweep's parent run.)"""
    metrics = [m for m, _ in objectives] + [m for m in VIEW_METRICS if m not in dict(objectives)]
    columns = ["tags.`ltssl.outcome`", "params.`method.preset`"]
    columns += [f"params.`sampled/{name}`" for name in searched if name != "method.preset"]
    columns += [f"metrics.`{m}`" for m in metrics]
    first, mode = objectives[0]
    return {
        "searchFilter": f"tags.`ltssl.sweep` = '{sweep_name}' AND tags.`ltssl.role` = 'trial'",
        "orderByKey": f"metrics.`{first}`",
        "orderByAsc": mode == "min",
        "selectedColumns": columns,
        "chartsSearchFilter": first,
    }


def child_runs(client: Any, experiment_id: str, parent_id: str) -> Iterator[Any]:
    """Every child run of a parent run, page by page."""
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
            max_results=500,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def pareto_ranks(points: list[tuple[float, ...]], modes: list[str]) -> list[int]:
    """Non-dominated sorting: rank 1 for the front, 2 for the front once rank 1 is removed, ..."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    pts = [tuple(s * v for s, v in zip(signs, p, strict=True)) for p in points]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))

    ranks = [0] * len(pts)
    left = set(range(len(pts)))
    rank = 1
    while left:
        front = {i for i in left if not any(dominates(pts[j], pts[i]) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def rank(rows: list[Row], objectives: list[tuple[str, str]]) -> list[Row]:
    metrics = [m for m, _ in objectives]
    first, first_mode = objectives[0]

    def value(row: Row, metric: str) -> float:
        v = row.metrics.get(metric, math.nan)
        return v if math.isfinite(v) else -math.inf if dict(objectives)[metric] == "max" else math.inf

    finished = [r for r in rows if r.outcome == "finished" and all(m in r.metrics for m in metrics)]
    others = [r for r in rows if r not in finished]
    if len(objectives) > 1 and finished:
        ranks = pareto_ranks([tuple(value(r, m) for m in metrics) for r in finished], [m for _, m in objectives])
        for row, r in zip(finished, ranks, strict=True):
            row.pareto_rank = r
    sign = -1.0 if first_mode == "max" else 1.0
    finished.sort(key=lambda r: (r.pareto_rank or 0, sign * value(r, first)))
    others.sort(key=lambda r: (r.outcome, sign * value(r, first)))
    return finished + others


def columns(rows: list[Row], objectives: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    params = sorted({k for r in rows for k in r.params})
    wanted = [m for m, _ in objectives] + [m for m in SUMMARY_METRICS if m not in dict(objectives)]
    metrics = [m for m in wanted if any(m in r.metrics for r in rows)]
    return params, metrics


def to_csv(rows: list[Row], objectives: list[tuple[str, str]]) -> str:
    params, metrics = columns(rows, objectives)
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["rank", "run_name", "outcome", "tune_trial_id", "optuna_trial", "run_id"]
    writer.writerow(header + (["pareto_rank"] if len(objectives) > 1 else []) + params + metrics)
    for i, r in enumerate(rows, start=1):
        fixed = [i, r.name, r.outcome, r.trial_id, r.optuna_trial, r.run_id]
        pareto = [r.pareto_rank or ""] if len(objectives) > 1 else []
        writer.writerow(
            fixed + pareto + [r.params.get(p, "") for p in params] + [_num(r.metrics.get(m)) for m in metrics]
        )
    return out.getvalue()


def to_markdown(rows: list[Row], objectives: list[tuple[str, str]], top: int = 20) -> str:
    params, metrics = columns(rows, objectives)
    header = ["#", "run", "outcome"] + (["front"] if len(objectives) > 1 else []) + params + metrics
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows[:top], start=1):
        front = [str(r.pareto_rank or "")] if len(objectives) > 1 else []
        cells = [str(i), r.name, r.outcome] + front + [r.params.get(p, "") for p in params]
        lines.append("| " + " | ".join(cells + [_num(r.metrics.get(m)) for m in metrics]) + " |")
    return "\n".join(lines) + "\n"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"
