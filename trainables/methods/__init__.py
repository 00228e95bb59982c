"""Method components by name: the registries' keys are the config schema's Literals."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainables.config import (
    AbcConfig,
    DarpConfig,
    DasoConfig,
    DrwConfig,
    ExtensionName,
    LabeledLossName,
    MethodConfig,
    PseudoLabelName,
    UnlabeledWeightName,
)
from trainables.methods.abc import AuxiliaryBalancedClassifier
from trainables.methods.acr import AdaptiveConsistency
from trainables.methods.base import (
    Extension,
    LabeledLoss,
    LinearPseudoLabel,
    Method,
    MethodContext,
    NoExtension,
    NoWeighting,
    PlainCE,
    PseudoLabelTransform,
    UnlabeledWeighting,
)
from trainables.methods.crest import CrestGenerations, ProgressiveAlignment
from trainables.methods.darp import DarpRefinement
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


def darp(cfg: DarpConfig, ctx: MethodContext) -> DarpRefinement:
    """The target: the labeled proportions (`labeled`, or `auto` with gamma_u == gamma_l on data whose unlabeled
    imbalance is known), the given shares, or None (`estimate`, or `auto` otherwise: a mismatched, reversed or
    unknown unlabeled distribution, as STL-10's and an image folder's) for the pass at the warm-up's end."""
    target = cfg.target
    if target == "auto":
        known = ctx.dataset not in ("stl10", "imagefolder")  # their unlabeled sets are not drawn with gamma_u
        target = "labeled" if known and ctx.gamma_u == ctx.gamma_l else "estimate"
    if isinstance(target, list):
        shares = torch.tensor(target, dtype=torch.float64)
    elif target == "labeled":
        shares = ctx.labeled_counts.double()
    else:
        shares = None
    return DarpRefinement(
        ctx.num_classes,
        ctx.unlabeled_size,
        ctx.device,
        iterations=ctx.iterations,
        target=shares,
        warmup=cfg.warmup,
        every=cfg.every,
        alpha=cfg.alpha,
        solver_iters=cfg.solver_iters,
    )


def abc(cfg: AbcConfig, ctx: MethodContext) -> AuxiliaryBalancedClassifier:
    return AuxiliaryBalancedClassifier(
        ctx.labeled_counts,
        ctx.feature_dim,
        ctx.device,
        iterations=ctx.iterations,
        tau=ctx.tau if cfg.tau is None else cfg.tau,
        weight=cfg.weight,
        stairs=cfg.stairs,
        seed=ctx.seed,
    )


def _labeled_counts(ctx: MethodContext):
    return ctx.labeled_counts.to(ctx.device)


PSEUDO_LABEL: dict[PseudoLabelName, Callable[[MethodConfig, MethodContext], PseudoLabelTransform]] = {
    "none": lambda cfg, ctx: LinearPseudoLabel(),
    "daso": lambda cfg, ctx: daso(cfg.daso, ctx),
    "dist_align": lambda cfg, ctx: ProgressiveAlignment(
        ctx.labeled_counts,
        ctx.device,
        iterations=ctx.iterations,
        generations=cfg.crest.generations if cfg.crest is not None else 1,
        t_min=cfg.da.t_min,
        queue=cfg.da.queue,
    ),
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
EXTENSION: dict[ExtensionName, Callable[[MethodConfig, MethodContext], Extension]] = {
    "none": lambda cfg, ctx: NoExtension(),
    "darp": lambda cfg, ctx: darp(cfg.darp, ctx),
    "abc": lambda cfg, ctx: abc(cfg.abc, ctx),
    "acr": lambda cfg, ctx: AdaptiveConsistency(
        ctx.labeled_counts,
        ctx.feature_dim,
        ctx.device,
        tau=ctx.tau,
        tau1=cfg.acr.tau1,
        tau12=cfg.acr.tau12,
        tau2=cfg.acr.tau2,
        ema_u=cfg.acr.ema_u,
        epoch=cfg.acr.epoch,
        est_epoch=cfg.acr.est_epoch,
    ),
    "crest": lambda cfg, ctx: CrestGenerations(
        ctx.labeled_counts, generations=cfg.crest.generations, alpha=cfg.crest.alpha
    ),
}


def build_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    pseudo, labeled, unlabeled, extension = cfg.components
    return Method(
        pseudo_label=PSEUDO_LABEL[pseudo](cfg, ctx),
        labeled_loss=LABELED_LOSS[labeled](cfg, ctx),
        unlabeled_weighting=UNLABELED_WEIGHTING[unlabeled](cfg, ctx),
        extension=EXTENSION[extension](cfg, ctx),
        labeled_only=cfg.labeled_only,
    )
