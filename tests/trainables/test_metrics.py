"""The metrics contract on hand-computed 3-class cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from trainables.metrics import (
    EvalHistory,
    class_groups,
    class_key,
    classification_metrics,
    confusion_matrix,
    per_class,
    per_class_table,
    pseudo_label_metrics,
)

# 3 classes with labeled counts 5 > 3 > 1: one class per group
GROUPS3 = class_groups([5, 3, 1])


@pytest.mark.parametrize(
    ("c", "num_classes", "key"),
    [(3, 10, "c03"), (9, 10, "c09"), (0, 3, "c00"), (3, 100, "c03"), (99, 100, "c99"), (3, 200, "c003"),
     (199, 200, "c199")],
)  # fmt: skip
def test_class_key_padding(c, num_classes, key):
    assert class_key(c, num_classes) == key


def test_per_class_names_vector_entries():
    assert per_class("daso/v", np.array([1.0, 0.25, 0.0])) == {
        "daso/v/c00": 1.0,
        "daso/v/c01": 0.25,
        "daso/v/c02": 0.0,
    }


def test_class_groups_cifar10_profile():
    """CIFAR-10-LT counts 1500 ... 15 (class 0 = head): 10 = 3 head + 4 medium (remainder 1) + 3 tail."""
    groups = class_groups([1500, 899, 539, 323, 193, 116, 69, 41, 25, 15])
    assert groups["head"].tolist() == [0, 1, 2]
    assert groups["medium"].tolist() == [3, 4, 5, 6]
    assert groups["tail"].tolist() == [7, 8, 9]


def test_class_groups_cifar100_sizes_follow_counts_not_indices():
    """C=100 = 33 + 34 + 33; counts increasing with the index, so the head is the LAST 33 classes."""
    groups = class_groups(np.arange(1, 101))
    assert groups["head"].tolist() == list(range(99, 66, -1))
    assert groups["medium"].tolist() == list(range(66, 32, -1))
    assert groups["tail"].tolist() == list(range(32, -1, -1))


def test_class_groups_uneven_counts_ties_and_remainder_two():
    """Counts [5, 9, 9, 1, 7]: sorted (9, c1), (9, c2) (tie: smaller index first), (7, c4), (5, c0), (1, c3).

    C=5 = 3 * 1 + 2: the remainder of two goes to medium and head -> head 2, medium 2, tail 1.
    """
    groups = class_groups(torch.tensor([5, 9, 9, 1, 7]))
    assert groups["head"].tolist() == [1, 2]
    assert groups["medium"].tolist() == [4, 0]
    assert groups["tail"].tolist() == [3]


def test_class_groups_sizes_200():
    sizes = {k: len(v) for k, v in class_groups(np.ones(200)).items()}
    assert sizes == {"head": 67, "medium": 67, "tail": 66}


def test_confusion_matrix_rows_are_truth():
    """(true, pred) pairs (0,0) (0,1) (1,1) (1,1) (2,0) (2,0) -> rows [1 1 0], [0 2 0], [2 0 0]."""
    cm = confusion_matrix([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 0], 3)


def test_classification_metrics_never_predicted_class():
    """y_true [0 0 0 0 1 1 2 2], y_pred [0 0 0 0 1 0 0 0]: confusion rows [4 0 0], [1 1 0], [2 0 0].

    top1 = 5/8; recall = [4/4, 1/2, 0/2], balanced_acc = 1/2, recall_min = 0;
    precision = [4/7, 1/1, 0 (class 2 never predicted: 0, not NaN)], never_predicted = 1.
    Groups (counts 5 > 3 > 1): head {0}, medium {1}, tail {2}.
    """
    m = classification_metrics("test", [0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 0, 0, 0], 3, GROUPS3)
    assert m == pytest.approx(
        {
            "test/top1": 5 / 8,
            "test/balanced_acc": 0.5,
            "test/recall_min": 0.0,
            "test/never_predicted": 1.0,
            "test/recall/c00": 1.0,
            "test/recall/c01": 0.5,
            "test/recall/c02": 0.0,
            "test/precision/c00": 4 / 7,
            "test/precision/c01": 1.0,
            "test/precision/c02": 0.0,
            "test/recall_head": 1.0,
            "test/recall_medium": 0.5,
            "test/recall_tail": 0.0,
        }
    )
    assert all(isinstance(v, float) for v in m.values())


def test_classification_metrics_class_absent_from_truth():
    """y_true [0 0 1], y_pred [0 2 1] (torch): class 2 has no true sample, so no recall key and it stays out
    of balanced_acc = mean(1/2, 1/1) = 3/4; predicted once, wrongly: precision 0/1 = 0, never_predicted 0."""
    m = classification_metrics("val", torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), 3, None)
    assert "val/recall/c02" not in m
    assert m["val/balanced_acc"] == pytest.approx(0.75)
    assert m["val/precision/c02"] == 0.0
    assert m["val/never_predicted"] == 0.0
    assert not any("recall_head" in k for k in m)


def test_pseudo_label_metrics_hand_computed():
    """8 unlabeled samples, 3 classes:

        y_true       0 0 0 1 1 2 2 -1
        pseudo_label 0 0 1 1 0 2 0  2
        mask         1 1 1 0 1 1 0  1

    Confident: samples 0 1 2 4 5 7 -> counts [3, 1, 2] (sample 7, truth unknown, counts), imbalance 3/1,
    mask_ratio 6/8. Known confident: 0 1 2 4 5 with labels 0 0 1 0 2 -> assigned [3, 1, 1]; correct ones
    0 1 5 -> correct [2, 0, 1]. Known truth counts [3, 2, 2]. recall = [2/3, 0, 1/2];
    precision = [2/3, 0, 1/1] (sample 7 is left out, otherwise class 2 would read 1/2).
    """
    m = pseudo_label_metrics(
        "pl",
        np.array([0, 0, 0, 1, 1, 2, 2, -1]),
        np.array([0, 0, 1, 1, 0, 2, 0, 2]),
        np.array([1.0, 1, 1, 0, 1, 1, 0, 1]),
        3,
        GROUPS3,
    )
    assert m == pytest.approx(
        {
            "pl/count/c00": 3.0,
            "pl/count/c01": 1.0,
            "pl/count/c02": 2.0,
            "pl/imbalance_ratio": 3.0,
            "pl/mask_ratio": 0.75,
            "pl/recall/c00": 2 / 3,
            "pl/recall/c01": 0.0,
            "pl/recall/c02": 0.5,
            "pl/precision/c00": 2 / 3,
            "pl/precision/c01": 0.0,
            "pl/precision/c02": 1.0,
            "pl/recall_head": 2 / 3,
            "pl/precision_head": 2 / 3,
            "pl/recall_tail": 0.5,
            "pl/precision_tail": 1.0,
        }
    )


def test_pseudo_label_metrics_without_truth_and_empty_class():
    """No truth: only counts, imbalance, mask ratio. Confident labels 0 0 (sample 2 masked out) -> counts
    [2, 0, 0]; the min count 0 is clamped to 1 -> imbalance 2/1; mask ratio 2/3."""
    m = pseudo_label_metrics(
        "pl_linear", None, torch.tensor([0, 0, 1]), torch.tensor([True, True, False]), 3, GROUPS3
    )
    assert m == pytest.approx(
        {
            "pl_linear/count/c00": 2.0,
            "pl_linear/count/c01": 0.0,
            "pl_linear/count/c02": 0.0,
            "pl_linear/imbalance_ratio": 2.0,
            "pl_linear/mask_ratio": 2 / 3,
        }
    )


def test_eval_history_med20_over_25_evaluations():
    """Evaluations 0, 1, ..., 24: last = 24; med20 = median(5..24) = (14 + 15) / 2 = 14.5.
    After 3 evaluations the median is over the 3 available: median(0, 1, 2) = 1."""
    hist = EvalHistory()
    for i in range(25):
        out = hist.update({"val/top1": float(i), "val/balanced_acc": 100.0 - i, "train/loss": 9.0})
        if i == 2:
            assert out["val/top1_med20"] == 1.0
    assert out == {
        "val/top1_last": 24.0,
        "val/top1_med20": 14.5,
        "val/balanced_acc_last": 76.0,
        "val/balanced_acc_med20": 85.5,  # median(76..95)
    }


def test_eval_history_state_round_trip_weights_only():
    hist = EvalHistory()
    for i in range(4):
        hist.update({"test/top1": float(i), "test/balanced_acc": float(2 * i)})
    buffer = io.BytesIO()
    torch.save(hist.state_dict(), buffer)
    buffer.seek(0)
    restored = EvalHistory()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    # median(0, 1, 2, 3, 10) = 2, same for both
    assert restored.update({"test/top1": 10.0}) == hist.update({"test/top1": 10.0})
    assert restored.summary()["test/top1_med20"] == 2.0


def test_per_class_table_rows():
    m = classification_metrics("test", [0, 0, 1, 1], [0, 1, 1, 1], 3, None)
    rows = per_class_table(m, "test", 3, ["cat", "dog", "bird"])
    assert rows == [
        {"class": 0, "name": "cat", "recall": 0.5, "precision": 1.0},
        {"class": 1, "name": "dog", "recall": 1.0, "precision": pytest.approx(2 / 3)},
        {"class": 2, "name": "bird", "recall": None, "precision": 0.0},
    ]
    assert per_class_table(m, "test", 3)[2]["name"] == "c02"
