"""DASO: distribution-aware semantics-oriented pseudo-labels (Oh et al., CVPR 2022).

The linear pseudo-label p (softmax of the classifier) is biased toward head classes, the semantic one q
(softmax of cosine similarities to class prototypes) toward tail classes. DASO blends them per sample with a
weight v_k' read off the recent pseudo-label histogram, where k' = argmax p: a sample the classifier puts in a
frequently predicted class leans on q. A semantic alignment loss pulls strong-view features toward the weak
view's prototype assignment.

Notation: U unlabeled samples, C classes, D feature dimension, L per-class queue length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.losses import soft_ce
from trainables.methods.base import PseudoLabelOutput

# ------------------------------------------------------------------------------------------------------------
# Pure functions


def prototypes(queue: Tensor, filled: Tensor) -> Tensor:
    """Class prototypes: the mean of the features held in each class's queue (DASO Sec. 3.2).

    c_k = (1 / n_k) sum_{l < n_k} queue[k, l], n_k = filled[k]. The queue fills slots 0, 1, ... and only wraps
    once full, so the filled slots of class k are exactly [0, n_k). A class with n_k = 0 has no prototype and
    gets the zero vector; callers flag it with `filled > 0`.

    Shape: queue (C, L, D), filled (C,) int64 -> (C, D).
    """
    length = queue.shape[1]
    used = (torch.arange(length, device=queue.device) < filled.unsqueeze(1)).to(queue.dtype)  # (C, L)
    total = torch.einsum("cl,cld->cd", used, queue)
    return total / filled.clamp_min(1).unsqueeze(1).to(queue.dtype)


def prototype_logits(feat: Tensor, protos: Tensor, has_proto: Tensor, t_proto: float) -> Tensor:
    """Scaled cosine similarities to the prototypes, s_ik / T_proto with s_ik = cos(z_i, c_k) (DASO eq. 3).

    s_ik = 0 where class k has no prototype: that class keeps the neutral logit 0 in the softmax, as a zero
    prototype has zero cosine similarity in the reference implementation.

    Shape: feat (N, D), protos (C, D), has_proto (C,) bool -> (N, C) float32.
    """
    sim = F.normalize(feat.float(), dim=1) @ F.normalize(protos.float(), dim=1).T  # (N, C)
    return torch.where(has_proto, sim, torch.zeros_like(sim)) / t_proto


def semantic_pseudo_label(feat: Tensor, protos: Tensor, has_proto: Tensor, t_proto: float) -> Tensor:
    """Semantic pseudo-label q_i = softmax_k(cos(z_i, c_k) / T_proto) (DASO eq. 3).

    Shape: feat (U, D), protos (C, D), has_proto (C,) bool -> q (U, C) float32.
    """
    return prototype_logits(feat, protos, has_proto, t_proto).softmax(dim=1)


def blend_weights(hist: Tensor, t_dist: float) -> Tensor:
    """Distribution-aware blending weight v_k = m_k^(1/T_dist) / max_j m_j^(1/T_dist) (DASO eq. 5).

    Computed as (m_k / max_j m_j)^(1/T_dist), the same number without overflow: a window histogram of 10^4
    raised to 1/0.1 exceeds float32. The most frequent class gets 1, a never-predicted class 0. An all-zero
    histogram (no window has closed yet) gives v = 0 for every class, i.e. the linear pseudo-label alone:
    there is no evidence of bias yet, and 0 / 0 must not reach the pseudo-label.

    Shape: hist (C,) counts or frequencies -> v (C,) float32 in [0, 1].
    """
    m = hist.float()
    relative = m / m.max().clamp_min(torch.finfo(m.dtype).tiny)  # all zeros stay zeros
    return relative.pow(1.0 / t_dist)


def daso_blend(p: Tensor, q: Tensor, v: Tensor) -> Tensor:
    """Blended pseudo-label p'_i = (1 - v_k') p_i + v_k' q_i with k' = argmax p_i (DASO eq. 6).

    Shape: p (U, C), q (U, C), v (C,) -> p' (U, C).
    """
    w = v[p.argmax(dim=1)].unsqueeze(1)  # (U, 1) weight of each sample's linear prediction
    return (1 - w) * p + w * q


def semantic_alignment_loss(q_w: Tensor, feat_s: Tensor, protos: Tensor, has_proto: Tensor, t_proto: float) -> Tensor:
    """L_align = (1 / U) sum_i CE(q_w_i, softmax(cos(z_s_i, C) / T_proto)) (DASO eq. 7).

    The target q_w (weak view's semantic pseudo-label) and the prototypes are constants: the gradient reaches
    the strong-view features only. No confidence mask.

    Shape: q_w (U, C), feat_s (U, D), protos (C, D), has_proto (C,) bool -> scalar.
    """
    logits_s = prototype_logits(feat_s, protos.detach(), has_proto, t_proto)
    return soft_ce(logits_s, q_w.detach())


def queue_slots(labels: Tensor, ptr: Tensor, queue_len: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Where a batch of labeled features goes in the balanced per-class FIFO queue, computed on the device.

    The r-th sample of class c in the batch (r = 0, 1, ...) goes to slot (ptr_c + r) mod L of class c, flat
    index c * L + slot. When a batch holds n_c > L samples of class c, only its last L are kept; the others
    get the discard index C * L (one spare row after the queue).

    Shape: labels (B,) int64, ptr (C,) int64 -> flat indices (B,) int64 in [0, C * L], counts n (C,) int64.
    """
    onehot = labels.unsqueeze(1) == torch.arange(num_classes, device=labels.device)  # (B, C)
    seen = onehot.long().cumsum(dim=0)  # (B, C) samples of each class up to and including row i
    rank = seen.gather(1, labels.unsqueeze(1)).squeeze(1) - 1  # (B,)
    counts = seen[-1] if len(labels) else torch.zeros_like(ptr)
    kept = rank >= counts[labels] - queue_len
    flat = labels * queue_len + (ptr[labels] + rank) % queue_len
    return torch.where(kept, flat, torch.full_like(flat, num_classes * queue_len)), counts


def resolve_t_dist(t_dist: float | str, dataset: str, gamma_l: float, gamma_u: float | str) -> float:
    """T_dist "auto": 1.5 on CIFAR-10-like data with gamma_l == gamma_u, 0.5 on image folders, else 0.3.

    The DASO paper's defaults: 1.5 for a matched CIFAR-10 profile; 0.3 for CIFAR-100, STL-10 and mismatched
    unlabeled profiles; 0.5 for Semi-Aves (image folders). The synthetic set stands in for CIFAR-10.
    """
    if t_dist != "auto":
        return float(t_dist)
    if dataset == "imagefolder":
        return 0.5
    if dataset in ("cifar10", "synthetic") and gamma_u == gamma_l:
        return 1.5
    return 0.3


# ------------------------------------------------------------------------------------------------------------
# The pseudo-label transform


class DasoPseudoLabel:
    """DASO as a pseudo-label transform: p -> p' plus lambda_align * L_align.

    A step runs `enqueue`, then `__call__`, then (after the optimiser step) `observe`, the reference's order:
    the labeled batch's features are in the queue before this step's prototypes are read.

    State (all on the training device, all saved with the run):
    - a balanced feature queue, L slots per class, filled in `enqueue` from the EMA encoder's features of the
      weak labeled views (raw features, as the reference);
    - the histogram of the final hard pseudo-labels argmax p' of EVERY unlabeled sample (confident or not)
      over the current window of `window` iterations, and the histogram of the last closed window, which sets
      v. Windows are counted in `observe` calls; a window's histogram replaces the previous one when it
      closes. Until the first window closes v = 0 (linear pseudo-label only; see `blend_weights`).
    During the first `warmup` iterations p' = p and L_align is off; the queue and the histogram fill all the
    same. `const_v` (ablation) replaces v by that constant for every class.
    """

    needs_ema_labeled_features = True

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        device: torch.device,
        *,
        t_proto: float = 0.05,
        t_dist: float = 1.5,
        lambda_align: float = 1.0,
        queue_len: int = 256,
        window: int = 100,
        warmup: int = 5000,
        const_v: float | None = None,
    ) -> None:
        self.num_classes, self.feature_dim, self.queue_len = num_classes, feature_dim, queue_len
        self.t_proto, self.t_dist, self.lambda_align = t_proto, t_dist, lambda_align
        self.window, self.warmup, self.const_v = window, warmup, const_v
        self.device = torch.device(device)
        # C * L queue slots plus one discard row for samples a batch pushes past a full class queue
        self._slots = torch.zeros(num_classes * queue_len + 1, feature_dim, device=self.device)
        self.queue_ptr = torch.zeros(num_classes, dtype=torch.long, device=self.device)  # next slot to write
        self.queue_fill = torch.zeros(num_classes, dtype=torch.long, device=self.device)  # filled slots, <= L
        self.window_hist = torch.zeros(num_classes, dtype=torch.long, device=self.device)
        self.window_iters = 0
        self.closed_hist = torch.zeros(num_classes, dtype=torch.long, device=self.device)
        self.v = self._blend_weights()

    @property
    def queue(self) -> Tensor:
        """(C, L, D) view of the queue slots."""
        return self._slots[:-1].view(self.num_classes, self.queue_len, self.feature_dim)

    def _blend_weights(self) -> Tensor:
        if self.const_v is not None:
            return torch.full((self.num_classes,), self.const_v, device=self.device)
        return blend_weights(self.closed_hist, self.t_dist)

    def __call__(self, probs_w: Tensor, feat_w: Tensor, feat_s: Tensor, step: int) -> PseudoLabelOutput:
        protos = prototypes(self.queue, self.queue_fill)
        has_proto = self.queue_fill > 0
        with torch.no_grad():
            q = semantic_pseudo_label(feat_w, protos, has_proto, self.t_proto)
        diagnostics = {"pl_linear": probs_w.argmax(dim=1), "pl_semantic": q.argmax(dim=1)}
        loss = probs_w.new_zeros((), dtype=torch.float32)
        if step < self.warmup:
            return PseudoLabelOutput(probs=probs_w, loss=loss, diagnostics=diagnostics)
        v = self.v
        with torch.no_grad():
            probs = daso_blend(probs_w, q, v)

        def blend(p: Tensor) -> Tensor:
            # another head's distribution (ABC's), blended with the same q and v; with the const_v ablation that v
            # is the constant, where the reference's ABC branch keeps the distribution-aware weights
            return daso_blend(p, q, v)

        logs = {}
        if self.lambda_align > 0:
            loss_align = semantic_alignment_loss(q, feat_s, protos, has_proto, self.t_proto)
            loss = self.lambda_align * loss_align
            logs["loss_align"] = loss_align.detach()
        return PseudoLabelOutput(probs, loss, diagnostics, logs=logs, transform=blend)

    def enqueue(self, feat_lb_ema: Tensor | None, y_lb: Tensor) -> None:
        """Push the labeled batch's EMA features (B, D) with labels (B,) into the per-class queue."""
        if feat_lb_ema is None:
            raise ValueError("DASO needs the EMA encoder's labeled features (needs_ema_labeled_features is True)")
        flat, counts = queue_slots(y_lb, self.queue_ptr, self.queue_len, self.num_classes)
        self._slots.index_copy_(0, flat, feat_lb_ema.detach().to(self._slots.dtype))
        self.queue_ptr = (self.queue_ptr + counts) % self.queue_len
        self.queue_fill = (self.queue_fill + counts).clamp_max(self.queue_len)

    def observe(self, pseudo_label: Tensor, step: int) -> None:
        """Count the step's final hard pseudo-labels (U,) into the window histogram; close it when full."""
        self.window_hist.scatter_add_(0, pseudo_label, torch.ones_like(pseudo_label))
        self.window_iters += 1
        if self.window_iters == self.window:
            self.closed_hist = self.window_hist
            self.window_hist = torch.zeros_like(self.closed_hist)
            self.window_iters = 0
            self.v = self._blend_weights()

    def metrics(self) -> dict[str, Tensor]:
        """The blending weights v in use, (C,) (logged as daso/v/cNN)."""
        return {"daso/v": self.v}

    def state_dict(self) -> dict:
        return {
            "queue": self.queue.clone(),
            "queue_ptr": self.queue_ptr.clone(),
            "queue_fill": self.queue_fill.clone(),
            "window_hist": self.window_hist.clone(),
            "window_iters": self.window_iters,
            "closed_hist": self.closed_hist.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        current = self.state_dict()
        if set(state) != set(current):
            raise ValueError(f"DASO state has keys {sorted(state)}, expected {sorted(current)}")
        for key, value in current.items():
            if isinstance(value, Tensor) and tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"DASO state {key!r} has shape {tuple(state[key].shape)}, this run expects "
                    f"{tuple(value.shape)} (C classes, L queue length, D feature dimension)"
                )
        self.queue.copy_(state["queue"])
        self.queue_ptr = state["queue_ptr"].to(self.device, torch.long).clone()
        self.queue_fill = state["queue_fill"].to(self.device, torch.long).clone()
        self.window_hist = state["window_hist"].to(self.device, torch.long).clone()
        self.window_iters = int(state["window_iters"])
        self.closed_hist = state["closed_hist"].to(self.device, torch.long).clone()
        self.v = self._blend_weights()
