"""The figures of a sweep's report, from its MLflow records: PNG (for the MLflow artifact viewer and the README) and,
for the parallel coordinates and the Pareto front, interactive HTML.

- `per_class_recall.png`: per-class test recall of the best trial against plain FixMatch (the best FixMatch trial of
  the sweep; with a seed confirmation, the confirmed winner and FixMatch as mean +- std over the seeds);
- `pseudo_label_quality.png`: per-class recall and precision over training of the linear, semantic and final
  pseudo-labels of the best DASO trial (the DASO paper's analysis; the final pseudo-label alone for other methods);
- `pseudo_label_counts.png`: the pseudo-label count imbalance ratio over training per preset, and the per-class
  pseudo-label counts of the best trial (the DRw paper's Figure 2);
- `optimization_history.png`, `param_importances.png`, `parallel_coordinate.png/.html` (Optuna's plots, on a study
  rebuilt from the child runs), and `pareto_front.png/.html` for several objectives.

Each PNG carries its title in its metadata (`Title`), so a test, or a person, can tell what it shows without the code.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.report import Confirmed, Sweep, Trial

TITLES = {
    "per_class_recall": "Per-class test recall: best configuration vs plain FixMatch",
    "pseudo_label_quality": "Pseudo-label recall and precision per class over training",
    "pseudo_label_counts": "Pseudo-label class counts over training",
    "optimization_history": "Optimisation history",
    "param_importances": "Hyperparameter importances",
    "parallel_coordinate": "Parallel coordinates of the searched values",
    "pareto_front": "Pareto front of the objectives",
}
CLASS_KEY = "/recall/c"


def make_all(client: Any, sweep: Sweep, folder: Path, confirmed: list[Confirmed] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    finished = sweep.finished
    if finished:
        names = class_names(client, finished[0])
        made += per_class_recall(sweep, confirmed or [], names, folder)
        daso = [t for t in finished if any(k.startswith("pl_semantic/") for k in t.metrics)]
        made += pseudo_label_quality(client, (daso or finished)[0], names, folder)
        made += pseudo_label_counts(client, sweep, names, folder)
    made += optuna_figures(client, sweep, folder)
    return made


def class_names(client: Any, trial: Trial) -> list[str]:
    """The data set's class names, from the trial's final per-class table (`cNN` where the data set has none)."""
    count = num_classes(trial.metrics)
    fallback = [f"c{c:0{max(2, len(str(count - 1)))}d}" for c in range(count)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(client.download_artifacts(trial.run_id, "per_class_test.csv", tmp)).read_text()
    except Exception:  # noqa: BLE001 - no table (a running trial): keys stand in for names
        return fallback
    rows = [line.split(",") for line in table.strip().splitlines()[1:]]
    names = [row[1] if len(row) > 1 and row[1] else fallback[i] for i, row in enumerate(rows)]
    return names if len(names) == count else fallback


def num_classes(metrics: dict[str, float]) -> int:
    return sum(1 for k in metrics if k.startswith("test/recall/c"))


def _save(fig: Any, folder: Path, stem: str) -> Path:
    path = folder / f"{stem}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Title": TITLES[stem]})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _class_values(metrics: dict[str, float], prefix: str, count: int) -> np.ndarray:
    width = max(2, len(str(count - 1)))
    return np.array([metrics.get(f"{prefix}/c{c:0{width}d}", math.nan) for c in range(count)])


def per_class_recall(sweep: Sweep, confirmed: list[Confirmed], names: list[str], folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    count = len(names)
    if count == 0:
        return []
    series: list[tuple[str, list[dict[str, float]]]] = []
    confirmed = [c for c in confirmed if c.by_seed]
    if confirmed:
        metric = sweep.objectives[0][0]
        sign = 1.0 if sweep.objectives[0][1] == "max" else -1.0
        ranked = sorted(
            confirmed, key=lambda c: -sign * float(np.mean([m.get(metric, math.nan) for m in c.by_seed.values()]))
        )
        winner = ranked[0]
        series.append((f"winner: {winner.label} ({len(winner.by_seed)} seeds)", list(winner.by_seed.values())))
        rival = next((c for c in ranked[1:] if c.preset == "fixmatch"), None)
        if winner.preset == "fixmatch" and len(ranked) > 1:
            rival = ranked[1]  # FixMatch won: against the runner-up
        if rival is not None:
            what = "FixMatch" if rival.preset == "fixmatch" else "runner-up"
            series.append((f"{what}: {rival.label} ({len(rival.by_seed)} seeds)", list(rival.by_seed.values())))
    else:
        best = sweep.finished[0]
        series.append((f"best: {best.name}", [best.metrics]))
        rival = next((t for t in sweep.finished[1:] if t.preset == "fixmatch"), None)
        if best.preset == "fixmatch":
            rival = next((t for t in sweep.finished[1:]), None)
        if rival is not None:
            series.append(
                (("FixMatch: " if rival.preset == "fixmatch" else "runner-up: ") + rival.name, [rival.metrics])
            )
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * count + 2), 4.2))
    width = 0.8 / len(series)
    x = np.arange(count)
    for i, (label, runs) in enumerate(series):
        values = np.array([_class_values(m, "test/recall", count) for m in runs])
        mean = np.nanmean(values, axis=0)
        err = np.nanstd(values, axis=0, ddof=1) if len(runs) > 1 else None
        ax.bar(x + (i - (len(series) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(
        x, names, rotation=45 if count > 10 or max(map(len, names)) > 6 else 0, ha="right" if count > 10 else "center"
    )
    ax.set_xlabel("class (head to tail: most to fewest labeled images)")
    ax.set_ylabel("test recall")
    ax.set_ylim(0, 1.22)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(TITLES["per_class_recall"])
    ax.legend(fontsize=8, loc="upper right")  # the tail classes, on the right, recall least
    ax.grid(axis="y", alpha=0.3)
    return [_save(fig, folder, "per_class_recall")]


def _history(client: Any, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return [p[0] for p in points], [p[1] for p in points]


def pseudo_label_quality(client: Any, trial: Trial, names: list[str], folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    count = len(names)
    prefixes = [
        p
        for p in ("pl_linear", "pl_semantic", "pl_abc", "pl_acr", "pl")
        if any(k.startswith(f"{p}/recall/") for k in trial.metrics)
    ]
    if not prefixes or count == 0:
        return []
    titles = {
        "pl_linear": "linear classifier",
        "pl_semantic": "semantic (prototypes)",
        "pl_abc": "ABC's balanced head",
        "pl_acr": "ACR's balanced head",
        "pl": "final (used by the loss)",
    }
    fig, axes = plt.subplots(
        2, len(prefixes), figsize=(4.2 * len(prefixes), 6.4), sharex=True, sharey=True, squeeze=False
    )
    colors = plt.cm.viridis(np.linspace(0, 0.95, count))
    width = max(2, len(str(count - 1)))
    for col, prefix in enumerate(prefixes):
        for row, kind in enumerate(("recall", "precision")):
            ax = axes[row][col]
            for c in range(count):
                steps, values = _history(client, trial.run_id, f"{prefix}/{kind}/c{c:0{width}d}")
                ax.plot(steps, values, color=colors[c], lw=1.2, label=names[c] if count <= 12 else None)
            ax.set_title(f"{titles[prefix]}: {kind}", fontsize=10)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"pseudo-label {kind}")
            if row == 1:
                ax.set_xlabel("training step")
    if count <= 12:
        axes[0][-1].legend(fontsize=7, title="class (head to tail)", title_fontsize=7, loc="lower right")
    fig.suptitle(f"{TITLES['pseudo_label_quality']}\n{trial.name}", fontsize=11)
    return [_save(fig, folder, "pseudo_label_quality")]


def pseudo_label_counts(client: Any, sweep: Sweep, names: list[str], folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    best = sweep.finished[0]
    count = len(names)
    if "pl/imbalance_ratio" not in best.metrics or count == 0:
        return []
    per_preset: dict[str, Trial] = {}
    for t in sweep.finished:  # ranked: the first of each preset is its best; labeled-only presets have none
        if "pl/imbalance_ratio" in t.metrics:
            per_preset.setdefault(t.preset, t)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for preset, t in per_preset.items():
        steps, values = _history(client, t.run_id, "pl/imbalance_ratio")
        left.plot(steps, values, marker="o", ms=3, label=f"{preset} ({t.name.split(' ')[0]})")
    left.set_yscale("log")
    left.set_xlabel("training step")
    left.set_ylabel("pseudo-label count of the most / least\npredicted class (log)")
    left.set_title("Imbalance ratio of the pseudo-labels, best trial per preset", fontsize=10)
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")
    colors = plt.cm.viridis(np.linspace(0, 0.95, count))
    width = max(2, len(str(count - 1)))
    for c in range(count):
        steps, values = _history(client, best.run_id, f"pl/count/c{c:0{width}d}")
        right.plot(steps, np.maximum(values, 0.5), color=colors[c], lw=1.2, label=names[c] if count <= 12 else None)
    right.set_yscale("log")
    right.set_xlabel("training step")
    right.set_ylabel("pseudo-labels per class in the window (log)")
    right.set_title(f"Per-class pseudo-label counts: {best.name}", fontsize=10)
    if count <= 12:
        right.legend(fontsize=7, ncol=2, title="class (head to tail)", title_fontsize=7)
    right.grid(alpha=0.3, which="both")
    fig.suptitle(TITLES["pseudo_label_counts"], fontsize=11)
    return [_save(fig, folder, "pseudo_label_counts")]


# ---- Optuna's plots -------------------------------------------------------------------------------------------


def rebuilt_study(client: Any, sweep: Sweep) -> Any:
    """An in-memory Optuna study with the sweep's ended trials, as Optuna would hold them: the searched values (a
    `log_one_minus` parameter under its searched name `1 - name`, on the searched scale), the objective(s) of the
    finished trials, the intermediate values of the pruned ones."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics = [m for m, _ in sweep.objectives]
    study = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for _, d in sweep.objectives])
    space = sweep.plan.get("space", {})
    for t in sorted(sweep.trials, key=lambda t: t.number):
        if t.outcome not in ("finished", "pruned"):
            continue
        params, dists = {}, {}
        for name, p in space.items():
            if name not in t.params or p["type"] == "fixed":
                continue
            value = t.params[name]
            if p["type"] == "categorical":
                dist = CategoricalDistribution(p["values"])
            elif p["type"] == "int":
                dist = IntDistribution(p["low"], p["high"], step=p.get("step", 1), log=p.get("log", False))
            elif p["type"] == "log_one_minus":
                name, value = f"1 - {name}", 1.0 - value
                dist = FloatDistribution(1.0 - p["high"], 1.0 - p["low"], log=True)
                value = min(max(value, dist.low), dist.high)  # 1 - (1 - x) rounds
            else:
                dist = FloatDistribution(p["low"], p["high"], log=p["type"] == "loguniform", step=p.get("step"))
            params[name], dists[name] = value, dist
        if t.outcome == "finished" and all(m in t.metrics for m in metrics):
            values = [t.metrics[m] for m in metrics]
            state = optuna.trial.TrialState.COMPLETE
        elif t.outcome == "pruned":
            values, state = None, optuna.trial.TrialState.PRUNED
        else:
            continue
        inter = {}
        if len(metrics) == 1:
            steps, vals = _history(client, t.run_id, metrics[0])
            inter = dict(zip(steps, vals, strict=True))
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dists, values=values, state=state, intermediate_values=inter
            )
        )
    return study


