"""DARP, distribution aligning refinery of pseudo-labels (Kim et al., "Distribution Aligning Refinery of Pseudo-label
for Imbalanced Semi-supervised Learning", NeurIPS 2020), with the DASO reference's settings.

DARP keeps every unlabeled sample's latest weak-view distribution a_n (N_U x C) and, every `every` iterations after
a warm-up, solves for refined labels x_n closest to a_n (an entropy-weighted KL) whose rows sum to 1 and whose
columns sum to the target counts c_k. The loop then trains on the refined rows of the batch. Notation: N unlabeled
samples, C classes, alpha the scaling rate. The solve runs on the host in float64 (it is a few scalar root finds).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trainables.methods.base import NoExtension

EPS = 1e-6


def scale_by_confident_counts(probs: Tensor, target: Tensor, alpha: float) -> Tensor:
    """DARP's pre-scaling: for each class k (from the last to the first), the floor(alpha c_k) samples of largest
    a_nk are marked for k and the class's scale is s_k = (c_k + eps) / (sum of their a_nk + eps). Each row becomes
    a_n * m_n * s + eps, renormalised (m_n the row's marks; an unmarked row becomes uniform).

    Shape: probs (N, C), target (C,) counts -> (N, C) rows summing to 1.
    """
    n, c = probs.shape
    marks = torch.zeros_like(probs)
    top_sum = torch.zeros(c, dtype=probs.dtype)
    for k in reversed(range(c)):
        take = int(alpha * float(target[k]))
        values, order = probs[:, k].sort(descending=True, stable=True)
        marks[order[:take], k] = 1.0
        top_sum[k] = values[:take].sum()
    scale = (target.to(probs.dtype) + EPS) / (top_sum + EPS)
    scaled = probs * marks * scale.view(1, -1) + EPS
    return scaled / scaled.sum(dim=1, keepdim=True)


def secant(f, x0: Tensor, tol: float = 0.1, maxiter: int = 30) -> Tensor:
    """Roots of an elementwise function by the secant method, each entry stopping on its own; the steps of
    scipy.optimize.newton without a derivative (x1 = x0 (1 + 1e-4) +- 1e-4, stop when |x_{i+1} - x_i| <= tol,
    a flat secant returns the midpoint), where the reference calls it one class at a time. An entry that does not
    converge in `maxiter` steps keeps its last iterate, and a flat secant between two distinct points returns the
    midpoint: in both cases scipy (and so the reference) raises.

    Shape: x0 (K,) float64 -> (K,).
    """
    p0 = x0.clone()
    p1 = x0 * (1 + 1e-4)
    p1 = p1 + 1e-4 * (1 - 2 * (p1 < 0).to(p1.dtype))  # +1e-4, or -1e-4 below 0
    q0, q1 = f(p0), f(p1)
    swap = q1.abs() < q0.abs()
    p0, p1 = torch.where(swap, p1, p0), torch.where(swap, p0, p1)
    q0, q1 = torch.where(swap, q1, q0), torch.where(swap, q0, q1)
    done = torch.zeros_like(x0, dtype=torch.bool)
    root = p1.clone()
    for _ in range(maxiter):
        flat = q1 == q0
        big = q1.abs() > q0.abs()  # divide by the larger of the two, as scipy
        r10 = q0 / torch.where(q1 == 0, 1.0, q1)
        r01 = q1 / torch.where(q0 == 0, 1.0, q0)
        step = torch.where(big, (-r10 * p1 + p0) / (1 - r10), (-r01 * p0 + p1) / (1 - r01))
        p = torch.where(flat, (p1 + p0) / 2, step)
        finished = ~done & (flat | ((p - p1).abs() <= tol))
        root = torch.where(finished, p, root)
        done = done | finished
        if bool(done.all()):
            return root
        p0, q0 = p1, q1
        p1 = torch.where(done, p1, p)
        q1 = torch.where(done, q1, f(p1))
    return torch.where(done, root, p1)


def refine_pseudo_labels(probs: Tensor, target: Tensor, rounds: int = 10) -> Tensor:
    """DARP's solver: x_nk = a_nk / e * X_n * Y_nk with Y_nk = exp(-nu_k / w_n), w_n = 1 / H(a_n); alternately
    X_n = 1 / sum_k (a_nk / e) Y_nk (rows sum to 1) and nu_k the root of sum_n (a_nk / e) X_n exp(-nu / w_n) = c_k
    (columns sum to c), `rounds` times from nu = 1 (first X) and nu = 0 (first root guess), then X once more.

    Shape: probs (N, C) float64, target (C,) counts -> (N, C) float64.
    """
    entropy = -(probs * torch.log(probs + EPS)).sum(dim=1)
    w = 1.0 / entropy
    a_e = probs / math.e
    c = target.to(probs.dtype)
    y = torch.exp(-1.0 / w).view(-1, 1).expand_as(probs)
    nu = torch.zeros(probs.shape[1], dtype=probs.dtype)
    for _ in range(rounds):
        x = 1.0 / (a_e * y).sum(dim=1)
        ax = a_e * x.view(-1, 1)

        def column_gap(v: Tensor, ax=ax) -> Tensor:
            return (ax * torch.exp(-v.view(1, -1) / w.view(-1, 1))).sum(dim=0) - c

        nu = secant(column_gap, nu)
        y = torch.exp(-nu.view(1, -1) / w.view(-1, 1))
    x = 1.0 / (a_e * y).sum(dim=1)
    return a_e * x.view(-1, 1) * y


def estimate_distribution(probs_val: Tensor, y_val: Tensor, probs_ulb: Tensor) -> Tensor:
    """Black-box shift estimate of the unlabeled class distribution (the DARP reference's formula): the
    validation confusion M_jk = mean predicted probability of j over class-k samples, the unlabeled predicted mass
    q~_j = sum_n p_nj, and q = M^-1 q~, clamped at 0 and normalised (a least-squares solve where M is singular).
    The reference applies it to a separately trained supervised model, averages it over many evaluations and keeps
    it only when no entry is negative and cond(M) < 100; here it is made once, from the semi-supervised EMA model at
    the end of DARP's warm-up, and negative entries are clamped.

    Shape: probs_val (V, C), y_val (V,), probs_ulb (N, C) -> (C,) float64 summing to 1.
    """
    c = probs_val.shape[1]
    p_val = probs_val.double().cpu()
    y = y_val.cpu().long()
    confusion = torch.zeros(c, c, dtype=torch.float64).index_add_(1, y, p_val.T)
    confusion = confusion / confusion.sum(dim=0, keepdim=True).clamp_min(EPS)
    predicted = probs_ulb.double().cpu().sum(dim=0)
    q = torch.linalg.lstsq(confusion, predicted.view(-1, 1)).solution.view(-1).clamp_min(0.0)
    if float(q.sum()) <= 0:
        return torch.full((c,), 1.0 / c, dtype=torch.float64)
    return q / q.sum()


def last_occurrence_rows(rows: Tensor, idx: Tensor) -> Tensor:
    """`rows` with each row replaced by that of the last position holding the same index: a batch that spans an
    epoch boundary of the index stream can hold one sample twice, and `index_copy_` of distinct rows to one index
    leaves an unspecified one on CUDA. With equal rows every device stores the last (the reference's CPU result),
    without a host sync."""
    positions = torch.arange(idx.numel(), device=idx.device)
    return rows[((idx[:, None] == idx[None, :]) * positions).amax(1)]  # a row's own position is always a match


class DarpRefinement(NoExtension):
    """DARP as an extension. State (saved with the run): the latest weak-view distribution of every unlabeled
    sample (uniform until first seen), the refined labels of the last solve (uniform before it), and the target
    counts once known. Step k (0-based) is the reference's call k + 1: up to int(warmup K) calls the batch keeps
    its own distribution; after that, every `every`-th call re-solves over the whole set, and every call trains
    on the refined rows of its samples (uniform, so masked, until the first solve)."""

    def __init__(
        self,
        num_classes: int,
        unlabeled_size: int,
        device: torch.device,
        *,
        iterations: int,
        target: Tensor | None,
        warmup: float = 0.4,
        every: int = 10,
        alpha: float = 2.0,
        solver_iters: int = 10,
    ) -> None:
        self.device = torch.device(device)
        self.num_classes, self.unlabeled_size = num_classes, unlabeled_size
        self.warmup_steps, self.every, self.alpha, self.solver_iters = (
            int(iterations * warmup),
            every,
            alpha,
            solver_iters,
        )
        uniform = torch.full((unlabeled_size, num_classes), 1.0 / num_classes, device=self.device)
        self.latest = uniform
        self.refined = uniform.clone()
        self.solves = 0
        # target counts over U (float64, host); None: estimated by the pass before the first refined step
        self.target = None if target is None else target.double().cpu() * unlabeled_size / target.double().sum()

    def refine(self, probs: Tensor, idx_ulb: Tensor, step: int) -> Tensor:
        idx = idx_ulb.to(self.device, non_blocking=True)
        self.latest.index_copy_(0, idx, last_occurrence_rows(probs.detach(), idx).to(self.latest.dtype))
        calls = step + 1
        if calls <= self.warmup_steps:
            return probs
        if calls % self.every == 0:
            scaled = scale_by_confident_counts(self.latest.double().cpu(), self.target, self.alpha)
            self.refined = refine_pseudo_labels(scaled, self.target, self.solver_iters).to(self.device, torch.float32)
            self.solves += 1
        return self.refined[idx].to(probs.dtype)

    def wants_pass(self, step: int) -> bool:
        return self.target is None and step + 1 > self.warmup_steps

    def observe_pass(self, probs_ulb: Tensor, probs_val: Tensor, y_val: Tensor, step: int) -> None:
        if len(y_val) == 0:
            raise ValueError(
                "method.darp.target 'estimate' needs a validation split and this data has none; give the target "
                "as per-class shares or 'labeled'"
            )
        self.target = estimate_distribution(probs_val, y_val, probs_ulb) * self.unlabeled_size

    def metrics(self) -> dict[str, Tensor]:
        """darp/refined: the refined hard labels per class over U (zeros before the first solve); darp/target: the
        target counts (zeros until estimated)."""
        refined = torch.bincount(self.refined.argmax(dim=1), minlength=self.num_classes).float()
        if self.solves == 0:  # uniform rows, no labels yet
            refined = torch.zeros_like(refined)
        target = torch.zeros(self.num_classes) if self.target is None else self.target.float()
        return {"darp/refined": refined, "darp/target": target}

    def state_dict(self) -> dict:
        return {
            "latest": self.latest.clone(),
            "refined": self.refined.clone(),
            "target": torch.empty(0, dtype=torch.float64) if self.target is None else self.target.clone(),
            "solves": self.solves,
        }

    def load_state_dict(self, state: dict) -> None:
        keys = {"latest", "refined", "target", "solves"}
        if set(state) != keys:
            raise ValueError(f"DARP state has keys {sorted(state)}, expected {sorted(keys)}")
        expected = (self.unlabeled_size, self.num_classes)
        if tuple(state["latest"].shape) != expected:
            raise ValueError(f"DARP state holds {tuple(state['latest'].shape)} labels, this run expects {expected}")
        self.latest = state["latest"].to(self.device).clone()
        self.refined = state["refined"].to(self.device).clone()
        self.target = None if state["target"].numel() == 0 else state["target"].double().cpu().clone()
        self.solves = int(state["solves"])
