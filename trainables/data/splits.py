"""Long-tailed semi-supervised splits of a labeled train set (DASO, CVPR 2022, section 4; DRw, WACV 2023).

Class c (0 = head) of C keeps `int(N1 * gamma ** (-c / (C - 1)))` labeled and
`int(M1 * gamma_u ** (-c / (C - 1)))` unlabeled images; "reversed" applies the labeled profile in reverse
class order. The split is a pure function of the seed: a random default seed silently changed the split in
the reference code (algorithms.md section 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from trainables.data.base import ImageSet

if TYPE_CHECKING:
    from trainables.config import DataConfig


def long_tailed_counts(n_max: int, gamma: float, num_classes: int) -> list[int]:
    """Per-class counts of an exponential profile: n_c = int(n_max * gamma ** (-c / (C - 1))).

    Class 0 keeps n_max, class C - 1 keeps int(n_max / gamma); gamma = 1 is uniform. Python floats and
    truncation as in the reference: CIFAR-10, n_max = 1500, gamma = 100 gives
    1500, 899, 539, 323, 193, 116, 69, 41, 25, 15.

    Shape: -> list of C ints, non-increasing.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a long-tailed profile needs at least 2 classes")
    if gamma < 1:
        raise ValueError(f"gamma={gamma}: the imbalance ratio must be >= 1 (1 = uniform)")
    if n_max < 0:
        raise ValueError(f"n_max={n_max} must be >= 0")
    return [int(n_max * gamma ** (-c / (num_classes - 1))) for c in range(num_classes)]


def unlabeled_counts(
    m1: int, gamma_u: float | Literal["reversed"], num_classes: int, gamma_l: float | None = None
) -> list[int]:
    """Per-class unlabeled counts: the profile of `long_tailed_counts`, or its mirror image for "reversed".

    gamma_u = 1 is uniform. "reversed" (the papers write gamma_u = 1 / gamma_l) uses the labeled ratio gamma_l
    in reverse class order, so class C - 1 gets m1 and class 0 gets int(m1 / gamma_l).

    Shape: -> list of C ints.
    """
    if gamma_u == "reversed":
        if gamma_l is None:
            raise ValueError("gamma_u='reversed' mirrors the labeled profile: pass gamma_l")
        return long_tailed_counts(m1, gamma_l, num_classes)[::-1]
    if isinstance(gamma_u, str):
        raise ValueError(f"gamma_u={gamma_u!r}: expected a number >= 1 or 'reversed'")
    return long_tailed_counts(m1, float(gamma_u), num_classes)


def split_ssl(
    labels: np.ndarray,
    num_classes: int,
    n1: int,
    m1: int,
    gamma_l: float,
    gamma_u: float | Literal["reversed"],
    val_per_class: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Indices of a class-balanced validation set and long-tailed labeled and unlabeled sets of a train split.

    Reference order (algorithms.md section 1): per class, one seeded permutation of the class's images; its
    first `val_per_class` form the validation set, the next n1 the labeled pool, the next m1 the unlabeled
    pool; the profiles then keep the first n_c of the labeled pool and the first m_c of the unlabeled pool.
    One permutation per class makes the sets nested: the validation set does not depend on n1, m1 or the
    gammas, and a smaller gamma keeps a superset of a larger gamma's images.

    Shape: labels (N,) ints in [0, C) -> {"labeled": (sum n_c,), "unlabeled": (sum m_c,), "val": (C * val,)}
    int64 indices into labels, grouped by class.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    n_counts = long_tailed_counts(n1, gamma_l, num_classes)
    m_counts = unlabeled_counts(m1, gamma_u, num_classes, gamma_l=gamma_l)
    need = val_per_class + n1 + m1
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"labeled": [], "unlabeled": [], "val": []}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < need:
            raise ValueError(
                f"class {c} has {len(idx)} train images, fewer than val_per_class + n1 + m1 = "
                f"{val_per_class} + {n1} + {m1} = {need}; lower n1, m1 or the validation size"
            )
        perm = rng.permutation(idx)
        pool_l = perm[val_per_class : val_per_class + n1]
        pool_u = perm[val_per_class + n1 : need]
        parts["val"].append(perm[:val_per_class])
        parts["labeled"].append(pool_l[: n_counts[c]])
        parts["unlabeled"].append(pool_u[: m_counts[c]])
    return {name: np.concatenate(chunks).astype(np.int64) for name, chunks in parts.items()}


def split_pool(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    cfg: DataConfig,
    val_per_class: int,
    unlabeled: bool = True,
) -> dict[str, ImageSet]:
    """`split_ssl` with the config's profile (n1, m1, gamma_l, gamma_u, seed) applied to a labeled pool.

    Returns the "labeled", "unlabeled" and "val" parts as ImageSets; the unlabeled part's labels are its ground
    truth, for measurement only. unlabeled=False takes no unlabeled pool (STL-10 has its own unlabeled split).
    """
    idx = split_ssl(
        labels,
        num_classes,
        n1=cfg.n1,
        m1=cfg.m1 if unlabeled else 0,
        gamma_l=cfg.gamma_l,
        gamma_u=cfg.gamma_u_resolved if unlabeled else 1.0,
        val_per_class=val_per_class,
        seed=cfg.seed,
    )
    return {part: ImageSet(images[i], labels[i]) for part, i in idx.items()}
