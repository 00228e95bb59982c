"""FixMatch's pseudo-label rule and losses as pure functions (Sohn et al., NeurIPS 2020, eq. 2-4).

Notation: U = mu * B unlabeled samples, C classes, tau the confidence threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fixmatch_mask(probs: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Hard pseudo-label and confidence mask from weak-view class probabilities.

    pseudo_label = argmax_c p_c; mask = 1[max_c p_c >= tau] (float, so it multiplies a per-sample loss).

    Shape: probs (U, C) -> mask (U,), pseudo_label (U,) int64.
    """
    confidence, pseudo_label = probs.max(dim=1)
    return (confidence >= tau).to(probs.dtype), pseudo_label


def labeled_ce(logits: Tensor, targets: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """L_s = mean_i w_{y_i} CE(logits_i, y_i); w = 1 without class weights.

    The mean is over the batch (not normalised by the weights), as in the class-balanced loss of Cui et al.

    Shape: logits (B, C), targets (B,), class_weights (C,) -> scalar.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    if class_weights is not None:
        ce = ce * class_weights[targets]
    return ce.mean()


def unlabeled_ce(logits_s: Tensor, pseudo_label: Tensor, mask: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """L_u = (1 / U) sum_i mask_i w_{yhat_i} CE(logits_s_i, yhat_i); w = 1 without class weights.

    Divided by the whole unlabeled batch size U = mu * B, not by the number of confident samples (FixMatch eq. 4).

    Shape: logits_s (U, C), pseudo_label (U,), mask (U,), class_weights (C,) -> scalar.
    """
    ce = F.cross_entropy(logits_s.float(), pseudo_label, reduction="none")
    weight = mask if class_weights is None else mask * class_weights[pseudo_label]
    return (ce * weight).sum() / logits_s.shape[0]


def soft_ce(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over rows of CE with a soft target: -(1/N) sum_i sum_c t_ic log softmax(logits)_ic.

    Shape: logits (N, C), target_probs (N, C) -> scalar.
    """
    return -(target_probs * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
