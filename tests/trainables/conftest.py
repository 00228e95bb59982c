import numpy as np
import pytest
import torch

from trainables.config import load_config
from trainables.data.base import ImageSet, SSLData

TINY = [
    "train.iterations=30",
    "train.eval_every=10",
    "model.depth=10",
    "model.widen=1",
    "train.batch_size=8",
    "train.mu=2",
    "train.device=cpu",
    "train.eval_batch_size=64",
    "train.deterministic=true",
]


@pytest.fixture(autouse=True)
def _one_thread():
    # Results must not depend on how many workers share the machine; one thread also keeps CPU runs exact.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_data(num_classes: int = 4, seed: int = 0) -> SSLData:
    """Random images: enough to exercise the loop's mechanics (not its learning) in a second."""
    rng = np.random.default_rng(seed)

    def split(n):
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n)

    (xl, yl), (xu, yu), (xv, yv), (xt, yt) = split(40), split(80), split(24), split(24)
    return SSLData(
        ImageSet(xl, yl), xu, yu, ImageSet(xv, yv), ImageSet(xt, yt), num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    )


def tiny_config(*overrides: str):
    return load_config(None, [*TINY, *overrides])
