"""CIFAR-10-LT and CIFAR-100-LT (Krizhevsky 2009) read through torchvision's dataset classes.

The files read are the real extracted archives: `cifar-10-batches-py/` (data_batch_1..5, test_batch,
batches.meta) and `cifar-100-python/` (train, test, meta), pickles of uint8 (N, 3072) rows. torchvision
verifies the md5 of each extracted file; here the extracted files are checked for presence only (the
downloaded archive keeps its md5 check), so a folder copied by hand and small test fixtures in the same format
load through the same code. Also home of the missing-data error and the quick network probe shared by the
torchvision-backed loaders.
"""

from __future__ import annotations

import pickle
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from filelock import FileLock
from torchvision import datasets

from trainables.config import DataConfig
from trainables.data.base import ImageSet, SSLData
from trainables.data.splits import split_pool

# Per-channel statistics of the 50k training images on [0, 1] (the constants FixMatch and DASO use).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# An offline node that drops packets would otherwise hold urllib (no timeout) for minutes per attempt.
PROBE_TIMEOUT_S = 5.0


class DatasetNotFoundError(FileNotFoundError):
    """Data files are missing and could not be downloaded; the message names the path and how to get them."""


def _presence_only(files: list[list[Any]]) -> list[list[Any]]:
    # torchvision's check_integrity(path, None) tests that the file exists and skips the md5
    return [[name, None] for name, _ in files]


class CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader; extracted files are checked for presence, the archive for its md5."""

    train_list = _presence_only(datasets.CIFAR10.train_list)
    test_list = _presence_only(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}


class CIFAR100Files(datasets.CIFAR100):
    """torchvision's CIFAR-100 reader; extracted files are checked for presence, the archive for its md5."""

    train_list = _presence_only(datasets.CIFAR100.train_list)
    test_list = _presence_only(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}


def expected_files(cls: type) -> list[str]:
    """File names torchvision reads under `root/cls.base_folder`."""
    names = [name for name, _ in cls.train_list + cls.test_list]
    meta = getattr(cls, "meta", None)
    return names + ([meta["filename"]] if meta else [])


def probe_host(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the URL's host (or urllib's proxy for it) accepts a TCP connection in `timeout` s, else why."""
    target = urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"cannot reach {target.hostname}:{port} ({err})"
    return None


def open_torchvision_dataset(cls: type, name: str, root: str, download: bool, **kwargs: Any) -> Any:
    """torchvision dataset `cls` under `root`, downloaded when allowed; DatasetNotFoundError otherwise.

    Missing files with download off, an unreachable host, a failed download and unreadable files all raise
    DatasetNotFoundError naming the folder and the two ways to provide it.
    """
    folder = Path(root) / cls.base_folder
    missing = [f for f in expected_files(cls) if not (folder / f).is_file()]
    how = (
        f"Set data.download=true on a machine with network access (it fetches {cls.url} and extracts it into "
        f"{Path(root)}), or copy the extracted folder '{cls.base_folder}' to {folder}."
    )
    if missing:
        if not download:
            raise DatasetNotFoundError(
                f"{name} not found: {folder} lacks {', '.join(missing)} and data.download is false. {how}"
            )
        reason = probe_host(cls.url)
        if reason is not None:
            raise DatasetNotFoundError(f"{name} not found under {folder} and cannot be downloaded: {reason}. {how}")
    try:
        if not missing:
            return cls(root, download=False, **kwargs)
        # trials sharing a node (or a shared data.root) download one at a time; the others then find the files
        Path(root).mkdir(parents=True, exist_ok=True)
        with FileLock(str(Path(root) / f".{cls.base_folder}.download.lock")):
            return cls(root, download=download, **kwargs)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise DatasetNotFoundError(f"{name}: could not download or read {folder}: {err!r}. {how}") from err
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError) as err:
        raise DatasetNotFoundError(
            f"{name}: files under {folder} are corrupted ({err!r}); delete the folder and download again. " + how
        ) from err


def _build_cifar(cfg: DataConfig, cls: type, name: str, mean: tuple, std: tuple) -> SSLData:
    train = open_torchvision_dataset(cls, name, cfg.root, cfg.download, train=True)
    test = open_torchvision_dataset(cls, name, cfg.root, cfg.download, train=False)
    num_classes = len(train.classes)
    images = np.ascontiguousarray(train.data)  # uint8 (50000, 32, 32, 3)
    labels = np.asarray(train.targets, dtype=np.int64)
    parts = split_pool(images, labels, num_classes, cfg, cfg.val_per_class)  # default: 500 (CIFAR-10), 50 per class
    return SSLData(
        labeled=parts["labeled"],
        unlabeled_images=parts["unlabeled"].images,
        unlabeled_truth=parts["unlabeled"].labels,
        val=parts["val"],
        test=ImageSet(np.ascontiguousarray(test.data), np.asarray(test.targets, dtype=np.int64)),
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=list(train.classes),
    )


def build_cifar10(cfg: DataConfig) -> SSLData:
    """CIFAR-10-LT: 10 classes, 5000 train images per class before the carve-out, 10k test set."""
    return _build_cifar(cfg, CIFAR10Files, "CIFAR-10", CIFAR10_MEAN, CIFAR10_STD)


def build_cifar100(cfg: DataConfig) -> SSLData:
    """CIFAR-100-LT: 100 fine classes, 500 train images per class before the carve-out, 10k test set."""
    return _build_cifar(cfg, CIFAR100Files, "CIFAR-100", CIFAR100_MEAN, CIFAR100_STD)
