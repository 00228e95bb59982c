"""Users' own data in the Semi-Aves layout (Su & Maji, 2021): image files listed in `path label` text files.

Every list file holds one image per line, `relative/path.jpg label`, the path relative to `imagefolder.root`.
Labeled, validation and test lists must carry labels 0..C-1; C is one more than the largest label there.
Unlabeled lists (in-class and out-of-class) may omit the label column; a label that is present is kept ONLY as
`unlabeled_truth` for pseudo-label metrics, with -1 for a missing label or one outside 0..C-1 (out-of-class).
The labeled list is used as given (it is already long-tailed): n1, m1, the gammas and val_size do not apply.
Images stay on disk and are decoded on demand (`FileImages`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainables.config import DataConfig
from trainables.data.base import FileImages, ImageSet, SSLData
from trainables.data.cifar import DatasetNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LISTED_MISSING = 5


def read_list(root: Path, list_name: str, labels_required: bool) -> tuple[list[str], np.ndarray]:
    """Absolute image paths and int64 labels of one list file; -1 where an unlabeled line has no label.

    A line is `path` or `path label` (the label is the last whitespace-separated token, so paths may hold
    spaces when a label follows). Blank lines are skipped. Raises DatasetNotFoundError for a missing list file
    or images, ValueError naming the file and line for a malformed line.
    """
    list_path = root / list_name
    if not list_path.is_file():
        raise DatasetNotFoundError(f"list file {list_path} not found (imagefolder.root={root}, entry {list_name!r})")
    paths: list[str] = []
    labels: list[int] = []
    missing: list[str] = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        label = _parse_label(parts[-1]) if len(parts) == 2 else None
        rel = parts[0] if label is not None else line
        if labels_required and (label is None or label < 0):
            raise ValueError(
                f"{list_path}:{number}: expected 'relative/path label' with an integer label >= 0, got {line!r}"
            )
        image = root / rel
        if not image.is_file():
            missing.append(f"{list_path}:{number}: {image}")
        paths.append(str(image))
        labels.append(-1 if label is None else label)
    if missing:
        shown = "\n  ".join(missing[:MAX_LISTED_MISSING])
        more = f"\n  ... and {len(missing) - MAX_LISTED_MISSING} more" if len(missing) > MAX_LISTED_MISSING else ""
        raise DatasetNotFoundError(f"{len(missing)} image(s) listed in {list_path} do not exist:\n  {shown}{more}")
    if not paths:
        raise ValueError(f"{list_path}: no entries (expected 'relative/path label' lines)")
    return paths, np.asarray(labels, dtype=np.int64)


def _parse_label(token: str) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def build_imagefolder(cfg: DataConfig) -> SSLData:
    """Labeled, unlabeled (all lists concatenated), val and test sets from `cfg.imagefolder`'s lists."""
    spec = cfg.imagefolder
    if spec is None:
        raise ValueError("dataset 'imagefolder' needs an 'imagefolder' section (root, list files)")
    root = Path(spec.root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"imagefolder.root={root} is not a directory")
    sets = {
        name: read_list(root, list_name, labels_required=True)
        for name, list_name in [
            ("labeled", spec.labeled_list),
            ("val", spec.val_list),
            ("test", spec.test_list),
        ]
    }
    num_classes = int(max(labels.max(initial=-1) for _, labels in sets.values())) + 1
    absent = sorted(set(range(num_classes)) - set(sets["labeled"][1].tolist()))
    if absent:
        raise ValueError(
            f"{root / spec.labeled_list}: classes {absent[:10]} of 0..{num_classes - 1} have no labeled "
            "image; every class needs one (the labeled class prior feeds logit adjustment and re-weighting)"
        )
    u_paths: list[str] = []
    u_labels: list[np.ndarray] = []
    for list_name in spec.unlabeled_lists:
        paths, labels = read_list(root, list_name, labels_required=False)
        u_paths += paths
        u_labels.append(np.where((labels >= 0) & (labels < num_classes), labels, -1))
    size = spec.image_size

    def image_set(name: str) -> ImageSet:
        paths, labels = sets[name]
        return ImageSet(FileImages(paths, size), labels)

    return SSLData(
        labeled=image_set("labeled"),
        unlabeled_images=FileImages(u_paths, size),
        unlabeled_truth=np.concatenate(u_labels),
        val=image_set("val"),
        test=image_set("test"),
        num_classes=num_classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
