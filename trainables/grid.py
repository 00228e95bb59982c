"""Run a grid of single runs (presets x seeds) without Ray, a few processes at a time, then summarise it.

    python -m trainables.grid --config FILE --presets fixmatch fixmatch_daso ... --seeds 0 1 2 --out DIR [--jobs 2]
                              [--set key=value ...]

Each run is `python -m trainables.train --config FILE --set method.preset=P --set train.seed=S --set data.seed=S`
into DIR/P/seedS (a finished run is skipped, an interrupted one resumed), one CPU thread each. The summary table
(mean +- std over seeds) is printed and written to DIR/summary.md; see `trainables.report`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trainables.config import PRESETS, ConfigError, load_config, preset_uses
from trainables.report import summarise

# presets whose blocks need CPU-scale timing; applied only where the preset has the block
PRESET_SETS = {
    "daso": ["method.daso.warmup=300", "method.daso.window=50"],
    "drw": ["method.drw.start=750", "method.drw.window=100"],
}


def preset_overrides(preset: str, extra: list[str]) -> list[str]:
    out = [f"method.preset={preset}"]
    if preset not in PRESETS:
        return out  # validation reports the bad name with the valid ones
    for block, sets in PRESET_SETS.items():
        if preset_uses(preset, block):
            out += [s for s in sets if not any(e.startswith(s.split("=")[0] + "=") for e in extra)]
    return out


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
        for preset in args.presets:
            sets = preset_overrides(preset, args.overrides) + args.overrides
            for seed in args.seeds:
                run_sets = [*sets, f"train.seed={seed}", f"data.seed={seed}"]
                load_config(args.config, run_sets)  # validate every run before starting any
                jobs.append((out / preset / f"seed{seed}", run_sets))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def run(job):
        run_dir, run_sets = job
        if (run_dir / "artifacts").is_dir():
            return 0
        cmd = [sys.executable, "-m", "trainables.train", "--config", args.config, "--out", str(run_dir)]
        cmd += [a for s in run_sets for a in ("--set", s)]
        if (run_dir / "checkpoint").exists():
            cmd.append("--resume")
        run_dir.mkdir(parents=True, exist_ok=True)
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
