"""The supervised baselines (`supervised`, `supervised_la`): the labeled set alone, the reference's multistep
schedule, evaluation of the trained model itself; inside the real loop on the tiny synthetic task."""

import dataclasses

import numpy as np
import pytest
import torch

from tests.trainables.methods.test_methods_in_loop import (
    _restore_global_torch_settings,  # noqa: F401  (autouse fixture)
    assert_resume_equals_whole_run,
    assert_same_tensors,
    data,  # noqa: F401  (fixture)
    final_model,
    tiny_config,
    trajectory,
)
from trainables.config import OptimConfig, RunConfig
from trainables.data import build_data
from trainables.evaluate import predict_logits
from trainables.loop import Run, lr_at, resolve_runtime, train


def test_multistep_schedule_by_hand():
    """lr 0.1, K = 100, warm-up 10 % (W = 10, linear from 0), milestones at 50 and 80, gamma 0.1."""
    cfg = OptimConfig(schedule="multistep", lr=0.1, warmup=0.1, milestones=[0.5, 0.8], gamma=0.1)
    expected = {0: 0.0, 1: 0.01, 5: 0.05, 9: 0.09, 10: 0.1, 49: 0.1, 50: 0.01, 79: 0.01, 80: 0.001, 99: 0.001}
    for step, lr in expected.items():
        assert lr_at(step, 100, cfg) == pytest.approx(lr, rel=1e-12, abs=1e-15), step
    # the DASO reference's supervised run: WarmupMultiStepLR, 6250 warm-up iterations of 250k, x0.01 twice
    ref = OptimConfig(schedule="multistep", lr=0.1, warmup=0.025, milestones=[0.8, 0.9], gamma=0.01)
    assert lr_at(3125, 250_000, ref) == pytest.approx(0.05)
    assert lr_at(6250, 250_000, ref) == lr_at(199_999, 250_000, ref) == 0.1
    assert lr_at(200_000, 250_000, ref) == pytest.approx(1e-3) and lr_at(225_000, 250_000, ref) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="increasing fractions"):
        OptimConfig(schedule="multistep", milestones=[0.9, 0.8])


def supervised_config(preset: str = "supervised", **optim) -> RunConfig:
    raw = tiny_config("fixmatch").model_dump()
    raw["method"] = {"preset": preset}
    raw["optim"].update(optim)
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize("preset", ["supervised", "supervised_la"])
def test_labeled_only_runs_never_read_the_unlabeled_set(tmp_path, data, preset):  # noqa: F811
    """Replacing every unlabeled image (and its truth) leaves the whole trajectory and the weights bit-identical;
    no pseudo-label metrics are reported."""
    cfg = supervised_config(preset, schedule="multistep", warmup=0.2, milestones=[0.5])
    rng = np.random.default_rng(1)
    other = dataclasses.replace(
        data,
        unlabeled_images=rng.integers(0, 256, data.unlabeled_images.shape, dtype=np.uint8),
        unlabeled_truth=rng.permutation(data.unlabeled_truth),
    )
    train(cfg, tmp_path / "a", progress=False, data=data)
    train(cfg, tmp_path / "b", progress=False, data=other)
    a, b = trajectory(tmp_path / "a"), trajectory(tmp_path / "b")
    assert a == b
    assert not any(k.startswith(("pl/", "train/loss_u", "train/mask_ratio")) for k in a[-1])
    assert a[-1]["train/loss"] == a[-1]["train/loss_x"] > 0
    assert_same_tensors(final_model(tmp_path / "a"), final_model(tmp_path / "b"))


def test_supervised_la_adds_the_scaled_log_prior():
    """supervised_la's loss on the same logits is CE(logits + tau log pi): larger for a head-class argmax."""
    from trainables.methods import build_method
    from trainables.methods.base import MethodContext

    cfg = supervised_config("supervised_la").method
    assert cfg.labeled_only and cfg.la.tau == 1.0
    counts = torch.tensor([30, 10, 5, 5])
    ctx = MethodContext(4, counts, 8, torch.device("cpu"), "synthetic", 6.0, 6.0, 10, 40, 8)
    method = build_method(cfg, ctx)
    logits, y = torch.tensor([[2.0, 0.0, 0.0, 1.0]]), torch.tensor([3])
    prior = torch.log(counts / counts.sum())
    expected = torch.nn.functional.cross_entropy(logits + prior, y)
    torch.testing.assert_close(method.labeled_loss(logits, y), expected)
    assert method.labeled_only and not build_method(tiny_config("fixmatch").method, ctx).labeled_only


def test_supervised_evaluates_the_trained_model_not_its_ema(data):  # noqa: F811
    """After a few steps the reported test logits are the trained model's (eval mode), which differ from the EMA
    model's; the model is back in training mode afterwards."""
    cfg = supervised_config()
    run = Run(cfg, data, resolve_runtime(cfg))
    run.model.train()
    from trainables.evaluate import Window

    for _ in range(3):
        run.train_step(Window())
    _, logits = run.evaluate()
    assert run.model.training
    run.model.eval()
    with torch.inference_mode():
        own = predict_logits(run.model, run.test_store, run.prep, 64)
        ema = predict_logits(run.ema.module, run.test_store, run.prep, 64)
    torch.testing.assert_close(logits["test"], own)
    assert not torch.allclose(logits["test"], ema)


def test_supervised_resume_equals_an_uninterrupted_run(tmp_path, data):  # noqa: F811
    cfg = supervised_config("supervised_la", schedule="multistep", warmup=0.2, milestones=[0.5, 0.75])
    assert_resume_equals_whole_run(cfg, tmp_path, data)


def test_build_data_is_unchanged_by_the_preset():
    """The split is a function of the data seed alone: a supervised run sees the same labeled set as FixMatch."""
    a, b = build_data(supervised_config().data), build_data(tiny_config("fixmatch").data)
    assert np.array_equal(a.labeled.images, b.labeled.images) and np.array_equal(a.labeled.labels, b.labeled.labels)


def test_reference_supervised_recipe_loads_with_the_reference_schedule():
    from pathlib import Path

    from trainables.config import load_config

    path = Path(__file__).parents[3] / "trainables" / "configs" / "reference_cifar10_supervised.yaml"
    cfg = load_config(path)
    assert cfg.method.labeled_only and cfg.optim.weight_decay_on == "all" and cfg.model.bn_momentum == 0.1
    lrs = [lr_at(k, cfg.train.iterations, cfg.optim) for k in (0, 3125, 6250, 199_999, 200_000, 225_000)]
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.1, 1e-3, 1e-5])
