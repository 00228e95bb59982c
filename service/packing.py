"""Several trials on one GPU: before the sweep starts, a probe measures a trial's peak GPU memory and a packing that
does not fit is refused.

`resources.gpu: 0.25` lets Ray place four trials on each GPU; Ray divides the GPU's time, not its memory. Each trial
caps its process at its share of the device's memory (`trainables.ray_trainable.cap_gpu_memory`), so a trial that
outgrows it fails alone with an out-of-memory error instead of starving its neighbours; this module makes sure, before
anything runs, that the heaviest trial of the space fits under that cap. The probe (`trainables.probe.peak_memory`:
a few steps with every method component active and one evaluation) runs as a Ray task placed like a trial, once per
preset, on the heaviest values the space can draw for the fields that move memory.
"""

from __future__ import annotations

import json
import math
from typing import Any

from service.plan import Plan, anchor_paths, trial_run_dict
from service.space import Fixed
from trainables.config import ConfigError, RunConfig

#: run-configuration fields whose larger values take more GPU memory; the probe takes each at its largest
MEMORY_FIELDS = (
    "train.batch_size", "train.mu", "train.eval_batch_size", "model.depth", "model.widen",
    "method.daso.queue_len", "data.synthetic.image_size",
)  # fmt: skip
#: per process, outside the caching allocator that the cap and the probe measure: CUDA's context, cuDNN and cuBLAS
CONTEXT_BYTES = 1 * 2**30
HEADROOM = 1.10  # over the probe's peak: fragmentation and the later steps' shapes


def heaviest_runs(plan: Plan) -> dict[str, dict[str, Any]]:
    """One raw run configuration per preset of the space: the base with every searched memory field at its
    largest value (`checked_values` holds the ends of each range)."""
    runs = {}
    for preset in plan.presets:
        values: dict[str, Any] = {}
        for name, param in plan.spec.space.items():
            if param.presets is not None and preset not in param.presets:
                continue
            targets = [t for t in plan.targets(name) if t in MEMORY_FIELDS]
            if not targets:
                continue
            candidates = [param.value] if isinstance(param, Fixed) else param.checked_values()
            numbers = [v for v in candidates if isinstance(v, int | float) and not isinstance(v, bool)]
            if numbers:
                values.update({target: max(numbers) for target in targets})
        run = RunConfig.model_validate(trial_run_dict(plan.base, values, preset)).model_dump(mode="json")
        runs[preset] = anchor_paths(run, plan.launch_dir)
    return runs


def per_gpu(share: float) -> int:
    """Trials Ray places on one GPU when each asks for `share` of it."""
    return math.floor(1.0 / share + 1e-9)


def packing_problem(share: float, peak_bytes: int, total_bytes: int) -> str | None:
    """Why trials that each peak at `peak_bytes` do not fit `per_gpu(share)` to a GPU of `total_bytes`; None if
    they do. A trial's cap is share x total; it must hold the probe's peak with HEADROOM, and the GPU must hold
    every trial's CONTEXT_BYTES besides."""
    n = per_gpu(share)
    need = peak_bytes * HEADROOM
    cap = share * total_bytes
    if need <= cap and n * (need + CONTEXT_BYTES) <= total_bytes:
        return None
    fits = math.floor(total_bytes / (need + CONTEXT_BYTES))
    hint = (
        f"resources.gpu: {1 / fits:.4g} ({fits} per GPU) fits"
        if fits >= 1
        else "not even one trial fits a GPU: lower the batch size or the model"
    )
    gib = 2**30
    return (
        f"resources.gpu: {share:g} packs {n} trials on each GPU, each capped at {cap / gib:.1f} GiB of the GPU's "
        f"{total_bytes / gib:.1f} GiB; a trial peaked at {peak_bytes / gib:.2f} GiB in the probe (with "
        f"{HEADROOM - 1:.0%} headroom {need / gib:.2f} GiB, plus {CONTEXT_BYTES / gib:.0f} GiB per process for "
        f"CUDA's context). {hint}"
    )


def _probe_task(runs: dict[str, dict[str, Any]], steps: int) -> dict[str, dict[str, Any]]:
    from trainables.probe import peak_memory

    return {preset: peak_memory(run, steps) for preset, run in runs.items()}


def probe(plan: Plan, steps: int = 3) -> dict[str, dict[str, Any]]:
    """Run the memory probe on the cluster, placed as a trial is (its CPUs, GPU share and custom resources)."""
    import ray

    r = plan.spec.resources
    options: dict[str, Any] = {"num_cpus": r.cpu, "num_gpus": r.gpu, "resources": dict(r.custom), "max_retries": 0}
    if r.memory_gb is not None:
        options["memory"] = r.memory_gb * 2**30
    task = ray.remote(_probe_task).options(**options)
    return ray.get(task.remote(heaviest_runs(plan), steps))


def check_packing(plan: Plan, measure=probe) -> dict[str, dict[str, Any]] | None:
    """Refuse (ConfigError) a fractional `resources.gpu` whose heaviest trial does not fit its share; returns the
    probe's results, or None when trials do not share GPUs (gpu 0 or a whole number) or `resources.probe_memory`
    is false."""
    share = plan.spec.resources.gpu
    if not 0 < share < 1 or not plan.spec.resources.probe_memory:
        return None
    try:
        results = measure(plan)
    except ConfigError:
        raise
    except Exception as err:  # the probe's own error, from the node it ran on
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{plan.source}: resources.gpu: {share:g} packs {per_gpu(share)} trials on each GPU, and the memory probe "
            f"that checks they fit failed: {reason}. Set resources.probe_memory: false to start without the check"
        ) from err
    for preset, result in results.items():
        problem = packing_problem(share, result["peak_bytes"], result["total_bytes"])
        if problem is not None:
            raise ConfigError(
                f"{plan.source}: {problem}. Probed: preset {preset} on {result['device']}, configuration "
                f"{json.dumps(_memory_values(heaviest_runs(plan)[preset]))}"
            )
    return results


def _memory_values(run: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for path in MEMORY_FIELDS:
        node: Any = run
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[path] = node
    return out


def describe(results: dict[str, dict[str, Any]], share: float) -> str:
    gib = 2**30
    parts = [f"{p} {r['peak_bytes'] / gib:.2f} GiB" for p, r in results.items()]
    device = next(iter(results.values()))
    return (
        f"packing: {per_gpu(share)} trials per GPU ({device['device']}, {device['total_bytes'] / gib:.1f} GiB), "
        f"probe peaks: {', '.join(parts)}: fits"
    )
