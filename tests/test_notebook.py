"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel of this interpreter (the
venv's), from the one-line pretrained call against a hub cache of random timm weights, and
prints what it promises."""

import math
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.hub_cache import add_repo, timm_files
from tests.reference import random_timm_model
from tresnet_jax.data.classes import imagenet_index

pytestmark = pytest.mark.slow  # processes of their own: not in the fast tier

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


@pytest.fixture
def hub_cache(tmp_path):
    """timm's default tresnet_m weights (random values) in a Hugging Face cache, as the hub
    would serve them."""
    model = random_timm_model("tresnet_m", 1000, seed=3)
    files = timm_files({k: v.numpy() for k, v in model.state_dict().items()}, "tresnet_m", 1000)
    add_repo(tmp_path / "hub", "timm/tresnet_m.miil_in21k_ft_in1k", files)
    return tmp_path / "hub"


def losses(text: str, name: str) -> list[float]:
    values = [float(v) for v in re.findall(rf"{name} step \d: loss (\S+)", text)]
    assert len(values) == 3, text
    assert all(math.isfinite(v) for v in values)
    return values


def test_quickstart_runs_from_the_one_line_pretrained_call(kernel, hub_cache, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store the notebook without outputs"
    one_line = 'model, variables = tresnet_jax.create_model("tresnet_m", pretrained=True)'
    assert code[0].source == f"import tresnet_jax\n\n{one_line}"

    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(tmp_path / "weights"))  # nothing converted yet
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as in a user's kernel (conftest.py sets 4)
    # This checkout's package, whatever else is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)\nprint(sys.prefix)"))
    # Run where Jupyter runs it: in the notebook's folder (it reads images/). Raises
    # CellExecutionError, with the cell and its traceback, if any cell fails.
    where = {"metadata": {"path": str(NOTEBOOK.parent)}}
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources=where).execute()

    executable, prefix = nb.cells[-1].outputs[0].text.splitlines()
    assert (executable, prefix) == (sys.executable, sys.prefix)
    assert (tmp_path / "weights" / "tresnet_m.miil_in21k_ft_in1k" / "metadata.json").is_file()

    metadata = stdout(nb, "metadata")
    assert "tresnet_m.miil_in21k_ft_in1k: 31.4 M parameters, 1000 classes, hub revision 0123456789ab" in metadata
    assert "reported ImageNet top-1: 83.09" in metadata

    lines = stdout(nb, "top5").splitlines()
    assert lines[0] == "(224, 224, 3) float32"
    rows = [re.fullmatch(r"\s*(\d+\.\d\d)%  (.+) \((n\d{8})\)", line) for line in lines[1:]]
    assert len(rows) == 5
    assert all(rows), lines
    percents = [float(row[1]) for row in rows]
    assert percents == sorted(percents, reverse=True)
    assert 0 < sum(percents) <= 100
    assert len({row[3] for row in rows}) == 5
    assert all(row[3] in imagenet_index() for row in rows)

    features = stdout(nb, "features").splitlines()
    assert features[0] == "pooled features: (1, 2048) float32"
    shapes = [re.search(r"\(.*\)", line)[0] for line in features[1:6]]
    assert shapes == ["(1, 56, 56, 64)", "(1, 56, 56, 64)", "(1, 28, 28, 128)", "(1, 14, 14, 1024)", "(1, 7, 7, 2048)"]
    assert features[6] == "out_indices=(2, 3): [(1, 28, 28, 128), (1, 14, 14, 1024)]"

    linen = stdout(nb, "linen")
    assert "head: {'fc': {'bias': (4,), 'kernel': (2048, 4)}}" in linen
    # A fresh 4-class head starts near uniform (log 4), and the steps lower the loss on their batch.
    for values in (losses(linen, "linen"), losses(stdout(nb, "nnx"), "nnx")):
        assert abs(values[0] - math.log(4)) < 0.5
        assert values[2] < values[0] - 0.05
    assert "pooled features: (1, 2048)" in stdout(nb, "nnx")

    recipe = stdout(nb, "recipe")
    assert "recipe voc2007, aims at 96.0 mAP" in recipe
    assert "  loss = asl" in recipe
    assert "asymmetric loss: {'gamma_neg': 4.0, 'gamma_pos': 0.0, 'clip': 0.05}" in recipe
    multilabel = stdout(nb, "multilabel")
    values = losses(multilabel, "asl")
    assert values[2] < values[0] - 0.05, values  # the asymmetric loss falls on its batch
    assert 0 < float(re.search(r"mAP on the four: (\d+\.\d)", multilabel)[1]) <= 100

    decoder = stdout(nb, "ml_decoder").splitlines()
    assert decoder[0] == "collections: ['batch_stats', 'constants', 'params'] | queries: (3, 768)"
    # A probability for each class and photograph: the head's own 3, then the zero-shot head's
    # made-up classes, each with its name.
    rows = [line.split() for line in decoder[1:]]
    photos = ["astronaut", "chelsea", "coffee", "rocket"]
    assert [row[:2] for row in rows] == [[kind, photo] for kind in ("ML-Decoder", "zero-shot") for photo in photos]
    for row in rows[:4]:
        assert len(row) == 2 + 3
        assert all(0 <= float(p) <= 1 for p in row[2:])
    for row in rows[4:]:
        assert row[2::2] == ["glimmerfox", "snorkelwhale", "quibbit", "zentacle", "flumph"]
        assert all(0 <= float(p) <= 1 for p in row[3::2])
