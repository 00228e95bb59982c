"""The report's statistics and its confirmation stage, on hand-computed values (no MLflow, no Ray)."""

from __future__ import annotations

import math

import pytest

from service import report
from service.leaderboard import runs_url, view_state
from service.plan import load_plan
from service.report import Confirmed, Sweep, Trial
from trainables.config import ConfigError

from .conftest import SMALL


def test_spearman_on_hand_ranked_values():
    # ranks (1, 2, 3, 4) vs (1, 3, 2, 4): d^2 = 0 + 1 + 1 + 0 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert report.spearman([0.1, 0.2, 0.3, 0.4], [0.5, 0.7, 0.6, 0.9]) == pytest.approx(0.8)
    assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: (1.5, 1.5, 3) vs (1, 2, 3) -> Pearson of the ranks = 0.8660
    assert report.spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(report.spearman([1, 2], [1, 2]))  # too few pairs
    assert math.isnan(report.spearman([1, 1, 1], [1, 2, 3]))  # a constant side


def test_interval_is_the_t_interval_of_the_mean():
    # mean 2, std 1 (n - 1), t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3) = 2.484138
    mean, std, lo, hi = report.interval([1.0, 2.0, 3.0])
    assert (mean, std) == (pytest.approx(2.0), pytest.approx(1.0))
    assert (lo, hi) == (pytest.approx(2 - 2.484138, abs=1e-6), pytest.approx(2 + 2.484138, abs=1e-6))
    assert math.isnan(report.interval([0.5])[2])


def confirmed(label: str, preset: str, values: dict[int, float]) -> Confirmed:
    return Confirmed(
        label, label, preset, {s: {"val/balanced_acc": v, "test/balanced_acc_last": v} for s, v in values.items()}
    )


def test_paired_comparison_says_whether_the_lead_survives():
    winner = confirmed("daso", "fixmatch_daso", {1: 0.60, 2: 0.62, 3: 0.64})
    close = confirmed("drw", "fixmatch_drw", {1: 0.61, 2: 0.60, 3: 0.65})
    far = confirmed("fixmatch", "fixmatch", {1: 0.50, 2: 0.53, 3: 0.54})
    # differences 0.10, 0.09, 0.10: mean 0.0967, std 0.00577, interval 0.0967 +- 0.0143 -> above 0
    line = report.paired_line(winner, far, "plain FixMatch", "val/balanced_acc", 1.0)
    assert "+0.0967" in line and "survives the noise" in line
    # differences -0.01, +0.02, -0.01: the interval holds 0
    assert "within the noise" in report.paired_line(winner, close, "the runner-up", "val/balanced_acc", 1.0)
    # lower is better (sign -1): the same +0.0967 is a loss beyond the noise
    assert "is better beyond the noise" in report.paired_line(winner, far, "plain FixMatch", "val/balanced_acc", -1.0)
    # only the seeds both ran are paired
    lone = confirmed("lone", "fixmatch", {9: 0.1})
    assert "0 shared seed(s)" in report.paired_line(winner, lone, "plain FixMatch", "val/balanced_acc", 1.0)


def test_confirmation_tables_pick_the_winner_by_its_mean():
    items = [
        confirmed("fixmatch", "fixmatch", {1: 0.50, 2: 0.53, 3: 0.54}),
        confirmed("daso", "fixmatch_daso", {1: 0.60, 2: 0.62, 3: 0.64}),
        confirmed("drw", "fixmatch_drw", {1: 0.61, 2: 0.60, 3: 0.65}),
    ]
    (header, rows), lines, winner = report.confirmation_tables(items, "val/balanced_acc", "max")
    assert winner.label == "daso" and [r[0] for r in rows] == ["daso", "drw", "fixmatch"]
    assert rows[0][2] == "0.6200" and rows[0][3] == "0.0200"  # mean and std of 0.60, 0.62, 0.64
    assert sum("the runner-up (drw)" in line for line in lines) == 2  # on the objective and on test bACC
    assert sum("plain FixMatch (fixmatch)" in line for line in lines) == 2


