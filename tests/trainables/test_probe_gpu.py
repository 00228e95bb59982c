"""The memory probe on CUDA (run with `pytest -m gpu`): a positive peak that grows with the batch, within the
device's memory, and a configuration's peak that a process capped at that peak (with headroom) can train under."""

import pytest
import torch

from trainables.config import load_config
from trainables.probe import peak_memory

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMALL = [
    "model.depth=10", "model.widen=1", "data.n1=100", "data.m1=200", "data.synthetic.pool_per_class=400",
    "data.synthetic.test_per_class=20", "method.preset=fixmatch_daso_drw", "train.eval_batch_size=256",
]  # fmt: skip


def test_probe_peak_grows_with_the_batch():
    small = peak_memory(load_config(None, [*SMALL, "train.batch_size=16"]))
    large = peak_memory(load_config(None, [*SMALL, "train.batch_size=128"]))
    assert 0 < small["peak_bytes"] < large["peak_bytes"] < large["total_bytes"]
    assert large["device"] == torch.cuda.get_device_name()
