"""Trials that share a node (or a shared data.root) download a data set one at a time; the others find the files."""

from __future__ import annotations

import threading
import time

import pytest

from trainables.config import DataConfig
from trainables.data import DatasetNotFoundError, ensure_available
from trainables.data import cifar as cifar_module
from trainables.data.cifar import open_torchvision_dataset


class SlowDownload:
    """Stands in for a torchvision dataset class: 'downloads' by writing its files, slowly, counting overlaps."""

    base_folder = "slow-set"
    url = "https://example.org/slow-set.tar.gz"
    train_list = [["part_a", None], ["part_b", None]]
    test_list = [["part_t", None]]
    meta = None
    active = 0
    most_at_once = 0
    downloads = 0
    guard = threading.Lock()

    def __init__(self, root: str, download: bool, **kwargs):
        folder = f"{root}/{self.base_folder}"
        import os

        if download and not all(os.path.isfile(f"{folder}/{n}") for n, _ in self.train_list + self.test_list):
            cls = type(self)
            with cls.guard:
                cls.active += 1
                cls.most_at_once = max(cls.most_at_once, cls.active)
                cls.downloads += 1
            time.sleep(0.3)
            os.makedirs(folder, exist_ok=True)
            for name, _ in self.train_list + self.test_list:
                with open(f"{folder}/{name}", "w") as f:
                    f.write("x")
            with cls.guard:
                cls.active -= 1


def test_concurrent_openers_download_once(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_module, "probe_host", lambda url: None)  # "online"
    errors = []

    def open_it():
        try:
            open_torchvision_dataset(SlowDownload, "Slow", str(tmp_path), download=True)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (SlowDownload.downloads, SlowDownload.most_at_once) == (1, 1)
    assert sorted(p.name for p in (tmp_path / "slow-set").iterdir()) == ["part_a", "part_b", "part_t"]


def test_ensure_available_names_the_path_and_the_fix_when_missing(tmp_path):
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 not found: .*nowhere.*data.download is false"):
        ensure_available(cfg)
    ensure_available(DataConfig(dataset="synthetic", root=str(tmp_path / "nowhere")))  # generated, nothing to find
