"""`python -m service.report --experiment NAME`: what a sweep found, read back from MLflow.

It prints and writes (CSV and Markdown, in `--out`, and as artifacts `report/` of the sweep's parent run):
- the leaderboard: preset, searched values, the objective(s), `test/balanced_acc` at the last evaluation (Last) and
  the median of the last 20 (Med20), tail and minimum test recall, outcome;
- a per-preset summary (mean +- std over the finished trials and their seeds), and per configuration where a
  configuration ran with several seeds;
- for an ASHA sweep, how well each rung's value predicted the final one (Spearman's rank correlation over the trials
  that reached the end): whether pruning was trustworthy;
- the seed confirmation of the top configurations (`--confirm-top-k K --seeds N` runs it through the service):
  mean +- std and a 95 % t interval per configuration, and paired comparisons across the same seeds of the winner
  against the runner-up and against plain FixMatch;
- the figures (`service.figures`).

Everything is read from MLflow (the study's trials are rebuilt from the child runs, so a sweep whose Optuna study
lived in memory is reported as well as one kept in a database), so the report works on a sweep that is still running:
it shows the trials that have ended and the values the running ones have reached.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import leaderboard
from service.leaderboard import SHARED_VIEW, child_runs, runs_url, view_state
from service.secrets import redact, redact_text
from trainables.config import ConfigError

ROLE, SWEEP, PARENT = "ltssl.role", "ltssl.sweep", "mlflow.parentRunId"
STAGE, CONFIRMS = "ltssl.stage", "ltssl.confirms"
CONFIRMATION = "confirmation"
OUTCOME, OPTUNA_TRIAL, LAST_STEP = "ltssl.outcome", "ltssl.optuna_trial", "ltssl.last_step"
SAMPLED = "sampled/"
PRESET = "method.preset"
SEED_FIELD = "train.seed"
#: the report's metric columns besides the objective(s), by (metric key, column title)
COLUMNS = (
    ("val/balanced_acc", "val bACC"),
    ("test/balanced_acc_last", "test bACC Last"),
    ("test/balanced_acc_med20", "test bACC Med20"),
    ("test/recall_tail", "test tail recall"),
    ("test/recall_min", "test min recall"),
)
SUMMARY = (
    "val/balanced_acc",
    "test/balanced_acc_last",
    "test/balanced_acc_med20",
    "test/recall_tail",
    "test/recall_min",
)
OBJECTIVES_TAG = re.compile(r"([^\s,]+) \((max|min)\)")


@dataclass
class Trial:
    """One child run of a sweep, as the report reads it."""

    run_id: str
    name: str
    number: int
    outcome: str  # running | finished | pruned | failed | interrupted | time budget
    preset: str
    params: dict[str, Any]  # sampled values, decoded (method.preset included)
    metrics: dict[str, float]  # latest value of every metric
    last_step: int
    pareto_rank: int | None = None

    def config_key(self, seed_param: str | None) -> str:
        """The configuration without its seed: trials that differ only by seed share it."""
        return json.dumps({k: v for k, v in sorted(self.params.items()) if k != seed_param})


@dataclass
class Sweep:
    """A sweep's parent run and what it planned (the resolved plan it logged)."""

    run_id: str
    name: str
    experiment_id: str
    objectives: list[tuple[str, str]]
    plan: dict[str, Any]  # space/resolved_plan.json: experiment, base, space, search, resources, tracking, storage
    tags: dict[str, str]
    trials: list[Trial] = field(default_factory=list)

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.outcome == "finished"]

    @property
    def seed_param(self) -> str | None:
        """The space's parameter that sets the training seed, if the space searches it."""
        for name, param in self.plan.get("space", {}).items():
            if SEED_FIELD in (param.get("paths") or [name]):
                return name
        return None


# ---- reading MLflow -------------------------------------------------------------------------------------------


