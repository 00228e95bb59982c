"""ACR, the adaptive consistency regularizer (Wei and Gan, "Towards Realistic Long-Tailed Semi-Supervised Learning:
Consistency Is All You Need", CVPR 2023), as its reference code trains it.

Two linear heads share the encoder: the standard classifier and a balanced one (the evaluated head). Per step, with
two strong views s, s' of each unlabeled sample and pi the labeled class distribution:
- L_x: CE of the standard head; L_x^b: CE of the balanced head on logits + tau_2 log pi (logit adjustment);
- standard consistency: targets argmax softmax(z^w - log(pi^tau_1 + 1e-12)), kept where that adjusted
  distribution OR the raw softmax(z^w) reaches the threshold, CE on both strong views, mean over 2U;
- balanced consistency: targets from z^w - log(pi^tau_12 + 1e-12) of the standard head, kept where that or the
  balanced head's own softmax reaches the threshold, CE of the balanced head on both strong views, mean over 2U.
tau_1 adapts: from epoch e_0 + 1 on, the unlabeled distribution is estimated as an EMA of the balanced head's
confident pseudo-label histogram, and at each epoch's start tau_1 = tau_max softmax(d)_consistent, d the epoch's
mean symmetric KL divergences of the estimate from the labeled (consistent), uniform and reversed distributions:
near 0 when U looks like the labeled set, near tau_max when it looks reversed. Notation: B labeled, U unlabeled
samples, C classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.methods.base import ExtensionOutput, NoExtension, StepView, linear_head


def log_adjustment(prior: Tensor, tau: Tensor | float) -> Tensor:
    """log(pi^tau + 1e-12), the reference's adjustment. Shape: prior (C,) -> (C,)."""
    return torch.log(prior.pow(tau) + 1e-12)


def symmetric_kl(p: Tensor, q: Tensor) -> Tensor:
    """(KL(p || q) + KL(q || p)) / 2 for distributions p, q (C,) -> scalar."""
    return 0.5 * (p * (p.log() - q.log())).sum() + 0.5 * (q * (q.log() - p.log())).sum()


def adaptive_tau(mean_kl: Tensor, tau_max: float, tau_min: float = 0.0) -> Tensor:
    """tau_min + (tau_max - tau_min) exp(d_con) / sum exp(d), d = (d_con, d_uni, d_rev). Shape: (3,) -> scalar."""
    return tau_min + (tau_max - tau_min) * torch.softmax(mean_kl, dim=0)[0]


