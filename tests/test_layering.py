"""Layers only look down: the training core imports no Ray, Optuna, MLflow or service code."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "optuna", "mlflow", "service"}
ADAPTER = ROOT / "trainables" / "ray_trainable.py"  # the one thin Ray Tune adapter
PURE_MATH = [
    "trainables/losses.py",
    "trainables/methods/base.py",
    "trainables/methods/daso.py",
    "trainables/methods/drw.py",
    "trainables/methods/la.py",
]
# what the method modules may import: torch, a little of the standard library, and the pure-function layer
# itself (the configuration and metrics modules are the registry's and the loop's business)
PURE_ALLOWED = {"torch", "__future__", "math", "dataclasses", "typing", "collections"}
PURE_LAYER = {"trainables.losses", "trainables.methods.base"}


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


def imported_modules(path: Path) -> set[str]:
    """Full names of the modules `path` imports (absolute imports; a relative one is reported as such)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module if node.level == 0 else "." * node.level + (node.module or ""))
    return names


def allowed_in_pure_layer(module: str) -> bool:
    return module.split(".")[0] in PURE_ALLOWED or module in PURE_LAYER


def test_pure_math_imports_torch_and_the_pure_layer_only():
    offenders = {}
    for rel in PURE_MATH:
        extra = sorted(m for m in imported_modules(ROOT / rel) if not allowed_in_pure_layer(m))
        if extra:
            offenders[rel] = extra
    assert offenders == {}


def test_the_layer_check_catches_config_metrics_and_numpy(tmp_path):
    """The allow-list is by module, not by package: `trainables.config` is refused although `trainables` is ours."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import numpy as np\nfrom trainables.config import DasoConfig\nfrom trainables.metrics import per_class\n"
        "from trainables.losses import soft_ce\nimport torch.nn.functional as F\nfrom . import sibling\n"
    )
    refused = sorted(m for m in imported_modules(bad) if not allowed_in_pure_layer(m))
    assert refused == [".", "numpy", "trainables.config", "trainables.metrics"]
