import numpy as np
import pytest
import torch

from trainables.config import DataConfig, SyntheticConfig
from trainables.data.synthetic import (
    BACKGROUNDS,
    build_synthetic,
    class_factors,
    class_names,
    normalisation,
    render,
)


def _config(**kw):
    synthetic = SyntheticConfig(num_classes=10, pool_per_class=60, test_per_class=5)
    args = dict(dataset="synthetic", n1=20, m1=30, gamma_l=10, gamma_u=None, seed=0, synthetic=synthetic)
    return DataConfig(**(args | kw))


def test_render_is_a_pure_function_of_the_seed():
    labels = np.arange(40) % 10
    a = render(labels, 10, 32, seed=5)
    assert a.dtype == np.uint8 and a.shape == (40, 32, 32, 3)
    assert np.array_equal(a, render(labels, 10, 32, seed=5))
    other = render(labels, 10, 32, seed=6)
    assert (a != other).mean() > 0.5  # a new draw, not a perturbation
    assert not np.array_equal(render(labels, 10, 32, seed=(5, 1)), a)


def test_render_other_sizes_and_many_classes():
    labels = np.array([0, 57, 199])
    images = render(labels, 200, 48, seed=0)
    assert images.shape == (3, 48, 48, 3)
    assert len(set(class_names(200))) == 200
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        render(np.array([10]), 10, 32, seed=0)


def test_class_factors():
    """Class c: shape c % 5, fill (c // 5) % 5; background c // 25 only beyond 25 classes.

    10 classes: c and c + 5 share a shape, solid (head side) vs striped (tail side).
    """
    shape, fill, bg = class_factors(np.array([0, 5, 9, 24]), 10)
    assert shape.tolist() == [0, 0, 4, 4] and fill.tolist() == [0, 1, 1, 4] and bg is None
    assert class_names(10)[0] == "disc/solid" and class_names(10)[5] == "disc/stripes"
    _, _, bg = class_factors(np.array([24, 25, 199]), 200)
    assert bg.tolist() == [0, 1, 7] and len(BACKGROUNDS) * 25 == 200


def test_images_carry_class_evidence():
    """Local image statistics differ between a solid class and its striped partner (stripes add edges).

    The horizontal + vertical first differences (mean |x[i+1] - x[i]|) of 200 disc/stripes images exceed those
    of 200 disc/solid images on average (the backgrounds are drawn from the same distribution for both).
    """
    solid = render(np.zeros(200, dtype=np.int64), 10, 32, seed=1).astype(np.float32)
    striped = render(np.full(200, 5), 10, 32, seed=1).astype(np.float32)

    def roughness(x):
        return np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()

    assert roughness(striped) > 1.03 * roughness(solid)


def test_normalisation_fits_fresh_images():
    """The fixed-sample mean / std standardise images of another seed to about zero mean and unit std.

    Each image's base colour dominates its mean (per-image std of the mean ~0.2 on [0, 1]), so 1000 fresh
    images and the 2048-image sample leave a standard error of about 0.2 * sqrt(1/1000 + 1/2048) / 0.275 =
    0.03 in standardised units; 0.1 is three of them, while a wrong scale or channel order misses by far more.
    """
    mean, std = normalisation(10, 32)
    x = torch.from_numpy(render(np.arange(1000) % 10, 10, 32, seed=99)).float().div(255)
    z = (x - torch.tensor(mean)) / torch.tensor(std)
    assert z.mean(dim=(0, 1, 2)).abs().max() < 0.1
    assert (z.std(dim=(0, 1, 2)) - 1).abs().max() < 0.05


def test_build_synthetic_splits_like_cifar():
    """Pool 60 / class, val 10 % = 6 / class, N1 = 20, M1 = 30, gamma = 10 for both.

    Labeled int(20 * 10 ** (-c / 9)) = 20, 15, 11, 9, 7, 5, 4, 3, 2, 2; unlabeled int(30 * 10 ** (-c / 9))
    = 30, 23, 17, 13, 10, 8, 6, 5, 3, 3 (c = 3: 30 * 0.4642 = 13.9; c = 4: 30 * 0.3594 = 10.8; c = 9: 3).
    """
    data = build_synthetic(_config())
    assert data.labeled_counts.tolist() == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert data.unlabeled_counts.tolist() == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    assert np.bincount(data.val.labels).tolist() == [6] * 10
    assert np.bincount(data.test.labels).tolist() == [5] * 10
    assert data.labeled.images.shape == (78, 32, 32, 3) and data.labeled.images.dtype == np.uint8
    assert data.class_names == class_names(10)


