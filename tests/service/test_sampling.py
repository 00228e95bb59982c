"""Define-by-run sampling: conditional parameters, the log scale on 1 - x, readable names, the space hash."""

from __future__ import annotations

import math
import statistics

import optuna
import pytest

from service.plan import load_plan
from service.sampling import SAMPLERS, TrialSampler, format_value, run_name, sample_configs
from service.space import LogOneMinus
from trainables.config import RunConfig

from .conftest import SMALL


def draws(plan, n, sampler="random"):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial_sampler = TrialSampler(plan)
    return [trial_sampler.draw(study.ask()) for _ in range(n)]


def test_conditional_parameters_follow_the_preset(small_plan):
    seen = set()
    for values in draws(small_plan, 60):
        preset = values["method.preset"]
        seen.add(preset)
        assert ("method.drw.beta" in values) == (preset == "fixmatch_drw")
        assert ("method.daso.t_dist" in values) == (preset == "fixmatch_daso")
        assert "optim.lr" in values  # unconditional
    assert seen == {"fixmatch", "fixmatch_daso", "fixmatch_drw"}


def test_explicit_presets_restrict_a_parameter(write_space, tmp_path):
    text = SMALL.replace(
        "  optim.lr: {type: loguniform, low: 0.01, high: 0.1}",
        "  optim.lr: {type: loguniform, low: 0.01, high: 0.1, presets: [fixmatch]}",
    )
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    for values in draws(plan, 40):
        assert ("optim.lr" in values) == (values["method.preset"] == "fixmatch")


def test_log_one_minus_is_log_uniform_in_one_minus_x():
    """1 - beta in [1e-4, 1e-1]: log10(1 - beta) uniform on [-4, -1], so its median is -2.5 and a third of the
    draws fall in each decade; a uniform beta would put 90% of the draws in the top decade (1 - beta > 1e-2)."""
    param = LogOneMinus(type="log_one_minus", low=0.9, high=0.9999)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    betas = [param.suggest(study.ask(), "method.drw.beta") for _ in range(3000)]
    assert all(0.9 <= b <= 0.9999 for b in betas)
    logs = [math.log10(1 - b) for b in betas]
    assert statistics.median(logs) == pytest.approx(-2.5, abs=0.08)
    for lo in (-4, -3, -2):
        share = sum(lo <= x < lo + 1 for x in logs) / len(logs)
        assert share == pytest.approx(1 / 3, abs=0.04)


def test_optuna_sees_the_log_scale_under_its_own_name(small_plan):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampler = TrialSampler(small_plan)
    for _ in range(30):
        trial = study.ask()
        values = sampler.draw(trial)
        if "method.drw.beta" in values:
            assert trial.params["1 - method.drw.beta"] == pytest.approx(1 - values["method.drw.beta"])
            dist = trial.distributions["1 - method.drw.beta"]
            assert dist.log and dist.low == pytest.approx(1e-4) and dist.high == pytest.approx(0.1)
            return
    pytest.fail("no DRw trial in 30 draws")


def test_tune_config_is_a_valid_run_config_with_metadata(small_plan, tmp_path):
    sampler = TrialSampler(small_plan)
    values = {"method.preset": "fixmatch_drw", "optim.lr": 0.05, "method.drw.beta": 0.995}
    config = sampler.tune_config(values, optuna_number=4)
    meta = config.pop("service")
    run = RunConfig.model_validate(config)
    assert run.method.preset == "fixmatch_drw" and run.method.drw.beta == 0.995 and run.optim.lr == 0.05
    assert run.method.daso is None  # the block of another preset of the sweep is dropped
    assert run.name == meta["run_name"] == "t004 fixmatch_drw lr=0.05 beta=0.995"
    assert meta["params"] == values and meta["optuna_trial"] == 4
    assert run.data.root == str(tmp_path / "data")  # anchored at the launch directory


def test_same_seed_same_trials_other_seed_other_trials(small_plan, write_space, tmp_path):
    first = [c["service"]["params"] for c in sample_configs(small_plan, 4)]
    again = [c["service"]["params"] for c in sample_configs(small_plan, 4)]
    other = load_plan(write_space(SMALL + "  seed: 7\n", name="other.yaml"), launch_dir=tmp_path)
    assert first == again
    assert first != [c["service"]["params"] for c in sample_configs(other, 4)]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_builds_and_draws(sampler, write_space, tmp_path):
    text = SMALL.replace("  num_trials: 6\n", f"  sampler: {sampler}\n")
    if sampler == "grid":  # a grid needs discrete, unconditional parameters
        text = text.split("space:")[0] + (
            "space:\n  method.preset: {type: categorical, values: [fixmatch, fixmatch_la]}\n"
            "  optim.lr: {type: categorical, values: [0.01, 0.03]}\nsearch:\n  sampler: grid\n"
        )
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    configs = sample_configs(plan, 4)
    assert len({c["service"]["run_name"] for c in configs}) == 4


def test_run_names_are_short_and_unambiguous(small_plan):
    space = {**small_plan.spec.space}
    assert run_name(space, {"method.preset": "fixmatch", "optim.lr": 0.0123456}, 12) == "t012 fixmatch lr=0.01235"
    assert format_value(0.99532, LogOneMinus(type="log_one_minus", low=0.9, high=0.9999)) == "0.99532"
    assert format_value(0.999912, LogOneMinus(type="log_one_minus", low=0.9, high=0.99999)) == "0.999912"


def test_space_hash_tracks_the_question_not_the_budget(write_space, tmp_path):
    lr = "  optim.lr: {type: loguniform, low: 0.01, high: 0.1}\n"
    plan = load_plan(write_space(SMALL), launch_dir=tmp_path)
    more_trials = load_plan(write_space(SMALL.replace("num_trials: 6", "num_trials: 9"), "b.yaml"), launch_dir=tmp_path)
    daso = "  method.daso.t_dist: {type: uniform, low: 0.3, high: 2.0}\n"
    reordered_text = SMALL.replace(lr, "").replace(daso, daso + lr)  # the same parameters in another order
    reordered = load_plan(write_space(reordered_text, "c.yaml"), launch_dir=tmp_path)
    wider = load_plan(write_space(SMALL.replace("high: 0.1}", "high: 0.2}"), "d.yaml"), launch_dir=tmp_path)
    longer = load_plan(write_space(SMALL, "e.yaml"), sets=["base.train.iterations=80"], launch_dir=tmp_path)
    assert list(reordered.spec.space) != list(plan.spec.space)
    assert plan.space_hash == more_trials.space_hash == reordered.space_hash
    assert len({plan.space_hash, wider.space_hash, longer.space_hash}) == 3
    assert plan.sweep_name == f"small-{plan.space_hash[:8]}"


def test_one_parameter_can_set_several_fields(write_space, tmp_path):
    text = SMALL.split("space:")[0] + (
        "space:\n  seed: {type: categorical, values: [0, 1, 2], paths: [train.seed, data.seed]}\nsearch:\n"
        "  sampler: grid\n"
    )
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    configs = sample_configs(plan, 3)
    assert sorted((c["train"]["seed"], c["data"]["seed"]) for c in configs) == [(0, 0), (1, 1), (2, 2)]
    for c in configs:
        seed = c["service"]["params"]["seed"]
        assert c["train"]["seed"] == seed and c["service"]["run_name"].endswith(f"fixmatch seed={seed}")
