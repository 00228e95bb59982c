import io
import math

import pytest
import torch

from trainables.methods.daso import (
    DasoPseudoLabel,
    blend_weights,
    daso_blend,
    prototypes,
    queue_slots,
    resolve_t_dist,
    semantic_alignment_loss,
    semantic_pseudo_label,
)

CPU = torch.device("cpu")


def softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


# ------------------------------------------------------------------------------------------------------------
# Pure functions


def test_prototypes_average_only_filled_slots():
    """C=3, L=2, D=2.

    class 0, 2 filled: mean([1, 0], [3, 2]) = [2, 1]
    class 1, 1 filled: slot 0 only, [4, -2]; slot 1 holds [9, 9] that must not count
    class 2, empty:    zero vector
    """
    queue = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[4.0, -2.0], [9.0, 9.0]], [[7.0, 7.0], [7.0, 7.0]]])
    filled = torch.tensor([2, 1, 0])
    expected = torch.tensor([[2.0, 1.0], [4.0, -2.0], [0.0, 0.0]])
    torch.testing.assert_close(prototypes(queue, filled), expected)


def test_semantic_pseudo_label_cosine_softmax_and_missing_prototype():
    """Prototypes c0 = [2, 0], c1 = [1, 1], c2 = [0, 5] but class 2 is flagged empty; T_proto = 0.5.

    z1 = [1, 0]: cos = (1, 1/sqrt2, masked 0) -> logits (2, sqrt2, 0)
    z2 = [0, 2]: cos = (0, 1/sqrt2, masked 0; unmasked it would be 1) -> logits (0, sqrt2, 0)
    q = softmax of each row.
    """
    feat = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    protos = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    has_proto = torch.tensor([True, True, False])
    r2 = math.sqrt(2.0)
    expected = torch.tensor([softmax([2.0, r2, 0.0]), softmax([0.0, r2, 0.0])])
    torch.testing.assert_close(semantic_pseudo_label(feat, protos, has_proto, 0.5), expected)


def test_blend_weights_hand_values():
    """m = (8, 2, 0, 1); v_k = (m_k / 8)^(1/T).

    T = 0.5: (1, 1/4, 0, 1/8)^2 = (1, 1/16, 0, 1/64)
    T = 1.5: (1, 1/4, 0, 1/8)^(2/3) = (1, 4^(-2/3), 0, 1/4)
    """
    hist = torch.tensor([8, 2, 0, 1])
    torch.testing.assert_close(blend_weights(hist, 0.5), torch.tensor([1.0, 1 / 16, 0.0, 1 / 64]))
    torch.testing.assert_close(blend_weights(hist, 1.5), torch.tensor([1.0, 4 ** (-2 / 3), 0.0, 0.25]))


def test_blend_weights_all_zero_histogram_gives_zero_not_nan():
    """No window closed yet: m = 0 everywhere; the documented choice is v = 0 (linear pseudo-label only)."""
    v = blend_weights(torch.zeros(5, dtype=torch.long), 0.3)
    assert torch.equal(v, torch.zeros(5))


def test_blend_weights_does_not_overflow_for_large_counts_and_small_temperature():
    """m = (10000, 5000), T = 0.1: m^(1/T) = 1e40 overflows float32, but v = (1, 0.5^10) = (1, 1/1024)."""
    torch.testing.assert_close(blend_weights(torch.tensor([10000, 5000]), 0.1), torch.tensor([1.0, 1 / 1024]))


def test_daso_blend_uses_the_weight_of_the_linear_prediction():
    """v = (1, 0.25, 0.5).

    row 1: p = (.7, .2, .1), k' = 0, v = 1   -> p' = q = (0, 0, 1)
    row 2: p = (.1, .3, .6), k' = 2, v = 0.5 -> p' = .5 (.1, .3, .6) + .5 (.9, .1, 0) = (.5, .2, .3);
           the blend moves the hard label from class 2 to class 0.
    """
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    q = torch.tensor([[0.0, 0.0, 1.0], [0.9, 0.1, 0.0]])
    v = torch.tensor([1.0, 0.25, 0.5])
    torch.testing.assert_close(daso_blend(p, q, v), torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.2, 0.3]]))


