"""The real single-run CLI, end to end for a few steps on the synthetic data set."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "trainables/configs/cpu_synthetic.yaml"
SMALL = [
    "--set", "train.iterations=4", "--set", "train.eval_every=2", "--set", "data.n1=20", "--set", "data.m1=40",
    "--set", "data.synthetic.pool_per_class=80", "--set", "data.synthetic.test_per_class=5",
]  # fmt: skip


def run_cli(*args):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "trainables.train", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)  # fmt: skip


def test_cli_runs_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--config", str(CONFIG), *SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "it/s" in proc.stderr and "ETA" in proc.stderr  # progress
    assert "labeled" in proc.stderr  # the per-class counts table
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert json.loads(proc.stdout)["step"] == 4
    assert (out / "checkpoint" / "state.pt").is_file()

    again = run_cli("--config", str(CONFIG), *SMALL, "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = run_cli("--config", str(CONFIG), *SMALL, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == json.loads(proc.stdout)


def test_cli_reports_missing_dataset_files_with_exit_2(tmp_path):
    proc = run_cli("--config", str(CONFIG), "--set", "data.dataset=cifar10", "--set", "data.download=false",
                   "--set", f"data.root={tmp_path}", "--out", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "download" in proc.stderr


def test_cli_exits_2_before_loading_data(tmp_path):
    """A bad field stops the CLI with exit code 2, a message naming it, and no output directory written."""
    out = tmp_path / "out"
    proc = run_cli("--config", str(CONFIG), "--set", "method.preset=daso", "--out", str(out))
    assert proc.returncode == 2
    assert "method.preset" in proc.stderr and "fixmatch_daso" in proc.stderr
    assert not out.exists()


def test_cli_bad_set_syntax(tmp_path):
    proc = run_cli("--config", str(CONFIG), "--set", "train.iterations", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "expected key=value" in proc.stderr
