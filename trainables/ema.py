"""Exponential moving average of a model's weights and BatchNorm statistics (FixMatch's evaluation model).

theta_ema <- d_t * theta_ema + (1 - d_t) * theta, with the warm-started decay d_t = min(1 - 1/(t + 1), decay)
of the FixMatch and DASO references (t = updates done so far): the first update copies the model, and early
averages are not dominated by the random initialisation. Floating-point buffers (BN running mean / var) are
averaged like the parameters; integer buffers (num_batches_tracked) are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


def ema_decay_at(t: int, decay: float) -> float:
    """d_t = min(1 - 1/(t + 1), decay) for the update after t earlier ones: d_0 = 0, d_1 = 1/2, d_2 = 2/3."""
    return min(1.0 - 1.0 / (t + 1), decay)


def _split(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(floating-point tensors, other tensors) over parameters then buffers, in registration order."""
    tensors = [p.data for p in module.parameters()] + list(module.buffers())
    return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]


class ModelEMA:
    """A frozen copy of `model` (eval mode, requires_grad False) tracking its exponential moving average.

    Build it from the plain model before any torch.compile wrapping; `update` takes that same model (or one
    with the same parameter and buffer layout). The loop evaluates `ema.module`.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._ema_float, self._ema_other = _split(self.module)
        self._source: nn.Module | None = None
        self._src_float: list[Tensor] = []
        self._src_other: list[Tensor] = []

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards `model`; returns the decay d_t used."""
        if model is not self._source:  # tensor lists built once per source model, not every step
            self._src_float, self._src_other = _split(model)
            shapes = [t.shape for t in self._src_float + self._src_other]
            if shapes != [t.shape for t in self._ema_float + self._ema_other]:
                raise ValueError(
                    "ModelEMA.update: the model's parameters/buffers do not match the EMA copy's"
                )
            self._source = model
        d = ema_decay_at(self.updates, self.decay)
        if d == 0.0:
            torch._foreach_copy_(self._ema_float, self._src_float)
        else:
            # lerp(ema, src, 1 - d) = ema + (1 - d)(src - ema) = d * ema + (1 - d) * src
            torch._foreach_lerp_(self._ema_float, self._src_float, 1.0 - d)
        for dst, src in zip(self._ema_other, self._src_other, strict=True):
            dst.copy_(src)
        self.updates += 1
        return d

    def state_dict(self) -> dict[str, Any]:
        """Weights, buffers and the update counter: tensors and an int, loadable with weights_only=True."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
