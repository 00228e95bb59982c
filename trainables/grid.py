"""Run a grid of single runs (presets x seeds) without Ray, a few processes at a time, then summarise it.

    python -m trainables.grid --config FILE --presets fixmatch fixmatch_daso ... --seeds 0 1 2 --out DIR [--jobs 2]
                              [--set key=value ...]

Each run is FILE with `method.preset=P`, `train.seed=S`, `data.seed=S` and the `--set` overrides, into DIR/P/seedS
(a finished run is skipped, an interrupted one resumed), one CPU thread each. FILE's `method` section may hold the
parameter blocks of several methods (`daso`, `drw`, `la`); each run keeps only the blocks its preset uses, as the
service's sweeps do, and the resolved configuration is written to DIR/P/seedS/run.yaml and trained from there.
The summary table (mean +- std over seeds) is printed and written to DIR/summary.md; see `trainables.report`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from trainables.config import (
    METHOD_BLOCKS,
    PRESETS,
    ConfigError,
    RunConfig,
    deep_merge,
    parse_overrides,
    preset_uses,
    read_yaml,
    validate,
)
from trainables.report import summarise


def preset_config(raw: dict[str, Any], preset: str, sets: list[str]) -> dict[str, Any]:
    """The raw configuration of one grid run: `raw` with `method.preset = preset` and the `--set` overrides,
    keeping only the method blocks the preset uses (an unknown preset is left for validation to report)."""
    merged = deep_merge(raw, parse_overrides([*sets, f"method.preset={preset}"]))
    method = dict(merged.get("method") or {})
    if preset in PRESETS:
        for block in METHOD_BLOCKS:
            if not preset_uses(preset, block):
                method.pop(block, None)
    return {**merged, "method": method}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainables.grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--presets", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    out = Path(args.out)
    jobs = []
    try:
        # an override for a block no chosen preset uses would be dropped from every run unseen
        overridden = parse_overrides(args.overrides).get("method") or {}
        for block in sorted(set(overridden) & set(METHOD_BLOCKS)):
            if not any(p in PRESETS and preset_uses(p, block) for p in args.presets):
                owners = ", ".join(p for p in PRESETS if preset_uses(p, block))
                raise ConfigError(
                    f"--set method.{block}.*: no preset of this grid uses method.{block}; presets that do: {owners}"
                )
        raw = read_yaml(args.config)
        for seed in args.seeds:  # seed-major: an interrupted grid has every preset's first seeds
            for preset in args.presets:
                run_sets = [*args.overrides, f"train.seed={seed}", f"data.seed={seed}"]
                run_raw = preset_config(raw, preset, run_sets)
                source = f"{args.config} with preset {preset}, seed {seed}"
                config = validate(RunConfig, run_raw, source)  # every run is validated before any starts
                jobs.append((out / preset / f"seed{seed}", config))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def run(job):
        run_dir, config = job
        if (run_dir / "artifacts").is_dir():
            return 0
        run_dir.mkdir(parents=True, exist_ok=True)
        run_file = run_dir / "run.yaml"
        run_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        cmd = [sys.executable, "-m", "trainables.train", "--config", str(run_file), "--out", str(run_dir)]
        if (run_dir / "checkpoint").exists():
            cmd.append("--resume")
        t0 = time.monotonic()
        with open(run_dir / "log.txt", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"{run_dir}: exit {rc} after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        return rc

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(run, jobs))
    table = summarise(out)
    (out / "summary.md").write_text(table)
    print(table)
    print(f"{len(jobs)} runs, {args.jobs} at a time, wall time {(time.monotonic() - t0) / 60:.1f} min", file=sys.stderr)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
