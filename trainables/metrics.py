"""The metrics contract: every key the loop reports, the service optimises and the reports read.

Keys are `/`-namespaced; per-class keys end in a zero-padded class key `cNN` whose width is max(2, digits of
C - 1): `c00..c09` (C=10), `c00..c99` (C=100), `c000..c199` (C=200). All values are python floats.

Training (`train/`, one value per logging interval):
    train/loss, train/loss_x, train/loss_u      total loss, labeled loss L_s and unlabeled loss L_u
    train/loss_align                            DASO's semantic alignment loss (DASO presets only)
    train/loss_abc, train/abc_mask_ratio        ABC's loss and its unlabeled Bernoulli-and-confidence keep rate
    train/da_t                                  CReST+'s alignment temperature
    train/loss_x_acr, train/loss_u_acr          ACR's balanced-head losses; train/acr_tau1 its adaptive tau_1
    train/lr, train/it_per_s                    learning rate; iterations per second over the interval
    train/mask_ratio                            fraction of unlabeled samples whose pseudo-label is confident

Evaluation (`val/`, `test/`, one value per evaluation; `classification_metrics`):
    {p}/top1, {p}/balanced_acc                  accuracy; mean per-class recall (the DRw paper's bACC)
    {p}/recall/cNN, {p}/precision/cNN           per class
    {p}/recall_head|medium|tail, {p}/recall_min group means (`class_groups`) and the worst class
    {p}/never_predicted                         number of classes the model never predicts
    {p}/top1_last, {p}/top1_med20               last evaluation and median of the last 20 (`EvalHistory`)
    {p}/balanced_acc_last, {p}/balanced_acc_med20
    val/top1_la, val/balanced_acc_la            after post-hoc logit adjustment (logits - tau log pi)

Pseudo-labels over a window of unlabeled samples (`pseudo_label_metrics`); prefixes `pl` (the final
pseudo-label used by the loss), `pl_linear` and `pl_semantic` (DASO's two ingredients), `pl_abc` and `pl_acr`
(ABC's and ACR's balanced heads, over every unlabeled sample):
    {p}/count/cNN, {p}/imbalance_ratio, {p}/mask_ratio
    {p}/recall/cNN, {p}/precision/cNN, {p}/recall_head|tail, {p}/precision_head|tail  (with ground truth)

Method state (`per_class`): daso/v/cNN (DASO's blending weight v_k), drw/w_u/cNN (DRw's unlabeled class
weights), darp/refined/cNN and darp/target/cNN (DARP's refined hard labels over U and its target counts),
crest/labeled/cNN (CReST's current labeled set), acr/u_py/cNN (ACR's estimated unlabeled distribution).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GROUPS = ("head", "medium", "tail")
#: summary keys every evaluation reports per split (classification metrics, the running history, post-hoc LA)
EVAL_SUMMARY = (
    "top1", "balanced_acc", "recall_min", "never_predicted",
    "top1_last", "top1_med20", "balanced_acc_last", "balanced_acc_med20",
    "top1_la", "balanced_acc_la",
)  # fmt: skip
EVAL_PER_CLASS = ("recall", "precision")  # {p}/recall/cNN, {p}/precision/cNN


def group_sizes(num_classes: int) -> dict[str, int]:
    """Classes per group as `class_groups` cuts them (C=10 -> head 3, medium 4, tail 3)."""
    base, rem = divmod(num_classes, 3)
    return {"head": base + (rem == 2), "medium": base + (rem >= 1), "tail": base}


def evaluation_keys(prefix: str, num_classes: int) -> frozenset[str]:
    """Every key an evaluation reports for split `prefix` (val, test) with C classes whose labels all occur in the
    split (the balanced val and test splits): what a sweep can optimise, as data the service checks names against."""
    keys = {f"{prefix}/{k}" for k in EVAL_SUMMARY}
    keys |= {f"{prefix}/recall_{g}" for g, n in group_sizes(num_classes).items() if n}
    keys |= {f"{prefix}/{f}/{class_key(c, num_classes)}" for f in EVAL_PER_CLASS for c in range(num_classes)}
    return frozenset(keys)


def _np(x: Any) -> np.ndarray:
    """numpy view of an array, a list or a torch tensor (detached, on the host), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def class_key(c: int, num_classes: int) -> str:
    """Zero-padded class key: class_key(3, 10) == "c03", class_key(3, 200) == "c003"."""
    width = max(2, len(str(num_classes - 1)))
    return f"c{c:0{width}d}"


