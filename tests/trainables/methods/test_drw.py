import io
import math

import pytest
import torch

from trainables.methods.drw import (
    ClassBalancedCE,
    DynamicReweighting,
    confident_counts,
    effective_number_weights,
)

CPU = torch.device("cpu")
CIFAR10_LT_COUNTS = [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]


def test_effective_number_weights_hand_example():
    """counts (1, 2), beta = 0.5: raw = (0.5 / 0.5, 0.5 / 0.75) = (1, 2/3), sum 5/3,
    w = raw * 2 / (5/3) = (1.2, 0.8)."""
    torch.testing.assert_close(effective_number_weights(torch.tensor([1, 2]), 0.5), torch.tensor([1.2, 0.8]))


def test_effective_number_weights_cifar10_lt_closed_form():
    """CIFAR-10-LT labeled counts (N1 = 1500, gamma = 100), beta = 0.999, recomputed with python floats:
    w_c = C * r_c / sum_j r_j, r_c = (1 - beta) / (1 - beta^n_c). The head weight is the smallest."""
    beta = 0.999
    raw = [(1 - beta) / (1 - beta**n) for n in CIFAR10_LT_COUNTS]
    expected = [10 * r / sum(raw) for r in raw]
    w = effective_number_weights(torch.tensor(CIFAR10_LT_COUNTS), beta)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=0)
    assert w.sum().item() == pytest.approx(10.0)
    assert w.argmin().item() == 0 and w.argmax().item() == 9


def test_beta_zero_is_exactly_no_reweighting():
    """beta = 0: every raw weight is 1 / (1 - 0^n) = 1 and C / C = 1, so the weights are bit-exact ones."""
    w = effective_number_weights(torch.tensor(CIFAR10_LT_COUNTS), 0.0)
    assert torch.equal(w, torch.ones(10))


def test_beta_to_one_tends_to_inverse_frequency():
    """1 - beta^n ~ n (1 - beta) as beta -> 1, so w_c -> C (1 / n_c) / sum_j (1 / n_j)."""
    inverse = [1 / n for n in CIFAR10_LT_COUNTS]
    expected = torch.tensor([10 * x / sum(inverse) for x in inverse])
    w = effective_number_weights(torch.tensor(CIFAR10_LT_COUNTS), 1 - 1e-9)
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=0)


def test_zero_counts_are_clamped_to_one():
    """counts (0, 1): clamped to (1, 1), hence weights (1, 1), not an infinite weight for class 0."""
    assert torch.equal(effective_number_weights(torch.tensor([0, 1]), 0.9), torch.ones(2))


@pytest.mark.parametrize("beta", [-0.1, 1.0])
def test_beta_outside_unit_interval_is_an_error(beta):
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights(torch.tensor([1, 2]), beta)


def test_confident_counts_count_masked_samples_only():
    """pseudo-labels (0, 2, 2, 1, 2), mask (1, 1, 0, 0, 1) -> class 0: 1, class 1: 0 (masked), class 2: 2."""
    counts = confident_counts(torch.tensor([0, 2, 2, 1, 2]), torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]), 3)
    assert counts.tolist() == [1, 0, 2]


def test_class_balanced_ce_weights_each_sample_by_its_label():
    """counts (1, 2), beta = 0.5 -> w = (1.2, 0.8) (see the hand example). Zero logits: CE = log 2 per sample.

    y = (0, 1): mean(1.2 log 2, 0.8 log 2) = log 2;  y = (0, 0): 1.2 log 2.
    """
    loss = ClassBalancedCE(torch.tensor([1, 2]), 0.5)
    logits = torch.zeros(2, 2)
    torch.testing.assert_close(loss(logits, torch.tensor([0, 1])), torch.tensor(math.log(2)))
    torch.testing.assert_close(loss(logits, torch.tensor([0, 0])), torch.tensor(1.2 * math.log(2)))


