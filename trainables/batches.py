"""Where each step's images come from: a deterministic index stream and an image store.

The data order is a pure function of (seed, stream, step): step k takes positions [k*B, (k+1)*B) of the
concatenation of per-epoch permutations, so a resumed run needs nothing but the step to continue the same order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from trainables.data.base import FileImages, Images


class IndexStream:
    """Batches of indices into a set of n items, epoch after epoch, each epoch a fresh seeded permutation."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int):
        if n <= 0:
            raise ValueError(f"stream {stream}: cannot draw batches from an empty set")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            seed = np.random.SeedSequence([self.seed, self.stream, epoch]).generate_state(1, np.uint64)[0]
            g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int) -> Tensor:
        """int64 (batch_size,) on the CPU."""
        start = step * self.batch_size
        parts, taken = [], 0
        while taken < self.batch_size:
            epoch, offset = divmod(start + taken, self.n)
            chunk = self._permutation(epoch)[offset : offset + self.batch_size - taken]
            parts.append(chunk)
            taken += len(chunk)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class ImageStore:
    """uint8 images served as (b, 3, H, W) tensors on `device`.

    resident=True keeps the whole set on the device (one upload, a step never waits on the host); otherwise arrays
    stay on the host and each batch is gathered there and copied over; file-backed images are decoded per batch.
    """

    def __init__(self, images: Images, device: torch.device, resident: bool):
        self.device = device
        self._files = images if isinstance(images, FileImages) else None
        self._tensor: Tensor | None = None
        self._array: np.ndarray | None = None
        if self._files is None:
            if resident:
                self._tensor = to_nchw(torch.from_numpy(np.ascontiguousarray(images))).to(device)
            else:
                self._array = images

    def __len__(self) -> int:
        if self._files is not None:
            return len(self._files)
        return len(self._tensor) if self._tensor is not None else len(self._array)

    def gather(self, idx: Tensor) -> Tensor:
        if self._tensor is not None:
            return self._tensor[idx.to(self.device, non_blocking=True)]
        host = self._files.load(idx.numpy()) if self._files is not None else self._array[idx.numpy()]
        batch = to_nchw(torch.from_numpy(np.ascontiguousarray(host)))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def chunks(self, batch_size: int):
        """Every image once, in order: (start index, uint8 batch on device)."""
        for start in range(0, len(self), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(self)))
            yield start, self.gather(idx)


class GrownStore:
    """A labeled store grown by some images of another store (CReST's selections): index i < len(base) is the base
    store's image i, index len(base) + j is `other`'s image picks[j]. Serves batches like an ImageStore."""

    def __init__(self, base: ImageStore, other: ImageStore, picks: Tensor):
        self.base, self.other, self.picks = base, other, picks.cpu()
        self.device = base.device

    def __len__(self) -> int:
        return len(self.base) + len(self.picks)

    def gather(self, idx: Tensor) -> Tensor:
        idx = idx.cpu()
        from_base = idx < len(self.base)
        if bool(from_base.all()):
            return self.base.gather(idx)
        if not bool(from_base.any()):
            return self.other.gather(self.picks[idx - len(self.base)])
        first = self.base.gather(idx[from_base])
        second = self.other.gather(self.picks[idx[~from_base] - len(self.base)])
        out = first.new_empty((len(idx), *first.shape[1:]))
        out.index_copy_(0, torch.nonzero(from_base).view(-1).to(out.device, non_blocking=True), first)
        out.index_copy_(0, torch.nonzero(~from_base).view(-1).to(out.device, non_blocking=True), second)
        return out

    chunks = ImageStore.chunks  # every image once, in order, through this store's gather


def to_nchw(x: Tensor) -> Tensor:
    # (N, H, W, 3) uint8 -> (N, 3, H, W), contiguous so the augmentations index it cheaply
    return x.permute(0, 3, 1, 2).contiguous()
