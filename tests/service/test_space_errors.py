"""Invalid space files fail at load time with one message naming the file, the field, the value and what is valid."""

from __future__ import annotations

import pytest
import yaml

from service.plan import load_plan
from service.sampling import sample_configs
from trainables.config import ConfigError, deep_merge

BASE = """
experiment: bad
base:
  train: {iterations: 100, eval_every: 10, device: cpu}
  method: {preset: fixmatch_drw}
"""

# (id, file body after BASE, fragments the message must contain)
CASES = [
    (
        "unknown distribution type",
        "space:\n  method.drw.beta: {type: normal, low: 0.9, high: 0.99}",
        ["space.method.drw.beta", "'normal'", "'uniform'", "'log_one_minus'", "'categorical'"],
    ),
    (
        "misspelt distribution field",
        "space:\n  optim.lr: {type: loguniform, lo: 0.01, high: 0.1}",
        ["space.optim.lr", "'lo'", "valid fields: high, low, paths, presets, type"],
    ),
    (
        "low not below high",
        "space:\n  optim.lr: {type: uniform, low: 0.1, high: 0.01}",
        ["space.optim.lr", "low=0.1 must be below high=0.01"],
    ),
    (
        "loguniform from zero",
        "space:\n  optim.lr: {type: loguniform, low: 0.0, high: 0.1}",
        ["space.optim.lr", "greater than 0", "(got 0.0)"],
    ),
    (
        "log_one_minus outside (0, 1)",
        "space:\n  method.drw.beta: {type: log_one_minus, low: 0.9, high: 1.0}",
        ["space.method.drw.beta", "high", "less than 1", "(got 1.0)"],
    ),
    (
        "parameter path not in the run configuration",
        "space:\n  optim.learning_rate: {type: loguniform, low: 0.01, high: 0.1}",
        [
            "space.optim.learning_rate",
            "'learning_rate'",
            "valid fields there: cosine_fraction, gamma, lr, milestones, momentum",
        ],
    ),
    (
        "parameter names a section",
        "space:\n  method.drw: {type: fixed, value: 1}",
        ["space.method.drw", "is a section", "beta"],
    ),
    (
        "extreme value invalid for the run configuration",
        "space:\n  optim.momentum: {type: uniform, low: 0.5, high: 1.0}",
        ["space.optim.momentum", "value 1.0", "optim.momentum", "less than 1"],
    ),
    (
        "categorical value invalid for the run configuration",
        "space:\n  model.arch: {type: categorical, values: [wrn, vit]}",
        ["space.model.arch", "'vit'", "'wrn'", "'resnet18'"],
    ),
    (
        "method parameter no preset of the sweep has",
        "space:\n  method.daso.t_dist: {type: uniform, low: 0.3, high: 2.0}",
        [
            "space.method.daso.t_dist",
            "applies to no trial",
            "fixmatch_drw",
            "presets that do: fixmatch_abc_daso, fixmatch_daso,",
        ],
    ),
    (
        "conditional presets outside the sweep",
        "space:\n  method.drw.beta: {type: log_one_minus, low: 0.9, high: 0.99, presets: [fixmatch_la_drw]}",
        ["space.method.drw.beta.presets", "fixmatch_la_drw", "not presets of this sweep (fixmatch_drw)"],
    ),
    (
        "unknown preset",
        "space:\n  method.preset: {type: categorical, values: [fixmatch, fixmatch_dasso]}",
        ["space.method.preset", "'fixmatch_dasso'", "valid presets: fixmatch, fixmatch_la, fixmatch_daso"],
    ),
    (
        "preset searched as a number",
        "space:\n  method.preset: {type: uniform, low: 0, high: 1}",
        ["space.method.preset", "categorical or fixed"],
    ),
    (
        "searching the run name",
        "space:\n  name: {type: categorical, values: [a, b]}",
        ["space.name", "cannot be searched"],
    ),
    (
        "paths to a missing field",
        "space:\n  seed: {type: categorical, values: [0, 1], paths: [train.seed, data.sed]}",
        ["space.seed.paths", "'sed'", "valid fields there:", "seed"],
    ),
    (
        "two parameters setting one field",
        "space:\n  seed: {type: categorical, values: [0, 1], paths: [train.seed, data.seed]}\n"
        "  train.seed: {type: categorical, values: [2, 3]}",
        ["space.seed", "train.seed", "like space.train.seed"],
    ),
    (
        "paths across method blocks",
        "space:\n  t: {type: uniform, low: 0.1, high: 0.5, paths: [method.daso.t_proto, method.drw.beta]}\n"
        "base:\n  train: {iterations: 100, eval_every: 10}\n  method: {preset: fixmatch_daso_drw}",
        ["space.t.paths", "several method blocks"],
    ),
    (
        "bad parameter name",
        "space:\n  Optim-LR: {type: uniform, low: 0.01, high: 0.1}",
        ["space", "'Optim-LR'", "dotted path"],
    ),
    (
        "optimising on test",
        "search: {metric: test/balanced_acc}",
        ["search.metric", "never optimises on the test split", "'test/balanced_acc'", "'val/balanced_acc'"],
    ),
    (
        "metric outside the contract namespace",
        "search: {metric: balanced_acc}",
        ["search.metric", "not a validation metric", "val/balanced_acc"],
    ),
    (
        "metrics and modes of different lengths",
        "search: {metric: [val/balanced_acc, val/recall_tail], mode: [max, max, min]}",
        ["search", "2 metric(s)", "3 mode(s)"],
    ),
    (
        "bad mode",
        "search: {mode: maximize}",
        ["search.mode", "'max'", "'min'", "(got 'maximize')"],
    ),
    (
        "unknown sampler",
        "search: {sampler: cmaes}",
        ["search.sampler", "'tpe'", "'gp'", "'nsga2'", "'random'", "'grid'", "(got 'cmaes')"],
    ),
    (
        "unknown scheduler",
        "search: {scheduler: hyperband}",
        ["search.scheduler", "'hyperband'", "'none'", "'asha'"],
    ),
    (
        "ASHA that could never stop a trial",
        "search: {scheduler: {type: asha, grace_period: 10}}",
        ["search.scheduler.grace_period", "10 evaluations", "only 10"],
    ),
    (
        "ASHA with a searched evaluation cadence",
        "space:\n  train.eval_every: {type: categorical, values: [5, 10]}\nsearch: {scheduler: asha}",
        ["space.train.eval_every", "ASHA"],
    ),
    (
        "ASHA metric outside the objectives",
        "search: {metric: [val/balanced_acc, val/recall_tail], scheduler: {type: asha, metric: val/top1}}",
        ["search", "'val/top1'", "one of the objectives"],
    ),
    (
        "grid over a continuous parameter",
        "space:\n  optim.lr: {type: loguniform, low: 0.01, high: 0.1}\nsearch: {sampler: grid}",
        ["space.optim.lr", "grid sampler needs discrete values", "loguniform"],
    ),
    (
        "grid over a conditional parameter",
        "space:\n  method.preset: {type: categorical, values: [fixmatch, fixmatch_drw]}\n"
        "  method.drw.beta: {type: categorical, values: [0.99, 0.999]}\nsearch: {sampler: grid}",
        ["space.method.drw.beta", "every parameter in every trial", "fixmatch_drw"],
    ),
    (
        "more trials than grid points",
        "space:\n  train.seed: {type: categorical, values: [0, 1]}\nsearch: {sampler: grid, num_trials: 5}",
        ["search.num_trials", "5", "2 points"],
    ),
    (
        "zero trials",
        "search: {num_trials: 0}",
        ["search.num_trials", "greater than or equal to 1", "(got 0)"],
    ),
    (
        "fractional GPU above one",
        "resources: {gpu: 1.5}",
        ["resources.gpu", "fraction of one GPU", "(got 1.5)"],
    ),
    (
        "CUDA trials without a GPU",
        "resources: {gpu: 0}\nbase:\n  train: {device: cuda}\n  method: {preset: fixmatch_drw}",
        ["resources.gpu", "'cuda'"],
    ),
    (
        "MLflow file store",
        "tracking: {uri: ./mlruns}",
        ["tracking.uri", "file store", "sqlite:///mlflow.db", "(got './mlruns')"],
    ),
    (
        "unknown section",
        "searchspace: {}",
        ["searchspace", "Extra inputs are not permitted", "valid fields here:", "space", "search"],
    ),
    (
        "base field that does not exist",
        "base:\n  train: {iterations: 100, eval_every: 10, warmup: 5}\n  method: {preset: fixmatch_drw}",
        ["base (with preset fixmatch_drw)", "train.warmup", "valid fields here:", "eval_every"],
    ),
    (
        "base block that no preset of the sweep uses",
        "base:\n  train: {iterations: 100, eval_every: 10}\n  method: {preset: fixmatch_drw, daso: {warmup: 5}}",
        ["base.method.daso", "no preset of this sweep", "fixmatch_daso"],
    ),
    (
        "experiment name that cannot name a directory",
        "experiment: 'my sweep/1'",
        ["experiment", "should match pattern", "(got 'my sweep/1')"],
    ),
    (
        "objective no trial reports",
        "search: {metric: val/balanced_accuracy}",
        ["search.metric: 'val/balanced_accuracy' is not a metric the trials report", "mean 'val/balanced_acc'"],
    ),
    (
        "per-class objective beyond the data set's classes",
        "search: {metric: val/recall/c10}",
        ["search.metric", "'val/recall/c10'", "val/recall/c00..c09"],
    ),
    (
        "per-class objective of a 200-class data set written with two digits",
        "base:\n  data: {synthetic: {num_classes: 200}}\nsearch: {metric: val/recall/c07}",
        ["search.metric", "'val/recall/c07'", "val/recall/c00..c199", "did you mean 'val/recall/c007'"],
    ),
    (
        "ASHA ranking by a metric no trial reports",
        "search:\n  metric: [val/balanced_acc, val/tail_recall]\n  mode: [max, max]\n"
        "  scheduler: {type: asha, metric: val/tail_recall}",
        ["search.metric: 'val/tail_recall'", "did you mean 'val/recall_tail'"],
    ),
    (
        "float interval on an integer field",
        "space:\n  train.iterations: {type: uniform, low: 100, high: 200}",
        ["space.train.iterations", "value 138.19", "train.iterations", "fractional part"],
    ),
    (
        "integer range whose inner values are invalid",
        "base:\n  model: {depth: 10}\nspace:\n  model.depth: {type: int, low: 10, high: 28}",
        ["space.model.depth", "value 11", "(depth - 4) % 6 == 0"],
    ),
    (
        "negative sampler seed",
        "search: {seed: -1}",
        ["search.seed", "greater than or equal to 0", "(got -1)"],
    ),
    (
        "empty validation split",
        "base:\n  data: {val_size: 0}",
        ["data.val_size", "greater than or equal to 1"],
    ),
    (
        "labeled count range beyond the data set's pool",
        "base:\n  data: {dataset: cifar10}\nspace:\n  data.n1: {type: int, low: 500, high: 2500, step: 500}",
        ["space.data.n1", "value 2000", "val (500 per class) + n1 (2000) + m1 (3000) = 5500", "cifar10's train"],
    ),
    (
        "tracking store in memory",
        "tracking: {uri: 'sqlite:///:memory:'}",
        ["tracking.uri", "a database in memory"],
    ),
    (
        "Optuna study in memory",
        "storage: {optuna: 'sqlite://'}",
        ["storage.optuna", "a database in memory"],
    ),
    (
        "malformed tracking URI",
        "tracking: {uri: 'htp://127.0.0.1:5000'}",
        ["tracking.uri", "'htp://127.0.0.1:5000' is not a tracking URI", "http(s)://host:port"],
    ),
]


