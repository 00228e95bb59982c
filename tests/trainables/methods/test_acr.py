"""ACR's pieces on hand-computed tensors, and `fixmatch_acr` inside the real loop (two strong views, the balanced
head evaluated, resume, the unlabeled truth never read)."""

import math

import pytest
import torch

from tests.trainables.methods.test_methods_in_loop import (
    _restore_global_torch_settings,  # noqa: F401  (autouse fixture)
    assert_resume_equals_whole_run,
    assert_truth_never_reaches_training,
    data,  # noqa: F401  (fixture)
    tiny_config,
    trajectory,
)
from trainables.config import RunConfig
from trainables.methods.acr import AdaptiveConsistency, adaptive_tau, consistency, log_adjustment, symmetric_kl
from trainables.methods.base import PseudoLabelOutput, StepView

LN2 = math.log(2.0)


def test_log_adjustment_and_adaptive_tau_by_hand():
    prior = torch.tensor([0.8, 0.2])
    torch.testing.assert_close(log_adjustment(prior, 2.0), torch.log(torch.tensor([0.64, 0.04]) + 1e-12))
    torch.testing.assert_close(log_adjustment(prior, 0.0), torch.log(torch.tensor([1.0, 1.0]) + 1e-12))
    # equal divergences: a third of tau_max; a consistent estimate (d_con = 0, the others large): about 0
    assert float(adaptive_tau(torch.zeros(3), 2.0)) == pytest.approx(2 / 3)
    assert float(adaptive_tau(torch.tensor([0.0, 10.0, 10.0]), 2.0)) == pytest.approx(2 / (1 + 2 * math.exp(10)))
    assert float(adaptive_tau(torch.tensor([10.0, 0.0, 0.0]), 2.0, 0.5)) == pytest.approx(
        0.5 + 1.5 / (1 + 2 * math.exp(-10))
    )


def test_symmetric_kl_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2])
    expected = 0.5 * (0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)) + 0.5 * (
        0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    )
    assert float(symmetric_kl(p, q)) == pytest.approx(expected)
    assert float(symmetric_kl(q, p)) == pytest.approx(expected) and float(symmetric_kl(p, p)) == 0.0


def test_consistency_is_a_mean_over_every_row():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    got = consistency(logits, torch.tensor([0, 1, 0]), torch.tensor([1.0, 0.0, 0.0]))
    assert float(got) == pytest.approx(LN2 / 3)


def make_acr(**kw) -> AdaptiveConsistency:
    return AdaptiveConsistency(torch.tensor([8, 2]), 3, torch.device("cpu"), tau=0.9, **kw)


def test_acr_targets_masks_and_losses_by_hand():
    """Labeled prior (0.8, 0.2), tau_1 = tau_12 = tau_2 = 1, threshold 0.9. Weak standard logits of sample 0:
    (log 6, log 4) -> raw (0.6, 0.4), adjusted by log pi: (7.5, 20) / 27.5 -> target 1 at 0.727, not confident
    either way. Sample 1: (log 98, log 2) -> raw 0.98 (confident), adjusted (122.5, 10) / 132.5 -> class 0 at
    0.9245. The balanced head's weak logits: sample 0 (0, 5) confident in class 1; sample 1 (0, 0) not. Step 150
    of epochs of 100 (estimation from epoch 1 on), not an epoch start: tau_1 stays."""
    acr = make_acr(tau1=1.0, tau12=1.0, tau2=1.0, epoch=100, est_epoch=0)
    b, u = 1, 2
    weak = torch.tensor([[math.log(6), math.log(4)], [math.log(98), math.log(2)]])
    strong = torch.zeros(2 * u, 2)
    logits = torch.cat([torch.zeros(b, 2), weak, strong])
    heads = torch.cat([torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 5.0], [0.0, 0.0]]), torch.zeros(2 * u, 2)])
    view = StepView(torch.zeros(5, 3), {"acr": heads}, torch.tensor([1]), b, PseudoLabelOutput(None, None), 150, logits)
    out = acr.loss(view)
    loss_u, targets, mask = out.unlabeled
    assert targets.tolist() == [1, 0] and mask.tolist() == [0.0, 1.0] and float(acr.tau1) == 1.0
    assert float(loss_u) == pytest.approx(2 * LN2 / 4)  # sample 1 on both strong views (uniform logits), of 4 rows
    # balanced branch: targets from the tau_12-adjusted standard logits (0, 0); kept where the balanced head is
    # confident (sample 0) or the adjusted distribution is (sample 1)
    assert float(out.logs["loss_u_acr"]) == pytest.approx(4 * LN2 / 4)
    # labeled: CE((0, 0) + log pi, y = 1) = -log 0.2
    assert float(out.logs["loss_x_acr"]) == pytest.approx(-math.log(0.2), rel=1e-5)
    assert out.diagnostics["pl_acr"].tolist() == [1, 0]
    # the estimate took the balanced head's confident pseudo-label (class 1) into its EMA from the uniform start
    torch.testing.assert_close(acr.u_py, torch.tensor([0.99 * 0.5, 0.99 * 0.5 + 0.01]))


