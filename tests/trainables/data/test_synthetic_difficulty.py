"""The synthetic set must stay learnable, yet hard for a model that sees only the long-tailed labeled split.

Slow (about 4 minutes on one CPU core): trains a small CNN twice. Run with `pytest -m slow`.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.data.splits import split_ssl
from trainables.data.synthetic import normalisation, render

C = 10


def _net() -> nn.Module:
    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(
        block(3, 32), block(32, 32), nn.MaxPool2d(2),  # 16 px
        block(32, 64), block(64, 64), nn.MaxPool2d(2),  # 8 px
        block(64, 128), nn.MaxPool2d(2), block(128, 128),  # 4 px
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, C),
    )  # fmt: skip


def _tensor(images: np.ndarray) -> torch.Tensor:
    mean, std = normalisation(C, 32)
    x = torch.from_numpy(images).float().div(255)
    return ((x - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)  # (N, 3, 32, 32)


def _train_and_recall(x, y, x_test, y_test, iterations: int) -> np.ndarray:
    """Per-class test recall after SGD with flips and 4 px reflect-padded crops (the weak augmentation)."""
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=iterations, pct_start=0.15)
    x, y = _tensor(x), torch.from_numpy(y)
    for _ in range(iterations):
        b = torch.randint(0, len(y), (64,))
        xb = torch.where(torch.rand(64, 1, 1, 1) < 0.5, x[b].flip(3), x[b])
        i, j = torch.randint(0, 9, (2,)).tolist()
        xb = F.pad(xb, (4, 4, 4, 4), mode="reflect")[:, :, i : i + 32, j : j + 32]
        loss = F.cross_entropy(model(xb), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(_tensor(x_test)).argmax(1).numpy()
    return np.array([(pred[y_test == c] == c).mean() for c in range(C)])


@pytest.mark.slow
def test_long_tailed_labels_alone_fall_well_short_of_the_balanced_pool():
    """LT split N1 = 500, gamma = 100 (500 ... 5 per class) vs the whole balanced pool (1300 per class).

    Measured at 1000 iterations: 69 % vs 96 % balanced accuracy, tail class 9 recall 0.05. Here 600 iterations
    with margins: balanced >= 85 %, at least 15 points above LT-only, and LT-only tail classes 5-9 at least 30
    points below head classes 0-4 in mean recall (their solid head partners absorb them).
    """
    torch.set_num_threads(1)
    pool_y = np.repeat(np.arange(C), 1500)
    pool_x = render(pool_y, C, 32, seed=0)
    test_y = np.repeat(np.arange(C), 100)
    test_x = render(test_y, C, 32, seed=1)
    idx = split_ssl(pool_y, C, n1=500, m1=1000, gamma_l=100, gamma_u=100, val_per_class=0, seed=0)
    lt = _train_and_recall(pool_x[idx["labeled"]], pool_y[idx["labeled"]], test_x, test_y, 600)
    keep = np.flatnonzero(np.arange(len(pool_y)) % 1500 < 1300)
    full = _train_and_recall(pool_x[keep], pool_y[keep], test_x, test_y, 600)
    assert full.mean() >= 0.85
    assert full.mean() >= lt.mean() + 0.15
    assert lt[:5].mean() >= lt[5:].mean() + 0.30
