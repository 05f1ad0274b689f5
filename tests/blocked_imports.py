"""Run Python in a subprocess where some packages cannot be imported (as on a machine without
them): proves a code path needs neither PyTorch nor TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every finder is wrapped so that the blocked packages are not found at all: ``import`` raises
# ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as when they are not installed.
_BLOCKER = """
import sys
class _Hiding:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)
sys.meta_path[:] = [_Hiding(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def blocker(blocked: set[str]) -> str:
    """Python code that makes ``blocked`` top-level packages unimportable in the process that
    runs it (saved as ``sitecustomize.py`` on ``PYTHONPATH``: in every process started with it)."""
    return _BLOCKER.format(blocked=sorted(blocked))


def run_without(
    blocked: set[str], code: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -c code`` from the repository root with ``blocked`` top-level packages unimportable."""
    return subprocess.run(
        [sys.executable, "-c", blocker(blocked) + code],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