def per_class(prefix: str, values: Any) -> dict[str, float]:
    """A (C,) vector as `{prefix}/cNN` keys, e.g. per_class("daso/v", v) -> {"daso/v/c00": ..., ...}."""
    values = _np(values).astype(np.float64)
    return {f"{prefix}/{class_key(c, len(values))}": float(v) for c, v in enumerate(values)}


def class_groups(labeled_counts: Any) -> dict[str, np.ndarray]:
    """Head / medium / tail class indices from the labeled class counts.

    Classes are sorted by labeled count, descending, ties broken by the smaller class index first, then cut
    into three consecutive groups of floor(C / 3) classes; a remainder of one class goes to medium, a
    remainder of two to medium and head. C=10 -> 3 / 4 / 3, C=100 -> 33 / 34 / 33, C=200 -> 67 / 67 / 66.
    With C < 3 a group can be empty; its group keys are then left out of the metrics.

    Shape: labeled_counts (C,) -> {"head": (n_h,), "medium": (n_m,), "tail": (n_t,)} int64 class indices.
    """
    counts = _np(labeled_counts)
    order = np.argsort(-counts, kind="stable")  # stable: equal counts keep ascending class index
    sizes = group_sizes(len(counts))
    n_head, n_medium = sizes["head"], sizes["medium"]
    return {
        "head": order[:n_head].astype(np.int64),
        "medium": order[n_head : n_head + n_medium].astype(np.int64),
        "tail": order[n_head + n_medium :].astype(np.int64),
    }


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts cm[t, p] of samples with true class t predicted as p (rows = truth).

    Shape: y_true (N,), y_pred (N,) int in [0, C) -> (C, C) int64.
    """
    y_true, y_pred = _np(y_true).astype(np.int64), _np(y_pred).astype(np.int64)
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0.0 where den == 0 (a class never predicted has precision 0, never NaN)."""
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def _group_means(
    prefix: str,
    name: str,
    values: np.ndarray,
    defined: np.ndarray,
    groups: Mapping[str, Any] | None,
    which: Sequence[str],
) -> dict[str, float]:
    """`{prefix}/{name}_{group}` = mean of values over the group's `defined` classes; left out if none."""
    out: dict[str, float] = {}
    for group in which if groups is not None else ():
        idx = _np(groups[group]).astype(np.int64)
        idx = idx[defined[idx]]
        if idx.size:
            out[f"{prefix}/{name}_{group}"] = float(values[idx].mean())
    return out


