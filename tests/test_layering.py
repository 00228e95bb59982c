"""Layers only look down: the training core imports no Ray, Optuna, MLflow or service code."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "optuna", "mlflow", "service"}
ADAPTER = ROOT / "trainables" / "ray_trainable.py"  # the one thin Ray Tune adapter
PURE_MATH = [
    "trainables/losses.py",
    "trainables/methods/daso.py",
    "trainables/methods/drw.py",
    "trainables/methods/la.py",
]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_training_core_imports_no_service_framework():
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN)
        for p in (ROOT / "trainables").rglob("*.py")
        if p != ADAPTER and imported_roots(p) & FORBIDDEN
    }
    assert offenders == {}


def test_pure_math_imports_torch_only():
    allowed = {"torch", "__future__", "math", "dataclasses", "typing", "collections", "trainables"}
    for rel in PURE_MATH:
        path = ROOT / rel
        if path.exists():
            extra = imported_roots(path) - allowed
            assert not extra, f"{rel} imports {sorted(extra)}"
