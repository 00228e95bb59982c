"""Small data sets written in the real on-disk formats, for the loader tests.

Every image is random noise, so an image's bytes identify it: `index_by_bytes` maps them back to the label
the writer gave it, which checks both the image-label pairing and the pixel layout (a transposed or
channel-swapped image would not be found).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def noise_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, size, size, 3) random images."""
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


def index_by_bytes(images: np.ndarray, labels: np.ndarray) -> dict[bytes, int]:
    return {img.tobytes(): int(y) for img, y in zip(images, labels, strict=True)}


def _dump(path: Path, obj: dict) -> None:
    # protocol 2, like the original Python 2 pickles
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _rows(images: np.ndarray) -> np.ndarray:
    # CIFAR rows: 1024 red values, then green, then blue, each plane row-major
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_cifar10(root: Path, train_per_class: int = 20, test_per_class: int = 3, seed: int = 0) -> dict:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta; returns the images and labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    y = balanced_labels(10, train_per_class, rng)
    x = noise_images(len(y), 32, rng)
    for b, chunk in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        _dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": y[chunk].tolist(),
                "data": _rows(x[chunk]),
                "filenames": [f"img_{i}.png" for i in chunk],
            },
        )
    y_test = balanced_labels(10, test_per_class, rng)
    x_test = noise_images(len(y_test), 32, rng)
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": y_test.tolist(),
            "data": _rows(x_test),
            "filenames": ["t.png"] * len(y_test),
        },
    )
    _dump(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 10000, "num_vis": 3072})
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def write_cifar100(root: Path, train_per_class: int = 6, test_per_class: int = 1, seed: int = 0) -> dict:
    """cifar-100-python/ with train, test, meta (fine and coarse labels); returns images and fine labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, per_class in [("train", train_per_class), ("test", test_per_class)]:
        y = balanced_labels(100, per_class, rng)
        x = noise_images(len(y), 32, rng)
        _dump(
            folder / split,
            {
                "filenames": ["f.png"] * len(y),
                "batch_label": split,
                "fine_labels": y.tolist(),
                "coarse_labels": (y // 5).tolist(),
                "data": _rows(x),
            },
        )
        out["x" if split == "train" else "x_test"], out["y" if split == "train" else "y_test"] = x, y
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    return out


def _stl_bytes(images: np.ndarray) -> bytes:
    # STL-10 stores each channel column-major: raw[n, c, w, h] = image[n, h, w, c]
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def write_stl10(root: Path, train_per_class: int = 12, test_per_class: int = 2, unlabeled: int = 7, seed: int = 0):
    """stl10_binary/ with train_X/y, test_X/y, unlabeled_X .bin and class_names.txt (labels 1..10 on disk)."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, per_class in [("train", train_per_class), ("test", test_per_class)]:
        y = balanced_labels(10, per_class, rng)
        x = noise_images(len(y), 96, rng)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(x))
        (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
        out["x" if split == "train" else "x_test"], out["y" if split == "train" else "y_test"] = x, y
    out["x_unlabeled"] = noise_images(unlabeled, 96, rng)
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(out["x_unlabeled"]))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return out


def write_png(path: Path, colour: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)
