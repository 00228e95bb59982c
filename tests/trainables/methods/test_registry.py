import io
import typing

import pytest
import torch

from trainables.config import (
    PRESETS,
    ExtensionName,
    LabeledLossName,
    MethodConfig,
    PseudoLabelName,
    UnlabeledWeightName,
)
from trainables.losses import fixmatch_mask, unlabeled_ce
from trainables.methods import EXTENSION, LABELED_LOSS, PSEUDO_LABEL, UNLABELED_WEIGHTING, build_method
from trainables.methods.abc import AuxiliaryBalancedClassifier
from trainables.methods.acr import AdaptiveConsistency
from trainables.methods.base import MethodContext, StepView
from trainables.methods.crest import CrestGenerations, ProgressiveAlignment
from trainables.methods.darp import DarpRefinement
from trainables.methods.daso import DasoPseudoLabel
from trainables.methods.drw import ClassBalancedCE, DynamicReweighting
from trainables.methods.la import LogitAdjustedCE

C, D, B, U = 4, 8, 6, 12
CTX = MethodContext(
    num_classes=C,
    labeled_counts=torch.tensor([40, 20, 8, 2]),
    feature_dim=D,
    device=torch.device("cpu"),
    dataset="synthetic",
    gamma_l=20.0,
    gamma_u=20.0,
    iterations=10,
    unlabeled_size=40,
    unlabeled_batch=U,
)
EXPECTED_TYPES = {
    "daso": DasoPseudoLabel,
    "class_balanced": ClassBalancedCE,
    "logit_adjustment": LogitAdjustedCE,
    "drw": DynamicReweighting,
    "darp": DarpRefinement,
    "abc": AuxiliaryBalancedClassifier,
    "crest": CrestGenerations,
    "acr": AdaptiveConsistency,
    "dist_align": ProgressiveAlignment,
}


def method_config(preset: str) -> MethodConfig:
    """Small windows so that a handful of steps exercises warm-up end, window closes and the DRw start."""
    pseudo, labeled, unlabeled, extension = PRESETS[preset]
    raw: dict = {"preset": preset}
    if pseudo == "daso":
        raw["daso"] = {"queue_len": 3, "window": 2, "warmup": 2}
    if labeled == "class_balanced" or unlabeled == "drw":
        raw["drw"] = {"start": 2, "window": 3}
    if extension == "darp":  # int(10 * 0.3) = 3 warm-up calls, then a solve every 2nd call: steps 3, 5, 7
        raw["darp"] = {"warmup": 0.3, "every": 2, "alpha": 1.0}
    if extension == "abc":
        raw["abc"] = {"stairs": 5}
    if extension == "crest":
        raw["crest"] = {"generations": 2}
    if pseudo == "dist_align":
        raw["da"] = {"queue": 3}
    if extension == "acr":  # epochs of 2 steps, estimating from step 2: tau_1 adapts at steps 4, 6, 8
        raw["acr"] = {"epoch": 2, "est_epoch": 0}
    return MethodConfig.model_validate(raw)


def loop_steps(method, generator: torch.Generator, steps) -> list[torch.Tensor]:
    """The loop's calls, in its order, on random tensors on the generator's device; returns the losses."""
    kw = dict(generator=generator, device=generator.device)
    losses = []
    for step in steps:
        if method.unlabeled_weighting.wants_pass(step):
            mask, pseudo_label = fixmatch_mask(torch.rand(20, C, **kw).softmax(dim=1), 0.3)
            method.unlabeled_weighting.observe_pass(pseudo_label, mask, step)
        logits_lb, y_lb = torch.randn(B, C, **kw), torch.randint(0, C, (B,), **kw)
        probs_w = (3 * torch.randn(U, C, **kw)).softmax(dim=1)
        feat_w, feat_s, logits_s = torch.randn(U, D, **kw), torch.randn(U, D, **kw), torch.randn(U, C, **kw)
        feat_lb_ema = torch.randn(B, D, **kw) if method.pseudo_label.needs_ema_labeled_features else None
        idx_ulb = torch.randint(0, CTX.unlabeled_size, (U,), **kw)
        rows = B + (1 + method.extension.strong_views) * U
        feats, logits = torch.randn(rows, D, **kw), torch.randn(rows, C, **kw)
        if method.extension.wants_pass(step):
            y_val = torch.arange(C, **kw).repeat(3)
            probs_val = (3 * torch.randn(len(y_val), C, **kw)).softmax(dim=1)
            probs_ulb = torch.rand(CTX.unlabeled_size, C, **kw).softmax(dim=1)
            method.extension.observe_pass(probs_ulb, probs_val, y_val, step)
        method.pseudo_label.enqueue(feat_lb_ema, y_lb)
        out = method.pseudo_label(probs_w, feat_w, feat_s, step)
        mask, yhat = fixmatch_mask(method.extension.refine(out.probs, idx_ulb, step), 0.5)
        weights = method.unlabeled_weighting.class_weights(step)
        heads = {name: head.to(feats.device)(feats) for name, head in method.extension.heads.items()}
        ext = method.extension.loss(StepView(feats, heads, y_lb, B, out, step, logits))
        loss_u = unlabeled_ce(logits_s, yhat, mask, weights)
        if ext.unlabeled is not None:
            loss_u, yhat, mask = ext.unlabeled
        loss = method.labeled_loss(logits_lb, y_lb) + loss_u + out.loss + ext.loss
        method.pseudo_label.observe(out.probs.argmax(dim=1), step)
        method.unlabeled_weighting.observe(yhat, mask, step)
        losses.append(loss.detach())
    return losses


