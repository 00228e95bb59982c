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
from trainables.methods.daso import DasoPseudoLabel
from trainables.methods.drw import ClassBalancedCE, DynamicReweighting
from trainables.methods.la import LogitAdjustedCE

PSEUDO_LABEL: dict[PseudoLabelName, Callable[[MethodConfig, MethodContext], PseudoLabelTransform]] = {
    "none": lambda cfg, ctx: LinearPseudoLabel(),
    "daso": lambda cfg, ctx: DasoPseudoLabel.from_config(cfg.daso, ctx),
}
LABELED_LOSS: dict[LabeledLossName, Callable[[MethodConfig, MethodContext], LabeledLoss]] = {
    "none": lambda cfg, ctx: PlainCE(),
    "class_balanced": lambda cfg, ctx: ClassBalancedCE.from_config(cfg.drw, ctx),
    "logit_adjustment": lambda cfg, ctx: LogitAdjustedCE.from_config(cfg.la, ctx),
}
UNLABELED_WEIGHTING: dict[
    UnlabeledWeightName, Callable[[MethodConfig, MethodContext], UnlabeledWeighting]
] = {
    "none": lambda cfg, ctx: NoWeighting(),
    "drw": lambda cfg, ctx: DynamicReweighting.from_config(cfg.drw, ctx),
}


def build_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    pseudo, labeled, unlabeled = cfg.components
    return Method(
        pseudo_label=PSEUDO_LABEL[pseudo](cfg, ctx),
        labeled_loss=LABELED_LOSS[labeled](cfg, ctx),
        unlabeled_weighting=UNLABELED_WEIGHTING[unlabeled](cfg, ctx),
    )