def test_rung_steps_follow_asha_milestones():
    plan = {"search": {"scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}}}
    plan["base"] = {"train": {"iterations": 1200, "eval_every": 150}}  # 8 evaluations: rungs at 2 and 4
    assert report.rung_steps(plan) == [300, 600]
    plan["search"]["scheduler"] = {"type": "none"}
    assert report.rung_steps(plan) == []


def trial(number: int, preset: str, outcome: str, value: float, **params) -> Trial:
    return Trial(
        run_id=f"r{number}",
        name=f"t{number:03d} {preset}",
        number=number,
        outcome=outcome,
        preset=preset,
        params={"method.preset": preset, **params},
        metrics={"val/balanced_acc": value},
        last_step=60,
    )


@pytest.fixture
def sweep(small_plan) -> Sweep:
    trials = [
        trial(0, "fixmatch_drw", "finished", 0.7, **{"optim.lr": 0.05, "method.drw.beta": 0.999}),
        trial(1, "fixmatch_daso", "finished", 0.6, **{"optim.lr": 0.02, "method.daso.t_dist": 1.5}),
        trial(2, "fixmatch_drw", "finished", 0.5, **{"optim.lr": 0.03, "method.drw.beta": 0.99}),
        trial(3, "fixmatch", "pruned", 0.4, **{"optim.lr": 0.08}),
    ]
    return Sweep("parent", "small-abc", "1", [("val/balanced_acc", "max")], small_plan.frozen_fields(), {}, trials)


def test_confirmation_space_reruns_the_top_k_and_plain_fixmatch(sweep, tmp_path):
    space = report.confirmation_space(sweep, k=2, seeds=3, storage=None)
    enqueued = space["search"]["enqueue"]
    # two configurations plus the best FixMatch trial (pruned, but the only plain baseline), three fresh seeds each
    assert space["search"]["num_trials"] == len(enqueued) == 3 * 3
    assert {e["train.seed"] for e in enqueued} == {1, 2, 3}  # seed 0 is the search's own
    assert [e["method.preset"] for e in enqueued[::3]] == ["fixmatch_drw", "fixmatch_daso", "fixmatch"]
    assert enqueued[0] == {"method.preset": "fixmatch_drw", "optim.lr": 0.05, "method.drw.beta": 0.999, "train.seed": 1}
    assert space["space"]["optim.lr"] == {"type": "categorical", "values": [0.05, 0.02, 0.08]}
    assert space["search"]["sampler"] == "random" and "scheduler" not in space["search"]  # nothing is pruned
    assert "uri" not in space["tracking"]  # given on the command line: a password never lands in the file
    assert space["tracking"]["tags"] == {
        "ltssl.stage": "confirmation",
        "ltssl.confirms": "parent",
        "ltssl.confirms_sweep": "small-abc",
    }
    # the stage is a valid space file, and its trials are the enqueued ones
    import yaml

    path = tmp_path / "confirm.yaml"
    path.write_text(yaml.safe_dump(space))
    plan = load_plan(path, launch_dir=tmp_path)
    from service.sampling import sample_configs

    configs = sample_configs(plan, 9)
    drawn = [(c["method"]["preset"], c["optim"]["lr"], c["train"]["seed"]) for c in configs]
    assert drawn == [(e["method.preset"], e["optim.lr"], e["train.seed"]) for e in enqueued]
    assert configs[0]["method"]["drw"]["beta"] == 0.999  # exactly the value, not 1 - (1 - value)


def test_confirmation_needs_a_finished_trial(sweep):
    for t in sweep.trials:
        t.outcome = "pruned"
    with pytest.raises(ConfigError, match="no finished trial"):
        report.confirmation_space(sweep, k=2, seeds=2, storage=None)


def test_enqueued_trials_are_checked_against_the_space(write_space, tmp_path):
    def base(trial: str) -> str:
        return SMALL.replace("  num_trials: 6\n", f"  num_trials: 6\n  enqueue: [{{{trial}}}]\n")

    with pytest.raises(ConfigError, match=r"search.enqueue\[0\].optim.lr: 0.5 is not a number in \[0.01, 0.1\]"):
        load_plan(write_space(base("optim.lr: 0.5")), launch_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"search.enqueue\[0\]: 'train.seed' not in the space"):
        load_plan(write_space(base("train.seed: 1")), launch_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"'fixmatch_la' is not one of"):
        load_plan(write_space(base("method.preset: fixmatch_la")), launch_dir=tmp_path)
    plan = load_plan(write_space(base("method.preset: fixmatch_drw, method.drw.beta: 0.995")), launch_dir=tmp_path)
    params = plan.spec.optuna_params(plan.spec.search.enqueue[0])
    assert params == {"method.preset": "fixmatch_drw", "1 - method.drw.beta": pytest.approx(0.005)}


def test_the_sweep_view_ranks_its_trials():
    state = view_state("qs-1234", ["method.preset", "optim.lr"], [("val/recall_min", "max"), ("val/top1", "min")])
    assert state["searchFilter"] == "tags.`ltssl.sweep` = 'qs-1234' AND tags.`ltssl.role` = 'trial'"
    assert state["orderByKey"] == "metrics.`val/recall_min`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:3] == [
        "tags.`ltssl.outcome`",
        "params.`method.preset`",
        "params.`sampled/optim.lr`",
    ]
    assert state["selectedColumns"][3:6] == [
        "metrics.`val/recall_min`",
        "metrics.`val/top1`",
        "metrics.`val/balanced_acc`",
    ]
    url = runs_url("http://h:5000/", "7", view="qs-1234")
    assert url == "http://h:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=qs-1234"


class Histories:
    """What the figures read of MLflow, for trials whose runs exist only here: metric histories by run and key."""

    def __init__(self, values: dict[str, dict[str, list[tuple[int, float]]]]):
        self.values = values

    def get_metric_history(self, run_id: str, key: str) -> list:
        from types import SimpleNamespace

        return [SimpleNamespace(step=s, value=v) for s, v in self.values.get(run_id, {}).get(key, [])]


def test_a_multi_objective_sweep_gets_its_pareto_front(sweep, tmp_path):
    from PIL import Image

    from service.figures import TITLES, optuna_figures

    sweep.objectives = [("val/balanced_acc", "max"), ("val/recall_min", "max")]
    for t, tail in zip(sweep.trials, (0.1, 0.3, 0.2, 0.0), strict=True):
        t.metrics["val/recall_min"] = tail
    made = {p.name for p in optuna_figures(Histories({}), sweep, tmp_path)}
    assert {"pareto_front.png", "pareto_front.html", "optimization_history.png", "parallel_coordinate.png"} <= made
    with Image.open(tmp_path / "pareto_front.png") as image:
        assert image.text["Title"] == TITLES["pareto_front"]
    # the study the plots come from: finished trials with both values, the pruned one without
    from service.figures import rebuilt_study

    study = rebuilt_study(Histories({}), sweep)
    assert [t.values for t in study.trials if t.values] == [[0.7, 0.1], [0.6, 0.3], [0.5, 0.2]]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert study.trials[0].params == {
        "method.preset": "fixmatch_drw",
        "optim.lr": 0.05,
        "1 - method.drw.beta": pytest.approx(0.001),
    }
