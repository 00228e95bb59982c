"""What every data builder returns: the four splits of a long-tailed semi-supervised task.

Training sees `labeled` and `unlabeled_images` only. The unlabeled ground truth is kept in its own field and is read
by the pseudo-label quality metrics alone; it never reaches a loss, a pseudo-label rule or a statistic that feeds
training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FileImages:
    """Images stored as files (image-folder data), decoded and resized to `size` x `size` on demand."""

    paths: Sequence[str]
    size: int

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (len(indices), size, size, 3)."""
        from PIL import Image

        out = np.empty((len(indices), self.size, self.size, 3), dtype=np.uint8)
        for row, i in enumerate(indices):
            with Image.open(Path(self.paths[int(i)])) as img:
                out[row] = np.asarray(img.convert("RGB").resize((self.size, self.size), Image.BILINEAR))
        return out


Images = np.ndarray | FileImages  # ndarray: uint8 (N, H, W, 3)


def image_side(images: Images) -> int:
    """The side of the stored (square) images: the size augmentation runs at, before any resize for the model."""
    return images.size if isinstance(images, FileImages) else int(images.shape[1])


@dataclass(frozen=True)
class ImageSet:
    images: Images
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SSLData:
    labeled: ImageSet
    unlabeled_images: Images
    # int64 (M,), -1 where unknown (STL-10's unlabeled split, out-of-class images). Measurement only.
    unlabeled_truth: np.ndarray | None
    val: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, float, float]  # per-channel normalisation on [0, 1] images
    std: tuple[float, float, float]
    class_names: list[str] = field(default_factory=list)
    # Side length the model sees; None = the stored size. STL-10 augments at 96 px, then resizes to 32.
    model_size: int | None = None

    @property
    def labeled_counts(self) -> np.ndarray:
        return np.bincount(self.labeled.labels, minlength=self.num_classes)

    @property
    def unlabeled_counts(self) -> np.ndarray | None:
        if self.unlabeled_truth is None:
            return None
        known = self.unlabeled_truth[self.unlabeled_truth >= 0]
        return np.bincount(known, minlength=self.num_classes)
