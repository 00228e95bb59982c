"""The loop on CUDA: bf16 autocast, channels_last, device-resident data, resume (run with `pytest -m gpu`)."""

import math

import pytest
import torch

from tests.trainables.conftest import random_data
from tests.trainables.test_learning import SHORT
from trainables.config import load_config
from trainables.loop import resolve_runtime, train

pytestmark = pytest.mark.gpu

CUDA = [
    "train.iterations=20", "train.eval_every=10", "model.depth=10", "model.widen=1", "train.batch_size=8",
    "train.device=cuda", "data.resident=device", "method.preset=fixmatch_daso_drw", "method.daso.warmup=5",
    "method.daso.window=3", "method.drw.start=5",
]  # fmt: skip


def whole_and_resumed(cfg, tmp_path):
    """Final metrics of the run uninterrupted (tmp_path/full) and of the run killed after its step-10 report and
    resumed (tmp_path/cut)."""
    full = train(cfg, tmp_path / "full", progress=False, data=random_data())

    class Killed(Exception):
        pass

    def kill(metrics, ckpt):
        if metrics["step"] == 10:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", report=kill, progress=False, data=random_data())
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False, data=random_data())
    return full, resumed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_and_resume(tmp_path):
    cfg = load_config(None, CUDA)
    rt = resolve_runtime(cfg)
    assert rt.device.type == "cuda" and rt.autocast_dtype == torch.bfloat16 and rt.channels_last
    full, resumed = whole_and_resumed(cfg, tmp_path)
    assert all(math.isfinite(v) for v in full.values())
    assert resumed["step"] == full["step"] == 20


DETERMINISTIC = [*CUDA, "train.deterministic=true"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_continues_the_same_run(tmp_path):
    """Stopped at step 10 and resumed, a deterministic CUDA run ends with the same weights, EMA weights and
    metrics as the uninterrupted run (values, not only the step). bench/gpu_check.sh sets
    CUBLAS_WORKSPACE_CONFIG so that cuBLAS is deterministic too."""
    from trainables import checkpoint

    cfg = load_config(None, DETERMINISTIC)
    full, resumed = whole_and_resumed(cfg, tmp_path)
    timing = {"train/it_per_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in full.items() if k not in timing}
    a, b = checkpoint.load(tmp_path / "full" / "checkpoint"), checkpoint.load(tmp_path / "cut" / "checkpoint")
    for key in ("model", "ema"):
        sa, sb = a[key], b[key]
        sa, sb = sa.get("module", sa), sb.get("module", sb)
        for name, tensor in sa.items():
            assert torch.equal(tensor, sb[name]), f"{key}.{name} differs after resume"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_never_waits_for_the_gpu():
    """Once warm (op tables on the device, DASO past its warm-up, DRw's weights set), a training step issues no
    host-device synchronisation: CUDA's sync debug mode raises on one (`.item()`, a D2H copy, `nonzero`)."""
    from trainables.evaluate import Window
    from trainables.loop import Run

    cfg = load_config(None, [*CUDA, "method.daso.warmup=0", "method.drw.start=0"])
    run = Run(cfg, random_data(), resolve_runtime(cfg))
    run.model.train()
    window = Window()
    for _ in range(3):
        run.train_step(window)
    torch.cuda.synchronize()
    steps = [s for s in range(run.step, run.step + 6) if not run.method.unlabeled_weighting.wants_pass(s)]
    assert len(steps) >= 3
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            run.step = step
            run.train_step(window)
    finally:
        torch.cuda.set_sync_debug_mode("default")


BAND = [o for o in SHORT if not o.startswith("train.device=")] + ["train.device=cuda"]  # test_learning's run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_lands_in_the_fp32_accuracy_band(tmp_path):
    """The short synthetic run of tests/trainables/test_learning.py on CUDA, three seeds each in bf16 and fp32:
    both beat chance (25 %) clearly, and the bf16 mean lies inside the range of the fp32 seeds widened by 0.05 on
    each side, two binomial standard errors of an accuracy near 0.55 on the 400 test images. (On the CPU, two
    seeds of each gave bf16 0.592, 0.580 and fp32 0.533, 0.575.)"""
    import statistics

    accuracy: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for precision in accuracy:
        for seed in (0, 1, 2):
            cfg = load_config(None, [*BAND, f"train.precision={precision}", f"train.seed={seed}"])
            final = train(cfg, tmp_path / f"{precision}-{seed}", progress=False)
            accuracy[precision].append(final["test/balanced_acc"])
    fp32, bf16 = accuracy["fp32"], accuracy["bf16"]
    assert min(fp32) > 0.40 and min(bf16) > 0.40, accuracy
    assert min(fp32) - 0.05 <= statistics.mean(bf16) <= max(fp32) + 0.05, accuracy
