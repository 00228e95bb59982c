import io
import math

import pytest
import torch

from trainables.methods.drw import (
    ClassBalancedCE,
    DynamicReweighting,
    effective_number_weights,
    pseudo_label_counts,
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


def test_pseudo_label_counts_count_masked_samples_only():
    """pseudo-labels (0, 2, 2, 1, 2), mask (1, 1, 0, 0, 1) -> class 0: 1, class 1: 0 (masked), class 2: 2."""
    counts = pseudo_label_counts(torch.tensor([0, 2, 2, 1, 2]), torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]), 3)
    assert counts.tolist() == [1, 0, 2]


def test_every_pseudo_label_counts_by_default():
    """The paper's pseudo number ignores the confidence mask: pl (0, 0, 1) with mask (1, 0, 0) counts (2, 1, 0);
    confident_only counts (1, 0, 0)."""
    pl, mask = torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.0, 0.0])
    for confident_only, expected in ((False, [2, 1, 0]), (True, [1, 0, 0])):
        for count in ("window", "ema_pass"):
            drw = DynamicReweighting(3, CPU, count=count, window=2, confident_only=confident_only)
            drw.observe(pl, mask, 0)
            drw.observe_pass(pl, mask, 0)
            assert drw.counts().tolist() == expected, (count, confident_only)


CIFAR10_LT_U = [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30]  # int(3000 * 100 ** (-c / 9)), |U| = 7443


def test_cifar10_lt_pseudo_numbers_give_the_papers_weight_ratio():
    """beta 0.995 on the CIFAR-10-LT unlabeled profile (M1 = 3000, gamma = 100, |U| = 7443).

    Counted over one pass over U (the window the factory sizes from |U| and mu * B = 128: ceil(7443 / 128) = 59
    batches), a pseudo-labeller that gets every label right reproduces the counts, and
    w_tail / w_head = (1 - 0.995^3000) / (1 - 0.995^30) = 0.99999... / 0.13962 = 7.16. The former window of 500
    batches x 128 (64,000 predictions, 8.6 |U|) with the same profile gives 1.38: the weights flatten.
    """
    from trainables.config import DrwConfig

    labels = torch.repeat_interleave(torch.arange(10), torch.tensor(CIFAR10_LT_U))
    assert len(labels) == 7443
    window = DrwConfig().window_batches(len(labels), 128)
    assert window == 59
    drw = DynamicReweighting(10, CPU, beta=0.995, count="window", window=window)
    order = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    for step, batch in enumerate(order.split(128)):  # one epoch of U in batches of mu * B
        drw.observe(batch, torch.zeros(len(batch)), step)  # unconfident: still counted
    assert drw.counts().tolist() == CIFAR10_LT_U
    w = drw.class_weights(10**9)
    ratio = float(w.max() / w.min())
    assert ratio == pytest.approx((1 - 0.995**3000) / (1 - 0.995**30), rel=1e-6)
    assert 7.1 < ratio < 7.2
    inflated = effective_number_weights(torch.tensor(CIFAR10_LT_U) * 64000 / 7443, 0.995)
    assert float(inflated.max() / inflated.min()) == pytest.approx(1.378, abs=0.001)


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
    drw = DynamicReweighting(3, CPU, beta=0.5, start=3, count="window", window=2, confident_only=True)
    drw.observe(torch.tensor([0, 0, 1]), torch.tensor([1.0, 1.0, 0.0]), 0)
    drw.observe(torch.tensor([1, 1, 2]), torch.tensor([1.0, 0.0, 1.0]), 1)
    assert drw.counts().tolist() == [2, 1, 1]
    drw.observe(torch.tensor([2, 2, 2]), torch.ones(3), 2)
    assert drw.counts().tolist() == [0, 1, 4]
    assert drw.class_weights(2) is None
    torch.testing.assert_close(drw.class_weights(3), torch.tensor([45 / 38, 45 / 38, 12 / 19]))
    assert not drw.wants_pass(3)
    metrics = drw.metrics()
    assert float(metrics["drw/w_u"][2]) == pytest.approx(12 / 19) and int(metrics["drw/count"][2]) == 4


def test_ema_pass_schedule_and_counts_replace():
    """start = 10, pass_every = 5: passes before steps 10, 15, 20, ...; training batches are not counted,
    and each pass replaces the previous counts."""
    drw = DynamicReweighting(3, CPU, beta=0.5, start=10, count="ema_pass", pass_every=5, confident_only=True)
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
