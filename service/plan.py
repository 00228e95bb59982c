"""A validated sweep plan: the space file, checked against the run configuration, with everything derived from it.

`load_plan` is the service's only parser: it reads the YAML, applies `--set` overrides, merges `base_file`, validates
the file (`service.space`) and then checks it against `trainables.config.RunConfig`: the base configuration for every
preset of the sweep, every parameter path, every parameter's extreme values, conditional parameters, grid and ASHA
constraints. Any problem raises `ConfigError` naming the file, the field, the value and what is valid, before Ray or
MLflow start.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from service.secrets import redact, redact_text
from service.space import Asha, Categorical, Fixed, SpaceFile, grid_size
from service.storage import Location
from trainables.config import (
    METHOD_BLOCKS,
    PRESETS,
    ConfigError,
    MethodConfig,
    RunConfig,
    deep_merge,
    format_validation_error,
    model_in,
    parse_overrides,
    preset_uses,
    read_yaml,
    validate,
)
from trainables.metrics import class_key, evaluation_keys

PRESET_PATH = "method.preset"
DEFAULT_NUM_TRIALS = 20
RESERVED = {"name": "each trial's name is set from its preset and sampled values"}  # fields a trial sets itself
PER_CLASS_VAL = re.compile(r"^val/(recall|precision)/c\d{2,}$")
ASHA_FIXED = ("train.iterations", "train.eval_every")  # ASHA's rungs count evaluations of the base cadence


@functools.cache
def block_presets() -> dict[str, frozenset[str]]:
    """Method blocks (`daso`, `drw`, `la`) -> presets that use them, as the run configuration itself decides."""
    return {block: frozenset(p for p in PRESETS if preset_uses(p, block)) for block in METHOD_BLOCKS}


def method_block(path: str) -> str | None:
    parts = path.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "method" and parts[1] in block_presets() else None


def trial_run_dict(base: dict[str, Any], values: dict[str, Any], preset: str) -> dict[str, Any]:
    """The raw run configuration of one trial: base, then the trial's values, then the preset's blocks only."""
    out = copy.deepcopy(base)
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    method = out.setdefault("method", {})
    method["preset"] = preset
    for block, presets in block_presets().items():
        if preset not in presets:
            method.pop(block, None)  # the base may carry blocks for the sweep's other presets
    return out


def anchor_paths(run: dict[str, Any], launch_dir: Path) -> dict[str, Any]:
    """A run configuration dict with its relative data paths made absolute at the launch directory (trials run in
    their own directories, possibly on other nodes)."""
    data = run["data"]
    data["root"] = str((launch_dir / data["root"]).resolve())
    if data.get("imagefolder"):
        data["imagefolder"]["root"] = str((launch_dir / data["imagefolder"]["root"]).resolve())
    return run


@dataclass(frozen=True)
class Plan:
    spec: SpaceFile
    source: Path  # the space file
    launch_dir: Path  # relative paths (storage, sqlite, data root) resolve against it
    base: dict[str, Any]  # base_file merged with base and the --set overrides, not yet validated per preset

    @property
    def presets(self) -> tuple[str, ...]:
        param = self.spec.space.get(PRESET_PATH)
        if isinstance(param, Categorical):
            return tuple(param.values)
        if isinstance(param, Fixed):
            return (param.value,)
        return (self.base.get("method", {}).get("preset", MethodConfig.model_fields["preset"].default),)

    def targets(self, name: str) -> list[str]:
        """The run configuration fields parameter `name` writes."""
        return list(self.spec.space[name].paths or [name])

    def block(self, name: str) -> str | None:
        """The method block (daso, drw, la) of the parameter's fields, if any (`check` makes it unique)."""
        blocks = {method_block(t) for t in self.targets(name)} - {None}
        return min(blocks) if blocks else None

    def applicable(self, name: str) -> tuple[str, ...]:
        """Presets of the sweep for which parameter `name` is sampled (or set, when fixed)."""
        param = self.spec.space[name]
        block = self.block(name)
        presets = [p for p in self.presets if block is None or p in block_presets()[block]]
        return tuple(p for p in presets if param.presets is None or p in param.presets)

    @property
    def space_hash(self) -> str:
        """Identity of the question the sweep asks: base configuration, space and objectives (not its budget)."""
        ident = {
            "base": self.base,
            "space": {k: v.model_dump(mode="json") for k, v in sorted(self.spec.space.items())},
            "objectives": self.spec.search.objectives,
        }
        if self.spec.search.enqueue:  # trials given one by one are part of the question
            ident["enqueue"] = self.spec.search.enqueue
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def sweep_name(self) -> str:
        return f"{self.spec.experiment}-{self.space_hash[:8]}"

    @property
    def num_trials(self) -> int:
        if self.spec.search.num_trials is not None:
            return self.spec.search.num_trials
        return grid_size(self.spec.space) if self.spec.search.sampler == "grid" else DEFAULT_NUM_TRIALS

    @property
    def storage(self) -> Location:
        """Where sweeps live: `storage.path` as an absolute local path (relative to the launch dir) or a URI."""
        path = self.spec.storage.path
        if "://" in path:
            return Location(path.rstrip("/"), self.spec.storage.endpoint_url)
        return Location(str((self.launch_dir / Path(path).expanduser()).resolve()))

    @property
    def sweep_location(self) -> Location:
        return self.storage / self.sweep_name

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI, credentials included: open connections with it, never write it down."""
        uri = self.spec.tracking.uri or "sqlite:///mlflow.db"
        return _absolute_sqlite(uri, self.launch_dir)

    @property
    def optuna_storage(self) -> str | None:
        """The Optuna storage URL, credentials included: open connections with it, never write it down."""
        uri = self.spec.storage.optuna
        return None if uri is None else _absolute_sqlite(uri, self.launch_dir)

    @property
    def mlflow_experiment(self) -> str:
        return self.spec.tracking.experiment or self.spec.experiment

    def evaluations(self, run: RunConfig) -> int:
        return math.ceil(run.train.iterations / run.train.eval_every)

    def base_config(self, preset: str | None = None) -> RunConfig:
        return RunConfig.model_validate(trial_run_dict(self.base, {}, preset or self.presets[0]))

    def frozen_fields(self) -> dict[str, Any]:
        """What a resumed sweep keeps from its start (Tuner.restore reloads it): compared on --resume.

        Store URLs appear redacted: this goes into the plan file and the parent run's artifacts.
        """
        dump = self.spec.model_dump(mode="json", exclude={"description", "base", "base_file"})
        dump["base"] = self.base
        dump["search"]["num_trials"] = self.num_trials
        dump["tracking"]["uri"] = redact(self.tracking_uri)
        dump["storage"]["optuna"] = redact(self.optuna_storage)
        dump["storage"]["path"] = self.storage.uri
        return dump


def load_plan(
    path: str | Path,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    launch_dir: Path | None = None,
) -> Plan:
    """Parse and check a space file; `sets` are `--set path=value` strings, `overrides` the other CLI flags."""
    source = Path(path)
    raw = deep_merge(deep_merge(read_yaml(source), parse_overrides(sets or [])), overrides or {})
    try:
        spec: SpaceFile = validate(SpaceFile, raw, source=str(source))
    except ConfigError as err:  # a rejected store URL is quoted in the message: without its password
        raise ConfigError(redact_text(str(err))) from None
    base = spec.base
    if spec.base_file is not None:
        base_path = source.parent / spec.base_file
        base = deep_merge(read_yaml(base_path), base)
    plan = Plan(spec=spec, source=source, launch_dir=(launch_dir or Path.cwd()).resolve(), base=base)
    problems = check(plan)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))
    return plan


def check(plan: Plan) -> list[str]:
    """Every problem of the plan against the run configuration, one readable line (or block) each."""
    spec = plan.spec
    problems = _check_presets(plan)
    if problems:
        return problems  # the other checks enumerate presets
    for preset in plan.presets:
        try:
            validate(RunConfig, trial_run_dict(plan.base, {}, preset), source=f"base (with preset {preset})")
        except ConfigError as err:
            problems.append(str(err).replace("\n", "\n  "))
    if problems:
        return problems  # parameters and the scheduler are checked against a valid base
    used_blocks = {b for b, presets in block_presets().items() if set(presets) & set(plan.presets)}
    # blocks the space file itself sets; a base_file (a run configuration shared with other sweeps and the grid)
    # may carry blocks for presets this sweep leaves out
    for block in sorted(set(plan.spec.base.get("method", {})) & set(block_presets()) - used_blocks):
        owners = ", ".join(sorted(block_presets()[block]))
        presets = ", ".join(plan.presets)
        problems.append(f"base.method.{block}: no preset of this sweep ({presets}) uses it; presets that do: {owners}")
    for name in spec.space:
        if name != PRESET_PATH:
            problems += _check_param(plan, name)
    problems += _check_search(plan)
    problems += _check_objectives(plan)
    gpu, device = spec.resources.gpu, plan.base.get("train", {}).get("device", "auto")
    if gpu == 0 and device == "cuda":
        problems.append("resources.gpu: 0 but base.train.device is 'cuda'; give trials a GPU (e.g. gpu: 0.5)")
    if gpu > 0 and device == "cpu":
        problems.append(f"resources.gpu: {gpu} but base.train.device is 'cpu'; use device auto or cuda, or gpu: 0")
    return problems


def _check_presets(plan: Plan) -> list[str]:
    param = plan.spec.space.get(PRESET_PATH)
    valid = ", ".join(PRESETS)
    if param is not None and not isinstance(param, Categorical | Fixed):
        return [f"space.{PRESET_PATH}: a {param.type} parameter; presets are searched as categorical or fixed"]
    if param is not None and param.presets is not None:
        return [f"space.{PRESET_PATH}.presets: the preset parameter cannot itself depend on the preset"]
    if param is not None and param.paths is not None:
        return [f"space.{PRESET_PATH}.paths: the preset parameter sets method.preset only"]
    bad = [p for p in plan.presets if p not in PRESETS]
    return [f"space.{PRESET_PATH}: unknown preset {p!r}; valid presets: {valid}" for p in bad]


def _check_param(plan: Plan, name: str) -> list[str]:
    param = plan.spec.space[name]
    where = f"space.{name}"
    targets = plan.targets(name)
    for target in targets:
        if target in RESERVED:
            return [f"{where}: {target} cannot be searched: {RESERVED[target]}"]
        if target == PRESET_PATH:
            return [f"{where}: the preset is searched as the {PRESET_PATH} parameter itself"]
        problem = _field_problem(target)
        if problem:
            return [f"{where}{'.paths' if param.paths else ''}: {problem}"]
    others = [o for o in plan.spec.space if o != name and set(plan.targets(o)) & set(targets)]
    if others:
        return [f"{where}: sets {sorted(set(plan.targets(others[0])) & set(targets))} like space.{others[0]}"]
    if len({method_block(t) for t in targets}) > 1:
        return [f"{where}.paths: {targets} span several method blocks; one parameter belongs to at most one"]
    block = plan.block(name)
    if param.presets is not None:
        outside = [p for p in param.presets if p not in plan.presets]
        if outside:
            return [f"{where}.presets: {outside} are not presets of this sweep ({', '.join(plan.presets)})"]
        if block is not None:
            wrong = [p for p in param.presets if p not in block_presets()[block]]
            if wrong:
                owners = ", ".join(sorted(block_presets()[block]))
                return [f"{where}.presets: {wrong} have no {block} block; presets that do: {owners}"]
    applicable = plan.applicable(name)
    if not applicable:
        owners = ", ".join(sorted(block_presets()[block])) if block else "none"
        return [
            f"{where}: applies to no trial: the sweep's presets ({', '.join(plan.presets)}) have no {block} "
            f"block; presets that do: {owners}"
        ]
    problems = []
    for preset in applicable:
        for value in param.checked_values():
            try:
                RunConfig.model_validate(trial_run_dict(plan.base, dict.fromkeys(targets, value), preset))
            except ValidationError as err:
                lines = format_validation_error(err, RunConfig, source="").splitlines()[1:]
                detail = "; ".join(line.strip() for line in lines)
                problems.append(f"{where}: value {value!r} (preset {preset}) gives an invalid trial: {detail}")
                break
    return problems


def _check_search(plan: Plan) -> list[str]:
    spec, search = plan.spec, plan.spec.search
    problems = []
    if search.sampler == "grid":
        for name, param in spec.searched.items():
            if param.grid_values() is None:
                problems.append(
                    f"space.{name}: the grid sampler needs discrete values (categorical or int), got {param.type}"
                )
            elif name != PRESET_PATH and set(plan.applicable(name)) != set(plan.presets):
                problems.append(
                    f"space.{name}: the grid sampler needs every parameter in every trial; this one applies only "
                    f"to {', '.join(plan.applicable(name))} (use sampler tpe or random for conditional spaces)"
                )
        if not problems and search.num_trials is not None and search.num_trials > grid_size(spec.space):
            problems.append(
                f"search.num_trials: {search.num_trials} exceeds the grid's {grid_size(spec.space)} points "
                "(leave it out to run the whole grid once)"
            )
    if isinstance(search.scheduler, Asha):
        for name in spec.searched:
            for target in set(plan.targets(name)) & set(ASHA_FIXED):
                problems.append(f"space.{name}: {target} cannot be searched with ASHA, whose rungs count evaluations")
        runs = [plan.base_config(p) for p in plan.presets] if not problems else []
        evaluations = min((plan.evaluations(r) for r in runs), default=0)
        if runs and search.scheduler.grace_period >= evaluations:
            problems.append(
                f"search.scheduler.grace_period: {search.scheduler.grace_period} evaluations, but a trial has only "
                f"{evaluations} (iterations / eval_every); ASHA could never stop a trial"
            )
    return problems


def _check_objectives(plan: Plan) -> list[str]:
    """Objective names against the metrics contract: a name no trial reports would end the sweep at its first
    evaluation. Per-class names are checked against the data set's classes where those are known. (ASHA's
    `scheduler.metric` is one of the objectives: the space file checks that.)"""
    problems: list[str] = []
    for name, _ in plan.spec.search.objectives:
        for preset in plan.presets:
            classes = plan.base_config(preset).data.num_classes
            valid = evaluation_keys("val", classes or 1)
            if name in valid or (classes is None and PER_CLASS_VAL.match(name)):
                continue
            summary = sorted(k for k in valid if not PER_CLASS_VAL.match(k))
            if PER_CLASS_VAL.match(name):  # a class key: the same class, padded as the keys are, if it exists
                family, number = name.rsplit("/c", 1)
                close = [f"{family}/{class_key(int(number), classes)}"] if classes and int(number) < classes else []
            else:
                close = _close_names(name, summary)
            last = class_key(classes - 1, classes) if classes else "cNN"
            problems.append(
                f"search.metric: {name!r} is not a metric the trials report"
                + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                + f" Validation metrics: {', '.join(summary)}, val/recall/c00..{last}, val/precision/c00..{last}"
            )
            break
    return problems


def _close_names(name: str, candidates: list[str]) -> list[str]:
    """Up to three candidates closest to `name`, words in any order (val/tail_recall ~ val/recall_tail)."""

    def words(key: str) -> str:
        return " ".join(sorted(re.split(r"[/_]", key)))

    by_words = {words(c): c for c in candidates}
    return [by_words[w] for w in difflib.get_close_matches(words(name), list(by_words), n=3, cutoff=0.6)]


def _field_problem(path: str) -> str | None:
    """Why `path` does not name a value of the run configuration (None when it does)."""
    model: type[BaseModel] = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the run configuration"
        if part not in model.model_fields:
            return f"no field {part!r} in {here}; valid fields there: {', '.join(sorted(model.model_fields))}"
        sub = model_in(model.model_fields[part].annotation)
        last = i == len(parts) - 1
        if last and sub is not None:
            return f"{path} is a section; search one of its fields: {', '.join(sorted(sub.model_fields))}"
        if not last:
            if sub is None:
                return f"{'.'.join(parts[: i + 1])} is a value, not a section"
            model = sub
    return None


def _absolute_sqlite(uri: str, launch_dir: Path) -> str:
    # sqlite:///relative.db is relative to whichever process opens it; pin it to the launch directory
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str((launch_dir / uri[len(prefix) :]).resolve())
    return uri
