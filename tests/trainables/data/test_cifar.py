import socket
import time
import urllib.error

import numpy as np
import pytest
import torchvision.datasets.utils

from tests.trainables.data.fakes import CIFAR10_NAMES, index_by_bytes, write_cifar10, write_cifar100
from trainables.config import DataConfig
from trainables.data import cifar
from trainables.data.cifar import DatasetNotFoundError, build_cifar10, build_cifar100


def _config(root, dataset="cifar10", **kw):
    args = dict(dataset=dataset, root=str(root), download=False, n1=8, m1=4, gamma_l=4, val_size=20, seed=0)
    return DataConfig(**(args | kw))


def _check_pairs(images, labels, truth: dict[bytes, int]):
    """Every returned image is one the writer made, with the label the writer gave it (pairing and layout)."""
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    assert [truth[img.tobytes()] for img in images] == labels.tolist()


def test_cifar10_reads_the_real_pickle_layout(tmp_path):
    """20 train images per class in data_batch_1..5; val 2 / class, N1 = 8, M1 = 4, gamma_l = gamma_u = 4.

    Labeled: int(8 * 4 ** (-c / 9)) = 8, 6, 5, 5, 4, 3, 3, 2, 2, 2; unlabeled: int(4 * 4 ** (-c / 9))
    = 4, 3, 2, 2, 2, 1, 1, 1, 1, 1.
    """
    fake = write_cifar10(tmp_path)
    data = build_cifar10(_config(tmp_path))
    truth = index_by_bytes(fake["x"], fake["y"])
    _check_pairs(data.labeled.images, data.labeled.labels, truth)
    _check_pairs(data.val.images, data.val.labels, truth)
    _check_pairs(data.unlabeled_images, data.unlabeled_truth, truth)
    assert data.labeled_counts.tolist() == [8, 6, 5, 5, 4, 3, 3, 2, 2, 2]
    assert data.unlabeled_counts.tolist() == [4, 3, 2, 2, 2, 1, 1, 1, 1, 1]
    assert np.bincount(data.val.labels).tolist() == [2] * 10
    assert np.array_equal(data.test.images, fake["x_test"])
    assert np.array_equal(data.test.labels, fake["y_test"])
    assert data.class_names == CIFAR10_NAMES
    assert data.num_classes == 10
    assert data.mean == cifar.CIFAR10_MEAN and data.model_size is None


def test_cifar100_reads_fine_labels(tmp_path):
    """6 train images per class, val 1 / class, N1 = 3, M1 = 2, gamma_l = 3, gamma_u = 1.

    Labeled: int(3 * 3 ** (-c / 99)) is 3 for c = 0; 3 * 3 ** (-1/99) = 2.97 -> 2 from c = 1 on; it drops
    below 2 once 3 ** (-c / 99) < 2/3, i.e. c > 99 * log3(1.5) = 36.5, so classes 37..99 keep 1.
    """
    fake = write_cifar100(tmp_path)
    data = build_cifar100(_config(tmp_path, "cifar100", n1=3, m1=2, gamma_l=3, gamma_u=1.0, val_size=100))
    truth = index_by_bytes(fake["x"], fake["y"])
    _check_pairs(data.labeled.images, data.labeled.labels, truth)
    _check_pairs(data.unlabeled_images, data.unlabeled_truth, truth)
    assert data.num_classes == 100
    assert data.labeled_counts.tolist() == [3] + [2] * 36 + [1] * 63
    assert data.unlabeled_counts.tolist() == [2] * 100
    assert data.class_names[:2] == ["fine_0", "fine_1"]
    assert np.array_equal(data.test.labels, fake["y_test"])


def test_missing_files_name_the_path_and_the_remedies(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_cifar10(_config(tmp_path / "nowhere"))
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "data.download" in message and "copy the extracted folder" in message
    assert isinstance(err.value, FileNotFoundError)


def test_partial_folder_lists_what_is_missing(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"lacks data_batch_3 and data.download is false"):
        build_cifar10(_config(tmp_path))


def test_failed_download_is_reported_at_once(tmp_path, monkeypatch):
    """The host answers the probe but the download raises URLError: one attempt, then a clear error."""
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(cifar, "probe_host", lambda url, timeout=None: None)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as err:
        build_cifar10(_config(tmp_path, download=True))
    assert time.monotonic() - start < 5
    assert calls == [cifar.CIFAR10Files.url]
    assert "simulated: no network" in str(err.value) and str(tmp_path / "cifar-10-batches-py") in str(err.value)


def test_unreachable_host_fails_before_downloading(tmp_path, monkeypatch):
    """The probe is one short TCP connect; when it fails torchvision's download is never called."""
    timeouts = []

    def unreachable(address, timeout=None):
        timeouts.append(timeout)
        raise OSError("[Errno 101] Network is unreachable")

    def must_not_download(*args, **kwargs):
        raise AssertionError("download attempted after a failed probe")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", must_not_download)
    with pytest.raises(DatasetNotFoundError, match=r"cannot reach www.cs.toronto.edu:443 .*Network is unreachable"):
        build_cifar100(_config(tmp_path, "cifar100", download=True, val_size=100))
    assert timeouts == [cifar.PROBE_TIMEOUT_S] and cifar.PROBE_TIMEOUT_S <= 10


def test_probe_goes_through_the_configured_proxy(monkeypatch):
    """With https_proxy set, urllib connects to the proxy, so the probe must test the proxy, not the host."""
    targets = []

    def record(address, timeout=None):
        targets.append(address)
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", record)
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    assert cifar.probe_host("https://www.cs.toronto.edu/x.tar.gz") == "cannot reach proxy.internal:3128 (refused)"
    monkeypatch.delenv("https_proxy")
    assert cifar.probe_host("https://www.cs.toronto.edu/x.tar.gz").startswith("cannot reach www.cs.toronto.edu:443")
    assert targets == [("proxy.internal", 3128), ("www.cs.toronto.edu", 443)]


def test_present_files_need_no_network(tmp_path, monkeypatch):
    """download=True with the files in place reads them without touching the network."""
    write_cifar10(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("network used although the files are present")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", no_network)
    assert len(build_cifar10(_config(tmp_path, download=True)).labeled) == 40


def test_corrupted_pickle_is_reported(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py are corrupted \(UnpicklingError"):
        build_cifar10(_config(tmp_path))


def test_default_validation_size_is_5000(tmp_path):
    """val_size null -> 5000 = 500 per class: 20 images per class cannot hold it, and the error says so."""
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"class 0 has 20 train images, fewer than .* 500 \+ 8 \+ 4"):
        build_cifar10(_config(tmp_path, val_size=None))