def classification_metrics(
    prefix: str, y_true: Any, y_pred: Any, num_classes: int, groups: Mapping[str, Any] | None
) -> dict[str, float]:
    """Accuracy, balanced accuracy, per-class recall / precision and group recalls of hard predictions.

    recall_c = cm[c, c] / sum_p cm[c, p] (true c); precision_c = cm[c, c] / sum_t cm[t, c] (predicted c),
    0.0 for a class never predicted, which also counts in `never_predicted`. A class absent from y_true has no
    recall: its recall key is left out and it is excluded from balanced_acc (mean recall of the present
    classes), the group means and recall_min. Groups come from `class_groups` (None: no group keys).

    Shape: y_true (N,), y_pred (N,) int in [0, C) -> flat dict of floats.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support, predicted, correct = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    recall, precision = _ratio(correct, support), _ratio(correct, predicted)
    present = support > 0
    out = {
        f"{prefix}/top1": float(correct.sum() / max(cm.sum(), 1)),
        f"{prefix}/balanced_acc": float(recall[present].mean()) if present.any() else 0.0,
        f"{prefix}/recall_min": float(recall[present].min()) if present.any() else 0.0,
        f"{prefix}/never_predicted": float((predicted == 0).sum()),
    }
    for c in range(num_classes):
        key = class_key(c, num_classes)
        if present[c]:
            out[f"{prefix}/recall/{key}"] = float(recall[c])
        out[f"{prefix}/precision/{key}"] = float(precision[c])
    out.update(_group_means(prefix, "recall", recall, present, groups, GROUPS))
    return out


def pseudo_label_metrics(
    prefix: str,
    y_true: Any | None,
    pseudo_label: Any,
    mask: Any,
    num_classes: int,
    groups: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Quantity and quality of the confident pseudo-labels over a window of unlabeled samples.

    With conf_i = mask_i != 0 and known_i = y_true_i >= 0 (truth -1 = unknown or out-of-class):
        count_c         = #{i: conf_i, yhat_i = c}                       (all samples, known or not)
        imbalance_ratio = max_c count_c / max(min_c count_c, 1)
        mask_ratio      = #{i: conf_i} / N                               (0.0 for an empty window)
        recall_c        = #{i: conf_i, known_i, yhat_i = c, y_i = c} / #{i: known_i, y_i = c}
        precision_c     = #{i: conf_i, known_i, yhat_i = c, y_i = c} / #{i: conf_i, known_i, yhat_i = c}
    recall_c is left out when no known sample has truth c; precision_c is 0.0 when no confident known sample
    is pseudo-labelled c. `recall|precision_head|tail` are means over the group's classes (recall: those
    defined).
    y_true None (no labels, e.g. STL-10's unlabeled split): only counts, imbalance_ratio and mask_ratio.

    Shape: y_true (N,) int or None, pseudo_label (N,) int in [0, C), mask (N,) bool or 0/1 -> dict of floats.
    """
    yhat = _np(pseudo_label).astype(np.int64)
    conf = _np(mask) != 0
    counts = np.bincount(yhat[conf], minlength=num_classes)
    out = {f"{prefix}/{k}": v for k, v in per_class("count", counts).items()}
    out[f"{prefix}/imbalance_ratio"] = float(counts.max() / max(counts.min(), 1))
    out[f"{prefix}/mask_ratio"] = float(conf.sum() / max(conf.size, 1))
    if y_true is None:
        return out
    y = _np(y_true).astype(np.int64)
    known = y >= 0
    hit = conf & known & (yhat == y)
    correct = np.bincount(y[hit], minlength=num_classes)
    truth = np.bincount(y[known], minlength=num_classes)
    assigned = np.bincount(yhat[conf & known], minlength=num_classes)
    recall, precision = _ratio(correct, truth), _ratio(correct, assigned)
    for c in range(num_classes):
        key = class_key(c, num_classes)
        if truth[c] > 0:
            out[f"{prefix}/recall/{key}"] = float(recall[c])
        out[f"{prefix}/precision/{key}"] = float(precision[c])
    every = np.ones(num_classes, dtype=bool)
    out.update(_group_means(prefix, "recall", recall, truth > 0, groups, ("head", "tail")))
    out.update(_group_means(prefix, "precision", precision, every, groups, ("head", "tail")))
    return out


class EvalHistory:
    """Running summaries of evaluation results: the last value and the median of the last `window` ones.

    The papers report "Last" (final evaluation) and "Med20" (median of the last 20 evaluations; fewer while
    fewer exist). `update` appends the tracked keys found in an evaluation's metrics and returns `{key}_last`
    and `{key}_med{window}` for every tracked key seen so far. Its state is plain lists, so it loads with
    torch.load(weights_only=True).
    """

    def __init__(
        self,
        keys: Sequence[str] = ("val/top1", "val/balanced_acc", "test/top1", "test/balanced_acc"),
        window: int = 20,
    ) -> None:
        self.keys = tuple(keys)
        self.window = window
        self.history: dict[str, list[float]] = {k: [] for k in self.keys}

    def update(self, metrics: Mapping[str, float]) -> dict[str, float]:
        for key in self.keys:
            if key in metrics:
                self.history[key].append(float(metrics[key]))
        return self.summary()

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, values in self.history.items():
            if values:
                out[f"{key}_last"] = values[-1]
                out[f"{key}_med{self.window}"] = float(np.median(values[-self.window :]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = {k: [] for k in self.keys}
        for key, values in state["history"].items():
            self.history[key] = [float(v) for v in values]


def per_class_table(
    metrics: Mapping[str, float], prefix: str, num_classes: int, class_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Rows {class, name, recall, precision} from `{prefix}/recall|precision/cNN` (None where absent)."""
    rows = []
    for c in range(num_classes):
        key = class_key(c, num_classes)
        rows.append(
            {
                "class": c,
                "name": class_names[c] if class_names is not None else key,
                "recall": metrics.get(f"{prefix}/recall/{key}"),
                "precision": metrics.get(f"{prefix}/precision/{key}"),
            }
        )
    return rows
