"""Single training run without Ray.

    python -m trainables.train --config FILE [--set key=value ...] [--out DIR] [--resume]

The configuration is validated before any data is read; a bad file, field or value exits with code 2 and a message
naming the field and what is valid. Output: DIR/metrics.jsonl, DIR/checkpoint/, DIR/artifacts/, DIR/config.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainables.config import ConfigError, load_config

EXIT_DIVERGED = 3  # training produced a non-finite loss or weight
EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainables.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run configuration (YAML)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set train.iterations=2000 --set method.preset=fixmatch_daso",
    )
    ap.add_argument("--out", help="output directory (default: runs/<name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out or Path("runs") / cfg.name)
    if not args.resume and (out / "checkpoint").exists():
        print(
            f"error: {out} already holds a run with a checkpoint; pass --resume to continue it or choose another --out",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT

    from trainables.data import build_data  # after validation: these pull in torch
    from trainables.loop import NonFiniteError, train

    try:
        data = build_data(cfg.data)
    except (FileNotFoundError, ValueError) as err:  # missing files, too few images for the requested split
        print(f"error: data: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        final = train(cfg, out, resume=args.resume, data=data)
    except NonFiniteError as err:  # the checkpoint holds the last finite state; a resume would diverge again
        print(
            f"error: {err}; lower optim.lr or check the data (the checkpoint holds the last finite state)",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    keys = ["step", "test/top1", "test/balanced_acc", "test/recall_head", "test/recall_tail", "val/balanced_acc_med20"]
    print(json.dumps({k: final[k] for k in keys if k in final}, indent=1))
    print(f"metrics: {out / 'metrics.jsonl'}  checkpoint: {out / 'checkpoint'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