def test_semantic_alignment_loss_value_and_gradient_path():
    """Prototypes e0, e1; T_proto = 1.

    strong feature 1 = [1, 0]: logits (1, 0), target (1, 0)      -> CE = log(1 + e^-1)
    strong feature 2 = [1, 1]: logits (1/sqrt2, 1/sqrt2) -> (.5, .5), target (.25, .75) -> CE = log 2
    L_align = (log(1 + 1/e) + log 2) / 2. The gradient reaches feat_s only (prototypes, target detached).
    """
    q_w = torch.tensor([[1.0, 0.0], [0.25, 0.75]], requires_grad=True)
    feat_s = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    protos = torch.eye(2, requires_grad=True)
    loss = semantic_alignment_loss(q_w, feat_s, protos, torch.tensor([True, True]), 1.0)
    torch.testing.assert_close(loss, torch.tensor((math.log(1 + math.exp(-1)) + math.log(2)) / 2))
    loss.backward()
    assert protos.grad is None and q_w.grad is None
    assert feat_s.grad is not None and feat_s.grad.abs().sum() > 0


def test_queue_slots_fifo_positions_and_overflow():
    """L = 3, ptr = (1, 0), labels (1, 0, 1, 1, 1).

    class 0: one sample, slot ptr_0 = 1 -> flat 0*3 + 1 = 1
    class 1: four samples > L; the first (rank 0) is discarded -> flat C*L = 6; ranks 1, 2, 3 go to slots
             (0 + r) mod 3 = 1, 2, 0 -> flat 4, 5, 3. Counts (1, 4).
    """
    flat, counts = queue_slots(torch.tensor([1, 0, 1, 1, 1]), torch.tensor([1, 0]), 3, 2)
    assert flat.tolist() == [6, 1, 4, 5, 3]
    assert counts.tolist() == [1, 4]


@pytest.mark.parametrize(
    "dataset, gamma_l, gamma_u, expected",
    [
        ("cifar10", 100.0, 100.0, 1.5),
        ("synthetic", 50.0, 50.0, 1.5),
        ("cifar10", 100.0, 1.0, 0.3),
        ("cifar10", 100.0, "reversed", 0.3),
        ("cifar100", 10.0, 10.0, 0.3),
        ("stl10", 10.0, 10.0, 0.3),
        ("imagefolder", 1.0, 1.0, 0.5),
    ],
)
def test_resolve_t_dist_auto(dataset, gamma_l, gamma_u, expected):
    """The DASO paper's defaults (algorithms.md section 4)."""
    assert resolve_t_dist("auto", dataset, gamma_l, gamma_u) == expected
    assert resolve_t_dist(0.7, dataset, gamma_l, gamma_u) == 0.7


# ------------------------------------------------------------------------------------------------------------
# The component


def make_daso(**kwargs):
    args = dict(num_classes=2, feature_dim=2, device=CPU, t_proto=1.0, t_dist=1.0, window=100, warmup=0)
    args.update(kwargs)
    return DasoPseudoLabel(**args)


def test_queue_is_a_balanced_fifo_per_class():
    """C=2, L=2, D=1.

    step 0: labels (0, 0), features 1, 2 -> class 0 queue (1, 2), full; class 1 empty
    step 1: labels (0, 1), features 3, 10 -> class 0 overwrites its oldest slot: (3, 2), prototype 2.5;
            class 1 queue (10, -), prototype 10
    """
    daso = make_daso(feature_dim=1, queue_len=2)
    daso.enqueue(torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]))
    assert daso.queue_fill.tolist() == [2, 0]
    daso.enqueue(torch.tensor([[3.0], [10.0]]), torch.tensor([0, 1]))
    assert daso.queue[0, :, 0].tolist() == [3.0, 2.0]
    assert daso.queue_fill.tolist() == [2, 1]
    assert prototypes(daso.queue, daso.queue_fill)[:, 0].tolist() == [2.5, 10.0]


def test_window_histogram_is_replaced_not_accumulated():
    """window = 2, C = 3, T_dist = 1 (v = m / max m).

    steps 0-1: pseudo-labels (0, 0, 1), (0, 2, 2) -> closed histogram (3, 1, 2) -> v = (1, 1/3, 2/3);
               after step 0 no window has closed: v = 0
    steps 2-3: (1, 1, 1), (1, 1, 1) -> closed (0, 6, 0) -> v = (0, 1, 0); a cumulative count (3, 7, 2) would
               give (3/7, 1, 2/7). Between steps 2 and 3, v stays at the previous window's value.
    """
    daso = make_daso(num_classes=3, window=2)
    daso.observe(torch.tensor([0, 0, 1]), 0)
    assert torch.equal(daso.v, torch.zeros(3))
    daso.observe(torch.tensor([0, 2, 2]), 1)
    torch.testing.assert_close(daso.v, torch.tensor([1.0, 1 / 3, 2 / 3]))
    daso.observe(torch.tensor([1, 1, 1]), 2)
    torch.testing.assert_close(daso.v, torch.tensor([1.0, 1 / 3, 2 / 3]))
    daso.observe(torch.tensor([1, 1, 1]), 3)
    torch.testing.assert_close(daso.v, torch.tensor([0.0, 1.0, 0.0]))
    assert daso.metrics()["daso/v"].tolist() == [0.0, 1.0, 0.0]


