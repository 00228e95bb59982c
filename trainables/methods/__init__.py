"""Method components by name: the registries' keys are the config schema's Literals."""

from __future__ import annotations

from collections.abc import Callable

from trainables.config import (
    DasoConfig,
    DrwConfig,
    LabeledLossName,
    MethodConfig,
    PseudoLabelName,
    UnlabeledWeightName,
)
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
from trainables.methods.daso import DasoPseudoLabel, resolve_t_dist
from trainables.methods.drw import ClassBalancedCE, DynamicReweighting
from trainables.methods.la import LogitAdjustedCE


def daso(cfg: DasoConfig, ctx: MethodContext) -> DasoPseudoLabel:
    return DasoPseudoLabel(
        ctx.num_classes,
        ctx.feature_dim,
        ctx.device,
        t_proto=cfg.t_proto,
        t_dist=resolve_t_dist(cfg.t_dist, ctx.dataset, ctx.gamma_l, ctx.gamma_u),
        lambda_align=cfg.lambda_align,
        queue_len=cfg.queue_len,
        window=cfg.window,
        warmup=cfg.warmup,
        const_v=cfg.const_v,
    )


def dynamic_reweighting(cfg: DrwConfig, ctx: MethodContext) -> DynamicReweighting:
    return DynamicReweighting(
        ctx.num_classes,
        ctx.device,
        beta=cfg.beta if cfg.beta_u is None else cfg.beta_u,
        start=cfg.start_step(ctx.iterations),
        count=cfg.count,
        window=cfg.window_batches(ctx.unlabeled_size, ctx.unlabeled_batch),
        pass_every=cfg.pass_every,
        confident_only=cfg.confident_only,
    )


def _labeled_counts(ctx: MethodContext):
    return ctx.labeled_counts.to(ctx.device)


PSEUDO_LABEL: dict[PseudoLabelName, Callable[[MethodConfig, MethodContext], PseudoLabelTransform]] = {
    "none": lambda cfg, ctx: LinearPseudoLabel(),
    "daso": lambda cfg, ctx: daso(cfg.daso, ctx),
}
LABELED_LOSS: dict[LabeledLossName, Callable[[MethodConfig, MethodContext], LabeledLoss]] = {
    "none": lambda cfg, ctx: PlainCE(),
    "class_balanced": lambda cfg, ctx: ClassBalancedCE(_labeled_counts(ctx), cfg.drw.beta),
    "logit_adjustment": lambda cfg, ctx: LogitAdjustedCE(_labeled_counts(ctx), cfg.la.tau),
}
UNLABELED_WEIGHTING: dict[UnlabeledWeightName, Callable[[MethodConfig, MethodContext], UnlabeledWeighting]] = {
    "none": lambda cfg, ctx: NoWeighting(),
    "drw": lambda cfg, ctx: dynamic_reweighting(cfg.drw, ctx),
}


def build_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    pseudo, labeled, unlabeled = cfg.components
    return Method(
        pseudo_label=PSEUDO_LABEL[pseudo](cfg, ctx),
        labeled_loss=LABELED_LOSS[labeled](cfg, ctx),
        unlabeled_weighting=UNLABELED_WEIGHTING[unlabeled](cfg, ctx),
        labeled_only=cfg.labeled_only,
    )
