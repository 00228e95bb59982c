"""ABC, the auxiliary balanced classifier (Lee, Shin and Kim, "ABC: Auxiliary Balanced Classifier for Class-imbalanced
Semi-supervised Learning", NeurIPS 2021), as the DASO reference trains it beside FixMatch.

A second linear head on the shared encoder learns as if the data were balanced: each labeled sample of class k
enters its loss with a Bernoulli mask of rate N_C / N_k (N_C the rarest labeled class); each confident unlabeled
sample enters its consistency loss with a mask of rate 1 - (s / S)(1 - N_C / N_k'), k' the head's own prediction,
s = floor(S k / K) the stair of iteration k of K: all unlabeled samples at first, the balanced rate by the end. The
consistency target is the head's soft weak-view distribution (DASO's blend of it, with DASO on). The head, not the
FixMatch classifier, is evaluated. Notation: B labeled, U unlabeled samples per step, C classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.methods.base import ExtensionOutput, NoExtension, StepView, linear_head


def balanced_keep_rate(counts: Tensor) -> Tensor:
    """Bernoulli rate per class, N_min / N_k: 1 for the rarest class (the reference's N_C / N_k on sorted counts).

    Shape: counts (C,) -> (C,) float32.
    """
    n = counts.float().clamp_min(1.0)
    return n.min() / n


def unlabeled_keep_rate(balanced: Tensor, step: int, iterations: int, stairs: int) -> Tensor:
    """1 - (s / S)(1 - balanced) with s = floor(S k / K): the unlabeled mask's rate at iteration k (0-based).

    With K = 250,000 and S = 500 this is the reference's floor(k / 500) / 500.

    Shape: balanced (C,) -> (C,).
    """
    stair = math.floor(stairs * step / iterations)
    return 1.0 - (stair / stairs) * (1.0 - balanced)


def abc_loss(
    logits_lb: Tensor,
    y_lb: Tensor,
    mask_lb: Tensor,
    target_u: Tensor,
    logits_s: Tensor,
    mask_u: Tensor,
) -> tuple[Tensor, Tensor]:
    """ABC's two terms, each a mean over its whole batch (masked samples count in the denominator):

    L_cls = (1/B) sum_b m_b CE(z_b, y_b);  L_con = -(1/U) sum_u m_u sum_c t_uc log softmax(z^s_u)_c.

    Shape: logits_lb (B, C), y_lb (B,), mask_lb (B,), target_u (U, C), logits_s (U, C), mask_u (U,) -> two scalars.
    """
    cls = (F.cross_entropy(logits_lb.float(), y_lb, reduction="none") * mask_lb).mean()
    con = -(mask_u * (target_u * F.log_softmax(logits_s.float(), dim=1)).sum(dim=1)).mean()
    return cls, con


class AuxiliaryBalancedClassifier(NoExtension):
    """ABC as an extension: one head "abc" (xavier-normal weights, zero bias, as the reference's classifier),
    its loss added to FixMatch's with `weight`, and the head evaluated. Its Bernoulli draws come from a generator
    of its own, saved with the run."""

    def __init__(
        self,
        labeled_counts: Tensor,
        feature_dim: int,
        device: torch.device,
        *,
        iterations: int,
        tau: float,
        weight: float = 1.0,
        stairs: int = 500,
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.balanced = balanced_keep_rate(labeled_counts).to(self.device)
        self.iterations, self.tau, self.weight, self.stairs = iterations, tau, weight, stairs
        self.heads = {"abc": linear_head(feature_dim, len(labeled_counts))}
        self.eval_head = "abc"
        # a stream of its own, not the augmentations' (seeded from the same train.seed)
        own_seed = int(np.random.SeedSequence([seed, 0xABC]).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF
        self.generator = torch.Generator(device=self.device).manual_seed(own_seed)

    def loss(self, view: StepView) -> ExtensionOutput:
        b = view.batch
        logits = view.head_logits["abc"]
        u = (len(logits) - b) // 2
        logits_lb, logits_w, logits_s = logits.split([b, u, u])
        with torch.no_grad():
            mask_lb = torch.bernoulli(self.balanced[view.y_lb], generator=self.generator)
            target = view.pseudo_label.apply(logits_w.float().softmax(dim=1))
            confidence, predicted = target.max(dim=1)
            rate = unlabeled_keep_rate(self.balanced, view.step, self.iterations, self.stairs)
            mask_u = (confidence >= self.tau).float() * torch.bernoulli(rate[predicted], generator=self.generator)
        cls, con = abc_loss(logits_lb, view.y_lb, mask_lb, target, logits_s, mask_u)
        total = cls + con
        return ExtensionOutput(
            loss=self.weight * total,
            logs={"loss_abc": total.detach(), "abc_mask_ratio": mask_u.mean()},
            diagnostics={"pl_abc": predicted},
        )

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"generator"}:
            raise ValueError(f"ABC state has keys {sorted(state)}, expected ['generator']")
        self.generator.set_state(state["generator"])
