"""The loop on CUDA: bf16 autocast, channels_last, device-resident data, resume (run with `pytest -m gpu`)."""

import math

import pytest
import torch

from tests.trainables.conftest import random_data
from trainables.config import load_config
from trainables.loop import resolve_runtime, train

pytestmark = pytest.mark.gpu

CUDA = [
    "train.iterations=20", "train.eval_every=10", "model.depth=10", "model.widen=1", "train.batch_size=8",
    "train.device=cuda", "data.resident=device", "method.preset=fixmatch_daso_drw", "method.daso.warmup=5",
    "method.daso.window=3", "method.drw.start=5",
]  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_and_resume(tmp_path):
    cfg = load_config(None, CUDA)
    rt = resolve_runtime(cfg)
    assert rt.device.type == "cuda" and rt.autocast_dtype == torch.bfloat16 and rt.channels_last
    full = train(cfg, tmp_path / "full", progress=False, data=random_data())
    assert all(math.isfinite(v) for v in full.values())

    class Killed(Exception):
        pass

    def kill(metrics, ckpt):
        if metrics["step"] == 10:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", report=kill, progress=False, data=random_data())
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False, data=random_data())
    assert resumed["step"] == full["step"] == 20
