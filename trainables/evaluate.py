"""Evaluation of the EMA model and the per-window training statistics, as metrics-contract dictionaries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from trainables.batches import ImageStore
from trainables.metrics import classification_metrics, pseudo_label_metrics


@torch.inference_mode()
def predict_logits(
    forward: Callable[[Tensor], Tensor], store: ImageStore, prep: Callable[[Tensor], Tensor], batch_size: int
) -> Tensor:
    """float32 logits (N, C) on the CPU for every image of the store, in order."""
    out = [forward(prep(x_u8)).float().cpu() for _, x_u8 in store.chunks(batch_size)]
    return torch.cat(out)


def split_metrics(
    prefix: str,
    logits: Tensor,
    labels: np.ndarray,
    num_classes: int,
    groups: dict[str, np.ndarray],
    log_prior: Tensor,
    posthoc_tau: float,
) -> dict[str, float]:
    """The contract's classification metrics for one split, plus post-hoc logit adjustment (Menon et al. 2021):
    predictions argmax(logits - tau * log pi) reported as `{prefix}/top1_la` and `{prefix}/balanced_acc_la`."""
    out = classification_metrics(prefix, labels, logits.argmax(1).numpy(), num_classes, groups)
    adjusted = (logits - posthoc_tau * log_prior).argmax(1).numpy()
    la = classification_metrics(prefix, labels, adjusted, num_classes, groups)
    out[f"{prefix}/top1_la"] = la[f"{prefix}/top1"]
    out[f"{prefix}/balanced_acc_la"] = la[f"{prefix}/balanced_acc"]
    return out


@dataclass
class Window:
    """What happened between two evaluations. Tensors stay on the device until `summarise` (no per-step sync)."""

    steps: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    indices: list[Tensor] = field(default_factory=list)  # unlabeled indices (CPU), to look up truth at the end
    pseudo_label: list[Tensor] = field(default_factory=list)
    mask: list[Tensor] = field(default_factory=list)
    diagnostics: dict[str, list[Tensor]] = field(default_factory=dict)

    def add(self, losses: dict[str, Tensor], idx_ulb: Tensor, pseudo_label: Tensor, mask: Tensor, diag: dict) -> None:
        self.add_losses(losses)
        self.indices.append(idx_ulb)
        self.pseudo_label.append(pseudo_label)
        self.mask.append(mask)
        for key, value in diag.items():
            self.diagnostics.setdefault(key, []).append(value)

    def add_losses(self, losses: dict[str, Tensor]) -> None:
        """A step without unlabeled data (labeled-only methods): only its losses."""
        self.steps += 1
        for key, value in losses.items():
            value = value.detach()
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def summarise(
        self, unlabeled_truth: np.ndarray | None, num_classes: int, groups: dict[str, np.ndarray]
    ) -> dict[str, float]:
        """train/ means over the window; pl/ metrics of the confident final pseudo-labels; `<name>/` metrics of
        each diagnostic pseudo-label (e.g. pl_linear, pl_semantic) over all samples, without a threshold."""
        if self.steps == 0:
            return {}
        out = {f"train/{key}": float(value) / self.steps for key, value in self.sums.items()}
        if not self.indices:  # a labeled-only method: no pseudo-labels to measure
            return out
        idx = torch.cat(self.indices).numpy()
        truth = None if unlabeled_truth is None else unlabeled_truth[idx]
        mask = torch.cat(self.mask).cpu().numpy()
        out["train/mask_ratio"] = float(mask.mean())
        pl = torch.cat(self.pseudo_label).cpu().numpy()
        out.update(pseudo_label_metrics("pl", truth, pl, mask, num_classes, groups))
        everything = np.ones_like(mask)
        for name, parts in self.diagnostics.items():
            labels = torch.cat(parts).cpu().numpy()
            out.update(pseudo_label_metrics(name, truth, labels, everything, num_classes, groups))
        return out
