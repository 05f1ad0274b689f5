"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel of this interpreter (the
venv's), on the random-weights path, and prints what it promises."""

import math
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tresnet_jax.classes import imagenet_index

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL = "tresnet-jax-test"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec running this interpreter, found before any other through JUPYTER_PATH; the
    kernel's IPython and runtime files stay in the temporary directory."""
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL, prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return KERNEL


def stdout(nb, tag: str) -> str:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, tag
    return "".join(o.text for o in cells[0].outputs if o.output_type == "stream" and o.name == "stdout")


def test_quickstart_runs_on_random_weights(kernel, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store the notebook without outputs"

    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(tmp_path / "no_weights"))  # nothing converted: random weights
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as in a user's kernel (conftest.py sets 4)
    # This checkout's package, whatever else is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)\nprint(sys.prefix)"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(workdir)}}).execute()

    executable, prefix = nb.cells[-1].outputs[0].text.splitlines()
    assert (executable, prefix) == (sys.executable, sys.prefix)

    model = stdout(nb, "model")
    assert "note: random weights" in model
    assert "tresnet_m: 31.4 M parameters, 1000 classes" in model

    lines = stdout(nb, "top5").splitlines()
    assert len(lines) == 5, lines
    rows = [re.fullmatch(r"\s*(\d+\.\d\d)%  (.+) \((n\d{8})\)", line) for line in lines]
    assert all(rows), lines
    percents = [float(row[1]) for row in rows]
    assert percents == sorted(percents, reverse=True)
    assert 0 < sum(percents) <= 100
    wnids = [row[3] for row in rows]
    assert len(set(wnids)) == 5
    assert all(wnid in imagenet_index() for wnid in wnids)

    features = stdout(nb, "features").splitlines()
    assert features[0] == "pooled features: (1, 2048) float32"
    shapes = [re.search(r"\(.*\)", line)[0] for line in features[1:]]
    assert shapes == ["(1, 56, 56, 64)", "(1, 56, 56, 64)", "(1, 28, 28, 128)", "(1, 14, 14, 1024)", "(1, 7, 7, 2048)"]

    assert "head: {'fc': {'bias': (10,), 'kernel': (2048, 10)}}" in stdout(nb, "finetune")
    losses = dict(re.findall(r"loss (before the step|after one step): +(\S+)", stdout(nb, "losses")))
    before, after = float(losses["before the step"]), float(losses["after one step"])
    assert math.isfinite(before)
    assert math.isfinite(after)
    assert abs(before - math.log(10)) < 0.5  # a fresh head predicts nearly uniformly over the 10 classes
    assert after < before - 0.1
