import typing

import numpy as np
import pytest

from tests.trainables.data.fakes import write_cifar10, write_cifar100, write_png, write_stl10
from trainables.config import DataConfig, DatasetName, ImageFolderConfig, SyntheticConfig
from trainables.data import BUILDERS, build_data, describe_counts
from trainables.data.base import ImageSet, SSLData


def _imagefolder(root):
    for name, label in [("a", 0), ("b", 1), ("c", 1)]:
        write_png(root / "img" / f"{name}.png", (label * 200, 10, 10))
    (root / "lab.txt").write_text("img/a.png 0\nimg/b.png 1\n")
    (root / "unl.txt").write_text("img/c.png\n")
    return DataConfig(
        dataset="imagefolder",
        imagefolder=ImageFolderConfig(
            root=str(root),
            labeled_list="lab.txt",
            unlabeled_lists=["unl.txt"],
            val_list="lab.txt",
            test_list="lab.txt",
            image_size=16,
        ),
    )


# dataset name -> (writes small data under a folder and returns the config that reads it)
MAKERS = {
    "synthetic": lambda root: DataConfig(
        dataset="synthetic",
        n1=10,
        m1=10,
        gamma_l=5,
        synthetic=SyntheticConfig(num_classes=10, pool_per_class=30, test_per_class=2),
    ),
    "cifar10": lambda root: (
        write_cifar10(root)
        and DataConfig(dataset="cifar10", root=str(root), download=False, n1=8, m1=4, gamma_l=4, val_size=20)
    ),
    "cifar100": lambda root: (
        write_cifar100(root)
        and DataConfig(dataset="cifar100", root=str(root), download=False, n1=3, m1=2, gamma_l=3, val_size=100)
    ),
    "stl10": lambda root: (
        write_stl10(root) and DataConfig(dataset="stl10", root=str(root), download=False, n1=9, gamma_l=3, val_size=20)
    ),
    "imagefolder": _imagefolder,
}


def test_registry_keys_are_the_config_literals():
    assert set(BUILDERS) == set(typing.get_args(DatasetName)) == set(MAKERS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_builder_returns_consistent_splits(name, tmp_path):
    cfg = MAKERS[name](tmp_path)
    data = build_data(cfg)
    c = data.num_classes
    assert isinstance(data, SSLData) and c >= 2
    for split in (data.labeled, data.val, data.test):
        assert split.labels.dtype == np.int64 and len(split.images) == len(split.labels)
        assert split.labels.min() >= 0 and split.labels.max() < c
    assert data.labeled_counts.min() >= 1  # every class has a labeled image
    assert data.unlabeled_truth is not None and len(data.unlabeled_truth) == len(data.unlabeled_images)
    assert data.unlabeled_truth.max() < c and data.unlabeled_truth.min() >= -1
    assert len(data.mean) == len(data.std) == 3 and all(s > 0 for s in data.std)
    batch = (
        data.labeled.images[np.array([0])]
        if isinstance(data.labeled.images, np.ndarray)
        else (data.labeled.images.load(np.array([0])))
    )
    assert batch.dtype == np.uint8 and batch.ndim == 4 and batch.shape[-1] == 3
    table = describe_counts(data)
    assert len(table.splitlines()) == c + 2


def test_describe_counts_table():
    """2 classes: labeled [3, 1]; unlabeled truth [0, 1, 1, -1] -> [1, 2] plus one of unknown class;
    val [1, 1]; test [2, 2]."""
    images = np.zeros((4, 2, 2, 3), np.uint8)
    data = SSLData(
        labeled=ImageSet(images, np.array([0, 0, 0, 1])),
        unlabeled_images=images,
        unlabeled_truth=np.array([0, 1, 1, -1]),
        val=ImageSet(images[:2], np.array([0, 1])),
        test=ImageSet(images, np.array([0, 1, 0, 1])),
        num_classes=2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        class_names=["cat", "dog"],
    )
    lines = describe_counts(data).splitlines()
    assert lines[0].split() == ["#", "class", "labeled", "unlabeled", "val", "test"]
    assert lines[1].split() == ["0", "cat", "3", "1", "1", "2"]
    assert lines[2].split() == ["1", "dog", "1", "2", "1", "2"]
    assert lines[3].split()[:5] == ["all", "4", "4", "2", "4"]
    assert "(1 unlabeled of unknown class)" in lines[3]


def test_describe_counts_without_unlabeled_truth():
    images = np.zeros((2, 2, 2, 3), np.uint8)
    data = SSLData(
        labeled=ImageSet(images, np.array([0, 1])),
        unlabeled_images=images,
        unlabeled_truth=None,
        val=ImageSet(images, np.array([0, 1])),
        test=ImageSet(images, np.array([0, 1])),
        num_classes=2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    lines = describe_counts(data).splitlines()
    assert lines[1].split() == ["0", "1", "?", "1", "1"]
    assert "(2 unlabeled of unknown class)" in lines[3]
