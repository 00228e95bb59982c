"""Summarise a grid of runs (DIR/<preset>/seed<S>/metrics.jsonl) as a mean +- std table over seeds.

    python -m trainables.report DIR

Only finished runs (with artifacts/) count. Test metrics are the final evaluation's. Pseudo-label metrics are the
mean over the evaluation windows of the second half of training (one window alone is too noisy). `pl/` is the
confident pseudo-label that trains; `pl_linear/` and `pl_semantic/` are DASO's two sources over all unlabeled
samples of the window.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = [
    ("test/balanced_acc", "final", "test bACC"),
    ("test/recall_head", "final", "test head rec."),
    ("test/recall_tail", "final", "test tail rec."),
    ("pl/recall_tail", "late", "PL tail rec."),
    ("pl/precision_tail", "late", "PL tail prec."),
    ("pl_linear/recall_tail", "late", "linear PL tail rec."),
    ("pl_semantic/recall_tail", "late", "semantic PL tail rec."),
]


def run_values(path: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    late = rows[len(rows) // 2 :]
    out = {}
    for key, when, _ in COLUMNS:
        if when == "final" and key in rows[-1]:
            out[key] = rows[-1][key]
        elif when == "late" and all(key in r for r in late):
            out[key] = statistics.fmean(r[key] for r in late)
    return out


def summarise(root: Path) -> str:
    header = "| preset | seeds | " + " | ".join(title for _, _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for preset_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        finished = [m for m in sorted(preset_dir.glob("seed*/metrics.jsonl")) if (m.parent / "artifacts").is_dir()]
        runs = [run_values(m) for m in finished]
        if not runs:
            continue
        cells = []
        for key, _, _ in COLUMNS:
            vals = [100 * r[key] for r in runs if key in r]
            if not vals:
                cells.append("-")
            else:
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.fmean(vals):.1f} +- {std:.1f}")
        lines.append(f"| {preset_dir.name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1])))
