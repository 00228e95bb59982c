import socket

import numpy as np
import pytest

from tests.trainables.data.fakes import index_by_bytes, write_stl10
from trainables.config import DataConfig
from trainables.data.cifar import DatasetNotFoundError
from trainables.data.stl10 import build_stl10, chw_colmajor_to_hwc


def _config(root, **kw):
    args = dict(dataset="stl10", root=str(root), download=False, n1=9, gamma_l=3, val_size=20, seed=0)
    return DataConfig(**(args | kw))


def test_column_major_layout():
    """raw[n, c, w, h] = image[n, h, w, c]: the byte after the first one of a channel is one row DOWN."""
    raw = np.arange(3 * 2 * 2).reshape(1, 3, 2, 2)  # channel 0 holds 0, 1, 2, 3 in file order
    image = chw_colmajor_to_hwc(raw)
    assert image.shape == (1, 2, 2, 3)
    assert image[0, :, :, 0].tolist() == [[0, 2], [1, 3]]  # file order runs down the first column first
    assert image[0, 0, 0].tolist() == [0, 4, 8]


def test_stl10_reads_the_real_binary_layout(tmp_path):
    """12 train images per class, val 2 / class, N1 = 9, gamma_l = 3: n_c = int(9 * 3 ** (-c / 9)).

    c = 0: 9; c = 1: 9 * 0.8851 = 7.97 -> 7; c = 2: 9 * 0.7834 = 7.05 -> 7; c = 3: 9 * 0.6934 = 6.24 -> 6;
    c = 4: 9 * 0.6137 = 5.52 -> 5; c = 5: 9 * 0.5432 = 4.89 -> 4; c = 6: 9 * 0.4807 = 4.33 -> 4;
    c = 7: 9 * 0.4255 = 3.83 -> 3; c = 8: 9 * 0.3766 = 3.39 -> 3; c = 9: 9 / 3 = 3.
    """
    fake = write_stl10(tmp_path)
    data = build_stl10(_config(tmp_path))
    truth = index_by_bytes(fake["x"], fake["y"])
    for images, labels in [(data.labeled.images, data.labeled.labels), (data.val.images, data.val.labels)]:
        assert images.shape[1:] == (96, 96, 3) and images.dtype == np.uint8
        assert [truth[img.tobytes()] for img in images] == labels.tolist()
    assert data.labeled_counts.tolist() == [9, 7, 7, 6, 5, 4, 4, 3, 3, 3]
    assert np.bincount(data.val.labels).tolist() == [2] * 10
    assert np.array_equal(data.test.images, fake["x_test"]) and np.array_equal(data.test.labels, fake["y_test"])
    # the unlabeled split: every image in file order, classes unknown
    assert np.array_equal(data.unlabeled_images, fake["x_unlabeled"])
    assert data.unlabeled_truth.tolist() == [-1] * 7
    assert data.unlabeled_counts.tolist() == [0] * 10
    assert data.model_size == 32
    assert data.class_names[:2] == ["airplane", "bird"]


def test_unlabeled_images_stay_on_disk(tmp_path):
    write_stl10(tmp_path)
    data = build_stl10(_config(tmp_path))
    assert isinstance(data.unlabeled_images, np.memmap)  # 100k images = 2.8 GB: read per batch
    assert not data.unlabeled_images.flags.writeable
    rows = data.unlabeled_images[[4, 1]]
    assert type(rows) is np.ndarray and rows.shape == (2, 96, 96, 3)


def test_missing_stl10_names_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"stl10_binary lacks train_X.bin, .*unlabeled_X.bin") as err:
        build_stl10(_config(tmp_path))
    assert str(tmp_path / "stl10_binary") in str(err.value)


def test_unreachable_stl10_host(tmp_path, monkeypatch):
    def unreachable(address, timeout=None):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DatasetNotFoundError, match=r"cannot reach ai.stanford.edu:80 .*copy the extracted folder"):
        build_stl10(_config(tmp_path, download=True))


def test_truncated_unlabeled_file_is_reported(tmp_path):
    write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "unlabeled_X.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetNotFoundError, match=r"unlabeled_X.bin: \d+ bytes is not a positive multiple of 27648"):
        build_stl10(_config(tmp_path))
