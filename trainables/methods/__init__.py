"""Method components by name: the registries' keys are the config schema's Literals."""

from __future__ import annotations

from collections.abc import Callable

from trainables.config import LabeledLossName, MethodConfig, PseudoLabelName, UnlabeledWeightName
from trainables.methods.base import (
    LabeledLoss,
    LinearPseudoLabel,
    Method,
    MethodContext,
    NoWeighting,
    PlainCE,
    PseudoLabelTransform,
    UnlabeledWeighting,
)

PSEUDO_LABEL: dict[PseudoLabelName, Callable[[MethodConfig, MethodContext], PseudoLabelTransform]] = {
    "none": lambda cfg, ctx: LinearPseudoLabel(),
}
LABELED_LOSS: dict[LabeledLossName, Callable[[MethodConfig, MethodContext], LabeledLoss]] = {
    "none": lambda cfg, ctx: PlainCE(),
}
UNLABELED_WEIGHTING: dict[UnlabeledWeightName, Callable[[MethodConfig, MethodContext], UnlabeledWeighting]] = {
    "none": lambda cfg, ctx: NoWeighting(),
}


def build_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    pseudo, labeled, unlabeled = cfg.components
    return Method(
        pseudo_label=PSEUDO_LABEL[pseudo](cfg, ctx),
        labeled_loss=LABELED_LOSS[labeled](cfg, ctx),
        unlabeled_weighting=UNLABELED_WEIGHTING[unlabeled](cfg, ctx),
    )