def test_unlabeled_truth_is_stored_apart():
    """Training reads the unlabeled images alone: a bare array; their classes live in a separate field."""
    data = build_synthetic(_config())
    assert isinstance(data.unlabeled_images, np.ndarray) and data.unlabeled_images.ndim == 4
    assert len(data.unlabeled_truth) == len(data.unlabeled_images)
    # no image is in two sets (random noise makes identical renders impossible)
    sets = [data.labeled.images, data.unlabeled_images, data.val.images]
    keys = [{img.tobytes() for img in s} for s in sets]
    assert sum(len(k) for k in keys) == len(set().union(*keys)) == sum(len(s) for s in sets)


def test_build_is_deterministic_and_seed_dependent():
    a, b, c = build_synthetic(_config()), build_synthetic(_config()), build_synthetic(_config(seed=1))
    assert np.array_equal(a.labeled.images, b.labeled.images) and np.array_equal(a.test.images, b.test.images)
    assert np.array_equal(a.unlabeled_truth, b.unlabeled_truth)
    assert not np.array_equal(a.labeled.images, c.labeled.images)
    assert not np.array_equal(a.test.images, c.test.images)


def test_pool_too_small_fails_in_the_config():
    # the configuration refuses it: before any data set is rendered or read, and for a sweep before Ray starts
    match = r"val \(6 per class\) \+ n1 \(40\) \+ m1 \(30\) = 76 images per class, more than synthetic.pool_per_class"
    with pytest.raises(ValueError, match=match):
        _config(n1=40)


def test_explicit_val_size():
    data = build_synthetic(_config(val_size=30))
    assert np.bincount(data.val.labels).tolist() == [3] * 10


def test_default_difficulty_renders_the_original_set():
    """The knobs at their defaults leave the images bit for bit as before they existed (md5 of this render
    before the knobs were added)."""
    import hashlib

    from trainables.data.synthetic import Difficulty

    labels = np.arange(200) % 10
    images = render(labels, 10, 32, 0)
    assert hashlib.md5(images.tobytes()).hexdigest() == "acef7f73ab5e61dc6e9e36f1de8e507c"
    assert np.array_equal(render(labels, 10, 32, 0, Difficulty(1.0, 1.0, 0.15)), images)


def test_difficulty_knobs_move_the_images_as_documented():
    """noise 0 smooths solid images; stronger contrast separates objects from the background more; a higher
    weakest-fill strength makes striped (tail) images rougher relative to their solid (head) partners."""
    from trainables.data.synthetic import Difficulty

    def roughness(x):
        x = x.astype(np.float32)
        return np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()

    solid, striped = np.zeros(200, dtype=np.int64), np.full(200, 5)
    assert roughness(render(solid, 10, 32, 1, Difficulty(noise=0.0))) < 0.8 * roughness(render(solid, 10, 32, 1))
    assert roughness(render(solid, 10, 32, 1, Difficulty(contrast=1.6))) > roughness(
        render(solid, 10, 32, 1, Difficulty(contrast=0.6))
    )

    def stripe_gap(faint_fill):
        d = Difficulty(faint_fill=faint_fill)
        return roughness(render(striped, 10, 32, 1, d)) / roughness(render(solid, 10, 32, 1, d))

    assert stripe_gap(0.9) > stripe_gap(0.0) + 0.02


def test_config_knobs_reach_the_generator():
    easy = build_synthetic(
        _config(synthetic=SyntheticConfig(num_classes=10, pool_per_class=60, test_per_class=5, noise=0.0))
    )
    base = build_synthetic(_config())
    assert not np.array_equal(easy.test.images, base.test.images)
    assert easy.mean != base.mean or easy.std != base.std  # statistics of the same generator settings
    with pytest.raises(ValueError, match="faint_fill"):
        SyntheticConfig(faint_fill=1.5)
