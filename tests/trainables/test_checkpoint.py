"""Checkpoint files: atomic replacement, weights_only loading, RNG capture and restore."""

import argparse
import random

import numpy as np
import pytest
import torch

from trainables import checkpoint
from trainables.config import OptimConfig
from trainables.loop import lr_at


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    checkpoint.save_atomic({"rng": checkpoint.capture_rng()}, tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng(checkpoint.load(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    checkpoint.save_atomic({"step": 1}, tmp_path)

    def torn(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2}, tmp_path)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path) == {"step": 1}


def test_load_refuses_arbitrary_pickles(tmp_path):
    torch.save({"x": argparse.Namespace(cmd="rm -rf")}, tmp_path / checkpoint.STATE_FILE)  # any non-tensor class
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.load(tmp_path)


def test_missing_checkpoint_is_none(tmp_path):
    assert checkpoint.load(tmp_path) is None


def test_lr_schedules():
    """Cosine: lr cos(7 pi k / (16 K)); at k = K/2, 0.03 cos(7 pi / 32). Constant: 0.03 everywhere."""
    cos = OptimConfig(schedule="cosine")
    assert lr_at(0, 1000, cos) == pytest.approx(0.03)
    assert lr_at(500, 1000, cos) == pytest.approx(0.03 * np.cos(7 * np.pi / 32))
    assert lr_at(1000, 1000, cos) == pytest.approx(0.03 * np.cos(7 * np.pi / 16))
    assert lr_at(777, 1000, OptimConfig()) == 0.03


def test_a_torn_temporary_file_does_not_survive_the_next_save(tmp_path):
    # a kill mid-write leaves .state.pt.<pid>.tmp; the directory is what Tune copies into its checkpoint
    (tmp_path / ".state.pt.4242.tmp").write_bytes(b"partial")
    checkpoint.save_atomic({"step": 2}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