def test_tau1_adapts_at_epoch_starts_after_the_estimation_epochs():
    """epoch 2, est_epoch 1: estimates from step 4 (epoch 2) on; at step 4 (epoch 2 starts) the sums are empty, so
    tau_1 = tau_max / 3, as the reference's first update; at step 6 it follows the divergences of steps 4 and 5."""
    acr = make_acr(epoch=2, est_epoch=1)
    b, u = 1, 2
    gen = torch.Generator().manual_seed(0)
    taus = []
    for step in range(8):
        logits = torch.randn(b + 3 * u, 2, generator=gen) * 4
        heads = torch.randn(b + 3 * u, 2, generator=gen) * 4
        view = StepView(
            torch.zeros(7, 3), {"acr": heads}, torch.tensor([0]), b, PseudoLabelOutput(None, None), step, logits
        )
        if step == 6:
            expected = adaptive_tau(acr.kl_sum / 2, 2.0)
        acr.loss(view)
        taus.append(float(acr.tau1))
    assert taus[:4] == [2.0] * 4
    assert taus[4] == taus[5] == pytest.approx(2 / 3)
    assert taus[6] == pytest.approx(float(expected)) and taus[6] != pytest.approx(2 / 3)


def acr_config(**acr) -> RunConfig:
    raw = tiny_config("fixmatch").model_dump()
    raw["method"] = {"preset": "fixmatch_acr", "acr": {"epoch": 4, "est_epoch": 0, **acr}}
    return RunConfig.model_validate(raw)


def test_acr_resumes_bit_exactly_with_two_strong_views(tmp_path, data):  # noqa: F811
    """Epochs of 3: the step-8 checkpoint is mid-epoch (epoch 2 started at step 6 with a tau_1 update), so the
    resumed run uses the restored tau_1, estimate and divergence sums before its next update at step 9; the
    trajectory and weights equal the uninterrupted run's."""
    assert_resume_equals_whole_run(acr_config(epoch=3), tmp_path, data)
    rows = trajectory(tmp_path / "whole")
    # the first window's mean: steps 0-2 at tau_max 2 (epoch 0, no estimate yet), steps 3-5 at 2/3 (the update
    # from epoch 0's empty sums), steps 6-7 at the update from epoch 1's divergences, strictly inside (0, 2)
    low, high = (3 * 2 + 3 * 2 / 3) / 8, (3 * 2 + 3 * 2 / 3 + 2 * 2) / 8
    assert low < rows[0]["train/acr_tau1"] < high
    assert rows[-1]["train/acr_tau1"] != pytest.approx(2.0)
    assert sum(rows[-1][f"acr/u_py/c{c:02d}"] for c in range(4)) == pytest.approx(1.0)


def test_acr_never_reads_the_unlabeled_truth(tmp_path, data):  # noqa: F811
    cfg = acr_config()
    assert_truth_never_reaches_training(cfg, tmp_path, data, ("pl_acr/",))
