"""From an Optuna trial to a trial configuration: define-by-run sampling, samplers by name, readable names.

The preset is drawn first, so a parameter under `method.daso` is only drawn for presets with a DASO block (Optuna's
define-by-run handles such conditional spaces). The resulting Tune config is the trial's resolved `RunConfig` as a
plain dict plus one `service` entry of metadata (sampled values, Optuna trial number, run name).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna

from service.plan import PRESET_PATH, Plan, anchor_paths, trial_run_dict
from service.space import Fixed, LogOneMinus, SamplerName
from trainables.config import RunConfig
from trainables.ray_trainable import SERVICE_KEY

OPTUNA_NUMBER = "__optuna_trial__"  # travels from the define-by-run function to SweepSearch.suggest

SAMPLERS: dict[SamplerName, Callable[[Plan], optuna.samplers.BaseSampler]] = {
    # constant_liar: trials running in parallel count as bad guesses, so TPE does not propose the same point twice
    "tpe": lambda plan: optuna.samplers.TPESampler(seed=plan.spec.search.seed, constant_liar=True),
    "gp": lambda plan: optuna.samplers.GPSampler(seed=plan.spec.search.seed),
    "nsga2": lambda plan: optuna.samplers.NSGAIISampler(seed=plan.spec.search.seed),
    "random": lambda plan: optuna.samplers.RandomSampler(seed=plan.spec.search.seed),
    "grid": lambda plan: optuna.samplers.GridSampler(
        {name: p.grid_values() for name, p in plan.spec.searched.items()}, seed=plan.spec.search.seed
    ),
}


class TrialSampler:
    """The define-by-run function: draws one trial's values from an Optuna trial. Picklable (Tune saves it)."""

    def __init__(self, plan: Plan):
        self.space = dict(plan.spec.space)
        self.applicable = {name: set(plan.applicable(name)) for name in self.space if name != PRESET_PATH}
        self.targets = {name: plan.targets(name) for name in self.space if name != PRESET_PATH}
        self.base_preset = plan.presets[0]
        self.base = plan.base
        self.launch_dir = plan.launch_dir

    def __call__(self, trial: Any) -> dict[str, Any]:
        values = self.draw(trial)
        return {**values, OPTUNA_NUMBER: trial.number}

    def draw(self, trial: Any) -> dict[str, Any]:
        """{parameter name: value} for the trial's preset, `fixed` parameters included."""
        preset_param = self.space.get(PRESET_PATH)
        preset = preset_param.suggest(trial, PRESET_PATH) if preset_param is not None else self.base_preset
        values = {PRESET_PATH: preset}
        for name, param in self.space.items():
            if name != PRESET_PATH and preset in self.applicable[name]:
                values[name] = param.suggest(trial, name)
        return values

    def tune_config(self, values: dict[str, Any], optuna_number: int) -> dict[str, Any]:
        """The Tune config of a trial: its resolved RunConfig as a dict, plus the `service` metadata entry."""
        name = run_name(self.space, values, optuna_number)
        fields = {path: v for k, v in values.items() if k != PRESET_PATH for path in self.targets[k]}
        raw = trial_run_dict(self.base, fields, values[PRESET_PATH])
        run = anchor_paths(RunConfig.model_validate({**raw, "name": name}).model_dump(mode="json"), self.launch_dir)
        sampled = {k: v for k, v in values.items() if k in self.space and not isinstance(self.space[k], Fixed)}
        return {**run, SERVICE_KEY: {"params": sampled, "optuna_trial": optuna_number, "run_name": name}}


def run_name(space: dict[str, Any], values: dict[str, Any], optuna_number: int) -> str:
    """`t003 fixmatch_daso_drw beta=0.99532 t_dist=1.21`: the preset and the sampled values, in space order."""
    shown = [k for k in space if k in values and k != PRESET_PATH and not isinstance(space[k], Fixed)]
    leaves = [k.rsplit(".", 1)[-1] for k in shown]
    labels = [leaf if leaves.count(leaf) == 1 else path for leaf, path in zip(leaves, shown, strict=True)]
    parts = [f"t{optuna_number:03d}", str(values[PRESET_PATH])]
    parts += [f"{label}={format_value(values[k], space[k])}" for label, k in zip(labels, shown, strict=True)]
    return " ".join(parts)


def format_value(value: Any, param: Any) -> str:
    if isinstance(value, float):
        if isinstance(param, LogOneMinus) and value < 1:
            # three significant digits of 1 - x, the searched scale: 0.99532, not 0.9953
            decimals = math.floor(-math.log10(1.0 - value)) + 3
            return f"{value:.{decimals}f}".rstrip("0")
        return f"{value:.4g}"
    return str(value)


def sample_configs(plan: Plan, n: int) -> list[dict[str, Any]]:
    """`n` trial configs from the plan's own sampler on a throwaway in-memory study (for --dry-run)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics, modes = plan.spec.search.objectives_lists()
    study = optuna.create_study(
        sampler=SAMPLERS[plan.spec.search.sampler](plan),
        directions=["maximize" if m == "max" else "minimize" for m in modes],
    )
    for trial in plan.spec.search.enqueue:
        study.enqueue_trial(plan.spec.optuna_params(trial))
    sampler = TrialSampler(plan)
    out = []
    for _ in range(n):
        # left running, never told: the grid sampler then skips their points, and nothing has a value to learn from
        trial = study.ask()
        out.append(sampler.tune_config(sampler.draw(trial), trial.number))
    return out