def test_window_counts_and_start():
    """window = 2 batches, C = 3, beta = 0.5, start = 3.

    step 0: pl (0, 0, 1), mask (1, 1, 0) -> (2, 0, 0)
    step 1: pl (1, 1, 2), mask (1, 0, 1) -> (0, 1, 1); window total (2, 1, 1)
    step 2: pl (2, 2, 2), mask (1, 1, 1) -> (0, 0, 3) replaces step 0's row; total (0, 1, 4)
    weights at step 3 from clamped counts (1, 1, 4): raw (1, 1, 0.5 / (1 - 1/16) = 8/15), sum 38/15,
    w = raw * 3 / (38/15) = (45/38, 45/38, 12/19). Before step 3: None (unweighted).
    """
    drw = DynamicReweighting(3, CPU, beta=0.5, start=3, count="window", window=2)
    drw.observe(torch.tensor([0, 0, 1]), torch.tensor([1.0, 1.0, 0.0]), 0)
    drw.observe(torch.tensor([1, 1, 2]), torch.tensor([1.0, 0.0, 1.0]), 1)
    assert drw.counts().tolist() == [2, 1, 1]
    drw.observe(torch.tensor([2, 2, 2]), torch.ones(3), 2)
    assert drw.counts().tolist() == [0, 1, 4]
    assert drw.class_weights(2) is None
    torch.testing.assert_close(drw.class_weights(3), torch.tensor([45 / 38, 45 / 38, 12 / 19]))
    assert not drw.wants_pass(3)
    metrics = drw.metrics()
    assert metrics["drw/w_u/c02"] == pytest.approx(12 / 19) and metrics["drw/count/c02"] == 4.0


def test_ema_pass_schedule_and_counts_replace():
    """start = 10, pass_every = 5: passes before steps 10, 15, 20, ...; training batches are not counted,
    and each pass replaces the previous counts."""
    drw = DynamicReweighting(3, CPU, beta=0.5, start=10, count="ema_pass", pass_every=5)
    assert [s for s in range(22) if drw.wants_pass(s)] == [10, 15, 20]
    drw.observe(torch.tensor([0, 0]), torch.ones(2), 0)
    assert drw.counts().tolist() == [0, 0, 0]
    drw.observe_pass(torch.tensor([0, 0, 0, 1, 2]), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]), 10)
    assert drw.counts().tolist() == [3, 1, 0]
    drw.observe_pass(torch.tensor([2, 2]), torch.ones(2), 15)
    assert drw.counts().tolist() == [0, 0, 2]
    assert drw.class_weights(9) is None
    torch.testing.assert_close(drw.class_weights(15), effective_number_weights(torch.tensor([1, 1, 2]), 0.5))


@pytest.mark.parametrize("count", ["window", "ema_pass"])
def test_state_round_trip(count):
    """Fill the counts, save through torch.save / torch.load(weights_only=True), restore into a fresh
    component: same weights now and after one more (identical) observation, which checks the ring position."""
    make = lambda: DynamicReweighting(4, CPU, beta=0.9, count=count, window=3, pass_every=2)  # noqa: E731
    original = make()
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        pl, mask = torch.randint(0, 4, (8,), generator=g), (torch.rand(8, generator=g) > 0.3).float()
        original.observe(pl, mask, step)
        if original.wants_pass(step):
            original.observe_pass(pl, mask, step)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(original.class_weights(5), restored.class_weights(5))
    for drw in (original, restored):
        drw.observe(torch.tensor([3, 3]), torch.ones(2), 5)
        if drw.wants_pass(6):
            drw.observe_pass(torch.tensor([3, 3]), torch.ones(2), 6)
    assert torch.equal(original.class_weights(7), restored.class_weights(7))
    assert original.state_dict()["ring_pos"] == restored.state_dict()["ring_pos"]


def test_load_state_dict_rejects_another_window():
    state = DynamicReweighting(4, CPU, window=3).state_dict()
    with pytest.raises(ValueError, match="ring"):
        DynamicReweighting(4, CPU, window=5).load_state_dict(state)