def consistency(logits_s: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """(1 / N) sum_i mask_i CE(logits_s_i, targets_i) over all rows (both strong views). Shape: (N, C), (N,), (N,)."""
    return (F.cross_entropy(logits_s.float(), targets, reduction="none") * mask).mean()


class AdaptiveConsistency(NoExtension):
    """ACR as an extension: the balanced head "acr" (evaluated), two strong views, the four losses (the loop's
    FixMatch terms replaced), and the distribution estimate. State (saved with the run): the estimate of the
    unlabeled distribution, the epoch's summed KL divergences, and tau_1."""

    strong_views = 2

    def __init__(
        self,
        labeled_counts: Tensor,
        feature_dim: int,
        device: torch.device,
        *,
        tau: float,
        tau1: float = 2.0,
        tau12: float = 2.0,
        tau2: float = 2.0,
        ema_u: float = 0.99,
        epoch: int = 500,
        est_epoch: int = 5,
    ) -> None:
        self.device = torch.device(device)
        c = len(labeled_counts)
        counts = labeled_counts.double()
        self.py_con = (counts / counts.sum()).float().to(self.device)
        self.py_uni = torch.full((c,), 1.0 / c, device=self.device)
        self.py_rev = self.py_con.flip(0)
        self.threshold, self.tau_max, self.ema_u = tau, tau1, ema_u
        self.epoch, self.est_epoch = epoch, est_epoch
        self.adjust_12 = log_adjustment(self.py_con, tau12)
        self.adjust_2 = log_adjustment(self.py_con, tau2)
        self.heads = {"acr": linear_head(feature_dim, c)}
        self.eval_head = "acr"
        self.tau1 = torch.tensor(float(tau1), device=self.device)
        self.u_py = self.py_uni.clone()
        self.kl_sum = torch.zeros(3, device=self.device)

    def _start_epoch(self, step: int) -> None:
        """At an epoch's first step: after the estimation epochs, tau_1 from the last epoch's mean divergences
        (kept when they give NaN), then the sums restart."""
        if step // self.epoch > self.est_epoch:
            tau = adaptive_tau(self.kl_sum / self.epoch, self.tau_max)
            self.tau1 = torch.where(tau.isnan(), self.tau1, tau)
        self.kl_sum = torch.zeros_like(self.kl_sum)

    def _estimate(self, targets_b: Tensor, mask_b: Tensor) -> None:
        """The balanced head's confident pseudo-labels update the estimate and the divergence sums (no host sync:
        a batch without any confident one leaves both as they are)."""
        counts = torch.zeros_like(self.u_py).index_add_(0, targets_b, mask_b)
        seen = counts.sum() > 0
        now = counts / counts.sum().clamp_min(1.0)
        u_py = self.ema_u * self.u_py + (1 - self.ema_u) * now
        kl = torch.stack([symmetric_kl(u_py, anchor) for anchor in (self.py_con, self.py_uni, self.py_rev)])
        self.u_py = torch.where(seen, u_py, self.u_py)
        self.kl_sum = self.kl_sum + torch.where(seen, kl, torch.zeros_like(kl))

    def loss(self, view: StepView) -> ExtensionOutput:
        step, b = view.step, view.batch
        if step % self.epoch == 0:
            self._start_epoch(step)
        u = (len(view.logits) - b) // 3
        z_lb, z_w, z_s = view.logits.split([b, u, 2 * u])
        h_lb, h_w, h_s = view.head_logits["acr"].split([b, u, 2 * u])
        with torch.no_grad():
            w = z_w.detach().float()
            adjust_1 = log_adjustment(self.py_con, self.tau1)
            conf, targets = torch.softmax(w - adjust_1, dim=1).max(dim=1)
            conf_12, targets_12 = torch.softmax(w - self.adjust_12, dim=1).max(dim=1)
            conf_b, targets_b = torch.softmax(h_w.detach().float(), dim=1).max(dim=1)
            conf_t = torch.softmax(w, dim=1).max(dim=1).values
            mask = ((conf >= self.threshold) | (conf_t >= self.threshold)).float()
            mask_b = ((conf_b >= self.threshold) | (conf_12 >= self.threshold)).float()
            if step // self.epoch > self.est_epoch:
                self._estimate(targets_b, (conf_b >= self.threshold).float())
        loss_u = consistency(z_s, targets.repeat(2), mask.repeat(2))
        loss_x_b = F.cross_entropy(h_lb.float() + self.adjust_2, view.y_lb)
        loss_u_b = consistency(h_s, targets_12.repeat(2), mask_b.repeat(2))
        return ExtensionOutput(
            loss=loss_x_b + loss_u_b,
            logs={"loss_x_acr": loss_x_b.detach(), "loss_u_acr": loss_u_b.detach(), "acr_tau1": self.tau1 + 0.0},
            diagnostics={"pl_acr": targets_b},
            unlabeled=(loss_u, targets, mask),
        )

    def metrics(self) -> dict[str, Tensor]:
        """acr/u_py: the estimated unlabeled class distribution (C,)."""
        return {"acr/u_py": self.u_py}

    def state_dict(self) -> dict:
        return {"tau1": self.tau1.clone(), "u_py": self.u_py.clone(), "kl_sum": self.kl_sum.clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"tau1", "u_py", "kl_sum"} or state["u_py"].shape != self.u_py.shape:
            raise ValueError(f"ACR state does not fit this run: keys {sorted(state)}")
        self.tau1 = state["tau1"].to(self.device).clone()
        self.u_py = state["u_py"].to(self.device).clone()
        self.kl_sum = state["kl_sum"].to(self.device).clone()
