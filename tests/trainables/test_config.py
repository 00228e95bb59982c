"""The run configuration: defaults, presets, and errors that name the field, the value and what is valid."""

import pytest

from trainables.config import PRESETS, ConfigError, RunConfig, load_config, parse_overrides, read_yaml


def test_defaults_follow_the_papers():
    cfg = RunConfig()
    assert (cfg.train.batch_size, cfg.train.mu, cfg.train.tau, cfg.train.ema_decay) == (64, 2, 0.95, 0.999)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.03, 0.9, True, 5e-4)
    assert (cfg.model.depth, cfg.model.widen, cfg.model.bn_momentum) == (28, 2, 0.001)


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception, match="frozen"):
        cfg.train.iterations = 3  # type: ignore[misc]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_gets_exactly_its_blocks(preset):
    m = load_config(None, [f"method.preset={preset}"]).method
    pseudo, labeled, unlabeled, extension = PRESETS[preset]
    assert (m.daso is not None) == (pseudo == "daso")
    assert (m.la is not None) == (labeled == "logit_adjustment")
    assert (m.drw is not None) == (labeled == "class_balanced" or unlabeled == "drw")
    assert (m.darp is not None) == (extension == "darp")
    assert (m.abc is not None) == (extension == "abc")
    assert (m.crest is not None) == (extension == "crest")
    assert (m.acr is not None) == (extension == "acr")
    assert (m.da is not None) == (pseudo == "dist_align")


def test_darp_target_is_checked_against_the_classes():
    with pytest.raises(ConfigError, match="lists 3 shares; the data set has 10 classes"):
        load_config(None, ["method.preset=fixmatch_darp", "method.darp.target=[1, 2, 3]"])
    with pytest.raises(ConfigError, match="non-negative share per class"):
        load_config(None, ["method.preset=fixmatch_darp", "method.darp.target=[0, 0]"])
    with pytest.raises(ConfigError, match="'darp' parameters do not belong to preset 'fixmatch_abc'"):
        load_config(None, ["method.preset=fixmatch_abc", "method.darp.alpha=3"])


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["a.b=3", "a.c=0.5", "d=reversed", "e=true"]) == {
        "a": {"b": 3, "c": 0.5},
        "d": "reversed",
        "e": True,
    }


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["method.preset=fixmatch_dsao"], ["method.preset", "'fixmatch_daso'", "got 'fixmatch_dsao'"]),
        (["data.gama_l=3"], ["data.gama_l", "valid fields here", "gamma_l"]),
        (["train.tau=1.5"], ["train.tau", "less than or equal to 1", "got 1.5"]),
        (["data.gamma_u=0.01"], ["gamma_u=0.01", "'reversed'"]),
        (["method.daso.t_dist=0.3"], ["'daso' parameters do not belong to preset 'fixmatch'", "fixmatch_daso"]),
        (["model.depth=27"], ["(depth - 4) % 6 == 0"]),
        (["data.dataset=cifar11"], ["data.dataset", "'cifar10'", "'imagefolder'"]),
        (["method.preset=fixmatch_drw", "method.drw.beta=1.0"], ["method.drw.beta", "less than 1"]),
        (["method.preset=fixmatch_drw", "method.drw.start=1.5"], ["method.drw.start", "fraction of train.iterations"]),
        (["method.preset=fixmatch_drw", "method.drw.window=0"], ["method.drw.window", "or be 'auto'"]),
        (["method.preset=fixmatch_daso", "method.daso.ema_bn=running"], ["method.daso.ema_bn", "'batch'", "'eval'"]),
        (["optim.weight_decay_on=bias"], ["optim.weight_decay_on", "'weights'", "'all'"]),
        (["data.augment.crop_pad=-2"], ["crop_pad=-2", "'auto'"]),
        (["data.synthetic.faint_fill=2"], ["data.synthetic.faint_fill", "less than or equal to 1"]),
    ],
)
def test_bad_values_name_field_value_and_choices(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for fragment in expected:
        assert fragment in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_error_names_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  iterations: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(f) in str(err.value) and "train.iterations" in str(err.value)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)  # 10^9 leaves once expanded (the service's CLI test reuses it)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"train: {iterations: 10}\ntrain: {iterations: 20}\n", "duplicate key 'train' (first on line 1)"),
        (b"train: {iterations: 10, iterations: 20}\n", "duplicate key 'iterations'"),
        (b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 9)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text (byte 0x89 at offset 0)"),
        (BOMB.encode(), "expands to more than 100,000 YAML nodes through its aliases"),
        (b"a: &a\n  b: *a\n", "an alias refers to a node that contains it"),
        (b"train: {iterations: 10\n", "not valid YAML"),
        (b"x: " + b"0" * (1 << 20) + b"\n", "a configuration file is at most 1,048,576 bytes"),
        (b"- 1\n- 2\n", "the top level must be a mapping"),
    ],
)
def test_configuration_files_are_read_strictly(tmp_path, content, fragment):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert str(info.value).startswith(str(path)) and fragment in str(info.value)


def test_merge_keys_may_be_overridden_and_anchors_reused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("common: &c {iterations: 10, eval_every: 5}\ntrain:\n  <<: *c\n  iterations: 20\nother: *c\n")
    assert read_yaml(path) == {
        "common": {"iterations": 10, "eval_every": 5},
        "train": {"iterations": 20, "eval_every": 5},
        "other": {"iterations": 10, "eval_every": 5},
    }


def test_a_set_value_that_is_not_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--set 'train.iterations=\[1,': not valid YAML"):
        parse_overrides(["train.iterations=[1,"])
