"""Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

Train time (eq. 10): the labeled loss sees logits + tau log pi, so the network learns logits that already
discount the prior. Post hoc (eq. 9): an ordinary network's logits are corrected to logits - tau log pi.
pi is the labeled class prior.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainables.losses import labeled_ce
from trainables.methods.base import Stateless


def log_prior(counts: Tensor) -> Tensor:
    """log pi_c = log(n_c / sum_j n_j), counts clamped to >= 1.

    The clamp keeps a class absent from the labeled set at a finite prior (that of one sample); log 0 would
    make its post-hoc adjusted logit +inf.

    Shape: counts (C,) -> (C,) float32.
    """
    n = counts.to(torch.float64).clamp_min(1.0)
    return (n / n.sum()).log().float()


def logit_adjusted_ce(logits: Tensor, y: Tensor, log_prior: Tensor, tau: float) -> Tensor:
    """L = mean_i CE(logits_i + tau log pi, y_i) (Menon et al. eq. 10).

    Shape: logits (B, C), y (B,), log_prior (C,) -> scalar.
    """
    return labeled_ce(logits.float() + tau * log_prior, y)


def posthoc_adjust(logits: Tensor, log_prior: Tensor, tau: float) -> Tensor:
    """Post-hoc adjusted logits, logits - tau log pi (Menon et al. eq. 9).

    Shape: logits (N, C), log_prior (C,) -> (N, C).
    """
    return logits - tau * log_prior


class LogitAdjustedCE(Stateless):
    """Labeled loss with train-time logit adjustment; pi from the labeled class counts."""

    def __init__(self, labeled_counts: Tensor, tau: float) -> None:
        self.log_prior = log_prior(labeled_counts)
        self.tau = tau

    def __call__(self, logits_lb: Tensor, y_lb: Tensor) -> Tensor:
        return logit_adjusted_ce(logits_lb, y_lb, self.log_prior, self.tau)
