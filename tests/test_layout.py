"""The package's shape: subpackages by concern whose imports only point downwards, a short top
level, and the whole tree lint- and format-clean."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tresnet_jax"

# What each part may import of the package (besides itself). A module at the top is a part of
# its own; errors, progress and preprocessing (the record of how images reach a model) are the
# floor everything stands on.
BASE = {"errors", "progress", "preprocessing"}
ALLOWED = {
    "errors": set(),
    "progress": set(),
    "preprocessing": {"errors"},
    "runtime": {"errors"},
    "model": {"errors", "preprocessing"},
    "data": {"errors", "preprocessing"},
    "weights": {"errors", "preprocessing", "model"},
    "evaluation": BASE | {"data", "runtime", "metrics"},
    "factory": BASE | {"model", "weights"},
    "train": BASE | {"model", "weights", "factory", "data", "runtime", "evaluation"},
    "export": BASE | {"model", "weights", "data", "runtime"},
    "metrics": set(),
    "nnx": {"model", "factory"},
    "cli": BASE | {"runtime", "model", "weights", "factory", "data", "train", "evaluation", "export", "metrics", "nnx"},
    "__init__": BASE | {"model", "weights", "factory", "runtime", "metrics", "train"},
}


def part_of(module: str) -> str:
    """``tresnet_jax.model.linen`` -> ``model``; ``tresnet_jax.cli`` -> ``cli``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def package_imports(path: Path) -> set[str]:
    """Every ``tresnet_jax.*`` module a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tresnet_jax"):
            found.add(node.module)
            if node.module == "tresnet_jax":
                found.update(f"tresnet_jax.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tresnet_jax."))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_each_part_imports_only_the_parts_below_it():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    wrong = []
    for path in files:
        here = module_name(path)
        part = part_of(here) if here != "tresnet_jax" else "__init__"
        assert part in ALLOWED, f"{path}: a part the layering does not know; add it to ALLOWED"
        for imported in package_imports(path):
            target = part_of(imported)
            if target != part and target not in ALLOWED[part]:
                wrong.append(f"{here} imports {imported}")
    assert not wrong, "imports against the layering: " + "; ".join(wrong)


def test_the_layering_check_sees_an_upward_import(tmp_path):
    """The check above can fail: an import of weights from model is found, also inside a function."""
    path = tmp_path / "tresnet_jax" / "model" / "bad.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    from tresnet_jax.factory import load\n    return load\n")
    assert package_imports(path) == {"tresnet_jax.factory"}
    assert "weights" not in ALLOWED[part_of("tresnet_jax.model.bad")]


def test_the_top_level_is_short_and_every_part_imports():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert subpackages == ["cli", "data", "model", "runtime", "train", "weights"]
    for name in subpackages:
        module = importlib.import_module(f"tresnet_jax.{name}")
        assert module.__doc__, f"tresnet_jax.{name} has no docstring"
        assert "May import" in module.__doc__, f"tresnet_jax.{name} does not say what it may import"


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["ruff-check", "ruff-format"])
def test_ruff_is_clean(check):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *check, "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
