"""Helpers for the service tests: space files written to a temporary directory."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from service.plan import Plan, load_plan

REPO = Path(__file__).resolve().parents[2]
SPACES = REPO / "search_spaces"

#: a small valid file the tests vary: synthetic data, three presets, conditional parameters
SMALL = """
experiment: small
base:
  data: {dataset: synthetic, n1: 100, m1: 200, synthetic: {num_classes: 10, pool_per_class: 400}}
  model: {depth: 10, widen: 1}
  train: {iterations: 60, eval_every: 20, batch_size: 16, device: cpu}
space:
  method.preset: {type: categorical, values: [fixmatch, fixmatch_daso, fixmatch_drw]}
  optim.lr: {type: loguniform, low: 0.01, high: 0.1}
  method.drw.beta: {type: log_one_minus, low: 0.9, high: 0.9999}
  method.daso.t_dist: {type: uniform, low: 0.3, high: 2.0}
search:
  num_trials: 6
  metric: val/balanced_acc
  mode: max
"""


@pytest.fixture
def write_space(tmp_path: Path):
    """write_space(text, name=...) -> path of a space file in tmp_path (text is dedented)."""

    def write(text: str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def small_plan(write_space, tmp_path: Path) -> Plan:
    return load_plan(write_space(SMALL), launch_dir=tmp_path)
