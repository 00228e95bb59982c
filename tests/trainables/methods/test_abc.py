"""ABC's masks and loss on hand-computed tensors, and `fixmatch_abc` / `fixmatch_abc_daso` inside the real loop."""

import dataclasses
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
from trainables.evaluate import predict_logits
from trainables.loop import Run, resolve_runtime
from trainables.methods.abc import AuxiliaryBalancedClassifier, abc_loss, balanced_keep_rate, unlabeled_keep_rate
from trainables.methods.base import PseudoLabelOutput, StepView

LN2 = math.log(2.0)


def test_balanced_keep_rate_is_rarest_over_own_count():
    torch.testing.assert_close(balanced_keep_rate(torch.tensor([40, 20, 8, 2])), torch.tensor([0.05, 0.1, 0.25, 1.0]))
    # unsorted counts: the rarest class, wherever it is, is always kept
    torch.testing.assert_close(balanced_keep_rate(torch.tensor([5, 10, 20])), torch.tensor([1.0, 0.5, 0.25]))


def test_unlabeled_keep_rate_falls_in_stairs():
    balanced = torch.tensor([0.1, 1.0])
    # the reference: K = 250,000, 500 stairs, a stair every 500 iterations, the last one at 499/500
    assert torch.equal(unlabeled_keep_rate(balanced, 499, 250_000, 500), torch.ones(2))
    torch.testing.assert_close(unlabeled_keep_rate(balanced, 500, 250_000, 500), torch.tensor([1 - 0.9 / 500, 1.0]))
    torch.testing.assert_close(
        unlabeled_keep_rate(balanced, 249_999, 250_000, 500), torch.tensor([1 - 0.9 * 499 / 500, 1.0])
    )
    # 4 stairs over K = 10: floor(4 k / 10) -> k = 5 is stair 2, halfway
    torch.testing.assert_close(unlabeled_keep_rate(balanced, 5, 10, 4), torch.tensor([0.55, 1.0]))


def test_abc_loss_by_hand():
    """Two labeled rows (the second masked out) and two unlabeled rows (the second masked out), each term a mean
    over its whole batch."""
    logits_lb = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    y_lb = torch.tensor([0, 1])
    target = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    logits_s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    cls, con = abc_loss(logits_lb, y_lb, torch.tensor([1.0, 0.0]), target, logits_s, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(cls, torch.tensor(LN2 / 2))
    torch.testing.assert_close(con, torch.tensor(LN2 / 2))
    # soft target, both kept: -(1/1) sum_c t_c log softmax([1, 2])_c
    _, soft = abc_loss(logits_lb[:1], y_lb[:1], torch.ones(1), target[1:], logits_s[1:], torch.ones(1))
    log_p = torch.log_softmax(torch.tensor([1.0, 2.0]), 0)
    torch.testing.assert_close(soft, -(0.3 * log_p[0] + 0.7 * log_p[1]))


def make_abc(counts=(8, 2), tau=0.6, step=0, iterations=10, stairs=5) -> AuxiliaryBalancedClassifier:
    return AuxiliaryBalancedClassifier(
        torch.tensor(counts), 3, torch.device("cpu"), iterations=iterations, tau=tau, stairs=stairs, seed=0
    )


def test_abc_extension_masks_and_targets():
    """Head logits are given directly: labeled rows of the rarest class are always kept, of the head class at rate
    2/8; unlabeled rows below tau are never kept; the target is the head's own distribution, or DASO's transform
    of it when the pseudo-label output carries one."""
    abc = make_abc()
    b, u = 400, 2
    y_lb = torch.tensor([1, 0]).repeat(b // 2)
    weak = torch.tensor([[0.0, 4.0], [0.0, 0.0]])  # row 0: confident in class 1 (the rarest), row 1: 0.5 / 0.5
    strong = torch.zeros(u, 2)
    logits = torch.cat([torch.zeros(b, 2), weak, strong])
    view = StepView(torch.zeros(b + 2 * u, 3), {"abc": logits}, y_lb, b, PseudoLabelOutput(None, None), step=0)

    out = abc.loss(view)
    assert out.diagnostics["pl_abc"].tolist() == [1, 0]
    assert float(out.logs["abc_mask_ratio"]) == 0.5  # row 0 kept (rate 1 at step 0), row 1 below tau
    # labeled: rarest-class rows all kept, head-class rows kept at 1/4 (a binomial draw of 200, checked loosely)
    p = torch.softmax(weak[0], 0)
    expected_con = -(p * torch.log_softmax(strong[0], 0)).sum() / u
    kept = (float(out.logs["loss_abc"]) - float(expected_con)) * b / LN2  # labeled CE is ln 2 per kept row
    assert 200 + 30 < kept < 200 + 70

    # DASO's transform is applied to the head's distribution before the threshold: swapped classes flip row 0's
    # prediction; a transform that sharpens row 1 to (0.1, 0.9) makes it confident in class 1
    flip = PseudoLabelOutput(None, None, transform=lambda q: q.flip(1))
    assert abc.loss(dataclasses.replace(view, pseudo_label=flip)).diagnostics["pl_abc"].tolist() == [0, 0]
    sharpen = PseudoLabelOutput(None, None, transform=lambda q: torch.tensor([[0.02, 0.98], [0.1, 0.9]]))
    out = abc.loss(dataclasses.replace(view, pseudo_label=sharpen))
    assert out.diagnostics["pl_abc"].tolist() == [1, 1] and float(out.logs["abc_mask_ratio"]) == 1.0


def test_abc_draws_replay_after_state_round_trip():
    a = make_abc()
    view = StepView(
        torch.zeros(10, 3), {"abc": torch.randn(10, 2)}, torch.tensor([0, 1, 0, 0]), 4, PseudoLabelOutput(None, None), 3
    )
    a.loss(view)
    b = make_abc()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.loss(view).loss, b.loss(view).loss)
    with pytest.raises(ValueError, match="ABC state has keys"):
        b.load_state_dict({})


def abc_config(preset: str) -> RunConfig:
    raw = tiny_config(preset, daso={} if "daso" in preset else None).model_dump()
    raw["method"]["abc"] = {"stairs": 6}
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize("preset", ["fixmatch_abc", "fixmatch_abc_daso"])
def test_abc_presets_resume_bit_exactly(tmp_path, data, preset):  # noqa: F811
    assert_resume_equals_whole_run(abc_config(preset), tmp_path, data)
    last = trajectory(tmp_path / "whole")[-1]
    assert last["train/loss_abc"] > 0 and any(k.startswith("pl_abc/") for k in last)


def test_abc_never_reads_the_unlabeled_truth_and_evaluates_its_head(tmp_path, data):  # noqa: F811
    """Shuffled unlabeled truth: training and evaluation bit-identical, only pseudo-label quality moves. The
    evaluated logits are the EMA model's ABC head over its encoder, not its classifier."""
    cfg = abc_config("fixmatch_abc_daso")
    assert_truth_never_reaches_training(cfg, tmp_path, data, ("pl_abc/",))

    run = Run(cfg, data, resolve_runtime(cfg))
    assert any(k.startswith("heads.abc.") for k in run.model.state_dict())
    ema = run.ema.module
    head = predict_logits(lambda x: ema.heads["abc"](ema.encode(x)), run.test_store, run.prep, 64)
    classifier = predict_logits(ema, run.test_store, run.prep, 64)
    evaluated = predict_logits(run.eval_logits, run.test_store, run.prep, 64)
    assert torch.equal(evaluated, head) and not torch.equal(evaluated, classifier)
