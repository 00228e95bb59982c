"""Summarise a grid of runs (DIR/<preset>/seed<S>/metrics.jsonl) as a mean +- std table over seeds, and read the
papers' claims off it.

    python -m trainables.report DIR [--claims]

Only finished runs (with artifacts/) count. Test metrics and the mask ratio are the final evaluation's. Pseudo-label
metrics are the mean over the evaluation windows of the second half of training (one window alone is too noisy).
`pl/` is the confident pseudo-label that trains; `pl_linear/` and `pl_semantic/` are DASO's two sources over all
unlabeled samples of the window. "min class PL" is the fewest confident pseudo-labels any class got in the final
window. `--claims` adds, for each claim of the papers, the paired comparisons it rests on: per seed (same data,
same initialisation) the difference with minus without the method, then its mean +- std over seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from trainables.metrics import class_groups, class_key

COLUMNS = [
    ("test/balanced_acc", "final", "test bACC"),
    ("test/recall_head", "final", "test head rec."),
    ("test/recall_tail", "final", "test tail rec."),
    ("train/mask_ratio", "final", "mask ratio"),
    ("pl/min_count", "final", "min class PL"),
    ("pl/recall_head", "late", "PL head rec."),
    ("pl/recall_tail", "late", "PL tail rec."),
    ("pl/precision_tail_pooled", "late", "PL tail prec."),
    ("pl_linear/recall_head", "late", "linear PL head rec."),
    ("pl_linear/recall_tail", "late", "linear PL tail rec."),
    ("pl_semantic/recall_head", "late", "semantic PL head rec."),
    ("pl_semantic/recall_tail", "late", "semantic PL tail rec."),
]
COUNTS = {"pl/min_count"}  # printed as counts, not percentages

# (claim, metric, [(without, with), ...]): each pair compared seed by seed
CLAIMS = [
    (
        "DASO raises tail pseudo-label recall",
        "pl/recall_tail",
        [("fixmatch", "fixmatch_daso"), ("fixmatch_la", "fixmatch_la_daso")],
    ),
    (
        "... at equal tail pseudo-label precision",
        "pl/precision_tail_pooled",
        [("fixmatch", "fixmatch_daso"), ("fixmatch_la", "fixmatch_la_daso")],
    ),
    (
        "... and raises balanced accuracy",
        "test/balanced_acc",
        [("fixmatch", "fixmatch_daso"), ("fixmatch_la", "fixmatch_la_daso")],
    ),
    (
        "DRw raises balanced accuracy",
        "test/balanced_acc",
        [("fixmatch", "fixmatch_drw"), ("fixmatch_la", "fixmatch_la_drw"), ("fixmatch_daso", "fixmatch_daso_drw")],
    ),
    (
        "LA raises balanced accuracy",
        "test/balanced_acc",
        [("fixmatch", "fixmatch_la"), ("fixmatch_daso", "fixmatch_la_daso"), ("fixmatch_drw", "fixmatch_la_drw")],
    ),
    # the baselines' own claims (DARP, CReST, ABC, ACR papers) and DASO's on top of ABC
    (
        "DARP raises balanced accuracy",
        "test/balanced_acc",
        [("fixmatch", "fixmatch_darp"), ("fixmatch_la", "fixmatch_la_darp")],
    ),
    ("CReST raises balanced accuracy", "test/balanced_acc", [("fixmatch", "fixmatch_crest")]),
    ("CReST+ raises it further", "test/balanced_acc", [("fixmatch_crest", "fixmatch_crest_plus")]),
    ("ABC raises balanced accuracy", "test/balanced_acc", [("fixmatch", "fixmatch_abc")]),
    ("DASO raises ABC's balanced accuracy", "test/balanced_acc", [("fixmatch_abc", "fixmatch_abc_daso")]),
    (
        "ACR raises balanced accuracy",
        "test/balanced_acc",
        [("fixmatch", "fixmatch_acr"), ("fixmatch_daso", "fixmatch_acr")],
    ),
    ("... and tail recall", "test/recall_tail", [("fixmatch", "fixmatch_acr")]),
]


def tail_precision_pooled(rows: list[dict[str, float]], tail: list[int]) -> float | None:
    """Precision of all confident tail-class pseudo-labels of the windows together: sum_c correct_c / sum_c count_c
    over tail classes c, with correct_c = precision_c * count_c. The per-class mean `pl/precision_tail` counts a
    class without any confident pseudo-label as precision 0, which says "none" rather than "wrong"."""
    num_classes = sum(k.startswith("pl/count/") for k in rows[0])
    keys = [class_key(c, num_classes) for c in tail]
    correct = assigned = 0.0
    for row in rows:
        for key in keys:
            if f"pl/precision/{key}" not in row:  # no ground truth (e.g. STL-10's unlabeled split): nothing to pool
                continue
            count = row.get(f"pl/count/{key}", 0.0)
            correct += row[f"pl/precision/{key}"] * count
            assigned += count
    return correct / assigned if assigned else None


def run_values(path: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    last = dict(rows[-1])
    counts = [v for k, v in last.items() if k.startswith("pl/count/")]
    if counts:
        last["pl/min_count"] = min(counts)
    late = rows[len(rows) // 2 :]
    out = {}
    counts_file = path.parent / "counts.json"
    if counts_file.is_file():
        tail = class_groups(json.loads(counts_file.read_text())["labeled"])["tail"].tolist()
        pooled = tail_precision_pooled(late, tail)
        if pooled is not None:
            out["pl/precision_tail_pooled"] = pooled
    for key, when, _ in COLUMNS:
        if key in out:
            continue
        if when == "final" and key in last:
            out[key] = last[key]
        elif when == "late" and all(key in r for r in late):
            out[key] = statistics.fmean(r[key] for r in late)
    return out


def grid_values(root: Path) -> dict[str, dict[str, dict[str, float]]]:
    """preset -> seed directory name -> values, finished runs only."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for preset_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for m in sorted(preset_dir.glob("seed*/metrics.jsonl")):
            if (m.parent / "artifacts").is_dir():
                out.setdefault(preset_dir.name, {})[m.parent.name] = run_values(m)
    return out


