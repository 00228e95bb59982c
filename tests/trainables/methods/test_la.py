import math

import torch

from trainables.methods.la import LogitAdjustedCE, log_prior, logit_adjusted_ce, posthoc_adjust


def test_log_prior_and_zero_count_clamp():
    """counts (1, 3) -> pi = (1/4, 3/4). counts (0, 3) -> clamped (1, 3) -> the same finite prior."""
    expected = torch.tensor([math.log(0.25), math.log(0.75)])
    torch.testing.assert_close(log_prior(torch.tensor([1, 3])), expected)
    torch.testing.assert_close(log_prior(torch.tensor([0, 3])), expected)


def test_logit_adjusted_ce_hand_values():
    """Zero logits, y = 0, pi = (1/4, 3/4).

    tau = 0: softmax (1/2, 1/2)                         -> CE = log 2
    tau = 1: logits log pi, softmax = pi                -> CE = -log(1/4) = log 4
    tau = 2: logits 2 log pi, softmax (1, 9) / 10       -> CE = log 10
    """
    logits, y, lp = torch.zeros(1, 2), torch.tensor([0]), log_prior(torch.tensor([1, 3]))
    for tau, expected in [(0.0, math.log(2)), (1.0, math.log(4)), (2.0, math.log(10))]:
        torch.testing.assert_close(logit_adjusted_ce(logits, y, lp, tau), torch.tensor(expected))


def test_posthoc_adjust_hand_values():
    """logits (1, 2), pi = (1/4, 3/4), tau = 1 -> (1 + log 4, 2 + log(4/3)): the tail class 0 now wins."""
    adjusted = posthoc_adjust(torch.tensor([[1.0, 2.0]]), log_prior(torch.tensor([1, 3])), 1.0)
    torch.testing.assert_close(adjusted, torch.tensor([[1 + math.log(4), 2 + math.log(4 / 3)]]))
    assert adjusted.argmax().item() == 0


def test_logit_adjusted_ce_component_uses_labeled_prior():
    """The component is the function with pi from its counts: zero logits, y = 0, counts (1, 3) -> log 4."""
    loss = LogitAdjustedCE(torch.tensor([1, 3]), tau=1.0)
    torch.testing.assert_close(loss(torch.zeros(1, 2), torch.tensor([0])), torch.tensor(math.log(4)))
