"""Every shipped search-space file validates, and each asks the question its name promises."""

from __future__ import annotations

import math

import pytest

from service.plan import load_plan
from service.sampling import sample_configs
from service.space import Asha, LogOneMinus
from trainables.config import RunConfig

from .conftest import SPACES

SHIPPED = sorted(SPACES.glob("*.yaml"))


def test_the_six_files_of_the_issue_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert names >= {
        "drw_beta",
        "daso_temperature",
        "daso_alignment",
        "daso_drw_joint",
        "quickstart",
        "repro_synthetic",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_validates_and_samples_valid_trials(path, tmp_path):
    plan = load_plan(path, launch_dir=tmp_path)
    configs = sample_configs(plan, 3)
    assert len(configs) == 3
    for config in configs:
        run = RunConfig.model_validate({k: v for k, v in config.items() if k != "service"})
        assert run.method.preset in plan.presets
        for name, value in config["service"]["params"].items():
            for path in plan.targets(name):
                node = run.model_dump()
                for part in path.split("."):
                    node = node[part]
                assert node == value, f"{name}: sampled {value!r} but the trial config holds {node!r} at {path}"
    for metric, _ in plan.spec.search.objectives:
        assert metric.startswith("val/")


def test_drw_beta_searches_one_minus_beta_on_cifar10_lt(tmp_path):
    plan = load_plan(SPACES / "drw_beta.yaml", launch_dir=tmp_path)
    base = plan.base_config()
    assert (base.data.dataset, base.data.n1, base.data.m1, base.data.gamma_l) == ("cifar10", 1500, 3000, 100)
    beta = plan.spec.space["method.drw.beta"]
    assert isinstance(beta, LogOneMinus)
    assert beta.low <= 0.995 <= beta.high and beta.low <= 0.999 <= beta.high  # the papers' two best values


def test_daso_files_search_their_knobs(tmp_path):
    temperature = load_plan(SPACES / "daso_temperature.yaml", launch_dir=tmp_path)
    assert set(temperature.spec.searched) == {"method.daso.t_dist", "method.daso.t_proto"}
    alignment = load_plan(SPACES / "daso_alignment.yaml", launch_dir=tmp_path)
    assert set(alignment.spec.searched) == {"method.daso.lambda_align"}


def test_joint_file_is_multi_objective_head_vs_tail(tmp_path):
    plan = load_plan(SPACES / "daso_drw_joint.yaml", launch_dir=tmp_path)
    assert plan.spec.search.objectives == [("val/balanced_acc", "max"), ("val/recall_tail", "max")]
    assert set(plan.spec.searched) == {"method.drw.beta", "method.daso.t_dist", "method.daso.lambda_align"}
    assert plan.presets == ("fixmatch_daso_drw",)


def test_quickstart_is_small_synthetic_and_pruned(tmp_path):
    plan = load_plan(SPACES / "quickstart.yaml", launch_dir=tmp_path)
    base = plan.base_config()
    assert base.data.dataset == "synthetic" and base.train.device == "cpu"
    assert isinstance(plan.spec.search.scheduler, Asha)
    assert plan.spec.resources.gpu == 0
    # conditional: beta only for DRw presets, T_dist only for DASO presets
    assert plan.applicable("method.drw.beta") == ("fixmatch_drw",)
    assert plan.applicable("method.daso.t_dist") == ("fixmatch_daso",)


def test_repro_grid_is_every_preset_times_three_seeds(tmp_path):
    plan = load_plan(SPACES / "repro_synthetic.yaml", launch_dir=tmp_path)
    assert plan.spec.search.sampler == "grid"
    assert plan.num_trials == 21
    configs = sample_configs(plan, plan.num_trials)
    cells = {(c["method"]["preset"], c["train"]["seed"]) for c in configs}
    assert len(cells) == 21
    assert {p for p, _ in cells} == set(plan.presets) and len(plan.presets) == 7
    assert {s for _, s in cells} == {0, 1, 2}
    assert all(c["data"]["seed"] == c["train"]["seed"] for c in configs)  # a seed is a split and a training run


@pytest.mark.parametrize("space", ["repro_synthetic", "testbed_synthetic"])
def test_method_grids_run_what_the_grid_runner_runs(tmp_path, space):
    """The sweep's trial configurations equal `python -m trainables.grid`'s runs on the same base file."""
    from trainables.config import RunConfig, read_yaml
    from trainables.grid import preset_config

    plan = load_plan(SPACES / f"{space}.yaml", launch_dir=tmp_path)
    base_file = SPACES / plan.spec.base_file
    configs = sample_configs(plan, plan.num_trials)
    assert len({(c["method"]["preset"], c["train"]["seed"]) for c in configs}) == 21
    for config in configs:
        preset, seed = config["method"]["preset"], config["train"]["seed"]
        raw = preset_config(read_yaml(base_file), preset, [f"train.seed={seed}", f"data.seed={seed}"])
        expected = RunConfig.model_validate(raw).model_dump(mode="json")
        ours = {k: v for k, v in config.items() if k not in ("service", "name")}
        expected.pop("name")
        ours["data"]["root"] = expected["data"]["root"]  # the sweep anchors the data root at its launch directory
        assert ours == expected, (preset, seed)


def test_shipped_asha_files_leave_room_to_prune(tmp_path):
    for path in SHIPPED:
        plan = load_plan(path, launch_dir=tmp_path)
        scheduler = plan.spec.search.scheduler
        if isinstance(scheduler, Asha):
            evaluations = plan.evaluations(plan.base_config())
            # ASHA's first rung sits at the grace period (Ray: rungs grace * rf^k below max_t): a rung before the
            # last evaluation lets it stop a trial before its end
            assert scheduler.grace_period < evaluations, path.name
            assert math.isfinite(evaluations)
