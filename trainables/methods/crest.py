"""CReST and CReST+ (Wei, Sohn, Mellina, Yuille and Yang, "CReST: A Class-Rebalancing Self-Training Framework for
Imbalanced Semi-Supervised Learning", CVPR 2021), as the DASO reference runs them with FixMatch.

Training runs in G generations of K / G iterations. At the end of each but the last, the EMA model predicts every
unlabeled sample; of the samples predicted k, the most confident fraction mu_k = (N_{C+1-k'} / N_1)^(1/alpha) joins the
labeled set with label k (k' the frequency rank of class k, so the rarest class keeps the most: N_1 / N_1 = 1, the
head class the least); the labeled set of the next generation is the original one plus this selection, and the
model, its EMA, the optimiser and the learning-rate schedule start afresh. CReST+ adds distribution alignment of the
weak-view distribution toward the labeled distribution raised to a temperature t that falls linearly from 1 in the
first generation to t_min in the last. Notation: C classes, N_k labeled samples of class k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainables.methods.base import NoExtension, PseudoLabelOutput

EPS = 1e-6


def selection_rates(counts: Tensor, alpha: float) -> Tensor:
    """mu per class: the class of frequency rank r (0 = most frequent) takes (N_(C-1-r) / N_(0))^(1/alpha), the
    reference's mu[C - 1 - k] on counts sorted from head to tail.

    Shape: counts (C,) -> (C,) float64.
    """
    n = counts.double()
    mu = (n / n.max()).pow(1.0 / alpha)
    order = torch.argsort(n, descending=True, stable=True)  # order[r] = class of rank r
    rates = torch.empty_like(mu)
    rates[order] = mu[order.flip(0)]
    return rates


def select_confident(probs: Tensor, rates: Tensor) -> tuple[Tensor, Tensor]:
    """Per predicted class k (in class order), the int(mu_k n_k) samples of highest confidence among the n_k
    predicted k (ties by index).

    Shape: probs (N, C), rates (C,) -> indices (S,) int64, labels (S,) int64.
    """
    confidence, predicted = probs.max(dim=1)
    chosen, labels = [], []
    for k in range(probs.shape[1]):
        members = torch.nonzero(predicted == k).view(-1)
        take = int(float(rates[k]) * len(members))
        if take < 1:
            continue
        order = torch.argsort(confidence[members], descending=True, stable=True)
        chosen.append(members[order[:take]])
        labels.append(torch.full((take,), k, dtype=torch.int64))
    if not chosen:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return torch.cat(chosen).cpu(), torch.cat(labels)


def progressive_temperature(generation: int, generations: int, t_min: float) -> float:
    """t = 1 - f + f t_min with f = (g - 1) / (G - 1) for generation g = 1..G (1 throughout when G = 1)."""
    f = (generation - 1) / (generations - 1) if generations > 1 else 0.0
    return 1.0 - f + f * t_min


def align_distribution(probs: Tensor, target: Tensor, running_mean: Tensor, t: float) -> Tensor:
    """Distribution alignment: p~ = p (pi^t / sum pi^t + eps) / (p_bar + eps), renormalised per row; pi the labeled
    distribution, p_bar the running mean prediction.

    Shape: probs (U, C), target (C,), running_mean (C,) -> (U, C).
    """
    scaled = target.pow(t)
    scaled = scaled / scaled.sum()
    aligned = probs * (scaled.view(1, -1) + EPS) / (running_mean.view(1, -1) + EPS)
    return aligned / aligned.sum(dim=1, keepdim=True)


class ProgressiveAlignment:
    """CReST+'s pseudo-label transform. State: the mean weak-view prediction of each of the last `queue` batches
    (this batch's included before the mean is read, as the reference), saved with the run."""

    needs_ema_labeled_features = False

    def __init__(
        self,
        labeled_counts: Tensor,
        device: torch.device,
        *,
        iterations: int,
        generations: int,
        t_min: float = 0.5,
        queue: int = 128,
    ) -> None:
        self.device = torch.device(device)
        counts = labeled_counts.double()
        self.target = (counts / counts.sum()).float().to(self.device)
        self.generation_length = iterations // generations
        self.generations, self.t_min = generations, t_min
        self.means = torch.zeros(queue, len(counts), device=self.device)
        self.next, self.filled = 0, 0

    def __call__(self, probs_w: Tensor, feat_w: Tensor, feat_s: Tensor, step: int) -> PseudoLabelOutput:
        self.means[self.next] = probs_w.mean(dim=0)
        self.next = (self.next + 1) % len(self.means)
        self.filled = min(self.filled + 1, len(self.means))
        t = progressive_temperature(step // self.generation_length + 1, self.generations, self.t_min)
        aligned = align_distribution(probs_w, self.target, self.means.sum(dim=0) / self.filled, t)
        zero = probs_w.new_zeros((), dtype=torch.float32)
        return PseudoLabelOutput(probs=aligned, loss=zero, logs={"da_t": zero + t})

    def enqueue(self, feat_lb_ema: Tensor | None, y_lb: Tensor) -> None:
        pass

    def observe(self, pseudo_label: Tensor, step: int) -> None:
        pass

    def metrics(self) -> dict[str, Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {"means": self.means.clone(), "next": self.next, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"means", "next", "filled"} or state["means"].shape != self.means.shape:
            raise ValueError(f"distribution alignment state does not fit this run: keys {sorted(state)}")
        self.means = state["means"].to(self.device).clone()
        self.next, self.filled = int(state["next"]), int(state["filled"])


class CrestGenerations(NoExtension):
    """CReST's generations as an extension: `generations` for the loop, `new_generation` picks the samples that
    join the labeled set. State: the current selection (indices into U and their labels), saved with the run so
    that a resumed run rebuilds the same labeled set (the loop knows the generation from the step)."""

    def __init__(self, labeled_counts: Tensor, *, generations: int, alpha: float = 3.0) -> None:
        self.labeled_counts = labeled_counts.long().cpu()
        self.generations = generations
        self.rates = selection_rates(self.labeled_counts, alpha)
        self.selected = torch.empty(0, dtype=torch.int64)
        self.selected_labels = torch.empty(0, dtype=torch.int64)

    def new_generation(self, probs_ulb: Tensor) -> tuple[Tensor, Tensor]:
        """The EMA model's class probabilities over U (N_U, C) -> the samples (indices into U) and pseudo-labels
        that join the original labeled set for the next generation."""
        self.selected, self.selected_labels = select_confident(probs_ulb.cpu(), self.rates)
        return self.selected, self.selected_labels

    def additions(self) -> tuple[Tensor, Tensor]:
        return self.selected, self.selected_labels

    def metrics(self) -> dict[str, Tensor]:
        """crest/labeled: the current labeled set per class (original plus selected)."""
        grown = self.labeled_counts + torch.bincount(self.selected_labels, minlength=len(self.labeled_counts))
        return {"crest/labeled": grown.float()}

    def state_dict(self) -> dict:
        return {"selected": self.selected.clone(), "labels": self.selected_labels.clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"selected", "labels"}:
            raise ValueError(f"CReST state has keys {sorted(state)}, expected ['labels', 'selected']")
        self.selected, self.selected_labels = state["selected"].long().clone(), state["labels"].long().clone()