def find_sweeps(client: Any, experiment_id: str) -> list[Any]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE}` = 'sweep'", max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time, reverse=True)


def pick_sweep(client: Any, experiment: Any, name: str | None) -> Any:
    """The search sweep to report: `name`, or the latest one that is not a confirmation."""
    sweeps = find_sweeps(client, experiment.experiment_id)
    searches = [r for r in sweeps if r.data.tags.get(STAGE) != CONFIRMATION]
    if name is not None:
        found = [r for r in sweeps if name in (r.info.run_name, r.data.tags.get(SWEEP))]
        if not found:
            known = ", ".join(r.info.run_name for r in sweeps) or "none"
            raise ConfigError(
                f"--sweep {name!r}: no sweep of that name in experiment {experiment.name!r}; sweeps: {known}"
            )
        return found[0]
    if not searches:
        raise ConfigError(f"experiment {experiment.name!r} holds no sweep (no run tagged {ROLE}=sweep)")
    return searches[0]


def load_sweep(client: Any, parent: Any) -> Sweep:
    tags = parent.data.tags
    objectives = [(m, d) for m, d in OBJECTIVES_TAG.findall(tags.get("ltssl.objectives", ""))]
    plan: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plan = json.loads(
                Path(client.download_artifacts(parent.info.run_id, "space/resolved_plan.json", tmp)).read_text()
            )
    except Exception:  # noqa: BLE001 - an older sweep, or an artifact store that does not answer: report without it
        plan = {}
    sweep = Sweep(
        run_id=parent.info.run_id,
        name=parent.info.run_name,
        experiment_id=parent.info.experiment_id,
        objectives=objectives or [("val/balanced_acc", "max")],
        plan=plan,
        tags=dict(tags),
    )
    sweep.trials = [trial_of(r) for r in child_runs(client, parent.info.experiment_id, parent.info.run_id)]
    sweep.trials = [t for t in sweep.trials if t.outcome != "lost"]
    sweep.trials = leaderboard.rank(sweep.trials, sweep.objectives)  # as the parent run's leaderboard ranks them
    return sweep


def trial_of(run: Any) -> Trial:
    params = {k.removeprefix(SAMPLED): _decode(v) for k, v in run.data.params.items() if k.startswith(SAMPLED)}
    preset = run.data.params.get("method.preset") or str(params.get(PRESET, ""))
    params.setdefault(PRESET, preset)
    tags = run.data.tags
    return Trial(
        run_id=run.info.run_id,
        name=run.info.run_name,
        number=int(tags.get(OPTUNA_TRIAL, "-1")),
        outcome=tags.get(OUTCOME, "running"),
        preset=preset,
        params=params,
        metrics=dict(run.data.metrics),
        last_step=int(tags.get(LAST_STEP, "-1")),
    )


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# ---- tables ---------------------------------------------------------------------------------------------------


def searched_names(trials: Sequence[Trial]) -> list[str]:
    names = sorted({k for t in trials for k in t.params if k != PRESET})
    return names


def leaderboard_rows(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leaderboard, every number as MLflow holds it (4 decimals)."""
    params = searched_names(sweep.trials)
    metric_cols = [(m, m) for m, _ in sweep.objectives if m not in dict(COLUMNS)] + list(COLUMNS)
    header = ["#", "run", "outcome", "preset", *params, *(title for _, title in metric_cols)]
    if len(sweep.objectives) > 1:
        header.insert(3, "front")
    rows = []
    for i, t in enumerate(sweep.trials, start=1):
        row = [str(i), t.name, t.outcome, t.preset, *(_fmt_value(t.params.get(p)) for p in params)]
        row += [_num(t.metrics.get(m)) for m, _ in metric_cols]
        if len(sweep.objectives) > 1:
            row.insert(3, str(t.pareto_rank or ""))
        rows.append(row)
    return header, rows


def group_rows(trials: Sequence[Trial], key: Any, label: str) -> tuple[list[str], list[list[str]]]:
    """mean +- std (over the finished trials of each group) of the summary metrics."""
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        if t.outcome == "finished":
            groups.setdefault(key(t), []).append(t)
    header = [label, "n", *SUMMARY]
    rows = []
    for name, members in groups.items():
        cells = [name, str(len(members))]
        for m in SUMMARY:
            values = [t.metrics[m] for t in members if m in t.metrics]
            cells.append(mean_std(values))
        rows.append(cells)
    rows.sort(key=lambda r: -_mean_of(r[2]))
    return header, rows


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} +- {np.std(values, ddof=1):.4f}"


def _mean_of(cell: str) -> float:
    try:
        return float(cell.split(" ")[0])
    except ValueError:
        return -math.inf


def config_label(t: Trial, seed_param: str | None) -> str:
    shown = [
        f"{k.rsplit('.', 1)[-1]}={_fmt_value(v)}" for k, v in sorted(t.params.items()) if k not in (PRESET, seed_param)
    ]
    return " ".join([t.preset, *shown])


# ---- ASHA: do early rungs predict the end? ----------------------------------------------------------------------


def rung_steps(plan: dict[str, Any]) -> list[int]:
    """Training steps of the ASHA rungs (grace period x reduction factor^k evaluations, before the last)."""
    scheduler = plan.get("search", {}).get("scheduler", {})
    if scheduler.get("type") != "asha":
        return []
    train = plan.get("base", {}).get("train", {})
    every, iterations = train.get("eval_every"), train.get("iterations")
    if not every or not iterations:
        return []
    evaluations = math.ceil(iterations / every)
    grace, factor = int(scheduler.get("grace_period", 2)), float(scheduler.get("reduction_factor", 3))
    rungs, r = [], float(grace)
    while r < evaluations:
        rungs.append(int(round(r)) * every)
        r *= factor
    return rungs


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 pairs or a constant side."""
    from scipy import stats

    if len(a) < 3:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant side: scipy warns and returns nan
        return float(stats.spearmanr(a, b).statistic)


def rung_correlations(client: Any, sweep: Sweep, metric: str) -> list[dict[str, Any]]:
    """Per rung: how many trials reached it, and the rank correlation between the rung's value and the final value
    over the trials that finished."""
    rungs = rung_steps(sweep.plan)
    if not rungs:
        return []
    histories = {t.run_id: {m.step: m.value for m in client.get_metric_history(t.run_id, metric)} for t in sweep.trials}
    out = []
    for step in rungs:
        reached = [t for t in sweep.trials if step in histories[t.run_id]]
        pairs = [(histories[t.run_id][step], t.metrics[metric]) for t in sweep.finished if step in histories[t.run_id]]
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        out.append({"step": step, "reached": len(reached), "finished": len(pairs), "spearman": rho})
    return out


def rung_reading(rho: float) -> str:
    if math.isnan(rho):
        return "too few finished trials to tell"
    if rho >= 0.8:
        return "ranks at this rung held to the end: pruning here was safe"
    if rho >= 0.5:
        return "ranks mostly held: pruning here may have cut a late bloomer"
    return "ranks at this rung did not predict the end: pruning here was not trustworthy"


# ---- seed confirmation ------------------------------------------------------------------------------------------


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (for a 95 % two-sided interval)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """mean, std (n - 1), and the 95 % t interval of the mean."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = t_quantile(len(x) - 1) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


@dataclass
class Confirmed:
    label: str
    key: str
    preset: str
    by_seed: dict[Any, dict[str, float]]  # seed -> metrics of its finished run


def confirmations(client: Any, sweep: Sweep) -> tuple[list[Confirmed], list[Sweep]]:
    """The configurations the confirmation stages of `sweep` re-ran, with their runs by seed."""
    stages = [
        load_sweep(client, r)
        for r in find_sweeps(client, sweep.experiment_id)
        if r.data.tags.get(STAGE) == CONFIRMATION and r.data.tags.get(CONFIRMS) == sweep.run_id
    ]
    found: dict[str, Confirmed] = {}
    for stage in stages:
        seed_param = stage.seed_param
        for t in stage.finished:
            key = t.config_key(seed_param)
            item = found.setdefault(key, Confirmed(config_label(t, seed_param), key, t.preset, {}))
            item.by_seed[t.params.get(seed_param)] = t.metrics
    return list(found.values()), stages


def confirmation_tables(
    items: list[Confirmed], metric: str, mode: str
) -> tuple[tuple[list[str], list[list[str]]], list[str], Confirmed | None]:
    """The per-configuration table (on `metric` and test balanced accuracy), the paired comparisons' lines, and the
    winner (the best mean of `metric`)."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [(c, [m[metric] for m in c.by_seed.values() if metric in m]) for c in items]
    scored = [(c, v) for c, v in scored if v]
    scored.sort(key=lambda cv: -sign * float(np.mean(cv[1])))
    header = ["configuration", "seeds", f"{metric} mean", "std", "95 % interval", "test bACC Last mean +- std"]
    rows = []
    for c, values in scored:
        mean, std, lo, hi = interval(values)
        tests = [m["test/balanced_acc_last"] for m in c.by_seed.values() if "test/balanced_acc_last" in m]
        rows.append(
            [
                c.label,
                str(len(values)),
                f"{mean:.4f}",
                _num(std),
                f"[{lo:.4f}, {hi:.4f}]" if not math.isnan(lo) else "",
                mean_std(tests),
            ]
        )
    lines: list[str] = []
    if not scored:
        return (header, rows), lines, None
    winner = scored[0][0]
    rivals = []
    if len(scored) > 1:
        rivals.append(("the runner-up", scored[1][0]))
    baseline = [c for c, _ in scored if c.preset == "fixmatch" and c is not winner]
    if baseline:
        rivals.append(("plain FixMatch", baseline[0]))
    elif winner.preset == "fixmatch":
        lines.append("The winner is plain FixMatch itself.")
    else:
        lines.append("No plain FixMatch configuration was confirmed: no comparison against it.")
    for what, rival in rivals:
        for m in (metric, "test/balanced_acc_last"):
            lines.append(paired_line(winner, rival, what, m, sign if m == metric else 1.0))
    return (header, rows), lines, winner


def paired(winner: Confirmed, rival: Confirmed, metric: str) -> tuple[list[Any], list[float]]:
    seeds = [
        s for s in winner.by_seed if s in rival.by_seed and metric in winner.by_seed[s] and metric in rival.by_seed[s]
    ]
    return seeds, [winner.by_seed[s][metric] - rival.by_seed[s][metric] for s in seeds]


def paired_line(winner: Confirmed, rival: Confirmed, what: str, metric: str, sign: float) -> str:
    """The paired comparison on `metric` across the seeds both ran; `sign` -1 when lower is better."""
    seeds, diffs = paired(winner, rival, metric)
    if len(diffs) < 2:
        return (
            f"{metric}: winner vs {what} ({rival.label}): {len(diffs)} shared seed(s), too few for a paired interval."
        )
    mean, std, lo, hi = interval(diffs)
    better_lo, better_hi = sorted((sign * lo, sign * hi))
    if better_lo > 0:
        verdict = "the winner's lead survives the noise"
    elif better_hi < 0:
        verdict = f"{what} is better beyond the noise"
    else:
        verdict = "within the noise (the interval holds 0)"
    return (
        f"{metric}: winner - {what} ({rival.label}) = {mean:+.4f} +- {std:.4f} over {len(diffs)} paired seeds, "
        f"95 % interval [{lo:+.4f}, {hi:+.4f}]: {verdict}."
    )


# ---- writing ----------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _fmt_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


@dataclass
class Report:
    sweep: Sweep
    text: str  # the Markdown report
    files: list[Path]


def build(client: Any, sweep: Sweep, out: Path, tracking_uri: str, figures: bool = True) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    metric, mode = sweep.objectives[0]
    counts: dict[str, int] = {}
    for t in sweep.trials:
        counts[t.outcome] = counts.get(t.outcome, 0) + 1
    state = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no trials yet"
    planned = sweep.plan.get("search", {}).get("num_trials")
    tracking_uri = redact(tracking_uri) or tracking_uri  # the report is written down: no password in it
    parts = [
        f"# Sweep {sweep.name}\n",
        f"Experiment {sweep.experiment_id}, parent run {sweep.run_id}, sweep status "
        f"{sweep.tags.get(OUTCOME, 'running')}; trials: {state}"
        + (f" (of {planned} planned)" if planned else "")
        + ".",
        f"Objective(s): {', '.join(f'{m} ({d})' for m, d in sweep.objectives)}. "
        "Test metrics are shown, never searched.",
        (
            ""
            if tracking_uri.startswith(("http://", "https://"))
            else f"`mlflow ui --backend-store-uri {tracking_uri}`, "
        )
        + f"then open the sweep's runs: {runs_url(_server(tracking_uri), sweep.experiment_id, view=sweep.name)}\n",
    ]

    header, rows = leaderboard_rows(sweep)
    files += _write(out, "leaderboard", header, rows)
    parts += ["## Leaderboard\n", markdown_table(header, rows)]

    header, rows = group_rows(sweep.trials, lambda t: t.preset, "preset")
    files += _write(out, "presets", header, rows)
    parts += ["## Per preset (finished trials: mean +- std over trials and seeds)\n", markdown_table(header, rows)]
    seed_param = sweep.seed_param
    by_config: dict[str, int] = {}
    for t in sweep.finished:
        by_config[t.config_key(seed_param)] = by_config.get(t.config_key(seed_param), 0) + 1
    if any(n > 1 for n in by_config.values()):
        header, rows = group_rows(sweep.trials, lambda t: config_label(t, seed_param), "configuration")
        files += _write(out, "configurations", header, rows)
        parts += ["## Per configuration (mean +- std over seeds)\n", markdown_table(header, rows)]

    scheduler_metric = sweep.plan.get("search", {}).get("scheduler", {}).get("metric") or metric
    rungs = rung_correlations(client, sweep, scheduler_metric)
    if rungs:
        header = ["rung (step)", "trials reached", "finished", f"Spearman rho vs final {scheduler_metric}", "reading"]
        rows = [
            [str(r["step"]), str(r["reached"]), str(r["finished"]), _num(r["spearman"]), rung_reading(r["spearman"])]
            for r in rungs
        ]
        files += _write(out, "rungs", header, rows)
        parts += ["## ASHA: do early rungs predict the end?\n", markdown_table(header, rows)]

    items, stages = confirmations(client, sweep)
    if items:
        (header, rows), lines, winner = confirmation_tables(items, metric, mode)
        files += _write(out, "confirmation", header, rows)
        names = ", ".join(s.name for s in stages)
        parts += [
            f"## Seed confirmation ({names})\n",
            markdown_table(header, rows),
            f"Winner: {winner.label if winner else 'none'}.\n",
            *[f"- {line}" for line in lines],
            "",
        ]

    if figures:
        from service import figures as figs

        made = figs.make_all(client, sweep, out / "figures", items)
        files += made
        if made:
            parts += ["## Figures\n", *[f"![{p.stem}](figures/{p.name})" for p in made if p.suffix == ".png"], ""]
    text = "\n".join(parts) + "\n"
    (out / "report.md").write_text(text)
    files.append(out / "report.md")
    return Report(sweep=sweep, text=text, files=files)


def ensure_view(client: Any, sweep: Sweep) -> None:
    """The experiment's shared view of the sweep's runs (the report's link opens it); sweeps started before the
    service wrote one get it here."""
    experiment = client.get_experiment(sweep.experiment_id)
    if f"{SHARED_VIEW}{sweep.name}" in experiment.tags or not sweep.plan.get("space"):
        return
    state = view_state(sweep.name, list(sweep.plan["space"]), sweep.objectives)
    client.set_experiment_tag(sweep.experiment_id, f"{SHARED_VIEW}{sweep.name}", json.dumps(state))


def _write(out: Path, stem: str, header: list[str], rows: list[list[str]]) -> list[Path]:
    (out / f"{stem}.csv").write_text(csv_text(header, rows))
    (out / f"{stem}.md").write_text(markdown_table(header, rows))
    return [out / f"{stem}.csv", out / f"{stem}.md"]


def _server(tracking_uri: str) -> str:
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def log_report(client: Any, report: Report, out: Path) -> None:
    """The report's files as artifacts `report/` of the parent run (a running sweep's too)."""
    for path in report.files:
        folder = "report" if path.parent == out else f"report/{path.parent.relative_to(out)}"
        client.log_artifact(report.sweep.run_id, str(path), folder)


# ---- the confirmation stage -----------------------------------------------------------------------------------


def confirmation_space(sweep: Sweep, k: int, seeds: int, storage: str | None) -> dict[str, Any]:
    """A space file that re-runs the top `k` configurations of `sweep` (and its best plain FixMatch configuration,
    when none of them is one) with `seeds` fresh training seeds, every trial enqueued, none pruned."""
    if not sweep.plan:
        raise ConfigError(f"sweep {sweep.name}: its parent run has no space/resolved_plan.json to re-run from")
    plan = json.loads(json.dumps(sweep.plan))
    ranked = sweep.finished
    if not ranked:
        raise ConfigError(f"sweep {sweep.name}: no finished trial to confirm yet")
    seed_param = sweep.seed_param or SEED_FIELD
    chosen: list[Trial] = []
    keys: set[str] = set()
    for t in ranked:  # distinct configurations, best first (a grid over seeds repeats them)
        key = t.config_key(seed_param)
        if key not in keys and len(chosen) < k:
            chosen.append(t)
            keys.add(key)
    if all(t.preset != "fixmatch" for t in chosen):
        # the best FixMatch trial: finished ones first, then those ASHA stopped (a plain baseline, however it fared)
        baseline = next(
            (t for t in sweep.trials if t.preset == "fixmatch" and t.outcome in ("finished", "pruned")), None
        )
        if baseline is not None:
            chosen.append(baseline)
    used = {int(t.params.get(seed_param, plan["base"].get("train", {}).get("seed", 0))) for t in sweep.trials}
    used.add(int(plan["base"].get("train", {}).get("seed", 0)))
    fresh: list[int] = []
    candidate = 0
    while len(fresh) < seeds:
        if candidate not in used:
            fresh.append(candidate)
        candidate += 1
    space: dict[str, Any] = {}
    for name, param in plan["space"].items():
        if name == seed_param:
            continue
        if param["type"] == "fixed":
            space[name] = param
            continue
        values = []
        for t in chosen:
            if name in t.params and t.params[name] not in values:
                values.append(t.params[name])
        if values:
            kept = {key: param[key] for key in ("presets", "paths") if param.get(key) is not None}
            space[name] = {"type": "categorical", "values": values, **kept}
    seed_entry = plan["space"].get(seed_param, {})
    space[seed_param] = {"type": "categorical", "values": fresh}
    if seed_entry.get("paths"):
        space[seed_param]["paths"] = seed_entry["paths"]
    enqueue = []
    for t in chosen:
        for seed in fresh:
            enqueue.append({**{n: v for n, v in t.params.items() if n in space}, seed_param: seed})
    presets = {t.preset for t in chosen}
    base = dict(plan["base"])
    if isinstance(base.get("method"), dict):  # the blocks of presets this stage leaves out would be refused
        from service.plan import block_presets

        owners = block_presets()
        base["method"] = {b: v for b, v in base["method"].items() if b not in owners or owners[b] & presets}
    search = plan["search"]
    stage = {
        "experiment": f"{plan['experiment']}-confirm",
        "description": f"Seed confirmation of sweep {sweep.name}: top {k} configuration(s) x {seeds} fresh seed(s)",
        "base": base,
        "space": space,
        "search": {
            "sampler": "random",
            "num_trials": len(enqueue),
            "seed": search.get("seed", 0),
            "metric": search["metric"],
            "mode": search["mode"],
            "max_concurrent": search.get("max_concurrent"),
            "max_failures": search.get("max_failures", 2),
            "enqueue": enqueue,
        },
        "resources": plan["resources"],
        "tracking": {  # the URI goes on the command line (confirm), never into the file: it may carry a password
            "experiment": plan["tracking"].get("experiment") or plan["experiment"],
            "per_class_every": plan["tracking"].get("per_class_every", 1),
            "tags": {STAGE: CONFIRMATION, CONFIRMS: sweep.run_id, "ltssl.confirms_sweep": sweep.name},
        },
        "storage": {
            "path": storage or plan["storage"]["path"],
            **({"endpoint_url": plan["storage"]["endpoint_url"]} if plan["storage"].get("endpoint_url") else {}),
        },
    }
    return stage


# ---- the command ------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.report",
        description="Leaderboard, per-preset summary, ASHA rung check, seed confirmation and figures of a sweep, "
        "read from MLflow.",
    )
    p.add_argument("--experiment", required=True, metavar="NAME", help="MLflow experiment of the sweep")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument("--sweep", metavar="NAME", help="the sweep (parent run name); default: the latest search sweep")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write the report (default: reports/SWEEP)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    p.add_argument(
        "--confirm-top-k", type=_positive, metavar="K", help="re-run the top K configurations with --seeds fresh seeds"
    )
    p.add_argument("--seeds", type=_positive, metavar="N", help="fresh training seeds per confirmed configuration")
    p.add_argument("--address", metavar="ADDR", help="with --confirm-top-k: the Ray cluster (as service.tune)")
    p.add_argument("--storage", metavar="PATH", help="with --confirm-top-k: storage.path of the confirmation stage")
    return p


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer")
    return n


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if (args.confirm_top_k is None) != (args.seeds is None):
        cli.error("--confirm-top-k K and --seeds N go together")
    if (args.address or args.storage) and args.confirm_top_k is None:
        cli.error("--address and --storage apply to --confirm-top-k")
    uri = args.tracking_uri or "sqlite:///mlflow.db"

    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise ConfigError(
                f"--experiment {args.experiment!r}: no such experiment at {redact(uri)}; experiments: {names}"
            )
        parent = pick_sweep(client, experiment, args.sweep)
        sweep = load_sweep(client, parent)
        out = args.out or Path("reports") / sweep.name
        if args.confirm_top_k is not None:
            code = confirm(sweep, args.confirm_top_k, args.seeds, uri, args.address, args.storage, out)
            if code != 0:
                return code
            sweep = load_sweep(client, parent)
        report = build(client, sweep, out, uri, figures=not args.no_figures)
        if not args.no_log:
            log_report(client, report, out)
            ensure_view(client, sweep)
    except ConfigError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    print(report.text)
    print(f"Written to {out}/" + ("" if args.no_log else f" and logged to the parent run {sweep.run_id} (report/)"))
    return 0


def confirm(sweep: Sweep, k: int, seeds: int, uri: str, address: str | None, storage: str | None, out: Path) -> int:
    import yaml

    from service import tune

    space = confirmation_space(sweep, k, seeds, storage)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "confirm_space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    argv = ["--space", str(path), "--tracking-uri", uri, "--no-report"] + (["--address", address] if address else [])
    print(
        f"[report] confirmation: {space['search']['num_trials']} trial(s) "
        f"({len(space['search']['enqueue']) // seeds} configuration(s) x {seeds} seed(s)): "
        f"python -m service.tune {redact_text(shlex.join(argv))}",
        flush=True,
    )
    from service.plan import load_plan
    from service.sweep import RECORD_FILE

    if (load_plan(path, overrides={"tracking": {"uri": uri}}).sweep_location / RECORD_FILE).is_file():
        argv.append("--resume")  # the same confirmation again: its finished trials stand, the rest run
    return tune.main(argv)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


if __name__ == "__main__":
    sys.exit(main())
