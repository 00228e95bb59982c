"""The Ray adapter's pure parts: the evaluation index ASHA counts in, and restoring a Tune checkpoint."""

from __future__ import annotations

from trainables.ray_trainable import ARTIFACTS, evaluation_index, restore_checkpoint


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
