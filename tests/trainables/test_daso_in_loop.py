"""DASO inside the training loop, checked against the reference implementation's order of operations.

The pure DASO functions are tested on hand-computed tensors in methods/test_daso.py; here the loop's first step
is recomputed independently the way the DASO reference code runs it (its `DASOModel.forward_train` and
`FeatureQueue`): the labeled batch goes through the EMA encoder in train mode and into a per-class bank first, the
prototypes are the bank means, and only then are the semantic pseudo-labels of the weak views computed.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.trainables.conftest import random_data, tiny_config
from trainables.augment import strong_augment, weak_augment
from trainables.evaluate import Window
from trainables.loop import Run, resolve_runtime

T_PROTO = 0.05
QUEUE = 4
V = 0.5  # the reference's fixed blending weight (WITH_DIST_AWARE False, INTERP_ALPHA 0.5)


def daso_run(*overrides: str) -> Run:
    cfg = tiny_config(
        "method.preset=fixmatch_daso",
        "method.daso.warmup=0",
        f"method.daso.queue_len={QUEUE}",
        f"method.daso.const_v={V}",
        f"method.daso.t_proto={T_PROTO}",
        *overrides,
    )
    return Run(cfg, random_data(), resolve_runtime(cfg))


def reference_first_step(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hard pseudo-labels, semantic hard pseudo-labels) of step 0, computed as the reference does."""
    gen = torch.Generator().set_state(run.aug_gen.get_state())
    model, ema = copy.deepcopy(run.model).train(), copy.deepcopy(run.ema.module).train()
    idx_lb, idx_ulb = run.lb_stream.indices(0), run.ulb_stream.indices(0)
    x_lb_u8, x_ulb_u8 = run.lb_store.gather(idx_lb), run.ulb_store.gather(idx_ulb)
    y_lb = run.y_lb[idx_lb]
    x_lb = run.prep(weak_augment(x_lb_u8, gen, run.crop_pad))
    x_w = run.prep(weak_augment(x_ulb_u8, gen, run.crop_pad))
    x_s = run.prep(strong_augment(x_ulb_u8, gen, cutout=run.cutout_px, pad=run.crop_pad))
    with torch.no_grad():
        # 1. push the labeled batch (EMA encoder, train-mode BatchNorm) into the bank, keeping the last QUEUE
        l_feats = ema.encode(x_lb)
        num_classes = run.data.num_classes
        prototypes = torch.zeros(num_classes, l_feats.shape[1])
        for c in range(num_classes):
            bank = l_feats[y_lb == c][-QUEUE:]
            if len(bank):
                prototypes[c] = bank.mean(0)
        # 2. the online model over [labeled, weak, strong]; semantic pseudo-label of the weak view
        feats = model.encode(torch.cat([x_lb, x_w, x_s]))
        feats_weak = feats[len(x_lb) : len(x_lb) + len(x_w)]
        sim = F.cosine_similarity(feats_weak.unsqueeze(1), prototypes.unsqueeze(0), dim=2) / T_PROTO
        q = sim.softmax(dim=1)
        p = model.classifier(feats_weak).softmax(dim=1)
        blended = (1 - V) * p + V * q
    return blended.argmax(dim=1), q.argmax(dim=1), p.argmax(dim=1)


def test_first_daso_step_gives_the_reference_pseudo_labels():
    run = daso_run()
    expected, expected_semantic, linear = reference_first_step(run)
    window = Window()
    run.train_step(window)
    assert torch.equal(window.diagnostics["pl_semantic"][0], expected_semantic)
    assert torch.equal(window.pseudo_label[0], expected)
    # the check can tell the orders apart: reading the prototypes before the enqueue finds an empty queue at
    # step 0 (q uniform), so the blended pseudo-label would be the linear one
    assert not torch.equal(expected, linear)


def bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("mode", ["batch", "train", "eval"])
def test_ema_batchnorm_modes(mode):
    """batch: batch statistics, running statistics untouched; train: batch statistics and the running statistics
    move as one train-mode forward moves them (the reference's side effect); eval: the running statistics. The
    EMA model is left in eval mode with its BatchNorm tracking statistics again."""
    run = daso_run(f"method.daso.ema_bn={mode}")
    x = run.prep(run.lb_store.gather(run.lb_stream.indices(0)))
    before = bn_state(run.ema.module)
    twin = copy.deepcopy(run.ema.module)
    with torch.no_grad():
        expected = (twin.eval() if mode == "eval" else twin.train()).encode(x)
    feats = run.ema_labeled_features(x)
    torch.testing.assert_close(feats, expected)
    after = bn_state(run.ema.module)
    if mode == "train":
        assert all(torch.equal(after[k], v) for k, v in bn_state(twin).items())
        assert any(not torch.equal(after[k], before[k]) for k in before if "running_mean" in k)
    else:
        assert all(torch.equal(after[k], before[k]) for k in before)
    assert not run.ema.module.training
    norms = [m for m in run.ema.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats for m in norms)