def mean_std(vals: list[float]) -> str:
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.1f} +- {std:.1f}"


def claims(root: Path) -> str:
    """One row per (claim, pair): both presets' mean +- std and the paired per-seed difference (points of %)."""
    grid = grid_values(root)
    lines = [
        "| claim | metric | without | with | without (%) | with (%) | with - without, paired (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim, key, pairs in CLAIMS:
        for without, with_ in pairs:
            seeds = sorted(set(grid.get(without, {})) & set(grid.get(with_, {})))
            seeds = [s for s in seeds if key in grid[without][s] and key in grid[with_][s]]
            if not seeds:
                continue
            a = [100 * grid[without][s][key] for s in seeds]
            b = [100 * grid[with_][s][key] for s in seeds]
            diff = [y - x for x, y in zip(a, b, strict=True)]
            lines.append(
                f"| {claim} | {key} | {without} | {with_} | {mean_std(a)} | {mean_std(b)} | {mean_std(diff)} |"
            )
    return "\n".join(lines) + "\n"


def summarise(root: Path) -> str:
    header = "| preset | seeds | " + " | ".join(title for _, _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for preset, by_seed in grid_values(root).items():
        runs = list(by_seed.values())
        cells = []
        for key, _, _ in COLUMNS:
            vals = [(1 if key in COUNTS else 100) * r[key] for r in runs if key in r]
            if not vals:
                cells.append("-")
            elif key in COUNTS:
                cells.append(f"{min(vals):.0f}")  # the fewest over seeds
            else:
                cells.append(mean_std(vals))
        lines.append(f"| {preset} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = [a for a in args if a != "--claims"]
    if len(paths) != 1:
        print("usage: python -m trainables.report DIR [--claims]", file=sys.stderr)
        return 2
    print(summarise(Path(paths[0])))
    if "--claims" in args:
        print(claims(Path(paths[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
