"""FixMatch's mask, pseudo-label and losses on hand-computed tensors."""

import math

import torch

from trainables.losses import fixmatch_mask, labeled_ce, soft_ce, unlabeled_ce


def test_mask_and_pseudo_label():
    """Rows: max 0.96 >= 0.95 (kept, class 1); max 0.95 == tau (kept, '>=' as in FixMatch, class 0);
    max 0.6 (dropped, class 2)."""
    probs = torch.tensor([[0.02, 0.96, 0.02], [0.95, 0.03, 0.02], [0.1, 0.3, 0.6]])
    mask, pl = fixmatch_mask(probs, 0.95)
    assert mask.tolist() == [1.0, 1.0, 0.0]
    assert pl.tolist() == [1, 0, 2]


def test_unlabeled_loss_divides_by_the_whole_batch():
    """Two samples, logits [0, 0] (CE = log 2 for any target); only the first is confident.
    L_u = (1 * log 2 + 0 * log 2) / 2 = log(2) / 2, not log 2 (FixMatch divides by mu*B, not by the mask sum)."""
    logits_s = torch.zeros(2, 2)
    loss = unlabeled_ce(logits_s, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    assert math.isclose(loss.item(), math.log(2) / 2, rel_tol=1e-6)


def test_unlabeled_loss_class_weights_multiply_by_pseudo_label_class():
    """Both confident, CE = log 2 each; weights w = [3, 0.5]: L_u = (3 log 2 + 0.5 log 2) / 2 = 1.75 log 2."""
    loss = unlabeled_ce(torch.zeros(2, 2), torch.tensor([0, 1]), torch.ones(2), torch.tensor([3.0, 0.5]))
    assert math.isclose(loss.item(), 1.75 * math.log(2), rel_tol=1e-6)


def test_labeled_ce_hand_computed():
    """logits [[log 3, 0]] target 0: softmax = [3/4, 1/4], CE = -log(3/4). With w = [2, 1]: 2 * -log(3/4)."""
    logits = torch.tensor([[math.log(3.0), 0.0]])
    y = torch.tensor([0])
    assert math.isclose(labeled_ce(logits, y).item(), -math.log(0.75), rel_tol=1e-6)
    assert math.isclose(labeled_ce(logits, y, torch.tensor([2.0, 1.0])).item(), -2 * math.log(0.75), rel_tol=1e-6)


def test_unit_weights_are_bit_identical_to_unweighted():
    """Weights of exactly 1 must not change a single bit: DRw with beta = 0 reproduces FixMatch exactly."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    pl = torch.randint(0, 5, (8,), generator=g)
    mask = (torch.rand(8, generator=g) > 0.5).float()
    ones = torch.ones(5)
    assert torch.equal(unlabeled_ce(logits, pl, mask), unlabeled_ce(logits, pl, mask, ones))
    assert torch.equal(labeled_ce(logits, pl), labeled_ce(logits, pl, ones))


def test_soft_ce_hand_computed():
    """logits [0, 0] -> log softmax = [-log 2, -log 2]; any target distribution gives CE = log 2."""
    assert math.isclose(soft_ce(torch.zeros(1, 2), torch.tensor([[0.3, 0.7]])).item(), math.log(2), rel_tol=1e-6)
