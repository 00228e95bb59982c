"""Class re-weighting by effective numbers: fixed on the labeled loss, dynamic on the unlabeled loss.

Cui et al., "Class-Balanced Loss Based on Effective Number of Samples" (CVPR 2019) give the weights; DRw
("Dynamic Re-weighting for Long-tailed Semi-supervised Learning", WACV 2023) applies them to the labeled loss
with the labeled counts (eq. 9) and to the unlabeled loss with the current pseudo-label counts (eq. 8/10).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainables.losses import labeled_ce
from trainables.methods.base import Stateless


def effective_number_weights(counts: Tensor, beta: float) -> Tensor:
    """Class-balanced weights w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to C (Cui et al. eq. 2-3).

    1 / w_c is the effective number of samples E(n_c) = (1 - beta^n_c) / (1 - beta). Counts are clamped to
    >= 1 so a class nobody predicts gets the weight of a single sample, not an infinite one. beta = 0 gives
    all ones (bit-exactly: 0^n = 0 and C / C = 1); beta -> 1 tends to inverse frequency. Computed in float64
    because 1 - beta^n loses digits in float32 when beta is close to 1.

    Shape: counts (C,) -> w (C,) float32.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1)")
    n = counts.to(torch.float64).clamp_min(1.0)
    raw = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    return (raw * (len(n) / raw.sum())).float()


def pseudo_label_counts(pseudo_label: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """Nhat_c = sum_i mask_i 1[yhat_i = c]: how many samples are pseudo-labelled c, counting those with
    mask_i = 1 (all ones: every sample, the paper's pseudo number; the FixMatch mask: confident ones only).

    Shape: pseudo_label (U,) int64, mask (U,) 0/1 float -> (C,) int64.
    """
    counts = torch.zeros(num_classes, dtype=torch.long, device=pseudo_label.device)
    return counts.scatter_add_(0, pseudo_label, mask.to(torch.long))


class ClassBalancedCE(Stateless):
    """Labeled loss mean_i w_{y_i} CE(logits_i, y_i), weights fixed by the labeled counts (DRw eq. 9)."""

    def __init__(self, labeled_counts: Tensor, beta: float) -> None:
        self.weights = effective_number_weights(labeled_counts, beta)

    def __call__(self, logits_lb: Tensor, y_lb: Tensor) -> Tensor:
        return labeled_ce(logits_lb, y_lb, self.weights)


class DynamicReweighting:
    """Unlabeled class weights from the current pseudo number of each class (DRw eq. 8/10).

    The pseudo number Nhat_c is how many unlabeled samples are pseudo-labelled c, on the scale of the
    unlabeled set (the paper's counts sum to |U|); the effective number saturates at 1 / (1 - beta), so counts
    inflated past |U| flatten the weights and change what beta means. Two ways to count:
    - "window": the pseudo-labels of the last `window` training batches (a ring buffer; fewer batches until
      it is full). The factory sizes the window to hold |U| predictions, one pass over the unlabeled set;
    - "ema_pass": the EMA model's pseudo-labels of the whole unlabeled set, from a pass the loop runs before
      step `start` and every `pass_every` steps after.
    Every pseudo-label counts (the paper's definition), or with `confident_only` only those the FixMatch mask
    keeps. From step `start` on, each masked sample's CE is multiplied by the weight of its pseudo-label,
    effective_number_weights(counts, beta); before, the unlabeled loss is unweighted. In "window" mode
    counting starts at step 0, so the window is full when the weights switch on (if start >= window).
    """

    def __init__(
        self,
        num_classes: int,
        device: torch.device,
        *,
        beta: float = 0.999,
        start: int = 0,
        count: str = "window",
        window: int = 500,
        pass_every: int = 500,
        confident_only: bool = False,
    ) -> None:
        if count not in ("window", "ema_pass"):
            raise ValueError(f"count={count!r}: expected 'window' or 'ema_pass'")
        self.num_classes, self.beta, self.start = num_classes, beta, start
        self.count, self.window, self.pass_every = count, window, pass_every
        self.confident_only = confident_only
        self.device = torch.device(device)
        rows = window if count == "window" else 0
        self.ring = torch.zeros(rows, num_classes, dtype=torch.long, device=self.device)  # (window, C)
        self.ring_pos = 0  # next row of the ring to overwrite
        self.pass_counts = torch.zeros(num_classes, dtype=torch.long, device=self.device)

    def counts(self) -> Tensor:
        """(C,) pseudo-label counts the weights come from."""
        return self.ring.sum(dim=0) if self.count == "window" else self.pass_counts

    def _counted(self, pseudo_label: Tensor, mask: Tensor) -> Tensor:
        return pseudo_label_counts(
            pseudo_label, mask if self.confident_only else torch.ones_like(mask), self.num_classes
        )

    def class_weights(self, step: int) -> Tensor | None:
        if step < self.start:
            return None
        return effective_number_weights(self.counts(), self.beta)

    def observe(self, pseudo_label: Tensor, mask: Tensor, step: int) -> None:
        if self.count != "window":
            return
        self.ring[self.ring_pos] = self._counted(pseudo_label, mask)
        self.ring_pos = (self.ring_pos + 1) % self.window

    def wants_pass(self, step: int) -> bool:
        return self.count == "ema_pass" and step >= self.start and (step - self.start) % self.pass_every == 0

    def observe_pass(self, pseudo_label: Tensor, mask: Tensor, step: int) -> None:
        self.pass_counts = self._counted(pseudo_label, mask)

    def metrics(self) -> dict[str, Tensor]:
        """The weights the current counts give (drw/w_u; applied from step `start` on) and the counts, (C,)."""
        counts = self.counts()
        return {"drw/w_u": effective_number_weights(counts, self.beta), "drw/count": counts}

    def state_dict(self) -> dict:
        return {"ring": self.ring.clone(), "ring_pos": self.ring_pos, "pass_counts": self.pass_counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        current = self.state_dict()
        if set(state) != set(current):
            raise ValueError(f"DRw state has keys {sorted(state)}, expected {sorted(current)}")
        for key in ("ring", "pass_counts"):
            if tuple(state[key].shape) != tuple(current[key].shape):
                raise ValueError(
                    f"DRw state {key!r} has shape {tuple(state[key].shape)}, this run expects "
                    f"{tuple(current[key].shape)} (count={self.count!r}, window={self.window}, "
                    f"C={self.num_classes})"
                )
        self.ring = state["ring"].to(self.device, torch.long).clone()
        self.ring_pos = int(state["ring_pos"])
        self.pass_counts = state["pass_counts"].to(self.device, torch.long).clone()
