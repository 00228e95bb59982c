"""The training loop: outputs, report callback, resume equivalence, unlabeled truth never reaching training."""

import json

import numpy as np
import pytest

from tests.trainables.conftest import random_data, tiny_config
from trainables.loop import train


class Killed(Exception):
    pass


def kill_at(step: int):
    def report(metrics, checkpoint_dir):
        if metrics["step"] == step:
            assert checkpoint_dir is not None and (checkpoint_dir / "state.pt").is_file()
            raise Killed

    return report


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "train/it_per_s"} for r in rows]


def test_outputs_and_report_cadence(tmp_path):
    seen = []
    final = train(
        tiny_config(), tmp_path, report=lambda m, c: seen.append((m["step"], c)), progress=False, data=random_data()
    )
    assert [s for s, _ in seen] == [10, 20, 30]
    assert all(c == tmp_path / "checkpoint" for _, c in seen)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[-1] == final
    for key in [
        "train/loss",
        "train/loss_x",
        "train/loss_u",
        "train/lr",
        "train/it_per_s",
        "val/top1",
        "val/balanced_acc",
        "test/recall/c03",
        "test/precision/c00",
        "val/recall_tail",
        "val/top1_med20",
        "pl/count/c02",
        "pl/mask_ratio",
        "val/top1_la",
    ]:
        assert key in final, key
    assert (tmp_path / "artifacts" / "confusion_test.csv").is_file()
    assert (tmp_path / "artifacts" / "per_class_test.csv").is_file()
    assert (
        json.loads((tmp_path / "counts.json").read_text())["labeled"]
        == np.bincount(random_data().labeled.labels, minlength=4).tolist()
    )


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_equals_uninterrupted(tmp_path, schedule):
    """Killed right after the step-10 checkpoint, then resumed: every later evaluation is identical."""
    cfg = tiny_config(f"optim.schedule={schedule}")
    full = train(cfg, tmp_path / "full", progress=False, data=random_data())
    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", report=kill_at(10), progress=False, data=random_data())
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False, data=random_data())
    assert without_timing([resumed]) == without_timing([full])
    assert without_timing(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "full" / "metrics.jsonl")
    )


def test_resume_between_checkpoints_drops_the_unsaved_evaluation(tmp_path):
    """Checkpoints every 20 steps, killed at the step-30 evaluation... the step-30 line written before the kill is
    dropped on resume and recomputed, so the file holds each step once."""
    cfg = tiny_config("train.iterations=40", "train.checkpoint_every=20")

    def report(metrics, ckpt):
        if metrics["step"] == 30:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path, report=report, progress=False, data=random_data())
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    train(cfg, tmp_path, resume=True, progress=False, data=random_data())
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30, 40]


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny_config("train.iterations=10"), tmp_path, progress=False, data=random_data())
    with pytest.raises(ValueError, match="train.tau: 0.95 .checkpoint. vs 0.9 .now."):
        train(
            tiny_config("train.iterations=10", "train.tau=0.9"),
            tmp_path,
            resume=True,
            progress=False,
            data=random_data(),
        )


def test_resume_refuses_a_checkpoint_of_the_former_rules(tmp_path):
    """A checkpoint without the format mark was written before DASO's order and DRw's counting changed: the
    same-looking configuration would resume under other rules, so it is refused."""
    from trainables import checkpoint

    train(tiny_config("train.iterations=10"), tmp_path, progress=False, data=random_data())
    state = checkpoint.load(tmp_path / "checkpoint")
    del state["format"]
    checkpoint.save_atomic(state, tmp_path / "checkpoint")
    with pytest.raises(ValueError, match="checkpoint format 1, this code writes format 2"):
        train(tiny_config("train.iterations=10"), tmp_path, resume=True, progress=False, data=random_data())


def test_resume_of_a_finished_run_returns_its_result(tmp_path):
    final = train(tiny_config("train.iterations=10"), tmp_path, progress=False, data=random_data())
    again = train(tiny_config("train.iterations=10"), tmp_path, resume=True, progress=False, data=random_data())
    assert again == final


def test_reported_evaluation_keys_are_the_contract(tmp_path):
    # the service checks objective names against metrics.evaluation_keys: it must be exactly what the loop reports
    from trainables.metrics import evaluation_keys

    data = random_data(num_classes=4)
    for split in (data.val, data.test):
        assert set(split.labels.tolist()) == set(range(4))  # every class occurs, as in the balanced splits
    seen = []
    train(tiny_config(), tmp_path, report=lambda m, c: seen.append(m), progress=False, data=data)
    for prefix in ("val", "test"):
        assert {k for k in seen[-1] if k.startswith(prefix + "/")} == evaluation_keys(prefix, 4)


DATA = random_data()


def test_divergence_stops_the_run_before_anything_is_written(tmp_path):
    # a learning rate of 1e12 sends the weights to inf/nan within the first evaluation window
    from trainables.loop import NonFiniteError

    seen = []
    with pytest.raises(NonFiniteError, match="training diverged at step 10: "):
        train(
            tiny_config("optim.lr=1e12"),
            tmp_path,
            report=lambda m, c: seen.append(m),
            progress=False,
            data=random_data(),
        )
    assert seen == []
    assert not (tmp_path / "checkpoint" / "state.pt").exists()
    assert not (tmp_path / "metrics.jsonl").exists() or (tmp_path / "metrics.jsonl").read_text() == ""
