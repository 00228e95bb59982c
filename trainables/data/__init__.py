"""Data sets by name: the `data.dataset` Literal of the config picks a builder from `BUILDERS`.

Every builder takes the validated `DataConfig` and returns an `SSLData` (labeled, unlabeled, val, test).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trainables.config import DataConfig, DatasetName
from trainables.data.base import SSLData
from trainables.data.cifar import DatasetNotFoundError, build_cifar10, build_cifar100
from trainables.data.imagefolder import build_imagefolder
from trainables.data.stl10 import build_stl10
from trainables.data.synthetic import build_synthetic

BUILDERS: dict[DatasetName, Callable[[DataConfig], SSLData]] = {
    "synthetic": build_synthetic,
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "stl10": build_stl10,
    "imagefolder": build_imagefolder,
}

__all__ = ["BUILDERS", "DatasetNotFoundError", "build_data", "describe_counts", "ensure_available", "split_counts"]


def build_data(cfg: DataConfig) -> SSLData:
    """The splits of the data set `cfg.dataset`."""
    return BUILDERS[cfg.dataset](cfg)


def ensure_available(cfg: DataConfig) -> None:
    """Make sure a run on this machine can load `cfg`'s data: downloads it when allowed (one process at a time per
    `data.root`), raises DatasetNotFoundError naming the path and the fix otherwise. A sweep's driver calls this on
    every node that may run a trial before the first trial starts."""
    if cfg.dataset == "synthetic":
        return  # generated from its seed wherever it runs
    build_data(cfg)  # reads the files (downloads them first when allowed); images of an image folder load lazily


def split_counts(data: SSLData) -> dict[str, np.ndarray | None]:
    """Per-class image counts of each split; the unlabeled column is by ground truth, None where unknown."""
    return {
        "labeled": data.labeled_counts,
        "unlabeled": data.unlabeled_counts,
        "val": np.bincount(data.val.labels, minlength=data.num_classes),
        "test": np.bincount(data.test.labels, minlength=data.num_classes),
    }


def describe_counts(data: SSLData) -> str:
    """Per-class image counts (labeled, unlabeled by ground truth where known, val, test) and totals.

    Unlabeled images of unknown class (STL-10's unlabeled split, out-of-class images) count in totals only.
    """
    c = data.num_classes
    columns = split_counts(data)
    names = data.class_names if len(data.class_names) == c else [""] * c
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"{'#':>4} {'class':<{width}} " + " ".join(f"{k:>9}" for k in columns)]
    for k in range(c):
        cells = " ".join(f"{'?' if v is None else int(v[k]):>9}" for v in columns.values())
        lines.append(f"{k:>4} {names[k]:<{width}} {cells}")
    n_unlabeled = len(data.unlabeled_images)
    unknown = n_unlabeled if data.unlabeled_truth is None else int((data.unlabeled_truth < 0).sum())
    totals = " ".join(f"{n:>9}" for n in (len(data.labeled), n_unlabeled, len(data.val), len(data.test)))
    lines.append(
        f"{'all':>4} {'':<{width}} {totals}" + (f"  ({unknown} unlabeled of unknown class)" if unknown else "")
    )
    return "\n".join(lines)
