"""The Ray Tune adapter: one Tune trial = one `trainables.loop.train` call. Knows Ray; the loop does not.

The Tune config is the trial's resolved `RunConfig` as a plain dict plus a `service` entry of metadata (ignored
here). A restored trial (a retry after a failure, or `--resume`) gets its latest Tune checkpoint copied back into
`out_dir/checkpoint` and the loop continues from it. Every evaluation is reported with `tune.report`, with the loop's
checkpoint directory when one was written. The last evaluation is reported once training has returned, so its
checkpoint also carries the final per-class table and confusion matrix (`artifacts/`) and the run's own records
(`metrics.jsonl`, `counts.json`, `config.json`): Tune persists every checkpoint to the sweep's storage (a shared
directory or an object store), so the driver's MLflow logger reads them from there wherever the trial ran, and the
trial's folder in storage holds its whole run. Every report also says where the trial ran (`where_running`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ray import tune

from trainables.config import ConfigError, RunConfig, validate

SERVICE_KEY = "service"  # the Tune config's metadata entry (written by service/sampling.py); the rest is the RunConfig
ARTIFACTS = "artifacts"  # the loop's final tables, under out_dir and inside the last Tune checkpoint
RUN_RECORDS = ("metrics.jsonl", "counts.json", "config.json")  # the loop's files that go with the last checkpoint
#: result key of a trial that failed in a way a retry would repeat (training diverged, the GPU ran out of memory, an
#: invalid configuration): the reason; no metrics come with it
NOT_RETRIED = "not_retried"
#: result key of a trial whose checkpoint the sweep's storage refused (full, over quota, read-only): the reason. The
#: driver stops the whole sweep (resumable) on it; the trial waits, unfinished, until then
STORAGE_REFUSED = "storage_refused"
NO_METRICS = (NOT_RETRIED, STORAGE_REFUSED)  # result keys that come without metrics
STORAGE_ERRORS = {errno.ENOSPC: "full", errno.EDQUOT: "over quota", errno.EROFS: "read-only"}


def cap_gpu_memory() -> float | None:
    """Cap this process's CUDA allocations at the GPU share Ray gave the trial (e.g. 0.25 of the device's memory
    when four trials share a GPU), so that a trial outgrowing its share fails alone with an out-of-memory error
    rather than starving the trials beside it. Returns the share set, or None (a whole GPU, or none)."""
    import ray
    import torch

    if not torch.cuda.is_available() or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # run_trial called in a driver (tests): no share was assigned
        return None
    share = context.get_assigned_resources().get("GPU", 0.0)
    if not 0 < share < 1:
        return None
    torch.cuda.set_per_process_memory_fraction(share)
    return share


def run_trial(config: dict[str, Any]) -> None:
    """The function trainable given to `tune.Tuner`."""
    # imported in the worker: the driver, which imports this module for its constants, never needs torch
    import torch

    from trainables.data.cifar import DatasetNotFoundError
    from trainables.loop import CHECKPOINT_DIR, NonFiniteError, train

    # Ray logs a line per persisted checkpoint, i.e. per evaluation of every trial; the sweep's own log says enough
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    context = tune.get_context()
    where = where_running()
    reporter: TuneReporter | None = None
    try:
        run = {k: v for k, v in config.items() if k != SERVICE_KEY}
        cfg: RunConfig = validate(RunConfig, run, source=f"trial {context.get_trial_id()} config")
        cap_gpu_memory()
        out_dir = Path(context.get_trial_dir()) / "run"
        restored = tune.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as src:
                restore_checkpoint(Path(src), out_dir / CHECKPOINT_DIR)
        reporter = TuneReporter(cfg, out_dir, where=where)
        train(cfg, out_dir, report=reporter, resume=restored is not None, progress=False)
        reporter.report_last()
    except NonFiniteError as err:
        # a retry from the last checkpoint would diverge again: end the trial with a result that says why, which the
        # driver records as failed (MLflow FAILED with the reason, Optuna FAIL) instead of letting Tune retry it
        tune.report({"step": err.step, NOT_RETRIED: str(err), **where})
    except (ConfigError, DatasetNotFoundError, torch.OutOfMemoryError) as err:
        # the same configuration with the same data on the same device fails the same way: no blind retries either
        kinds = ((torch.OutOfMemoryError, "out of memory"), (DatasetNotFoundError, "data set missing"))
        what = next((name for kind, name in kinds if isinstance(err, kind)), "invalid configuration")
        step = reporter.step if reporter is not None else 0  # the last evaluation's step in this attempt
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        tune.report({"step": step, NOT_RETRIED: f"{what}: {message}", **where})
    except OSError as err:
        refused = storage_refusal(err)
        if refused is None:
            raise
        # a retry would fail the same way, and so would every other trial: the driver stops the sweep when it sees
        # this, and the trial stays unfinished (its last checkpoint stands) so that --resume continues it
        step = reporter.step if reporter is not None else 0
        tune.report({"step": step, STORAGE_REFUSED: refused, **where})
        while True:
            time.sleep(60)


def storage_refusal(err: BaseException) -> str | None:
    """'full: <message>' (or over quota, read-only) when `err` is the storage refusing a write, else None. pyarrow's
    copies to the sweep's storage raise OSError with the system's message but not always its errno."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError) and err.errno in STORAGE_ERRORS:
        return f"{STORAGE_ERRORS[err.errno]}: {text}"
    for code, what in STORAGE_ERRORS.items():
        if os.strerror(code) in text:
            return f"{what}: {text}"
    return None


def where_running() -> dict[str, str]:
    """The Ray node, the GPU model (or none) and the folder `trainables` was imported from, i.e. the code that runs:
    on a cluster, the copy the driver shipped (Ray's runtime_resources), not a checkout the node happens to have."""
    import ray
    import torch

    import trainables

    gpu = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "none"
    return {
        "ray_node_id": ray.get_runtime_context().get_node_id(),
        "gpu_model": gpu,
        "code_path": str(Path(trainables.__file__).resolve().parent),
    }


def evaluation_index(step: int, eval_every: int) -> int:
    """1-based index of the evaluation at training step `step`; the last one may fall between two cadences."""
    return max(1, math.ceil(step / eval_every))


def restore_checkpoint(src: Path, dst: Path) -> None:
    """Replace the loop's checkpoint directory with a Tune checkpoint's content (minus the final files)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(ARTIFACTS, *RUN_RECORDS))


class TuneReporter:
    """The loop's `report` callback: forwards each evaluation to Tune; holds back the last until training ends."""

    def __init__(self, cfg: RunConfig, out_dir: Path, where: dict[str, str] | None = None):
        self.cfg = cfg
        self.out_dir = out_dir
        self.where = where or {}
        self.last: tuple[dict[str, float], Path | None] | None = None
        self.step = 0  # the last evaluation's step

    def __call__(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        evaluation = evaluation_index(int(metrics["step"]), self.cfg.train.eval_every)
        metrics = {**metrics, "evaluation": evaluation, **self.where}
        self.step = int(metrics["step"])
        if int(metrics["step"]) >= self.cfg.train.iterations:
            self.last = (metrics, checkpoint_dir)
            return
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def report_last(self) -> None:
        if self.last is None:
            return
        metrics, checkpoint_dir = self.last
        final = self.out_dir / "final_report"
        if final.exists():
            shutil.rmtree(final)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, final)
        final.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / ARTIFACTS).is_dir():
            shutil.copytree(self.out_dir / ARTIFACTS, final / ARTIFACTS)
        for name in RUN_RECORDS:
            if (self.out_dir / name).is_file():
                shutil.copy2(self.out_dir / name, final / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(final)))
