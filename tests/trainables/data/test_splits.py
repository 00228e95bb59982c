import numpy as np
import pytest

from trainables.config import balanced_per_class
from trainables.data.splits import long_tailed_counts, split_ssl, unlabeled_counts


def test_cifar10_profile_matches_the_papers():
    """N1 = 1500, gamma = 100, C = 10: n_c = int(1500 * 100 ** (-c / 9)).

    c = 1: 100 ** (-1/9) = 0.59948 -> 899.2 -> 899; c = 9: 1500 / 100 = 15 (algorithms.md section 1).
    """
    assert long_tailed_counts(1500, 100, 10) == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]


def test_cifar100_profile():
    """N1 = 150, gamma = 10, C = 100: n_c = int(150 * 10 ** (-c / 99)).

    c = 1: 10 ** (-1/99) = 0.97701 -> 146.55 -> 146; c = 2: 0.95455 -> 143.18 -> 143;
    c = 50: 10 ** (-50/99) = 0.31257 -> 46.89 -> 46; c = 99: 150 / 10 = 15.
    """
    counts = long_tailed_counts(150, 10, 100)
    assert len(counts) == 100
    assert counts[:3] == [150, 146, 143]
    assert counts[50] == 46
    assert counts[99] == 15


def test_uniform_unlabeled():
    assert unlabeled_counts(3000, 1.0, 10) == [3000] * 10


def test_reversed_unlabeled_mirrors_the_labeled_ratio():
    """M1 = 3000, gamma_l = 100: m_c = int(3000 * 100 ** (-(9 - c) / 9)); class 9 gets 3000, class 0 gets 30.

    Class 8: 3000 * 100 ** (-1/9) = 3000 * 0.59948 = 1798.4 -> 1798;
    class 1: 3000 * 100 ** (-8/9) = 3000 * 0.016681 = 50.04 -> 50.
    """
    assert unlabeled_counts(3000, "reversed", 10, gamma_l=100) == [
        30,
        50,
        83,
        139,
        232,
        387,
        646,
        1078,
        1798,
        3000,
    ]


def test_reversed_needs_the_labeled_ratio():
    with pytest.raises(ValueError, match="gamma_l"):
        unlabeled_counts(3000, "reversed", 10)


def test_profile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 classes"):
        long_tailed_counts(10, 10, 1)
    with pytest.raises(ValueError, match="gamma=0.5"):
        long_tailed_counts(10, 0.5, 10)


def _labels(per_class: int = 40, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), per_class))


def test_split_counts_follow_the_profiles():
    """40 images per class, val 5, N1 = 20, M1 = 10, gamma_l = 10, gamma_u = 1.

    Labeled: int(20 * 10 ** (-c / 9)) = 20, 15, 11, 9, 7, 5, 4, 3, 2, 2 (c = 1: 20 * 0.7743 = 15.5);
    unlabeled 10 per class; val 5 per class.
    """
    labels = _labels()
    idx = split_ssl(labels, 10, n1=20, m1=10, gamma_l=10, gamma_u=1.0, val_per_class=5, seed=0)
    assert np.bincount(labels[idx["labeled"]], minlength=10).tolist() == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert np.bincount(labels[idx["unlabeled"]], minlength=10).tolist() == [10] * 10
    assert np.bincount(labels[idx["val"]], minlength=10).tolist() == [5] * 10


def test_split_reversed_unlabeled():
    """M1 = 10, gamma_l = 10, reversed: class c gets int(10 * 10 ** (-(9 - c) / 9)).

    = 1, 1, 1, 2, 2, 3, 4, 5, 7, 10 (class 8: 10 * 0.7743 = 7.7; class 2: 10 * 0.1292 = 1.3).
    """
    labels = _labels()
    idx = split_ssl(labels, 10, n1=20, m1=10, gamma_l=10, gamma_u="reversed", val_per_class=5, seed=0)
    assert np.bincount(labels[idx["unlabeled"]], minlength=10).tolist() == [1, 1, 1, 2, 2, 3, 4, 5, 7, 10]


def test_split_sets_are_disjoint():
    labels = _labels()
    idx = split_ssl(labels, 10, n1=20, m1=15, gamma_l=10, gamma_u=1.0, val_per_class=5, seed=3)
    sets = {name: set(a.tolist()) for name, a in idx.items()}
    assert all(len(sets[name]) == len(idx[name]) for name in idx)  # no index twice within a set
    assert not sets["labeled"] & sets["unlabeled"]
    assert not sets["labeled"] & sets["val"]
    assert not sets["unlabeled"] & sets["val"]
    assert all(a.dtype == np.int64 for a in idx.values())


def test_split_is_a_pure_function_of_the_seed():
    labels = _labels()
    args = dict(n1=20, m1=10, gamma_l=10, gamma_u=1.0, val_per_class=5)
    a = split_ssl(labels, 10, seed=7, **args)
    b = split_ssl(labels, 10, seed=7, **args)
    c = split_ssl(labels, 10, seed=8, **args)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(np.sort(a["labeled"]), np.sort(c["labeled"]))
    assert not np.array_equal(np.sort(a["val"]), np.sort(c["val"]))


def test_split_is_nested():
    """One permutation per class: val ignores n1 / m1; a larger gamma keeps a subset of the labeled set."""
    labels = _labels()
    base = split_ssl(labels, 10, n1=20, m1=10, gamma_l=10, gamma_u=1.0, val_per_class=5, seed=0)
    other = split_ssl(labels, 10, n1=25, m1=5, gamma_l=10, gamma_u=1.0, val_per_class=5, seed=0)
    steeper = split_ssl(labels, 10, n1=20, m1=10, gamma_l=20, gamma_u=1.0, val_per_class=5, seed=0)
    assert np.array_equal(base["val"], other["val"])
    assert set(steeper["labeled"].tolist()) < set(base["labeled"].tolist())


def test_split_names_the_class_that_is_too_small():
    labels = _labels()
    labels = np.delete(labels, np.flatnonzero(labels == 6)[:5])  # class 6: 35 images, the others 40
    split_ssl(labels, 10, n1=25, m1=5, gamma_l=10, gamma_u=1.0, val_per_class=5, seed=0)  # needs 35: fits
    with pytest.raises(ValueError, match=r"class 6 has 35 train images, fewer than .* 5 \+ 30 \+ 5 = 40"):
        split_ssl(labels, 10, n1=30, m1=5, gamma_l=10, gamma_u=1.0, val_per_class=5, seed=0)


def test_split_refuses_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        split_ssl(np.array([0, 10]), 10, n1=1, m1=0, gamma_l=1, gamma_u=1.0, val_per_class=0, seed=0)


def test_balanced_per_class():
    assert balanced_per_class(5000, 10) == 500
    assert balanced_per_class(5000, 100) == 50
    with pytest.raises(ValueError, match="val_size=505 is not a multiple of the 10 classes"):
        balanced_per_class(505, 10)
