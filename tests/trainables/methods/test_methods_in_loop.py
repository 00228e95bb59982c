"""The method components inside the real training loop, on a tiny synthetic task (seconds per run on a CPU).

WRN-10-1 on 16 px images of 4 classes, 24 iterations, evaluations every 8. DASO's warm-up (4) and window (6),
and DRw's start (4) and window (10), are small so that every piece of state is in use and mid-window at the
step-8 checkpoint, and the windows open at step 8 still feed the daso/v and drw/count metrics of the step-16
evaluation. The confidence threshold is low (0.4) so that the unlabeled loss and its counts are not empty.
"""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from trainables import checkpoint
from trainables.config import RunConfig
from trainables.data import build_data
from trainables.loop import CHECKPOINT_DIR, METRICS_FILE, train

TIMING_KEYS = {"train/it_per_s"}  # wall-clock, the only thing allowed to differ between identical runs
TRUTH_PREFIXES = ("pl/", "pl_linear/", "pl_semantic/")  # pseudo-label quality: the only readers of the truth


def tiny_config(preset: str, daso: dict | None = None, drw: dict | None = None) -> RunConfig:
    method: dict = {"preset": preset}
    if daso is not None:
        method["daso"] = {"warmup": 4, "window": 6, "queue_len": 8, **daso}
    if drw is not None:
        method["drw"] = {"start": 4, "window": 10, **drw}
    return RunConfig.model_validate(
        {
            "name": "tiny",
            "data": {
                "dataset": "synthetic",
                "n1": 12,
                "m1": 24,
                "gamma_l": 4,
                "synthetic": {"num_classes": 4, "image_size": 16, "pool_per_class": 50, "test_per_class": 5},
            },
            "model": {"arch": "wrn", "depth": 10, "widen": 1},
            "train": {
                "iterations": 24,
                "batch_size": 4,
                "mu": 2,
                "tau": 0.4,
                "eval_every": 8,
                "eval_batch_size": 64,
                "device": "cpu",
                "deterministic": True,
            },
            "method": method,
        }
    )


@pytest.fixture(autouse=True)
def _restore_global_torch_settings():
    """The loop seeds the global generators and turns deterministic algorithms on: undo both afterwards."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)
    torch.set_rng_state(rngs[0])
    np.random.set_state(rngs[1])
    random.setstate(rngs[2])


@pytest.fixture(scope="module")
def data():
    return build_data(tiny_config("fixmatch").data)


def trajectory(out_dir) -> list[dict]:
    """Every evaluation's metrics from metrics.jsonl, without the wall-clock keys."""
    lines = (out_dir / METRICS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def final_model(out_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load(out_dir / CHECKPOINT_DIR)["model"]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_drw_with_beta_zero_is_fixmatch(tmp_path, data):
    """beta = 0 makes every class weight exactly 1 (labeled and unlabeled), so fixmatch_drw must retrace
    fixmatch bit for bit: same per-evaluation metrics and same final weights; only the drw/ keys are extra."""
    plain = train(tiny_config("fixmatch"), tmp_path / "plain", progress=False, data=data)
    drw = train(
        tiny_config("fixmatch_drw", drw={"beta": 0.0, "start": 0}),
        tmp_path / "drw",
        progress=False,
        data=data,
    )
    assert {k for k in drw if k not in plain} == {k for k in drw if k.startswith("drw/")}
    plain_traj, drw_traj = trajectory(tmp_path / "plain"), trajectory(tmp_path / "drw")
    assert [{k: m[k] for k in p} for p, m in zip(plain_traj, drw_traj, strict=True)] == plain_traj
    assert max(m["train/mask_ratio"] for m in plain_traj) > 0  # the unlabeled loss (and its weights) took part
    assert_same_tensors(final_model(tmp_path / "plain"), final_model(tmp_path / "drw"))


@pytest.mark.parametrize(
    "preset, daso, drw",
    [
        ("fixmatch_daso_drw", {}, {"count": "window"}),
        ("fixmatch_la_drw", None, {"count": "ema_pass", "pass_every": 6}),
    ],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, data, preset, daso, drw):
    """Stop right after the step-8 checkpoint (DASO window and DRw ring both mid-way; DASO past its warm-up),
    resume from it, and finish: the evaluations and the final weights equal those of a run never stopped."""
    assert_resume_equals_whole_run(tiny_config(preset, daso=daso, drw=drw), tmp_path, data)


def assert_resume_equals_whole_run(cfg: RunConfig, tmp_path, data) -> None:
    """Stopped right after the step-8 checkpoint and resumed, `cfg` gives the evaluations and final weights of the
    run never stopped."""
    train(cfg, tmp_path / "whole", progress=False, data=data)

    class Stop(Exception):
        pass

    def stop_at_8(metrics, saved):
        if metrics["step"] == 8:
            assert saved is not None
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "split", report=stop_at_8, progress=False, data=data)
    assert checkpoint.load(tmp_path / "split" / CHECKPOINT_DIR)["step"] == 8
    train(cfg, tmp_path / "split", resume=True, progress=False, data=data)

    assert trajectory(tmp_path / "split") == trajectory(tmp_path / "whole")
    assert_same_tensors(final_model(tmp_path / "split"), final_model(tmp_path / "whole"))


def test_unlabeled_truth_never_reaches_training(tmp_path, data):
    """Shuffle the unlabeled ground truth (kept for pseudo-label metrics only): with DASO and DRw on, every
    training and evaluation number and the final weights stay bit-identical; only pl/ metrics may move,
    and some do, so the shuffle did reach the measurement."""
    assert_truth_never_reaches_training(tiny_config("fixmatch_daso_drw", daso={}, drw={}), tmp_path, data)


def assert_truth_never_reaches_training(cfg: RunConfig, tmp_path, data, diagnostics: tuple[str, ...] = ()) -> None:
    """`cfg` trained with the true and with shuffled unlabeled ground truth: the same weights and the same numbers,
    except pseudo-label quality (pl/, DASO's sources and the `diagnostics` prefixes), some of which move."""
    shuffled = np.random.default_rng(0).permutation(data.unlabeled_truth)
    assert not np.array_equal(shuffled, data.unlabeled_truth)
    train(cfg, tmp_path / "true", progress=False, data=data)
    train(cfg, tmp_path / "shuffled", progress=False, data=dataclasses.replace(data, unlabeled_truth=shuffled))

    moved = set()
    for a, b in zip(trajectory(tmp_path / "true"), trajectory(tmp_path / "shuffled"), strict=True):
        assert a.keys() == b.keys()
        moved |= {k for k in a if a[k] != b[k]}
    assert moved and all(k.startswith((*TRUTH_PREFIXES, *diagnostics)) for k in moved), sorted(moved)
    assert_same_tensors(final_model(tmp_path / "true"), final_model(tmp_path / "shuffled"))
