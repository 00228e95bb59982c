"""DARP's pieces on hand-computed tensors and against the reference's per-class scipy solve, and `fixmatch_darp` /
`fixmatch_la_darp` inside the real loop."""

import dataclasses
import math

import numpy as np
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
from trainables.config import MethodConfig, RunConfig
from trainables.methods.darp import (
    EPS,
    DarpRefinement,
    estimate_distribution,
    last_occurrence_rows,
    refine_pseudo_labels,
    scale_by_confident_counts,
    secant,
)


def test_scale_by_confident_counts_by_hand():
    """alpha 1, target (2, 1): class 1 takes its top row (row 2, 0.8), class 0 its top two (rows 0, 1: 0.9 + 0.6)."""
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    out = scale_by_confident_counts(probs, torch.tensor([2.0, 1.0], dtype=torch.float64), alpha=1.0)
    s0, s1 = (2 + EPS) / (1.5 + EPS), (1 + EPS) / (0.8 + EPS)
    rows = torch.tensor(
        [[0.9 * s0 + EPS, EPS], [0.6 * s0 + EPS, EPS], [EPS, 0.8 * s1 + EPS], [EPS, EPS]], dtype=torch.float64
    )
    torch.testing.assert_close(out, rows / rows.sum(1, keepdim=True))
    assert torch.equal(out[3], torch.tensor([0.5, 0.5], dtype=torch.float64))  # unmarked row: uniform


def test_secant_matches_scipy_newton_without_derivative():
    """The reference calls scipy.optimize.newton(f, x0, tol=0.1, maxiter=30) per class: the same iterates."""
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    a, b = rng.random((50, 4)), rng.random(50)
    w = rng.random(50) * 3 + 0.2
    d = np.array([2.0, 5.0, 0.5, 9.0])
    x0 = np.array([0.0, 0.3, -0.7, 1.2])

    def f(x, a, b, c, d):  # the reference's column function
        return np.sum(a * b * np.exp(-1 * x / c)) - d

    expected = [optimize.newton(f, x0[k], maxiter=30, args=(a[:, k], b, w, d[k]), tol=0.1) for k in range(4)]
    at, bt, wt, dt = (torch.from_numpy(v) for v in (a, b, w, d))
    got = secant(
        lambda x: (at * bt.view(-1, 1) * torch.exp(-x.view(1, -1) / wt.view(-1, 1))).sum(0) - dt, torch.from_numpy(x0)
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    # a straight line is solved by the first secant step
    assert float(secant(lambda x: 2.0 - x, torch.zeros(1, dtype=torch.float64))) == pytest.approx(2.0, abs=1e-12)


def reference_solve(probs: np.ndarray, target: np.ndarray, rounds: int) -> np.ndarray:
    """The DARP reference's opt_solver, step by step, with scipy's newton per class."""
    from scipy import optimize

    def f(x, a, b, c, d):
        return np.sum(a * b * np.exp(-1 * x / c)) - d

    entropy = (-1 * probs * np.log(probs + 1e-6)).sum(1)
    w = 1 / entropy
    n, k = probs.shape
    a_e = probs / math.e
    y_t = np.exp(-1 * np.ones(k).reshape(1, -1) / w.reshape(-1, 1))
    prev_y = np.zeros(k)
    for _ in range(rounds):
        x_t = np.ones(n) / np.sum(a_e * y_t, 1)
        y_t = np.zeros(k)
        for i in range(k):
            y_t[i] = optimize.newton(f, prev_y[i], maxiter=30, args=(a_e[:, i], x_t, w, target[i]), tol=1.0e-01)
        prev_y = y_t
        y_t = np.exp(-1 * y_t.reshape(1, -1) / w.reshape(-1, 1))
    x_t = np.ones(n) / np.sum(a_e * y_t, 1)
    return a_e * x_t.reshape(-1, 1) * y_t


def test_refinement_matches_the_reference_solver_and_its_constraints():
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(300, 5, generator=gen, dtype=torch.float64)).softmax(1)
    target = torch.tensor([120.0, 80.0, 50.0, 30.0, 20.0], dtype=torch.float64)
    scaled = scale_by_confident_counts(probs, target, alpha=2.0)
    got = refine_pseudo_labels(scaled, target, rounds=10)
    np.testing.assert_allclose(got.numpy(), reference_solve(scaled.numpy(), target.numpy(), 10), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sum(1), torch.ones(300, dtype=torch.float64))  # rows are distributions
    # columns near the target (the root finder stops at tol 0.1 on nu); far nearer than the input's columns
    assert (got.sum(0) - target).abs().max() < 0.2 * (scaled.sum(0) - target).abs().max()


def test_estimate_distribution_inverts_the_confusion():
    """Validation: class-0 rows predict (0.8, 0.2), class-1 rows (0.3, 0.7), so M = [[0.8, 0.3], [0.2, 0.7]]. An
    unlabeled set of 25 % class 0 carries predicted mass M (0.25, 0.75) N; the estimate returns (0.25, 0.75)."""
    probs_val = torch.tensor([[0.8, 0.2]] * 3 + [[0.3, 0.7]] * 5)
    y_val = torch.tensor([0] * 3 + [1] * 5)
    mass = torch.tensor([[0.8, 0.3], [0.2, 0.7]], dtype=torch.float64) @ torch.tensor([0.25, 0.75], dtype=torch.float64)
    probs_ulb = mass.view(1, 2).repeat(40, 1)  # 40 rows whose sum is 40 M q
    torch.testing.assert_close(
        estimate_distribution(probs_val, y_val, probs_ulb), torch.tensor([0.25, 0.75], dtype=torch.float64)
    )
    # an estimate below 0 is clamped: predicted mass beyond the confusion's reach
    est = estimate_distribution(probs_val, y_val, torch.tensor([[0.95, 0.05]]))
    assert float(est[1]) == 0.0 and float(est[0]) == 1.0


