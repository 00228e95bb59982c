"""How a method plugs into the FixMatch loop: four small components chosen by name.

A method is (pseudo-label transform, labeled-loss weighting, unlabeled-loss weighting, extension). The loop calls
each through the protocols below with explicit tensors; it never asks which method is running. Stateful components
(DASO's queue and histogram, DRw's counts, DARP's per-sample labels) save and restore their state with the run
through `state_dict` / `load_state_dict`.

The extension covers what the three axes do not: trainable heads on the shared encoder (ABC's balanced classifier),
evaluated in place of the classifier if the method says so; a refinement of the pseudo-labels that sees each
sample's index in the unlabeled set (DARP); an extra loss on the step's features; a pass of the EMA model over the
unlabeled and validation sets when the method asks for one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from trainables.losses import labeled_ce


@dataclass(frozen=True)
class MethodContext:
    """Run-time facts a component may need at build time (never the unlabeled ground truth)."""

    num_classes: int
    labeled_counts: Tensor  # int64 (C,)
    feature_dim: int
    device: torch.device
    dataset: str
    gamma_l: float
    gamma_u: float | str
    iterations: int  # training iterations K
    unlabeled_size: int  # |U|
    unlabeled_batch: int  # mu * B
    seed: int = 0  # train.seed, for a component's own random generator
    tau: float = 0.95  # the confidence threshold train.tau


@dataclass
class PseudoLabelOutput:
    probs: Tensor  # (U, C) final pseudo-label distribution p' (no grad); the FixMatch mask and target use it
    loss: Tensor  # scalar extra loss already weighted (e.g. lambda_align * L_align); 0 when none
    # hard labels (U,) of intermediate pseudo-labels for diagnostics, keyed by metric prefix, e.g. "pl_linear"
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    # per-step scalar tensors averaged over the evaluation window as train/<key>, e.g. "loss_align" (no host sync)
    logs: dict[str, Tensor] = field(default_factory=dict)
    # the same rule applied to another classifier's weak-view distribution (U, C) of this batch (DASO's blend for
    # ABC's head); None = that distribution unchanged
    transform: Callable[[Tensor], Tensor] | None = None

    def apply(self, probs: Tensor) -> Tensor:
        return probs if self.transform is None else self.transform(probs)


class PseudoLabelTransform(Protocol):
    """Called per step as `enqueue` (before the pseudo-label), `__call__`, then `observe` (after the step)."""

    #: whether `enqueue` needs the EMA encoder's features of the weak labeled views (costs one extra forward)
    needs_ema_labeled_features: bool

    def enqueue(self, feat_lb_ema: Tensor | None, y_lb: Tensor) -> None:
        """Before this step's pseudo-labels: the labeled batch's EMA features (B, D) with labels (B,)."""

    def __call__(self, probs_w: Tensor, feat_w: Tensor, feat_s: Tensor, step: int) -> PseudoLabelOutput:
        """probs_w (U, C) linear pseudo-label (no grad); feat_w (U, D) weak-view features (no grad); feat_s (U, D)
        strong-view features (with grad, for losses on the strong view)."""

    def observe(self, pseudo_label: Tensor, step: int) -> None:
        """After the optimiser step: the final hard pseudo-labels (U,) of every unlabeled sample of the batch
        (confident or not)."""

    def metrics(self) -> dict[str, Tensor]:
        """Per-class vectors (C,) by metric prefix; the loop logs them as `<prefix>/cNN`."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LabeledLoss(Protocol):
    def __call__(self, logits_lb: Tensor, y_lb: Tensor) -> Tensor:
        """logits (B, C), labels (B,) -> scalar L_s."""


