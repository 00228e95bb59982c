"""The pruner of ended trials' checkpoints: it deletes a checkpoint only once a saved Tune state no longer needs it.

A state saved while a trial ran names the checkpoint the trial was at; a driver killed before the next save resumes
the trial from that checkpoint, so pruning at the trial's end (before Tune saved again) made that resume fail with
"checkpoint does not exist on storage anymore", four times, and the trial ended failed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest

from service.sweep import CheckpointPruner


@pytest.fixture(autouse=True)
def fresh_pruner():
    CheckpointPruner.ended, CheckpointPruner.started = [], False
    yield
    CheckpointPruner.ended, CheckpointPruner.started = [], False


def trial_with_checkpoints(root: Path, name: str, count: int, status: str = "RUNNING") -> SimpleNamespace:
    folder = root / name
    for i in range(count):
        (folder / f"checkpoint_{i:06d}").mkdir(parents=True)
        (folder / f"checkpoint_{i:06d}" / "state.pt").write_bytes(b"x")
    (folder / "result.json").write_text("{}")
    last = folder / f"checkpoint_{count - 1:06d}"
    storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(folder))
    return SimpleNamespace(status=status, checkpoint=SimpleNamespace(path=str(last)), storage=storage)


def left(root: Path, name: str) -> list[str]:
    return sorted(p.name for p in (root / name).iterdir())


def test_a_trial_ending_keeps_its_checkpoints_until_tune_has_saved_its_final_state(tmp_path):
    pruner = CheckpointPruner()
    trial = trial_with_checkpoints(tmp_path, "a", 2)
    pruner.on_step_begin(iteration=5, trials=[trial])
    pruner.on_trial_complete(iteration=9, trials=[trial], trial=trial)
    # a driver killed here resumes from the saved state, which may name checkpoint_000000: it must still be there
    assert left(tmp_path, "a") == ["checkpoint_000000", "checkpoint_000001", "result.json"]
    CheckpointPruner.prune_ended()  # after tuner.fit() returned
    assert left(tmp_path, "a") == ["checkpoint_000001", "result.json"]
    assert CheckpointPruner.ended == []


def test_trials_restored_as_ended_are_pruned_at_the_first_step_only(tmp_path):
    done = trial_with_checkpoints(tmp_path, "done", 3, status="TERMINATED")
    errored = trial_with_checkpoints(tmp_path, "errored", 2, status="ERROR")
    cut = trial_with_checkpoints(tmp_path, "cut", 2, status="PENDING")  # resumes from one of them: both stay
    pruner = CheckpointPruner()
    pruner.on_step_begin(iteration=41, trials=[done, errored, cut])
    assert left(tmp_path, "done") == ["checkpoint_000002", "result.json"]
    assert left(tmp_path, "errored") == ["checkpoint_000001", "result.json"]
    assert left(tmp_path, "cut") == ["checkpoint_000000", "checkpoint_000001", "result.json"]
    # later steps do not prune a trial that ended in this session: only prune_ended() does, after Tune's final save
    late = trial_with_checkpoints(tmp_path, "late", 2, status="TERMINATED")
    pruner.on_step_begin(iteration=42, trials=[done, errored, cut, late])
    assert left(tmp_path, "late") == ["checkpoint_000000", "checkpoint_000001", "result.json"]


def test_a_trial_without_a_checkpoint_is_left_alone(tmp_path):
    trial = trial_with_checkpoints(tmp_path, "a", 1)
    trial.checkpoint = None
    CheckpointPruner().on_trial_complete(iteration=1, trials=[trial], trial=trial)
    CheckpointPruner.prune_ended()
    assert left(tmp_path, "a") == ["checkpoint_000000", "result.json"]


def test_a_failed_save_of_tunes_state_is_noticed(monkeypatch):
    # Tune only logs a failed save (fit() returns as usual): the pruner must not trust that final save
    import logging

    from service.sweep import SAVE_WATCH

    monkeypatch.setattr(SAVE_WATCH, "failed", False)
    logging.getLogger("ray.tune.tune").info("Wrote the latest version of all result files and experiment state")
    assert not SAVE_WATCH.failed
    logging.getLogger("ray.tune.tune").error("Experiment state snapshotting failed:", exc_info=False)
    assert SAVE_WATCH.failed
    SAVE_WATCH.failed = False
    logging.getLogger("ray.tune.execution.experiment_state").error(
        "Saving experiment state to storage at 's3://b/x' failed with exception: "
    )
    assert SAVE_WATCH.failed
