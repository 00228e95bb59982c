"""The grid summary and the claims table, on a hand-written grid of two presets x two seeds."""

import json

import pytest

from trainables.report import claims, main, run_values, summarise

# 4 classes; labeled counts 40 > 20 > 10 > 5: head = (0,), medium = (1, 2), tail = (3,) (class_groups, C = 4)
COUNTS = {"labeled": [40, 20, 10, 5]}


def row(step, bacc, mask, count3, prec3, counts=(5, 5, 5)):
    out = {"step": step, "test/balanced_acc": bacc, "train/mask_ratio": mask, "pl/precision_tail": prec3}
    for c, n in enumerate([*counts, count3]):
        out[f"pl/count/c{c:02d}"] = n
        out[f"pl/precision/c{c:02d}"] = prec3 if c == 3 else 1.0
    return out


def write_run(root, preset, seed, rows, finished=True):
    run = root / preset / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "counts.json").write_text(json.dumps(COUNTS))
    if finished:
        (run / "artifacts").mkdir()


@pytest.fixture
def grid(tmp_path):
    # late half = the last two of four evaluations
    write_run(
        tmp_path,
        "fixmatch",
        0,
        [row(1, 0.1, 0, 0, 0), row(2, 0.2, 0, 0, 0), row(3, 0.5, 0.4, 10, 0.5), row(4, 0.6, 0.5, 30, 0.9)],
    )
    write_run(
        tmp_path,
        "fixmatch",
        1,
        [row(1, 0.1, 0, 0, 0), row(2, 0.2, 0, 0, 0), row(3, 0.5, 0.4, 0, 0.0), row(4, 0.7, 0.6, 2, 1.0, (0, 5, 5))],
    )
    write_run(
        tmp_path,
        "fixmatch_daso",
        0,
        [row(1, 0.1, 0, 0, 0), row(2, 0.2, 0, 0, 0), row(3, 0.5, 0.4, 4, 1.0), row(4, 0.8, 0.5, 6, 0.5)],
    )
    write_run(
        tmp_path,
        "fixmatch_daso",
        1,
        [row(1, 0.1, 0, 0, 0), row(2, 0.2, 0, 0, 0), row(3, 0.5, 0.4, 1, 1.0), row(4, 0.75, 0.5, 1, 1.0)],
    )
    write_run(tmp_path, "fixmatch_daso", 2, [row(1, 0.9, 0.9, 9, 1.0)], finished=False)  # unfinished: ignored
    return tmp_path


def test_pooled_tail_precision_weighs_classes_by_their_pseudo_labels(grid):
    """fixmatch seed 0, tail class 3 over the late windows: (0.5 * 10 + 0.9 * 30) / 40 = 0.8; the per-class mean
    would be (0.5 + 0.9) / 2 = 0.7. Seed 1: a window without tail pseudo-labels adds nothing: 1.0 * 2 / 2 = 1."""
    values = run_values(grid / "fixmatch" / "seed0" / "metrics.jsonl")
    assert values["pl/precision_tail_pooled"] == pytest.approx(0.8)
    assert values["train/mask_ratio"] == 0.5 and values["pl/min_count"] == 5
    assert run_values(grid / "fixmatch" / "seed1" / "metrics.jsonl")["pl/precision_tail_pooled"] == pytest.approx(1.0)


def test_summary_counts_finished_runs_with_mean_and_std(grid):
    lines = summarise(grid).splitlines()
    fixmatch = next(line for line in lines if line.startswith("| fixmatch |"))
    cells = [c.strip() for c in fixmatch.split("|")[1:-1]]
    # bACC (60, 70): mean 65.0, std 7.1; min class PL over seeds: 0 (seed 1's class 0)
    assert cells[:3] == ["fixmatch", "2", "65.0 +- 7.1"]
    assert "0" in cells
    daso = next(line for line in lines if line.startswith("| fixmatch_daso |"))
    assert "| 2 |" in daso


def test_claims_are_paired_by_seed(grid):
    """DASO minus FixMatch, seed by seed: bACC (80 - 60, 75 - 70) = (20, 5): 12.5 +- 10.6; pooled tail precision
    seed 0 (1.0 * 4 + 0.5 * 6) / 10 = 70 vs 80 -> -10, seed 1 100 vs 100 -> 0: -5.0 +- 7.1."""
    table = claims(grid)
    bacc = next(line for line in table.splitlines() if "raises balanced accuracy" in line and "fixmatch_daso |" in line)
    assert bacc.rstrip().endswith("| 12.5 +- 10.6 |")
    precision = next(line for line in table.splitlines() if "precision" in line)
    assert precision.rstrip().endswith("| -5.0 +- 7.1 |")
    assert "fixmatch_la" not in table  # pairs without runs are left out


def test_cli_usage(grid, capsys):
    assert main([str(grid), "--claims"]) == 0
    assert "with - without, paired" in capsys.readouterr().out
    assert main([]) == 2
