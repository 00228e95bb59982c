"""ModelEMA on a tiny module with scalar tensors, hand-computed over 3 updates."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from trainables.ema import ModelEMA, ema_decay_at


class Scalars(nn.Module):
    """A scalar parameter, a float buffer (like a BN running mean), an integer buffer (a step counter)."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.register_buffer("running", torch.tensor(0.0))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))

    def set(self, w: float, running: float, count: int) -> None:
        with torch.no_grad():
            self.w.fill_(w)
            self.running.fill_(running)
            self.count.fill_(count)


def test_ema_decay_at_warm_start_and_cap():
    assert ema_decay_at(0, 0.999) == 0.0
    assert ema_decay_at(1, 0.999) == 0.5
    assert ema_decay_at(2, 0.999) == pytest.approx(2 / 3)
    assert ema_decay_at(10_000, 0.999) == 0.999


def test_three_updates_hand_computed():
    """Model (w, running, count) before each update: (2, 4, 1), (4, 8, 2), (6, 2, 3); decay cap 0.9.

    t=0: d = 0 -> copy: w = 2, running = 4 (the construction-time w = 10 is gone).
    t=1: d = 1/2 -> w = 2/2 + 4/2 = 3, running = 4/2 + 8/2 = 6.
    t=2: d = min(2/3, 0.9) = 2/3 -> w = 2/3 * 3 + 1/3 * 6 = 4, running = 2/3 * 6 + 1/3 * 2 = 14/3.
    The integer buffer is copied each time: 1, 2, 3.
    """
    model = Scalars(10.0)
    ema = ModelEMA(model, decay=0.9)
    expected = [(0.0, 2.0, 4.0), (0.5, 3.0, 6.0), (2 / 3, 4.0, 14 / 3)]
    for step, ((w, running, count), (d, ema_w, ema_running)) in enumerate(
        zip([(2.0, 4.0, 1), (4.0, 8.0, 2), (6.0, 2.0, 3)], expected, strict=True)
    ):
        model.set(w, running, count)
        assert ema.update(model) == pytest.approx(d)
        assert ema.module.w.item() == pytest.approx(ema_w)
        assert ema.module.running.item() == pytest.approx(ema_running)
        assert ema.module.count.item() == count
        assert ema.updates == step + 1


def test_decay_cap_applies():
    """decay 0.5 caps d_2 = 2/3 at 1/2: after w = 2, 4, 6 the average is 1/2 * 3 + 1/2 * 6 = 4.5."""
    model = Scalars(0.0)
    ema = ModelEMA(model, decay=0.5)
    for w in (2.0, 4.0, 6.0):
        model.set(w, 0.0, 0)
        ema.update(model)
    assert ema.module.w.item() == pytest.approx(4.5)


def test_copy_is_frozen_in_eval_mode_and_independent():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    ema = ModelEMA(model, decay=0.999)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema.module[0].weight, model[0].weight)


def test_batchnorm_statistics_follow_the_model():
    """After a training forward the BN statistics moved; the first update copies them and the counter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    ema = ModelEMA(model, decay=0.999)
    model(torch.randn(8, 3, 6, 6) + 3.0)
    bn, ema_bn = model[1], ema.module[1]
    assert not torch.equal(ema_bn.running_mean, bn.running_mean)
    ema.update(model)
    torch.testing.assert_close(ema_bn.running_mean, bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ema_bn.running_var, bn.running_var, rtol=0, atol=0)
    assert ema_bn.num_batches_tracked.item() == 1


def test_state_round_trip_weights_only():
    """A restored EMA continues like the original: same weights, update counter and next d_t."""
    model = Scalars(1.0)
    ema = ModelEMA(model, decay=0.9)
    for w in (2.0, 4.0):
        model.set(w, w, 1)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = ModelEMA(Scalars(-5.0), decay=0.9)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.updates == 2
    model.set(6.0, 6.0, 3)
    assert restored.update(model) == ema.update(model) == pytest.approx(2 / 3)
    assert restored.module.w.item() == ema.module.w.item() == pytest.approx(4.0)


def test_update_rejects_a_different_architecture():
    ema = ModelEMA(nn.Linear(2, 2), decay=0.9)
    with pytest.raises(ValueError, match="do not match"):
        ema.update(nn.Linear(3, 2))