def optuna_figures(client: Any, sweep: Sweep, folder: Path) -> list[Path]:
    import optuna
    from optuna.visualization import matplotlib as ovm

    if not sweep.plan.get("space"):
        return []
    study = rebuilt_study(client, sweep)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    metric = sweep.objectives[0][0]
    multi = len(sweep.objectives) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": metric} if multi else {"target_name": metric}
    made = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        ax = ovm.plot_optimization_history(study, **target)
        fig = _retitled(ax, f"{TITLES['optimization_history']}: {metric} of the finished trials")
        made.append(_save(fig, folder, "optimization_history"))
        searched = {k for t in complete for k in t.params}
        if len(complete) >= 2 and searched:
            try:
                ax = ovm.plot_param_importances(study, **target)
            except (RuntimeError, ValueError):  # too few trials with distinct values to fit the importance model
                ax = None
            if ax is not None:
                title = f"{TITLES['param_importances']} for {metric} (fANOVA over {len(complete)} finished trials)"
                made.append(_save(_retitled(ax, title), folder, "param_importances"))
        if searched:
            ax = ovm.plot_parallel_coordinate(study, **target)
            title = f"{TITLES['parallel_coordinate']}, finished trials (colour and first axis: {metric})"
            made.append(_save(_retitled(ax, title), folder, "parallel_coordinate"))
            made += _html(optuna.visualization.plot_parallel_coordinate(study, **target), folder, "parallel_coordinate")
        if multi:
            names = [m for m, _ in sweep.objectives]
            ax = ovm.plot_pareto_front(study, target_names=names)
            made.append(_save(_retitled(ax, f"{TITLES['pareto_front']} ({', '.join(names)})"), folder, "pareto_front"))
            made += _html(optuna.visualization.plot_pareto_front(study, target_names=names), folder, "pareto_front")
    return made


def _retitled(ax: Any, title: str) -> Any:
    """The figure of one of Optuna's plots with `title` as its only title (Optuna titles its axes, some on the left)."""
    fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
    for axes in fig.axes:
        for loc in ("left", "center", "right"):
            axes.set_title("", loc=loc)
    fig.suptitle(title, fontsize=11)
    return fig


def _html(fig: Any, folder: Path, stem: str) -> list[Path]:
    fig.update_layout(title=TITLES[stem])
    path = folder / f"{stem}.html"
    fig.write_html(path, include_plotlyjs=True, full_html=True)  # self-contained: the UI may have no internet
    return [path]
