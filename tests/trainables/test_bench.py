"""The benchmark's reference-style pieces compute what ours compute, and its report is consistent
(trainables/bench.py; speed figures live in BENCHMARKS.md, not in tests)."""

import json

import numpy as np
import pytest
import torch

from tests.trainables.conftest import TINY, random_data
from trainables import bench
from trainables.augment import normalize
from trainables.augment_pil import pil_strong, pil_weak
from trainables.config import load_config
from trainables.evaluate import Window
from trainables.loop import Run, resolve_runtime


def _run(*overrides: str) -> Run:
    cfg = load_config(None, [*TINY, *overrides])
    return Run(cfg, random_data(), resolve_runtime(cfg))


def test_reference_style_ema_equals_the_fused_ema():
    """The per-tensor Python EMA of the reference pipeline and our fused `_foreach_lerp_` EMA give the same
    weights and BatchNorm statistics after the same steps (up to float rounding)."""
    ours, theirs = _run(), _run()
    bench._python_ema(theirs)
    for run in (ours, theirs):
        run.model.train()
        for _ in range(3):
            run.train_step(Window())
    assert ours.ema.updates == theirs.ema.updates == 3
    a, b = ours.ema.module.state_dict(), theirs.ema.module.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reference_dataset_gives_the_pil_views_normalised():
    """`_ViewsDataset` item i: the PIL weak and strong views of image i, ToTensor + Normalize, in the order its
    per-worker generator draws them."""
    data = random_data()
    ds = bench._ViewsDataset(data.unlabeled_images, data.mean, data.std, strong=True, seed=3)
    weak, strong, i = ds[5]
    rng = np.random.default_rng([3, 0])
    from PIL import Image

    img = Image.fromarray(data.unlabeled_images[5])
    expected = [pil_weak(img, rng), pil_strong(img, rng)]
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    for got, view in zip((weak, strong), expected, strict=True):
        x = torch.from_numpy(np.array(view)).permute(2, 0, 1).unsqueeze(0)
        torch.testing.assert_close(got, normalize(x, mean, std)[0])
    assert i == 5 and weak.dtype == torch.float32


def test_unknown_suite_or_variant_is_refused(capsys):
    for argv in (["--suite", "augment,speed"], ["--variants", "fp16"]):
        with pytest.raises(SystemExit) as exit_:
            bench.main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown 'speed'; valid: augment, step, reference, packing" in err and "unknown 'fp16'" in err


@pytest.mark.slow
def test_every_suite_runs_and_the_report_adds_up(tmp_path):
    """The whole benchmark on a small network: every suite reports, the ratios are the quotients they claim, the
    FLOP count matches the network's, and bench.json holds what was printed."""
    report = bench.main(
        ["--suite", "augment,step,reference,packing", "--device", "cpu", "--depth", "10", "--widen", "1",
         "--batch-size", "16", "--steps", "2", "--warmup", "1", "--variants", "fp32,bf16", "--aug-rounds", "2",
         "--aug-seconds", "0.2", "--workers", "1", "--pack", "1,2", "--pack-seconds", "2", "--pack-variant", "fp32",
         "--preset", "fixmatch", "--n1", "60", "--m1", "120", "--out", str(tmp_path)]
    )  # fmt: skip
    a = report["augment"]
    assert a["ratio_min"] <= a["ratio"] <= a["ratio_max"] and a["batched_img_s"] > 0 and a["pil_img_s"] > 0
    step = report["step"]
    assert set(step) == {"fp32", "bf16"}
    for row in step.values():
        assert row["img_s"] == pytest.approx(row["it_s"] * 16 * 5)
        assert row["tflop_s"] == pytest.approx(row["gflop_per_step"] * row["it_s"] / 1000)
    assert step["fp32"]["gflop_per_step"] == pytest.approx(step["bf16"]["gflop_per_step"])
    # FixMatch: forward and backward (twice the forward, less the first layer's input gradient) of 80 images
    from torch.utils.flop_counter import FlopCounterMode

    from trainables.models import build_model

    cfg = load_config(None, ["model.depth=10", "model.widen=1"])
    with FlopCounterMode(display=False) as counter:
        build_model(cfg.model, 10)(torch.zeros(1, 3, 32, 32))
    forward = counter.get_total_flops() * 16 * 5 / 1e9
    assert 2.9 * forward < step["fp32"]["gflop_per_step"] <= 3 * forward
    ref = report["reference"]
    best = max(step.values(), key=lambda r: r["it_s"])
    assert ref["speedup"] == pytest.approx(best["it_s"] / ref["it_s"])
    packing = report["packing"]
    assert packing["1"]["vs_first"] == 1.0 and len(packing["2"]["per_process_it_s"]) == 2
    assert packing["2"]["aggregate_it_s"] == pytest.approx(sum(packing["2"]["per_process_it_s"]))
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
