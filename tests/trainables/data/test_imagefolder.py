import numpy as np
import pytest

from tests.trainables.data.fakes import write_png
from trainables.config import DataConfig, ImageFolderConfig
from trainables.data.base import FileImages
from trainables.data.cifar import DatasetNotFoundError
from trainables.data.imagefolder import IMAGENET_MEAN, build_imagefolder


def _colour(label: int) -> tuple[int, int, int]:
    return (40 * label, 255 - 40 * label, 7)


def _layout(root):
    """Semi-Aves-like tree: 3 classes; labeled 3/2/1 images, 1 val and 1 test per class, two unlabeled lists.

    u_in.txt carries labels (2 in class, one 9 = out of range, so -1); u_out.txt has none (-1).
    """
    lines = {"labeled.txt": [], "val.txt": [], "test.txt": [], "u_in.txt": [], "u_out.txt": []}
    for label, n in enumerate([3, 2, 1]):
        for i in range(n):
            lines["labeled.txt"].append(f"l_train/{label}_{i}.png {label}")
        lines["val.txt"].append(f"val/{label}.png {label}")
        lines["test.txt"].append(f"test/{label}.png {label}")
    lines["u_in.txt"] = ["u_in/a.png 2", "u_in/b.png 0", "u_in/c.png 9"]
    lines["u_out.txt"] = ["u_out/x y.png", "", "u_out/z.png"]  # a path with a space, a blank line
    for name, entries in lines.items():
        for entry in filter(None, entries):
            path, _, label = entry.rpartition(" ") if name != "u_out.txt" else (entry, "", "0")
            write_png(root / path, _colour(int(label) % 6))
        (root / name).write_text("\n".join(entries) + "\n")


def _config(root, **kw):
    spec = dict(
        root=str(root),
        labeled_list="labeled.txt",
        unlabeled_lists=["u_in.txt", "u_out.txt"],
        val_list="val.txt",
        test_list="test.txt",
        image_size=16,
    )
    return DataConfig(dataset="imagefolder", imagefolder=ImageFolderConfig(**(spec | kw)))


def test_imagefolder_lists(tmp_path):
    _layout(tmp_path)
    data = build_imagefolder(_config(tmp_path))
    assert data.num_classes == 3
    assert data.labeled.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert data.val.labels.tolist() == [0, 1, 2] and data.test.labels.tolist() == [0, 1, 2]
    assert isinstance(data.unlabeled_images, FileImages) and len(data.unlabeled_images) == 5
    # in-class labels kept for measurement only; 9 is out of range, u_out has none
    assert data.unlabeled_truth.tolist() == [2, 0, -1, -1, -1]
    assert data.unlabeled_images.paths[3] == str(tmp_path / "u_out" / "x y.png")
    assert data.mean == IMAGENET_MEAN


def test_images_decode_lazily_at_the_configured_size(tmp_path):
    _layout(tmp_path)
    data = build_imagefolder(_config(tmp_path))
    pixels = data.labeled.images.load(np.array([5, 0]))  # class 2 then class 0
    assert pixels.shape == (2, 16, 16, 3)
    assert pixels[0, 3, 3].tolist() == list(_colour(2)) and pixels[1, 0, 0].tolist() == list(_colour(0))


def test_malformed_line_names_file_and_line(tmp_path):
    _layout(tmp_path)
    (tmp_path / "val.txt").write_text("val/0.png 0\nval/1.png one\n")
    with pytest.raises(ValueError, match=r"val.txt:2: expected 'relative/path label' .*'val/1.png one'"):
        build_imagefolder(_config(tmp_path))


def test_negative_label_names_file_and_line(tmp_path):
    _layout(tmp_path)
    (tmp_path / "labeled.txt").write_text("l_train/0_0.png 0\n\nl_train/1_0.png -1\n")
    with pytest.raises(ValueError, match=r"labeled.txt:3: expected .*integer label >= 0, got 'l_train/1_0.png -1'"):
        build_imagefolder(_config(tmp_path))


def test_missing_image_names_file_and_line(tmp_path):
    _layout(tmp_path)
    (tmp_path / "test" / "1.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"1 image\(s\) listed in .*test.txt do not exist:\n .*test.txt:2: "):
        build_imagefolder(_config(tmp_path))


def test_missing_list_file(tmp_path):
    _layout(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"list file .*u_missing.txt not found"):
        build_imagefolder(_config(tmp_path, unlabeled_lists=["u_in.txt", "u_missing.txt"]))


def test_class_without_labeled_image(tmp_path):
    _layout(tmp_path)
    (tmp_path / "labeled.txt").write_text("l_train/0_0.png 0\nl_train/2_0.png 2\n")
    with pytest.raises(ValueError, match=r"classes \[1\] of 0..2 have no labeled image"):
        build_imagefolder(_config(tmp_path))