def assert_same_state(a, b) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_registry_keys_are_the_schema_literals():
    assert set(PSEUDO_LABEL) == set(typing.get_args(PseudoLabelName))
    assert set(LABELED_LOSS) == set(typing.get_args(LabeledLossName))
    assert set(UNLABELED_WEIGHTING) == set(typing.get_args(UnlabeledWeightName))
    assert set(EXTENSION) == set(typing.get_args(ExtensionName))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_build_method_and_state_round_trip(preset):
    """Every preset builds its named components; after 5 loop steps the method's state survives
    torch.save / torch.load(weights_only=True) into a freshly built method, and both continue identically."""
    cfg = method_config(preset)
    method = build_method(cfg, CTX)
    for name, component in zip(
        PRESETS[preset],
        (method.pseudo_label, method.labeled_loss, method.unlabeled_weighting, method.extension),
        strict=True,
    ):
        if name in EXPECTED_TYPES:
            assert isinstance(component, EXPECTED_TYPES[name])

    loop_steps(method, torch.Generator().manual_seed(0), range(5))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = build_method(cfg, CTX)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name, head in method.extension.heads.items():  # in the loop the heads are saved with the model
        restored.extension.heads[name].load_state_dict(head.state_dict())
    assert_same_state(method.state_dict(), restored.state_dict())
    assert_same_state(restored.metrics(), method.metrics())

    a = loop_steps(method, torch.Generator().manual_seed(1), range(5, 9))
    b = loop_steps(restored, torch.Generator().manual_seed(1), range(5, 9))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert_same_state(method.state_dict(), restored.state_dict())


def test_daso_t_dist_auto_is_resolved_from_the_context():
    """synthetic data with gamma_l == gamma_u -> 1.5; the same with a uniform unlabeled set -> 0.3."""
    cfg = method_config("fixmatch_daso")
    assert build_method(cfg, CTX).pseudo_label.t_dist == 1.5
    uniform = MethodContext(**{**CTX.__dict__, "gamma_u": 1.0})
    assert build_method(cfg, uniform).pseudo_label.t_dist == 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_per_step_calls_do_not_synchronise_with_the_host(preset):
    """Every call the loop makes per step stays on the device: CUDA's sync debug mode turns any host-device
    synchronisation (.item(), boolean-mask indexing, a device-to-host copy) into an error."""
    device = torch.device("cuda")
    method = build_method(method_config(preset), MethodContext(**{**CTX.__dict__, "device": device}))
    generator = torch.Generator(device=device).manual_seed(0)
    # DARP's solve (calls 4 and 6 here: past int(0.3 * 10) = 3, every 2nd) runs on the host by design
    solves = {3, 5} if PRESETS[preset][3] == "darp" else set()
    try:
        for step in range(6):
            torch.cuda.set_sync_debug_mode("default" if step in solves else "error")
            loop_steps(method, generator, [step])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_dynamic_reweighting_factory_wiring():
    """beta goes to the labeled weights, beta_u to the unlabeled ones; a fractional start is a share of the
    context's iterations; the auto window holds |U| predictions; confident_only passes through."""
    from trainables.methods.drw import effective_number_weights

    cfg = MethodConfig.model_validate(
        {"preset": "fixmatch_drw", "drw": {"beta": 0.9, "beta_u": 0.5, "start": 0.7, "confident_only": True}}
    )
    method = build_method(cfg, CTX)  # CTX: 10 iterations, |U| = 40, unlabeled batch 12
    drw = method.unlabeled_weighting
    assert (drw.beta, drw.start, drw.window, drw.confident_only) == (0.5, 7, 4, True)
    torch.testing.assert_close(method.labeled_loss.weights, effective_number_weights(CTX.labeled_counts, 0.9))
    one = MethodConfig.model_validate({"preset": "fixmatch_drw", "drw": {"beta": 0.9, "start": 3, "window": 2}})
    drw = build_method(one, CTX).unlabeled_weighting
    assert (drw.beta, drw.start, drw.window, drw.confident_only) == (0.9, 3, 2, False)
