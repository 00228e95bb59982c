"""STL-10 (Coates et al., AISTATS 2011) as a long-tailed semi-supervised task, read through torchvision.

Files: `stl10_binary/` train_X.bin, train_y.bin (5k labeled), test_X.bin, test_y.bin (8k), unlabeled_X.bin
(100k, no labels), class_names.txt. Each image is 3 x 96 x 96 uint8, every channel stored column-major; labels
are uint8 1..10. The labeled set follows the long-tailed profile (N1, gamma_l) drawn from the 5k train split
after a class-balanced validation carve-out (500 by default, as in DASO); the unlabeled set is the whole 100k
split, whose classes are unknown (some images are not of the 10 classes), so its truth is all -1 and m1 /
gamma_u do not apply. Images stay 96 px for augmentation; the loop resizes them to `model_size` = 32 (DASO's
protocol).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision import datasets

from trainables.config import DataConfig
from trainables.data.base import ImageSet, SSLData
from trainables.data.cifar import DatasetNotFoundError, open_torchvision_dataset
from trainables.data.splits import split_pool

# Per-channel statistics of STL-10 on [0, 1] (112.4, 109.1, 98.6) / 255 and (68.4, 66.6, 68.5) / 255.
STL10_MEAN = (0.4408, 0.4278, 0.3867)
STL10_STD = (0.2682, 0.2612, 0.2686)
STL10_MODEL_SIZE = 32
IMAGE_BYTES = 3 * 96 * 96


class STL10Files(datasets.STL10):
    """torchvision's STL-10 reader; extracted files are checked for presence, the archive for its md5."""

    train_list = [[name, None] for name, _ in datasets.STL10.train_list]
    test_list = [[name, None] for name, _ in datasets.STL10.test_list]


def chw_colmajor_to_hwc(raw: np.ndarray) -> np.ndarray:
    """STL-10's on-disk layout to images: raw[n, c, w, h] -> out[n, h, w, c] (a view, no copy).

    Shape: raw (N, 3, 96, 96) -> (N, 96, 96, 3).
    """
    return raw.transpose(0, 3, 2, 1)


def unlabeled_images(root: str) -> np.ndarray:
    """The 100k unlabeled images as a read-only memmap view, uint8 (N, 96, 96, 3).

    Read lazily rather than through torchvision's `split="unlabeled"`, which loads all 2.8 GB into memory; the
    byte layout is the same one torchvision decodes (`chw_colmajor_to_hwc`). Indexing rows returns ordinary
    arrays; `np.ascontiguousarray` reads it all.
    """
    path = Path(root) / STL10Files.base_folder / "unlabeled_X.bin"
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES != 0:
        raise DatasetNotFoundError(
            f"{path}: {size} bytes is not a positive multiple of {IMAGE_BYTES} (one 3x96x96 image); the file "
            "is truncated or corrupted: delete stl10_binary and download again"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // IMAGE_BYTES, 3, 96, 96))
    return chw_colmajor_to_hwc(raw)


def build_stl10(cfg: DataConfig) -> SSLData:
    """STL-10-LT: labeled (n1, gamma_l) from the 5k train split, the 100k unlabeled split, the 8k test set."""
    train = open_torchvision_dataset(STL10Files, "STL-10", cfg.root, cfg.download, split="train")
    test = open_torchvision_dataset(STL10Files, "STL-10", cfg.root, cfg.download, split="test")
    num_classes = 10
    # torchvision already swapped the column-major axes: its data is (N, 3, H, W)
    images = np.ascontiguousarray(train.data.transpose(0, 2, 3, 1))  # uint8 (5000, 96, 96, 3)
    labels = train.labels.astype(np.int64)
    # default: 50 per class, leaving 450 per class: N1 in {150, 450} fits
    parts = split_pool(images, labels, num_classes, cfg, cfg.val_per_class, unlabeled=False)
    unlabeled = unlabeled_images(cfg.root)
    return SSLData(
        labeled=parts["labeled"],
        unlabeled_images=unlabeled,
        unlabeled_truth=np.full(len(unlabeled), -1, dtype=np.int64),
        val=parts["val"],
        test=ImageSet(np.ascontiguousarray(test.data.transpose(0, 2, 3, 1)), test.labels.astype(np.int64)),
        num_classes=num_classes,
        mean=STL10_MEAN,
        std=STL10_STD,
        class_names=list(getattr(train, "classes", [])),
        model_size=STL10_MODEL_SIZE,
    )
