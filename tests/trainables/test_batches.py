"""Data order: a pure function of (seed, stream, step), covering every item once per epoch."""

import numpy as np
import torch

from trainables.batches import ImageStore, IndexStream


def test_each_epoch_is_a_permutation():
    s = IndexStream(n=10, batch_size=5, seed=0, stream=0)
    epoch0 = torch.cat([s.indices(0), s.indices(1)])
    epoch1 = torch.cat([s.indices(2), s.indices(3)])
    assert sorted(epoch0.tolist()) == list(range(10)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_batches_spanning_epochs_and_sets_smaller_than_a_batch():
    s = IndexStream(n=3, batch_size=7, seed=1, stream=0)
    first = s.indices(0)  # positions 0..6: epochs 0, 1 and the first item of epoch 2
    assert len(first) == 7
    assert sorted(first[:3].tolist()) == [0, 1, 2] == sorted(first[3:6].tolist())


def test_order_depends_only_on_seed_stream_and_step():
    a = IndexStream(100, 8, seed=3, stream=1)
    b = IndexStream(100, 8, seed=3, stream=1)
    for step in [5, 0, 40, 12]:  # any access order: resuming at step k needs nothing else
        assert torch.equal(a.indices(step), b.indices(step))
    assert not torch.equal(a.indices(0), IndexStream(100, 8, seed=4, stream=1).indices(0))
    assert not torch.equal(a.indices(0), IndexStream(100, 8, seed=3, stream=0).indices(0))


def test_image_store_resident_and_host_agree():
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    idx = torch.tensor([5, 0, 3])
    resident = ImageStore(images, torch.device("cpu"), resident=True).gather(idx)
    host = ImageStore(images, torch.device("cpu"), resident=False).gather(idx)
    assert resident.shape == (3, 3, 4, 4) and resident.dtype == torch.uint8
    assert torch.equal(resident, host)
    assert torch.equal(resident[1], torch.from_numpy(images[0]).permute(2, 0, 1))