def test_refinement_schedule():
    """K = 10, warm-up 0.3 -> int(3) calls keep their own distribution; then a solve at every 2nd call (calls 4, 6,
    ...), and the calls between reuse the last solve's rows; uniform (so masked) rows before the first solve."""
    darp = DarpRefinement(
        2, 6, torch.device("cpu"), iterations=10, target=torch.tensor([2.0, 1.0]), warmup=0.3, every=2, alpha=1.0
    )
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    for step in range(3):
        assert torch.equal(darp.refine(probs, torch.tensor([2 * step, 2 * step + 1]), step), probs)
    assert darp.solves == 0 and torch.equal(darp.latest[:2], probs)
    assert float(darp.metrics()["darp/refined"].sum()) == 0
    solved = darp.refine(probs, torch.tensor([0, 1]), 3)  # call 4: solve
    assert darp.solves == 1 and torch.equal(solved, darp.refined[[0, 1]])
    again = darp.refine(torch.full((2, 2), 0.5), torch.tensor([0, 1]), 4)  # call 5: the stored rows
    assert darp.solves == 1 and torch.equal(again, solved)
    assert torch.equal(darp.metrics()["darp/target"], torch.tensor([4.0, 2.0]))  # (2, 1) scaled to |U| = 6
    assert float(darp.metrics()["darp/refined"].sum()) == 6


def test_a_sample_twice_in_one_batch_is_stored_from_its_last_position():
    """Indices (3, 1, 3, 2): both rows for sample 3 become the third (its last position), so the write to `latest`
    does not depend on which duplicate a device's `index_copy_` applies last."""
    rows = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([3, 1, 3, 2])
    expected = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert torch.equal(last_occurrence_rows(rows, idx), expected)
    assert torch.equal(last_occurrence_rows(rows, torch.tensor([0, 1, 2, 3])), rows)
    darp = DarpRefinement(2, 4, torch.device("cpu"), iterations=10, target=None, warmup=0.5)
    assert torch.equal(darp.refine(rows, idx, 0), rows)  # in the warm-up the batch trains on its own rows
    assert torch.equal(darp.latest[3], torch.tensor([0.6, 0.4])) and torch.equal(darp.latest[1], rows[1])
    assert torch.equal(darp.latest[0], torch.tensor([0.5, 0.5]))  # not seen yet: uniform


def darp_config(preset: str, **darp) -> RunConfig:
    raw = tiny_config(preset).model_dump()
    raw["method"] = {"preset": preset, "darp": {"warmup": 0.25, "every": 2, **darp}}
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize(
    "preset, darp",
    [("fixmatch_darp", {}), ("fixmatch_la_darp", {"target": "estimate"})],
)
def test_darp_presets_resume_bit_exactly(tmp_path, data, preset, darp):  # noqa: F811
    """Stopped at the step-8 checkpoint (past the warm-up of int(24 x 0.25) = 6 calls; solves at calls 8, 10, ...:
    step 8 is call 9, which trains on the refined rows restored from the checkpoint) and resumed: the whole
    trajectory and the final weights are those of the run never stopped; the estimate is made once and saved."""
    assert_resume_equals_whole_run(darp_config(preset, **darp), tmp_path, data)
    last = trajectory(tmp_path / "whole")[-1]
    assert sum(last[f"darp/refined/c{c:02d}"] for c in range(4)) == len(data.unlabeled_images)
    assert sum(last[f"darp/target/c{c:02d}"] for c in range(4)) == pytest.approx(len(data.unlabeled_images))


def test_darp_never_reads_the_unlabeled_truth(tmp_path, data):  # noqa: F811
    cfg = darp_config("fixmatch_la_darp", target="estimate")
    assert_truth_never_reaches_training(cfg, tmp_path, data)


def test_darp_target_auto_follows_the_imbalance_of_the_unlabeled_set():
    from trainables.methods import build_method
    from trainables.methods.base import MethodContext

    ctx = MethodContext(3, torch.tensor([30, 10, 5]), 8, torch.device("cpu"), "synthetic", 6.0, 6.0, 10, 90, 8)
    cfg = darp_config("fixmatch_darp").method
    torch.testing.assert_close(
        build_method(cfg, ctx).extension.target, torch.tensor([60.0, 20.0, 10.0], dtype=torch.float64)
    )
    assert build_method(cfg, dataclasses.replace(ctx, gamma_u="reversed")).extension.target is None  # estimated
    # STL-10's and an image folder's unlabeled sets are not drawn with gamma_u: estimated too, as the reference
    assert build_method(cfg, dataclasses.replace(ctx, dataset="stl10")).extension.target is None
    with pytest.raises(ValueError, match="needs a validation split"):
        build_method(cfg, dataclasses.replace(ctx, dataset="imagefolder")).extension.observe_pass(
            torch.full((90, 3), 1 / 3), torch.empty(0, 3), torch.empty(0, dtype=torch.int64), 0
        )
    given = MethodConfig.model_validate({"preset": "fixmatch_darp", "darp": {"target": [1, 1, 1]}})
    torch.testing.assert_close(build_method(given, ctx).extension.target, torch.full((3,), 30.0, dtype=torch.float64))
