"""What the loop takes from the recipe: augmentation sizes per image size, weight decay groups, the reference
recipe files."""

from pathlib import Path

import pytest
import torch

from tests.trainables.conftest import random_data, tiny_config
from tests.trainables.data.fakes import write_stl10
from trainables import augment
from trainables.config import AugmentConfig, load_config
from trainables.data import build_data
from trainables.evaluate import Window
from trainables.loop import Run, resolve_runtime

CONFIGS = Path(__file__).resolve().parents[2] / "trainables" / "configs"


@pytest.mark.parametrize(
    ("side", "dataset", "pad", "cutout"),
    [
        (32, "cifar10", 4, 16),  # FixMatch at 32 px
        (16, "synthetic", 2, 8),
        (96, "stl10", 12, 16),  # the reference's 16 px Cutout at STL-10's native 96 px (about 3 % of the image)
        (96, "synthetic", 12, 48),
        (224, "imagefolder", 28, 112),  # image folders scale with the side
    ],
)
def test_auto_sizes_follow_the_image(side, dataset, pad, cutout):
    sizes = AugmentConfig()
    assert (sizes.pad_px(side), sizes.cutout_px(side, dataset)) == (pad, cutout)
    fixed = AugmentConfig(crop_pad=4, cutout=20)
    assert (fixed.pad_px(side), fixed.cutout_px(side, dataset)) == (4, 20)


def test_negative_sizes_are_refused():
    with pytest.raises(ValueError, match="crop_pad=-1"):
        AugmentConfig(crop_pad=-1)


def test_stl10_run_cuts_16_px_at_96(tmp_path, monkeypatch):
    """A run on STL-10's files augments at 96 px with a 16 px Cutout and 12 px padding, then resizes to 32."""
    write_stl10(tmp_path)
    cfg = tiny_config(
        "data.dataset=stl10",
        f"data.root={tmp_path}",
        "data.download=false",
        "data.n1=9",
        "data.gamma_l=3",
        "data.val_size=20",
    )
    run = Run(cfg, build_data(cfg.data), resolve_runtime(cfg))
    assert (run.crop_pad, run.cutout_px) == (12, 16)
    seen = {}
    original = augment.apply_strong

    def spy(x, params, grouped=None):
        seen["size"], seen["cutout"], seen["pad"] = x.shape[-1], params.cutout_size, params.weak.pad
        return original(x, params, grouped)

    monkeypatch.setattr(augment, "apply_strong", spy)
    run.train_step(Window())
    assert seen == {"size": 96, "cutout": 16, "pad": 12}


def test_image_folder_run_sizes_follow_its_image_size(tmp_path):
    """Image-folder images are decoded on demand at `imagefolder.image_size`; the sizes follow it (48 px: pad 6,
    Cutout 24) and a step runs."""
    from tests.trainables.data.test_registry import _imagefolder

    raw = _imagefolder(tmp_path).model_dump()
    raw["imagefolder"]["image_size"] = 48
    cfg = tiny_config("model.arch=resnet18", "train.batch_size=2", "train.mu=1")
    cfg = cfg.model_copy(update={"data": type(cfg.data).model_validate(raw)})
    run = Run(cfg, build_data(cfg.data), resolve_runtime(cfg))
    assert (run.crop_pad, run.cutout_px) == (6, 24)
    run.train_step(Window())
    assert run.step == 1


@pytest.mark.parametrize(("where", "decayed_1d"), [("weights", False), ("all", True)])
def test_weight_decay_groups(where, decayed_1d):
    """FixMatch decays conv and linear weights only; the DASO reference decays every parameter."""
    cfg = tiny_config(f"optim.weight_decay_on={where}")
    run = Run(cfg, random_data(), resolve_runtime(cfg))
    decay, no_decay = run.optimizer.param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    n_params = len(list(run.model.parameters()))
    one_d = [p for p in run.model.parameters() if p.ndim <= 1]
    assert one_d  # BN weights and biases, linear bias
    assert any(p is q for p in one_d for q in decay["params"]) == decayed_1d
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_reference_recipes_are_the_reference_code_settings():
    for name in ("reference_cifar10", "reference_stl10"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert (cfg.model.arch, cfg.model.depth, cfg.model.widen, cfg.model.bn_momentum) == ("wrn", 28, 2, 0.1)
        o = cfg.optim
        assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.weight_decay_on, o.schedule) == (
            0.03,
            0.9,
            True,
            5e-4,
            "all",
            "constant",
        )
        t = cfg.train
        assert (t.iterations, t.batch_size, t.mu, t.tau, t.ema_decay, t.eval_every) == (
            250_000,
            64,
            2,
            0.95,
            0.999,
            500,
        )
        d = cfg.method.daso
        assert (d.t_proto, d.lambda_align, d.queue_len, d.window, d.warmup, d.ema_bn) == (
            0.05,
            1.0,
            256,
            100,
            5000,
            "train",
        )
    stl = load_config(CONFIGS / "reference_stl10.yaml").data
    assert (stl.augment.pad_px(96), stl.augment.cutout_px(96, "stl10")) == (4, 16)
    # the recipe runs: every parameter in the decayed group
    cfg = load_config(CONFIGS / "reference_cifar10.yaml", ["data.dataset=synthetic", "model.depth=10", "model.widen=1"])
    run = Run(cfg, random_data(), resolve_runtime(cfg))
    assert len(run.optimizer.param_groups[0]["params"]) == len(list(run.model.parameters()))
    assert all(m.momentum == 0.1 for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
