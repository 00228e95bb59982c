"""The Ray adapter: the evaluation index ASHA counts in, restoring a Tune checkpoint, and how a trial ends on a
failure a retry would repeat (Tune's session replaced by a recorder)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainables import ray_trainable
from trainables.config import ConfigError
from trainables.data.cifar import DatasetNotFoundError
from trainables.ray_trainable import ARTIFACTS, NOT_RETRIED, evaluation_index, restore_checkpoint, run_trial


def test_evaluation_index_counts_evaluations_including_a_short_last_one():
    # eval_every 20 over 50 iterations: evaluations at 20, 40 and the final 50
    assert [evaluation_index(s, 20) for s in (20, 40, 50)] == [1, 2, 3]
    assert [evaluation_index(s, 500) for s in (500, 250_000)] == [1, 500]


def test_restore_replaces_the_loop_checkpoint_and_leaves_the_artifacts_out(tmp_path):
    src = tmp_path / "tune_checkpoint"
    (src / ARTIFACTS).mkdir(parents=True)
    (src / "state.pt").write_bytes(b"new")
    (src / ARTIFACTS / "per_class_test.csv").write_text("x")
    dst = tmp_path / "run" / "checkpoint"
    dst.mkdir(parents=True)
    (dst / "state.pt").write_bytes(b"old")
    (dst / "stale.tmp").write_bytes(b"partial")
    restore_checkpoint(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["state.pt"]
    assert (dst / "state.pt").read_bytes() == b"new"


@pytest.fixture
def tune_session(monkeypatch, tmp_path):
    """Tune's session API as run_trial uses it, recording the reports."""
    reports: list[dict] = []
    context = SimpleNamespace(get_trial_id=lambda: "abc", get_trial_dir=lambda: str(tmp_path / "trial"))
    fake = SimpleNamespace(
        get_context=lambda: context,
        get_checkpoint=lambda: None,
        report=lambda metrics, checkpoint=None: reports.append(metrics),
        Checkpoint=SimpleNamespace(from_directory=lambda path: path),
    )
    monkeypatch.setattr(ray_trainable, "tune", fake)
    monkeypatch.setattr(ray_trainable, "where_running", lambda: {"ray_node_id": "n1"})
    return reports


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        (DatasetNotFoundError("CIFAR-10 not found under /data"), "data set missing: CIFAR-10 not found under /data"),
        (ConfigError("model.depth: 11 is not 6n+4"), "invalid configuration: model.depth: 11 is not 6n+4"),
    ],
    ids=["oom", "data", "config"],
)
def test_a_failure_a_retry_would_repeat_ends_the_trial_with_its_reason(tune_session, monkeypatch, error, reason):
    from trainables import loop
    from trainables.config import load_config

    def fail_after_one_evaluation(cfg, out_dir, report, resume, progress):
        report({"step": 20, "val/balanced_acc": 0.5}, None)
        raise error

    monkeypatch.setattr(loop, "train", fail_after_one_evaluation)
    config = load_config(ray_trainable.Path(__file__).parents[2] / "trainables/configs/repro_synthetic.yaml")
    config = config.model_dump(mode="json")
    config["train"]["iterations"] = 60
    run_trial({**config, "service": {}})  # returns: Tune ends the trial instead of retrying it
    first, last = tune_session
    assert first["step"] == 20 and NOT_RETRIED not in first
    assert last == {"step": 20, NOT_RETRIED: reason, "ray_node_id": "n1"}


def test_other_errors_propagate_so_that_tune_retries_the_trial(tune_session, monkeypatch):
    from trainables import loop
    from trainables.config import load_config

    def crash(cfg, out_dir, report, resume, progress):
        raise RuntimeError("NCCL timeout")

    monkeypatch.setattr(loop, "train", crash)
    config = load_config(ray_trainable.Path(__file__).parents[2] / "trainables/configs/repro_synthetic.yaml")
    with pytest.raises(RuntimeError, match="NCCL timeout"):
        run_trial({**config.model_dump(mode="json"), "service": {}})
    assert tune_session == []
