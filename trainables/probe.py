"""A short probe of one trial's GPU memory: a few training steps and one evaluation, then the allocator's peak.

    python -m trainables.probe [--set path=value ...] [--steps 3]

The service runs it (as a Ray task placed like a trial) before a sweep that packs several trials on one GPU, and
refuses a packing that does not fit (`service.packing`). It needs torch and a CUDA device, nothing else of the
service.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from trainables.config import RunConfig, load_config
from trainables.data import build_data
from trainables.evaluate import Window
from trainables.loop import Run, resolve_runtime


def probe_config(run: dict[str, Any] | RunConfig, steps: int) -> RunConfig:
    """`run` on CUDA for `steps` iterations, DASO's semantic pseudo-label, DRw's pass, DARP's refinement and ACR's
    estimate active from step 0, CReST in one generation."""
    cfg = run if isinstance(run, RunConfig) else RunConfig.model_validate(run)
    dump = cfg.model_dump()
    dump["train"].update(device="cuda", iterations=max(steps, 1))
    if dump["method"].get("daso"):
        dump["method"]["daso"]["warmup"] = 0
    if dump["method"].get("drw"):
        dump["method"]["drw"]["start"] = 0
    if dump["method"].get("darp"):  # refined labels (and an estimate's pass) from the first step
        dump["method"]["darp"].update(warmup=0.0, every=1)
    if dump["method"].get("acr"):  # the distribution estimate from the first step
        dump["method"]["acr"].update(epoch=1, est_epoch=0)
    if dump["method"].get("crest"):  # one generation: a new one rebuilds the same model on a larger labeled set
        dump["method"]["crest"]["generations"] = 1
    return RunConfig.model_validate(dump)


def peak_memory(run: dict[str, Any] | RunConfig, steps: int = 3) -> dict[str, Any]:
    """Peak GPU memory of the training configuration `run`: `steps` training steps with every method component
    active (DASO past its warm-up, DRw's pseudo-label pass) and one evaluation of the validation and test sets.

    Returns peak_bytes (the caching allocator's peak reservation, what a per-process cap limits), total_bytes
    (the device's memory), device (its name). Raises RuntimeError without a CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the memory probe needs a CUDA device; none is visible to this process")
    cfg = probe_config(run, steps)
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run_ = Run(cfg, build_data(cfg.data), resolve_runtime(cfg))
    run_.model.train()
    window = Window()
    for _ in range(steps):
        run_.train_step(window)
    run_.evaluate()
    torch.cuda.synchronize(device)
    out = {
        "peak_bytes": int(torch.cuda.max_memory_reserved(device)),
        "total_bytes": int(torch.cuda.get_device_properties(device).total_memory),
        "device": torch.cuda.get_device_name(device),
    }
    del run_
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trainables.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a run configuration YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    result = peak_memory(load_config(args.config, args.set), args.steps)
    print(json.dumps({**result, "peak_gib": round(result["peak_bytes"] / 2**30, 3)}))


if __name__ == "__main__":
    main()