@pytest.mark.parametrize(("body", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_space_fails_with_a_precise_message(body, fragments, write_space, tmp_path):
    # the body overrides BASE's sections (a repeated key in one file is itself refused)
    path = write_space(yaml.safe_dump(deep_merge(yaml.safe_load(BASE), yaml.safe_load(body) or {})), "bad_space.yaml")
    with pytest.raises(ConfigError) as info:
        load_plan(path, launch_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # the file comes first
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_every_problem_is_reported_at_once(write_space, tmp_path):
    body = (
        "space:\n  optim.lrr: {type: uniform, low: 0.01, high: 0.1}\n"
        "  optim.momentum: {type: uniform, low: 0.5, high: 1.0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_plan(write_space(BASE + body), launch_dir=tmp_path)
    assert "2 problem(s)" in str(info.value)
    assert "optim.lrr" in str(info.value) and "optim.momentum" in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("experiment: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("", "experiment: Field required"),
    ],
)
def test_malformed_yaml(text, fragment, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_plan(path, launch_dir=tmp_path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        load_plan(tmp_path / "nope.yaml", launch_dir=tmp_path)


def test_base_file_is_merged_under_base(write_space, tmp_path):
    (tmp_path / "run.yaml").write_text("train: {iterations: 100, eval_every: 10, device: cpu}\nmodel: {depth: 10}\n")
    path = write_space("experiment: x\nbase_file: run.yaml\nbase:\n  model: {widen: 1}\n")
    plan = load_plan(path, launch_dir=tmp_path)
    base = plan.base_config()
    assert (base.train.iterations, base.model.depth, base.model.widen) == (100, 10, 1)


def test_base_file_blocks_of_other_presets_reach_only_their_presets(write_space, tmp_path):
    """A base file shared with the grid may hold every method's block; a sweep without DASO takes it as it is,
    and its trials get only their own preset's blocks."""
    (tmp_path / "run.yaml").write_text(
        "train: {iterations: 100, eval_every: 10, device: cpu}\n"
        "method: {preset: fixmatch_daso_drw, daso: {warmup: 5}, drw: {start: 50}}\n"
    )
    path = write_space(
        "experiment: x\nbase_file: run.yaml\nsearch: {sampler: grid}\nspace:\n"
        "  method.preset: {type: categorical, values: [fixmatch, fixmatch_drw]}\n"
    )
    plan = load_plan(path, launch_dir=tmp_path)
    assert plan.presets == ("fixmatch", "fixmatch_drw")
    configs = sample_configs(plan, 2)
    assert {c["method"]["preset"] for c in configs} == {"fixmatch", "fixmatch_drw"}
    for config in configs:
        assert "daso" not in config["method"] or config["method"]["daso"] is None
        if config["method"]["preset"] == "fixmatch_drw":
            assert config["method"]["drw"]["start"] == 50


def test_missing_base_file_is_reported(write_space, tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml: no such file"):
        load_plan(write_space("experiment: x\nbase_file: nothere.yaml\n"), launch_dir=tmp_path)


def test_set_overrides_are_validated_like_the_file(write_space, tmp_path):
    path = write_space(BASE)
    plan = load_plan(path, sets=["search.num_trials=7", "base.train.iterations=200"], launch_dir=tmp_path)
    assert plan.num_trials == 7 and plan.base_config().train.iterations == 200
    with pytest.raises(ConfigError, match="search.sampler"):
        load_plan(path, sets=["search.sampler=annealing"], launch_dir=tmp_path)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_plan(path, sets=["search.num_trials"], launch_dir=tmp_path)
