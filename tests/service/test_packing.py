"""Packing trials on one GPU: the fit rule, the heaviest configuration the probe takes, and the refusal before a
sweep starts (service/packing.py). The probe itself runs on a GPU (tests/trainables/test_probe_gpu.py)."""

from __future__ import annotations

import pytest

from service import packing
from service.plan import load_plan
from trainables.config import ConfigError

GIB = 2**30
H200 = 143_771 * 2**20  # what an H200 reports

PACKED = """
experiment: packed
base:
  data: {dataset: synthetic, n1: 100, m1: 200, synthetic: {num_classes: 10, pool_per_class: 400}}
  model: {depth: 10, widen: 1}
  train: {iterations: 60, eval_every: 20, batch_size: 16}
space:
  method.preset: {type: categorical, values: [fixmatch, fixmatch_daso]}
  train.batch_size: {type: categorical, values: [32, 128, 64]}
  model.widen: {type: int, low: 1, high: 4}
  method.daso.queue_len: {type: int, low: 128, high: 512, presets: [fixmatch_daso]}
  optim.lr: {type: loguniform, low: 0.01, high: 0.1}
resources: {cpu: 1, gpu: 0.25}
search: {num_trials: 4, metric: val/balanced_acc, mode: max}
"""


def test_fit_rule_by_hand():
    # 4 per GPU, cap 35.1 GiB each: 30 GiB * 1.1 = 33 GiB fits, 4 * (33 + 1) = 136 <= 140.4
    assert packing.packing_problem(0.25, 30 * GIB, H200) is None
    # 32 GiB * 1.1 = 35.2 GiB is over the 35.1 GiB cap; 140.4 / 36.2 -> 3 per GPU
    problem = packing.packing_problem(0.25, 32 * GIB, H200)
    assert "packs 4 trials on each GPU" in problem and "capped at 35.1 GiB" in problem
    assert "peaked at 32.00 GiB" in problem and "resources.gpu: 0.3333 (3 per GPU) fits" in problem
    # 1/3 of a GPU places 3 trials (not 2 through rounding)
    assert packing.per_gpu(1 / 3) == 3 and packing.per_gpu(0.5) == 2 and packing.per_gpu(0.3) == 3
    # the contexts count: 10 trials of 12 GiB (13.2 with headroom) fit their 14.0 GiB caps but not the GPU
    assert "1 GiB per process" in packing.packing_problem(0.1, 12 * GIB, H200)
    assert "not even one trial" in packing.packing_problem(0.5, 200 * GIB, H200)


def test_heaviest_runs_take_the_largest_memory_values(write_space, tmp_path):
    plan = load_plan(write_space(PACKED), launch_dir=tmp_path)
    runs = packing.heaviest_runs(plan)
    assert set(runs) == {"fixmatch", "fixmatch_daso"}
    for preset, run in runs.items():
        assert run["train"]["batch_size"] == 128 and run["model"]["widen"] == 4
        assert run["method"]["preset"] == preset
        assert run["optim"]["lr"] == 0.03  # not a memory field: the default, not the range's end (0.1)
    assert runs["fixmatch_daso"]["method"]["daso"]["queue_len"] == 512
    assert runs["fixmatch"]["method"]["daso"] is None
    assert runs["fixmatch"]["data"]["root"].startswith(str(tmp_path))  # anchored for trials on other nodes


def test_check_packing_refuses_naming_the_share_and_the_probe(write_space, tmp_path):
    plan = load_plan(write_space(PACKED), launch_dir=tmp_path)
    fits = {"fixmatch": {"peak_bytes": 8 * GIB, "total_bytes": H200, "device": "NVIDIA H200"}}
    assert packing.check_packing(plan, measure=lambda p: fits) == fits
    assert "4 trials per GPU (NVIDIA H200, 140.4 GiB)" in packing.describe(fits, 0.25)
    too_big = {**fits, "fixmatch_daso": {"peak_bytes": 40 * GIB, "total_bytes": H200, "device": "NVIDIA H200"}}
    with pytest.raises(ConfigError) as err:
        packing.check_packing(plan, measure=lambda p: too_big)
    message = str(err.value)
    assert str(plan.source) in message and "resources.gpu: 0.25 packs 4 trials" in message
    assert "preset fixmatch_daso on NVIDIA H200" in message and '"train.batch_size": 128' in message

    def broken(p):
        raise RuntimeError("the memory probe needs a CUDA device; none is visible to this process")

    with pytest.raises(ConfigError, match="probe that checks they fit failed: the memory probe needs a CUDA"):
        packing.check_packing(plan, measure=broken)


