"""The installed commands: ``pip install .`` puts one on the path for every command line the
project declares (``[project.scripts]``), and each answers ``--help`` from the installed package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "tresnet-train": "tresnet_jax.cli.train:main",
    "tresnet-eval": "tresnet_jax.cli.eval:main",
    "tresnet-predict": "tresnet_jax.cli.predict:main",
    "tresnet-convert": "tresnet_jax.cli.convert:main",
    "tresnet-to-torch": "tresnet_jax.cli.to_torch:main",
    "tresnet-export-onnx": "tresnet_jax.cli.export:onnx_main",
    "tresnet-export-stablehlo": "tresnet_jax.cli.export:stablehlo_main",
}


def test_pyproject_declares_the_commands():
    tomllib = pytest.importorskip("tomllib")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == COMMANDS


@pytest.mark.slow
def test_pip_install_puts_every_command_on_the_path_and_each_answers_help(tmp_path):
    # Built from a copy: a build writes build/ and *.egg-info beside the sources.
    source, target = tmp_path / "source", tmp_path / "installed"
    shutil.copytree(ROOT / "tresnet_jax", source / "tresnet_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*install, "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    show_where = [sys.executable, "-c", "import tresnet_jax; print(tresnet_jax.__file__)"]
    where = subprocess.run(show_where, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(target)  # the installed copy, not this checkout
    for name in COMMANDS:
        script = target / "bin" / name
        assert script.is_file(), name
        shown = subprocess.run(
            [sys.executable, str(script), "--help"], env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert shown.stdout.startswith(f"usage: {name} "), shown.stdout[:200]