class UnlabeledWeighting(Protocol):
    def class_weights(self, step: int) -> Tensor | None:
        """(C,) weights multiplying each masked sample's CE by its pseudo-label's weight; None = unweighted."""

    def observe(self, pseudo_label: Tensor, mask: Tensor, step: int) -> None:
        """The batch's hard pseudo-labels (U,) and mask (U,) after the step."""

    def wants_pass(self, step: int) -> bool:
        """Whether the loop should run the EMA model over the whole unlabeled set before `step`."""

    def observe_pass(self, pseudo_label: Tensor, mask: Tensor, step: int) -> None:
        """Pseudo-labels and mask of the EMA model over the whole unlabeled set."""

    def metrics(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Stateless:
    def metrics(self) -> dict[str, Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"stateless component got state with keys {sorted(state)}")


class LinearPseudoLabel(Stateless):
    """Plain FixMatch: the linear classifier's weak-view distribution is the pseudo-label."""

    needs_ema_labeled_features = False

    def __call__(self, probs_w: Tensor, feat_w: Tensor, feat_s: Tensor, step: int) -> PseudoLabelOutput:
        return PseudoLabelOutput(probs=probs_w, loss=probs_w.new_zeros(()))

    def enqueue(self, feat_lb_ema: Tensor | None, y_lb: Tensor) -> None:
        pass

    def observe(self, pseudo_label: Tensor, step: int) -> None:
        pass


class PlainCE(Stateless):
    def __call__(self, logits_lb: Tensor, y_lb: Tensor) -> Tensor:
        return labeled_ce(logits_lb, y_lb)


class NoWeighting(Stateless):
    def class_weights(self, step: int) -> Tensor | None:
        return None

    def observe(self, pseudo_label: Tensor, mask: Tensor, step: int) -> None:
        pass

    def wants_pass(self, step: int) -> bool:
        return False

    def observe_pass(self, pseudo_label: Tensor, mask: Tensor, step: int) -> None:
        pass


def linear_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """A classifier head on the encoder's features, initialised as the references' classifiers: xavier-normal
    weights, zero bias."""
    head = nn.Linear(feature_dim, num_classes)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@dataclass
class StepView:
    """What an extension's loss sees of one step, all on the device. Rows are [labeled B, weak U, strong U] and,
    with `Extension.strong_views` = 2, a second strong view of the same U samples after them."""

    feats: Tensor  # (B + (1 + S) U, D) encoder features, with grad
    head_logits: dict[str, Tensor]  # each of the extension's heads over the same rows, with grad
    y_lb: Tensor  # (B,)
    batch: int  # B
    pseudo_label: PseudoLabelOutput  # this step's pseudo-label transform, to apply to a head's own distribution
    step: int
    logits: Tensor | None = None  # the classifier's logits over the same rows, with grad


@dataclass
class ExtensionOutput:
    loss: Tensor  # scalar, already weighted; added to L
    logs: dict[str, Tensor] = field(default_factory=dict)  # averaged over the window as train/<key>
    diagnostics: dict[str, Tensor] = field(default_factory=dict)  # hard labels (U,) measured like pl/, by prefix
    #: (L_u, hard pseudo-labels (U,), mask (U,)) replacing FixMatch's unlabeled term and what the loop records
    #: and the other components observe (ACR's consistency over two strong views); None = FixMatch's
    unlabeled: tuple[Tensor, Tensor, Tensor] | None = None


class Extension(Protocol):
    """Called per step as `refine` (on the final pseudo-label distribution, before the mask) and `loss` (after
    the forward); `wants_pass` / `observe_pass` before the step when the method needs whole-set predictions;
    `new_generation` at the start of each self-training generation after the first."""

    #: trainable modules on the encoder's features, by name; the loop attaches them to the model, so they are
    #: optimised, EMA-averaged and checkpointed with it
    heads: dict[str, nn.Module]
    #: the head evaluated (and used for the post-hoc numbers) in place of the classifier; None = the classifier
    eval_head: str | None
    #: self-training generations G (1: one run). Training is split into G equal parts; each after the first starts
    #: from a fresh model, EMA, optimiser and learning-rate schedule on the labeled set grown by `new_generation`
    generations: int
    #: strong views of each unlabeled sample per step (ACR: 2); the loop builds and forwards them all
    strong_views: int

    def refine(self, probs: Tensor, idx_ulb: Tensor, step: int) -> Tensor:
        """probs (U, C) final weak-view distribution of the unlabeled samples idx_ulb (U,) -> refined (U, C)."""

    def loss(self, view: StepView) -> ExtensionOutput: ...

    def wants_pass(self, step: int) -> bool:
        """Whether the loop should run the EMA model over the unlabeled and validation sets before `step`."""

    def observe_pass(self, probs_ulb: Tensor, probs_val: Tensor, y_val: Tensor, step: int) -> None:
        """The EMA model's class probabilities over U (N_U, C) and over the validation split (N_V, C) with its
        labels (N_V,); never the unlabeled ground truth."""

    def new_generation(self, probs_ulb: Tensor) -> tuple[Tensor, Tensor]:
        """The evaluated EMA model's probabilities over U -> (indices into U, labels) added to the original
        labeled set for the generation that starts now."""

    def additions(self) -> tuple[Tensor, Tensor]:
        """The current generation's additions (indices into U, labels), empty in the first; restored on resume."""

    def metrics(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class NoExtension(Stateless):
    """No extension; the defaults that extensions override."""

    heads: dict[str, nn.Module] = {}  # noqa: RUF012  (never mutated; an extension with heads sets its own)
    eval_head: str | None = None
    generations = 1
    strong_views = 1

    def refine(self, probs: Tensor, idx_ulb: Tensor, step: int) -> Tensor:
        return probs

    def loss(self, view: StepView) -> ExtensionOutput:
        return ExtensionOutput(loss=view.feats.new_zeros((), dtype=torch.float32))

    def wants_pass(self, step: int) -> bool:
        return False

    def observe_pass(self, probs_ulb: Tensor, probs_val: Tensor, y_val: Tensor, step: int) -> None:
        pass

    def new_generation(self, probs_ulb: Tensor) -> tuple[Tensor, Tensor]:
        raise RuntimeError(f"{type(self).__name__} runs a single generation")

    def additions(self) -> tuple[Tensor, Tensor]:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty


@dataclass
class Method:
    pseudo_label: PseudoLabelTransform
    labeled_loss: LabeledLoss
    unlabeled_weighting: UnlabeledWeighting
    extension: Extension = field(default_factory=NoExtension)
    #: trains on the labeled set alone (supervised baselines): the loop skips the unlabeled views, the pseudo-labels
    #: and the unlabeled loss, and evaluates the trained model rather than its EMA
    labeled_only: bool = False

    def metrics(self) -> dict[str, Tensor]:
        return {**self.pseudo_label.metrics(), **self.unlabeled_weighting.metrics(), **self.extension.metrics()}

    def state_dict(self) -> dict:
        return {
            "pseudo_label": self.pseudo_label.state_dict(),
            "unlabeled_weighting": self.unlabeled_weighting.state_dict(),
            "extension": self.extension.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.pseudo_label.load_state_dict(state["pseudo_label"])
        self.unlabeled_weighting.load_state_dict(state["unlabeled_weighting"])
        self.extension.load_state_dict(state.get("extension", {}))