@pytest.mark.parametrize("resources", ["{cpu: 1, gpu: 0}", "{gpu: 1}", "{cpu: 1, gpu: 0.5, probe_memory: false}"])
def test_no_probe_without_packing(write_space, tmp_path, resources):
    plan = load_plan(write_space(PACKED.replace("{cpu: 1, gpu: 0.25}", resources)), launch_dir=tmp_path)

    def never(p):
        raise AssertionError("probed")

    assert packing.check_packing(plan, measure=never) is None


@pytest.mark.slow
def test_probe_runs_as_a_ray_task_placed_like_a_trial(write_space, tmp_path, monkeypatch):
    """A real local Ray with one (declared) GPU: the probe task asks for the trial's 0.25 GPU and runs there; on
    this machine it finds no CUDA device, and the refusal says so before any trial starts."""
    import ray

    plan = load_plan(write_space(PACKED), launch_dir=tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # address="local": a Ray of its own, not a cluster an earlier test left running (whose address Ray would find)
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ConfigError, match="probe that checks they fit failed: .*the memory probe needs a CUDA"):
            packing.check_packing(plan)
        # a trial's process caps its CUDA memory at the share Ray assigned it (CUDA stood in for: none here)
        caps = ray.get(ray.remote(_cap_with_stand_in_cuda).options(num_cpus=0.5, num_gpus=0.25).remote())
        assert caps == (0.25, [0.25])
        whole = ray.get(ray.remote(_cap_with_stand_in_cuda).options(num_cpus=0.5, num_gpus=1).remote())
        assert whole == (None, [])
    finally:
        ray.shutdown()
    assert _cap_with_stand_in_cuda(monkeypatch.setattr) == (None, [])  # in the driver: no share, no cap


def _cap_with_stand_in_cuda(setattr_=setattr):
    """cap_gpu_memory with torch.cuda's availability and memory cap stood in for (in a Ray worker, which ends
    with the test's Ray; in the driver through monkeypatch)."""
    import torch

    from trainables.ray_trainable import cap_gpu_memory

    fractions = []
    setattr_(torch.cuda, "is_available", lambda: True)
    setattr_(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device=None: fractions.append(fraction))
    return cap_gpu_memory(), fractions


def test_probe_configuration_turns_every_component_on(write_space, tmp_path):
    from trainables.probe import probe_config

    plan = load_plan(write_space(PACKED.replace("fixmatch_daso]", "fixmatch_daso_drw]")), launch_dir=tmp_path)
    run = packing.heaviest_runs(plan)["fixmatch_daso_drw"]
    cfg = probe_config(run, steps=3)
    assert cfg.train.device == "cuda" and cfg.train.iterations == 3 and cfg.train.batch_size == 128
    assert cfg.method.daso.warmup == 0 and cfg.method.drw.start == 0
    assert probe_config(packing.heaviest_runs(plan)["fixmatch"], 3).method.daso is None


@pytest.mark.parametrize("preset", ["fixmatch_darp", "fixmatch_acr", "fixmatch_crest_plus"])
def test_probe_configuration_of_the_baselines_is_valid_and_active(preset):
    """3 iterations of a 5-generation CReST would not validate: the probe runs one generation; DARP refines and ACR
    estimates from the first step."""
    from trainables.probe import probe_config

    cfg = probe_config({"method": {"preset": preset}}, steps=3)
    assert cfg.train.iterations == 3
    m = cfg.method
    active = {
        "fixmatch_darp": lambda: (m.darp.warmup, m.darp.every) == (0.0, 1),
        "fixmatch_acr": lambda: (m.acr.epoch, m.acr.est_epoch) == (1, 0),
        "fixmatch_crest_plus": lambda: m.crest.generations == 1,
    }
    assert active[preset]()


def test_probe_refuses_without_cuda():
    from trainables.probe import peak_memory

    with pytest.raises(RuntimeError, match="needs a CUDA device"):  # this machine has none
        peak_memory({"model": {"depth": 10, "widen": 1}})