def test_warmup_then_blend_and_alignment_loss():
    """Prototypes e0 = [1, 0], e1 = [0, 1]; T_proto = 1; const_v = 0.5; lambda_align = 2; warmup = 2.

    weak feature [1, 0]   -> q = softmax(1, 0) = (e, 1) / (e + 1); p = (.2, .8)
    step 1 (warm-up):        p' = p, loss 0
    step 2:                  p' = .5 p + .5 q
    strong feature [0, 3]  -> logits (0, 1); CE(q, .) = log(1 + e) - q_1; loss = 2 (log(1 + e) - 1 / (1 + e))
    Diagnostics: linear argmax 1, semantic argmax 0.
    """
    daso = make_daso(const_v=0.5, lambda_align=2.0, warmup=2)
    daso.enqueue(torch.eye(2), torch.tensor([0, 1]))
    daso.observe(torch.tensor([0]), 0)
    p = torch.tensor([[0.2, 0.8]])
    feat_w = torch.tensor([[1.0, 0.0]])
    feat_s = torch.tensor([[0.0, 3.0]], requires_grad=True)
    e = math.e

    out = daso(p, feat_w, feat_s, 1)
    assert torch.equal(out.probs, p) and float(out.loss) == 0.0
    assert out.diagnostics["pl_linear"].tolist() == [1] and out.diagnostics["pl_semantic"].tolist() == [0]

    out = daso(p, feat_w, feat_s, 2)
    q = torch.tensor([[e / (e + 1), 1 / (e + 1)]])
    torch.testing.assert_close(out.probs, 0.5 * p + 0.5 * q)
    assert not out.probs.requires_grad
    torch.testing.assert_close(out.loss, torch.tensor(2 * (math.log(1 + e) - 1 / (1 + e))))
    assert out.loss.requires_grad
    assert float(out.logs["loss_align"]) == pytest.approx(math.log(1 + e) - 1 / (1 + e))


def test_before_the_first_window_closes_the_linear_pseudo_label_is_used():
    """warmup = 0, window = 100, after one observation: v = 0, so p' = p exactly; the alignment loss is on."""
    daso = make_daso()
    daso.enqueue(torch.eye(2), torch.tensor([0, 1]))
    daso.observe(torch.tensor([0]), 0)
    p = torch.tensor([[0.3, 0.7]])
    out = daso(p, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]], requires_grad=True), 1)
    assert torch.equal(out.probs, p)
    assert float(out.loss.detach()) > 0


def test_enqueue_without_ema_features_is_an_error():
    with pytest.raises(ValueError, match="EMA"):
        make_daso().enqueue(None, torch.tensor([0]))


def run_steps(daso, generator, steps):
    """Drive a DASO component like the loop does; returns the outputs."""
    outs = []
    for step in steps:
        probs = torch.rand(6, 3, generator=generator).softmax(dim=1)
        feat_w, feat_s = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
        daso.enqueue(torch.randn(5, 4, generator=generator), torch.randint(0, 3, (5,), generator=generator))
        out = daso(probs, feat_w, feat_s, step)
        daso.observe(out.probs.argmax(dim=1), step)
        outs.append((out.probs, out.loss.detach()))
    return outs


def test_state_round_trip_continues_identically():
    """Run 7 steps, save (through torch.save / torch.load(weights_only=True)), restore into a fresh component,
    and check both continue with identical outputs and end in identical states. The window (3) is mid-way at
    the save point, so the open histogram and its iteration count matter."""
    kwargs = dict(num_classes=3, feature_dim=4, queue_len=4, window=3, warmup=2)
    original = make_daso(**kwargs)
    run_steps(original, torch.Generator().manual_seed(0), range(7))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = make_daso(**kwargs)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.window_iters == 1

    a = run_steps(original, torch.Generator().manual_seed(1), range(7, 12))
    b = run_steps(restored, torch.Generator().manual_seed(1), range(7, 12))
    for (pa, la), (pb, lb) in zip(a, b, strict=True):
        assert torch.equal(pa, pb) and torch.equal(la, lb)
    for key, value in original.state_dict().items():
        other = restored.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_load_state_dict_rejects_a_queue_of_another_shape():
    state = make_daso(queue_len=4).state_dict()
    with pytest.raises(ValueError, match="queue"):
        make_daso(queue_len=8).load_state_dict(state)
